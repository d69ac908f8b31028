"""Pretraining at speed: bf16 autocast follows fp32 closely for MoCo v2 and the supervised teacher, MoCo's
key encoder and queue stay fp32, and ssl.precision and DeepSpeed's autocast are one switch.

Tolerances (digits, 10 images per class, ConvNet width 16, batch 32, 6 SGD steps, CPU bf16 autocast): each
step's loss within 0.5% of fp32's and every weight tensor's distance from the fp32 run at most 20% of how far
fp32 moved it from the common start (measured: loss 0.015% MoCo v2 / 0.011% supervised, weights 7.1% / 4.3%).
"""
import pytest
import torch

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.evaluate.stage import random_real_subset
from engine.models import build_model
from engine.squeeze.augment import spec_for
from engine.squeeze.losses import momentum_update
from engine.squeeze.pretrain import Schedule, train
from engine.squeeze.ssl import METHODS, MoCoSettings, SupervisedSettings
from engine.training.precision import cpu_has_native_bf16
from engine.training.trainers import DeepSpeedSettings, deepspeed_config
from teachers import SMALL_MODEL
from recording_logger import Recorder, assert_bf16_losses_follow_fp32

LOSS_RTOL = 0.005
WEIGHT_SHARE = 0.2


@pytest.fixture(scope="module")
def digits():
    bundle = build_data(DataConfig(name="digits"))
    return bundle, random_real_subset(bundle, 10, seed=0).dataset


def _settings(name: str):
    if name == "mocov2":
        return MoCoSettings(epochs=2, batch_size=32, lr=0.06, queue_size=64, shuffle_groups=2)
    return SupervisedSettings(epochs=2, batch_size=32, lr=0.05, augment="weak")


def _pretrain(digits, name: str, precision: str, tmp_path):
    bundle, train_set = digits
    settings = _settings(name)
    torch.manual_seed(0)
    model = build_model(SMALL_MODEL, 10, 1, bundle.image_size)
    generator = torch.Generator().manual_seed(5)
    method = METHODS[name].build(model, settings, generator)
    start = {k: v.clone() for k, v in method.state_dict().items()}
    recorder = Recorder()
    history = train(method, train_set, schedule=Schedule(settings.epochs, settings.batch_size, settings.lr,
                                                         settings.momentum, settings.weight_decay),
                    spec=spec_for(settings.augment, bundle.image_size, False), normalize=bundle.normalize,
                    device=torch.device("cpu"), generator=generator, state_path=tmp_path / f"{precision}.pt",
                    fingerprint={"precision": precision}, resume=False, progress=False, precision=precision,
                    logger=recorder)
    return method, start, recorder, history


@pytest.mark.parametrize("name", ["mocov2", "supervised"])
def test_bf16_pretraining_follows_fp32(digits, name, tmp_path):
    fp32, start, rec32, _ = _pretrain(digits, name, "fp32", tmp_path)
    bf16, _, rec16, history = _pretrain(digits, name, "bf16", tmp_path)
    assert_bf16_losses_follow_fp32(rec32, rec16, 6, LOSS_RTOL)
    for key, w32 in fp32.state_dict().items():
        w16 = bf16.state_dict()[key]
        assert w16.dtype == w32.dtype, key  # weights, key encoder, queue, BN statistics: as in fp32
        if w32.is_floating_point() and key != "queue":
            moved = (w32 - start[key]).norm()
            assert (w16 - w32).norm() <= WEIGHT_SHARE * moved + 1e-6, key
    assert [step for step, _ in rec16.rows["epoch/loss"]] == [1, 2]
    assert history[-1]["loss"] == pytest.approx(rec16.rows["epoch/loss"][-1][1])


def test_moco_key_encoder_ema_stays_fp32_under_autocast(digits):
    bundle, train_set = digits
    torch.manual_seed(0)
    method = METHODS["mocov2"].build(build_model(SMALL_MODEL, 10, 1, bundle.image_size), _settings("mocov2"),
                                     torch.Generator().manual_seed(1))
    x = bundle.normalize(train_set.images[:32].float() / 255)
    keys = [p.detach().clone() for p in method._key_params()]
    queries = [p.detach().clone() for p in method._query_params()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.loss([x, x.flip(3)], torch.zeros(32, dtype=torch.long),
                           method.draw(32, torch.Generator().manual_seed(2)))
    assert loss.dtype == torch.float32  # InfoNCE taken in fp32
    expected = [k.clone() for k in keys]
    momentum_update(expected, queries, method.key_momentum)  # the fp32 EMA, outside autocast
    for got, want in zip(method._key_params(), expected):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)  # 1 - m = 0.01 of a weight: bf16 would have rounded it away
    assert method.queue.dtype == torch.float32 and not torch.isnan(method.queue).any()


def test_deepspeed_autocast_follows_ssl_precision_and_refuses_a_contradiction():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device type is read

    def autocasts(settings, device, precision):
        return deepspeed_config(settings, 8, 1, device, precision)["torch_autocast"]["enabled"]

    assert autocasts(DeepSpeedSettings(), cuda, "auto")
    assert autocasts(DeepSpeedSettings(), cpu, "auto") == cpu_has_native_bf16()  # auto on the CPU: bf16 where native
    assert autocasts(DeepSpeedSettings(), cpu, "bf16") and not autocasts(DeepSpeedSettings(), cuda, "fp32")
    assert autocasts(DeepSpeedSettings(bf16=True), cpu, "auto") and autocasts(DeepSpeedSettings(bf16=True), cpu, "bf16")
    with pytest.raises(ConfigError, match=r"ssl.precision=fp32 contradicts deepspeed.bf16 \(DeepSpeed autocast on\)"):
        deepspeed_config(DeepSpeedSettings(bf16=True), 8, 1, cpu, "fp32")
    with pytest.raises(ConfigError, match="ssl.precision=bf16 contradicts deepspeed.extra"):
        deepspeed_config(DeepSpeedSettings(extra={"torch_autocast": {"enabled": False}}), 8, 1, cpu, "bf16")
    with pytest.raises(ConfigError, match="ssl.precision='half' is not one of auto|fp32|bf16"):
        MoCoSettings(precision="half")


def test_a_non_finite_loss_stops_pretraining_before_its_epoch_is_saved(digits, tmp_path, monkeypatch):
    """Step losses are read from the device once per epoch; a NaN among them is still one clear error,
    raised before that epoch's checkpoint, so resume=true restarts from the last finite epoch."""
    from engine.squeeze import pretrain

    real_view = pretrain._view
    calls = {"n": 0}

    first_of_epoch_2 = len(digits[1]) // _settings("mocov2").batch_size + 1  # full batches only

    def poisoned(*args):  # the second epoch's first step sees a NaN pixel in its first view (2 views a step)
        view = real_view(*args)
        calls["n"] += 1
        if calls["n"] == 2 * (first_of_epoch_2 - 1) + 1:
            view = view.clone()
            view.view(-1)[0] = float("nan")
        return view

    monkeypatch.setattr(pretrain, "_view", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 2; lower ssl.lr"):
        _pretrain(digits, "mocov2", "fp32", tmp_path)
    saved = torch.load(tmp_path / "fp32.pt", weights_only=False)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["method"].values()
                                       if v.is_floating_point())
