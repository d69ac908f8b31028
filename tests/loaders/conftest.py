"""Real image-folder trees and FFCV files shared by the loader tests (built once per session)."""
from pathlib import Path

import pytest

from realdata import make_imagefolder_tree


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """FFCV's loader calls torch.set_num_threads(loader num_workers) for the whole process; put it back, or
    every later test trains with that many OpenMP threads (35x slower on a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def png_tree(tmp_path_factory) -> Path:
    """foolbox's real CIFAR-10 PNGs: 40 train files (20 images x 2), 10 val, 8 classes."""
    root = tmp_path_factory.mktemp("png_tree")
    make_imagefolder_tree(root, "cifar10", copies=2)
    return root


@pytest.fixture(scope="session")
def png_bundle(png_tree):
    from engine.data import DataConfig, build_data

    # CIFAR files at their native 32 px, evaluated whole (ratio 1): loaders can be checked bit-exact
    return build_data(DataConfig(name="imagefolder", root=str(png_tree), image_size=32, eval_crop_ratio=1.0))


@pytest.fixture(scope="session")
def raw_betons(png_bundle, tmp_path_factory) -> Path:
    from engine.loaders.convert_ffcv import convert

    out = tmp_path_factory.mktemp("betons")
    convert(png_bundle, out, fmt="raw", workers=1)
    return out
