"""Recover's switches for SC-DD's scripts: the CIFAR-100 script's roll-only augmentation (no crop, no
flip) and the scripts' forward roll randint(0, jitter)."""
import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.recover.augment import augment_batch
from engine.recover.settings import RecoverConfig, resolve_augment
from realdata import foolbox_samples

pytestmark = pytest.mark.usefixtures("one_thread")


def cifar_images(count: int) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(path).convert("RGB")) for path, _ in foolbox_samples("cifar10")[:count]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _shift_of(x: torch.Tensor, out: torch.Tensor, jitter: int) -> tuple[int, int]:
    """The (dy, dx) roll in [-jitter, jitter]^2 that turns x into out exactly (fails if none does)."""
    found = [(dy, dx) for dy in range(-jitter, jitter + 1) for dx in range(-jitter, jitter + 1)
             if torch.equal(torch.roll(x, shifts=(dy, dx), dims=(-2, -1)), out)]
    assert found, "the output is not a roll of the input"
    return found[0]


def test_crop_off_applies_the_roll_only():
    x = cifar_images(4)
    aug = resolve_augment(RecoverConfig(crop=False, flip=False, jitter=4, jitter_mode="forward"), 32, 3)
    assert (aug.crop, aug.flip, aug.jitter, aug.jitter_mode) == (False, False, 4, "forward")
    generator = torch.Generator().manual_seed(0)
    shifts = [_shift_of(x, augment_batch(x, aug, generator), 4) for _ in range(60)]
    assert all(0 <= dy <= 4 and 0 <= dx <= 4 for dy, dx in shifts)  # random.randint(0, 4), as the script
    assert len(set(shifts)) > 10


def test_symmetric_roll_reaches_negative_shifts_and_crop_on_still_crops():
    x = cifar_images(2)
    aug = resolve_augment(RecoverConfig(crop=False, flip=False, jitter=2), 32, 3)
    generator = torch.Generator().manual_seed(1)
    shifts = {_shift_of(x, augment_batch(x, aug, generator), 2) for _ in range(60)}
    assert min(min(s) for s in shifts) < 0
    cropped = resolve_augment(RecoverConfig(flip=False, jitter=0, crop_scale=[0.1, 0.2]), 32, 3)
    out = augment_batch(x, cropped, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_bad_jitter_mode_is_one_line():
    with pytest.raises(ConfigError, match="recover.jitter_mode='both'") as info:
        RecoverConfig(jitter_mode="both")
    assert "\n" not in str(info.value)
