"""A student step and a MoCo v2 step never wait for the device, and keep today's CPU results.

On CUDA a copy from pageable host memory makes the host wait for the stream, and a read of a device value
(item(), int(t), nonzero, a boolean mask) waits for everything queued: either keeps the CPU from running
ahead of the GPU. There is no GPU here, so the steps run on the meta device, which holds no data: every read
of a value raises there, and every host->device copy is recorded (tests/gpu/test_sync_free_steps_cuda.py
runs the same steps under CUDA's sync debug mode). After a warm-up step, which makes the cached constants,
a student step makes one copy (images, labels and augmentation parameters together), and so does a MoCo step
(batch, both views' parameters and the shuffle-BN order the method draws).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.ops import roi_align

from engine.evaluate.augment import PARTNER, apply_params, param_tensors, sample_params, step_rng
from engine.models import build_model
from engine.squeeze.ssl import METHODS, MoCoSettings
from engine.squeeze import pretrain
from engine.squeeze.augment import large_image_spec
from engine.training.precision import pack_bytes, to_device_all, unpack_bytes
from sync_steps import cifar_bundle, moco_step, student_step
from teachers import SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

META = torch.device("meta")
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class HostCopies(TorchDispatchMode):
    """Records every copy of a host tensor onto another device, and every tensor built from Python data
    straight onto one (``torch.tensor(..., device=)`` copies below the dispatcher, so it is watched by
    wrapping)."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.copies: list[tuple[int, ...]] = []
        self.active = False
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, self._watch(getattr(torch, name)))

    def _watch(self, make):
        def made(*args, **kwargs):
            out = make(*args, **kwargs)
            if out.device.type != "cpu" and self.active:
                self.copies.append(tuple(out.shape))
            return out
        return made

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _COPIES:
            host = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
            if host and any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves(out)):
                self.copies.append(tuple(host[0].shape))
        return out


def _copies_per_step(monkeypatch, step, steps: int) -> list[int]:
    step()  # warm-up: cached constants (normalize's mean/std, the luma and YIQ matrices) are made here
    counts = []
    recorder = HostCopies(monkeypatch)
    for _ in range(steps):
        before = len(recorder.copies)
        with recorder:
            step()
        counts.append(len(recorder.copies) - before)
    return counts


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return cifar_bundle(tmp_path_factory.mktemp("cifar"))


RECIPES = {
    "rrc-cutmix-kl": dict(loss="kl", crop="rrc", mix="cutmix"),
    "pad-mixup-hard": dict(loss="hard", crop="pad", mix="mixup"),
}


@pytest.mark.parametrize("options", RECIPES.values(), ids=RECIPES.keys())
def test_a_student_step_reads_nothing_back_and_copies_once(cifar, monkeypatch, options):
    step = student_step(cifar, META, SMALL_MODEL, **options)

    def checked():
        loss = step()
        assert loss.device == META and loss.shape == ()

    assert _copies_per_step(monkeypatch, checked, 3) == [1, 1, 1]


def test_a_moco_step_reads_nothing_back_and_copies_once(cifar, monkeypatch, tmp_path):
    step = moco_step(cifar, META, SMALL_MODEL, tmp_path / "state.pt")

    def checked():
        loss = step()
        assert loss.device == META and loss.shape == ()

    assert _copies_per_step(monkeypatch, checked, 3) == [1, 1, 1]


def test_loader_views_come_in_one_copy(cifar, monkeypatch):
    crops = [cifar.train.images[:4], cifar.train.images[4:8]]  # FFCV/DALI: already cropped and flipped
    generator = torch.Generator().manual_seed(0)

    def step():
        views = pretrain._loader_views(crops, 2, large_image_spec(32), generator, cifar.normalize, META)
        assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2

    assert _copies_per_step(monkeypatch, step, 2) == [1, 1]


