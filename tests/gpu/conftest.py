"""The GPU tier: compiled Triton kernels on CUDA tensors, CUDA determinism, the bench on CUDA.

Run it alone, on a machine with a CUDA GPU:

    TRITON_INTERPRET=0 pytest -m gpu tests/gpu        # or: make test-gpu

Every test module here carries ``pytestmark = pytest.mark.gpu``; tests/conftest.py deselects the
marker in every other run (``make test`` reports them as deselected) and keeps Triton's interpreter
off when ``-m gpu`` selects this tier, so the kernels compile.
"""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _cuda_and_compiled_triton():
    assert torch.cuda.is_available(), ("the GPU tier needs a CUDA GPU; on a CPU-only machine run `make test`, "
                                       "which deselects it")
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), (
        "TRITON_INTERPRET is on: the GPU tier runs the compiled kernels; run "
        "`TRITON_INTERPRET=0 pytest -m gpu tests/gpu`")


@pytest.fixture
def no_tf32():
    """Full fp32 matrix products and convolutions (comparisons against a reference path)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's deterministic algorithms, no autotuning (graphed against eager runs compare the same kernels)."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


DIGITS32_IPC = 20  # the GPU graph tests count their steps from it
"""Images per class of ``digits32``'s training subset: 200 images."""


@pytest.fixture(scope="module")
def digits32():
    """(digits at 32 px in 3 channels, a random real subset of DIGITS32_IPC per class): real images at
    shapes ResNet-18 takes, small enough for whole trainings."""
    from engine.data import DataConfig, build_data
    from engine.evaluate.stage import random_real_subset

    bundle = build_data(DataConfig(name="digits", image_size=32, channels=3))
    return bundle, random_real_subset(bundle, DIGITS32_IPC, seed=0).dataset
