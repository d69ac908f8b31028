"""The loader= config group end to end: a tiny `stage=squeeze` on digits read through DALI and
through FFCV files written by the conversion command (real libraries, no mocks), and its errors."""
import subprocess
import sys

import pytest
import torch

from engine.errors import ConfigError

TINY = ("data=digits", "stage=squeeze", "progress=false", "model.width=16", "model.depth=2",
        "squeeze.epochs=1", "squeeze.probe.epochs=2", "squeeze.teachers=[ssl]")
CHANCE = 0.1  # digits has 10 balanced classes


def _check_teacher(result, run_dir, loader):
    teacher = run_dir / "squeeze" / "ssl" / "teacher.pt"
    assert teacher.is_file()
    row = result["teachers"]["ssl"]
    assert row["probe_top1"] > CHANCE + 0.2, row
    metrics = torch.load(teacher, map_location="cpu", weights_only=False)["metrics"]
    assert metrics["loader"] == loader and metrics["finished"]


def test_squeeze_with_dali(run_scdd, tmp_path):
    result = run_scdd(*TINY, "loader=dali", run_dir=tmp_path / "run")
    _check_teacher(result, tmp_path / "run", "dali")


def test_squeeze_with_ffcv_after_conversion(run_scdd, tmp_path):
    out = tmp_path / "betons"
    done = subprocess.run([sys.executable, "-m", "engine.loaders.convert_ffcv", "--data", "digits",
                           "--out", str(out), "--format", "raw", "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "meta.json").is_file()
    result = run_scdd(*TINY, "loader=ffcv", f"loader.beton_dir={out}", run_dir=tmp_path / "run")
    _check_teacher(result, tmp_path / "run", "ffcv")


def test_ffcv_missing_betons_name_the_conversion_command(run_scdd, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_scdd(*TINY, "loader=ffcv", f"loader.beton_dir={tmp_path / 'nothing'}", run_dir=tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "train.beton is missing" in message
    assert "python -m engine.loaders.convert_ffcv --data digits" in message
    with pytest.raises(ConfigError, match="loader.beton_dir=DIR.*convert_ffcv --data digits"):
        run_scdd(*TINY, "loader=ffcv", run_dir=tmp_path / "run2")
    assert not (tmp_path / "run" / "squeeze" / "ssl").exists()  # failed before any training


def test_unknown_loader_name(run_scdd, tmp_path):
    with pytest.raises(ConfigError, match="unknown loader 'webdataset'"):
        run_scdd(*TINY, "loader.name=webdataset", run_dir=tmp_path / "run")


def test_color_split_replays_augment_batch():
    """augment_batch == its crop/flip grid followed by augment_color (same generator stream)."""
    import torch.nn.functional as F

    from engine.squeeze.augment import _crop_flip_grid, augment_batch, augment_color, small_image_spec

    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    spec = small_image_spec(16)
    whole = augment_batch(images, spec, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    grid = F.affine_grid(_crop_flip_grid(6, spec, gen), [6, 3, 16, 16], align_corners=False)
    views = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border",
                          align_corners=False)
    assert torch.equal(augment_color(views, spec, gen), whole)