def test_packed_copy_keeps_every_value_dtype_and_shape():
    tensors = [torch.arange(30, dtype=torch.uint8).view(2, 3, 5), torch.randn(4, 6)[:, 1], torch.tensor([True, False]),
               torch.arange(-3, 4), torch.tensor(2.5, dtype=torch.float64), torch.zeros(0, 3), torch.randn(3, 3).t()]
    buffer, starts = pack_bytes(tensors)
    assert all(start % 16 == 0 for start in starts)
    for original, unpacked in zip(tensors, unpack_bytes(buffer.clone(), starts, tensors)):
        assert unpacked.dtype == original.dtype and unpacked.shape == original.shape
        assert torch.equal(unpacked, original)
    assert all(a is b for a, b in zip(to_device_all(tensors, "cpu"), tensors))  # the CPU: no copy at all
    moved = to_device_all(tensors, META)
    assert [(t.dtype, t.shape, t.device) for t in moved] == [(t.dtype, t.shape, META) for t in tensors]


def _apply_params_unpacked(x, params):
    """apply_params as it was before the parameters were packed: one tensor per field."""
    n, _, height, width = x.shape
    boxes = torch.from_numpy(params.boxes.astype(np.float32))
    rois = torch.stack([torch.arange(n, dtype=torch.float32), boxes[:, 1], boxes[:, 0],
                        boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], dim=1)
    out = roi_align(x, rois, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    out = torch.where(torch.from_numpy(params.flips).view(-1, 1, 1, 1), out.flip(-1), out)
    if params.cutmix_partner is not None:
        top, bottom, left, right = params.cutmix_box
        out[:, :, top:bottom, left:right] = out[torch.from_numpy(params.cutmix_partner), :, top:bottom, left:right]
    if params.mixup_partner is not None:
        out = params.mixup_lam * out + (1.0 - params.mixup_lam) * out[torch.from_numpy(params.mixup_partner)]
    return out


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_packed_student_parameters_give_todays_views_and_partners(cifar, mix):
    x = cifar.normalize(cifar.train.images[:8].float() / 255)
    for step in range(4):
        params = sample_params(step_rng(3, 0, step), 8, 32, (0.08, 1.0), True, 1.0, 1.0, mix=mix)
        assert params.partner is not None
        assert torch.equal(apply_params(x, params), _apply_params_unpacked(x, params))
        assert torch.equal(param_tensors(params)[0][:, PARTNER], torch.from_numpy(params.partner))


def test_moco_queue_pointer_on_the_device_fills_the_queue_as_before():
    settings = MoCoSettings(epochs=1, batch_size=8, queue_size=12, shuffle_groups=2)
    method = METHODS["mocov2"].build(build_model(SMALL_MODEL, 10, 3, 32), settings, torch.Generator().manual_seed(1))
    queue, ptr = method.queue.clone(), 0
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):  # 5 x 5 keys into 12 slots: the pointer wraps twice
        keys = torch.randn(5, settings.proj_dim, generator=generator)
        method._enqueue(keys)
        queue[(torch.arange(5) + ptr) % 12] = keys  # the host-pointer rule it replaces
        ptr = (ptr + 5) % 12
        assert torch.equal(method.queue, queue) and int(method.queue_ptr) == ptr


@pytest.mark.parametrize("channels, draws", [(3, 13), (1, 12)])  # RGB adds the grayscale choice
def test_ssl_views_draw_todays_stream(cifar, channels, draws):
    """Per view, in this order: crop area, ratio, x, y, flip; jitter on/off, brightness, contrast, saturation,
    hue; grayscale (RGB); blur on/off, sigma: one torch.rand(n) each, so a generator replays today's views."""
    from engine.squeeze.augment import augment_batch, draw_view_params

    images = cifar.train.images[:6, :channels]
    spec = large_image_spec(32)
    drawn, replayed = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(2):
        augment_batch(images, spec, drawn)
        for _ in range(draws):
            torch.rand(6, generator=replayed)
        assert torch.equal(drawn.get_state(), replayed.get_state())
    params = draw_view_params(6, channels, 32, spec, torch.Generator().manual_seed(4))
    uniforms = torch.rand(draws, 6, generator=torch.Generator().manual_seed(4))
    flip = torch.where(uniforms[4] < 0.5, -1.0, 1.0)
    assert torch.equal(params[:, 0] * flip > 0, torch.ones(6, dtype=torch.bool))  # width * sign: the sign is the flip
    kernels = params[:, -3:]  # 32 px: a 3-tap Gaussian (side taps > 0 even at sigma 0.1), or the identity
    assert torch.equal(kernels[:, 0] == 0, uniforms[-2] >= spec.blur_prob)
