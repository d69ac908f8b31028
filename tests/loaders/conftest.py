"""Real image-folder trees and FFCV files shared by the loader tests (built once per session)."""
from pathlib import Path

import pytest

from realdata import make_imagefolder_tree


@pytest.fixture(scope="session")
def png_tree(tmp_path_factory) -> Path:
    """foolbox's real CIFAR-10 PNGs: 40 train files (20 images x 2), 10 val, 8 classes."""
    root = tmp_path_factory.mktemp("png_tree")
    make_imagefolder_tree(root, "cifar10", copies=2)
    return root


@pytest.fixture(scope="session")
def png_bundle(png_tree):
    from engine.data import DataConfig, build_data

    return build_data(DataConfig(name="imagefolder", root=str(png_tree), image_size=32))


@pytest.fixture(scope="session")
def raw_betons(png_bundle, tmp_path_factory) -> Path:
    from engine.loaders.convert_ffcv import convert

    out = tmp_path_factory.mktemp("betons")
    convert(png_bundle, out, fixed_size=32, fmt="raw", workers=1)
    return out
