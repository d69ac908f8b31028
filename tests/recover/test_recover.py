"""Recover: BN-loss values and gradients, the optimization, outputs, resume and bad input."""
import shutil

import pytest
import torch
from PIL import Image

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.models import bn_layers
from engine.recover.plan import batches_for_rank, plan_batches
from engine.recover.settings import StepAugment
from engine.recover.synthesize import Objective, synthesize_batch
from engine.artifacts.distilled import DistilledSet
from engine.artifacts.teacher import load_teacher
from kernels import fused_bn_matching
from teachers import MODEL_OVERRIDES, SMALL_MODEL

FAST = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "stage=recover", "progress=false", "recover.log_every=1",
        "recover.ipc_per_batch=1")


def peer_style_bn_losses(model, x):
    """The straightforward peer computation: hooks with permute/contiguous copies and torch.norm."""
    losses = []

    def hook(module, inputs, _output):
        inp = inputs[0]
        nch = inp.shape[1]
        mean = inp.mean([0, 2, 3])
        var = inp.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        losses.append(torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2))

    handles = [bn.register_forward_hook(hook) for bn in bn_layers(model)]
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, losses


def test_bn_loss_value_and_gradient_match_peer_computation(digits_teacher):
    bundle = build_data(DataConfig(name="digits"))
    teacher, _ = load_teacher(digits_teacher, SMALL_MODEL, bundle)
    teacher.eval()
    torch.manual_seed(0)
    x_ref = torch.randn(10, 1, 8, 8, requires_grad=True)
    logits_ref, peer = peer_style_bn_losses(teacher, x_ref)
    (10 * peer[0] + sum(peer[1:]) + logits_ref.sum()).backward()

    x = x_ref.detach().clone().requires_grad_(True)
    with fused_bn_matching(teacher, backend="torch") as modules:
        logits = teacher(x)
        ours = [m.last_loss for m in modules]
        (10 * ours[0] + sum(ours[1:]) + logits.sum()).backward()
    assert len(ours) == len(peer) == 2
    for a, b in zip(ours, peer):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits, logits_ref, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    # the swap is undone: the model has plain BN layers again
    assert len(bn_layers(teacher)) == 2


def _objective(mult=10.0, iterations=30, r_bn=1.0):
    return Objective(r_bn=r_bn, first_bn_multiplier=mult, iterations=iterations, lr=0.25, log_every=1)


def test_loss_falls_pixels_bounded_and_first_multiplier_honoured(digits_teacher):
    bundle = build_data(DataConfig(name="digits"))
    teacher, _ = load_teacher(digits_teacher, SMALL_MODEL, bundle)
    teacher.eval().requires_grad_(False)
    aug = StepAugment(image_size=8, crop_scale=(0.5, 1.0), flip=False, jitter=1)
    bounds = bundle.pixel_bounds()
    labels = torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(10, 1, 8, 8, generator=gen)
    with fused_bn_matching(teacher, backend="torch") as modules:
        result = synthesize_batch(teacher, modules, init, labels, _objective(mult=3.0, iterations=80), aug, bounds,
                                  torch.Generator().manual_seed(1))
    first, last = result.log[0], result.log[-1]
    total = lambda row: row["ce"] + row["bn"]  # noqa: E731
    assert total(last) < 0.7 * total(first) and last["ce"] < first["ce"]
    for row in result.log:
        assert row["bn"] == pytest.approx(3.0 * row["bn0"] + row["bn1"], rel=1e-5)
    low, high = bounds
    assert torch.all(result.images >= low - 1e-6) and torch.all(result.images <= high + 1e-6)
    assert result.images.shape == (10, 1, 8, 8)


def test_first_multiplier_changes_the_images(digits_teacher):
    bundle = build_data(DataConfig(name="digits"))
    teacher, _ = load_teacher(digits_teacher, SMALL_MODEL, bundle)
    teacher.eval().requires_grad_(False)
    aug = StepAugment(image_size=8, crop_scale=(1.0, 1.0), flip=False, jitter=0)
    init = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for mult in (1.0, 10.0):
        with fused_bn_matching(teacher, backend="torch") as modules:
            outs.append(synthesize_batch(teacher, modules, init, torch.arange(10), _objective(mult, 5),
                                         aug, bundle.pixel_bounds(), torch.Generator().manual_seed(1)).images)
    assert not torch.allclose(outs[0], outs[1])


def test_plan_is_fixed_by_config_and_split_across_ranks():
    plan = plan_batches(num_classes=10, ipc=3, classes_per_batch=4)
    assert [b.classes for b in plan[:3]] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [b.ipc_indices[0] for b in plan] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    grouped = plan_batches(num_classes=10, ipc=3, classes_per_batch=5, ipc_per_batch=2)
    assert [b.index for b in grouped] == [0, 1, 2, 3]
    assert grouped[1].classes == (5, 6, 7, 8, 9) * 2 and grouped[1].ipc_indices == (0,) * 5 + (1,) * 5
    assert grouped[3].ipc_indices == (2,) * 5
    # the paper's batching keeps the same batch indices, hence the same seeds
    assert [b.index for b in plan_batches(10, 3, 5)] == [0, 1, 2, 3, 4, 5]
    assert len({b.seed(0) for b in plan}) == len(plan)
    shards = [batches_for_rank(plan, r, 4) for r in range(4)]
    flat = sorted(b.index for s in shards for b in s)
    assert flat == [b.index for b in plan]
    # more processes than batches: the ranks past the last batch get an empty share (they wait)
    assert [len(batches_for_rank(plan, r, 10)) for r in range(10)] == [1] * 9 + [0]
    assert plan_batches(10, 1, None)[0].classes == tuple(range(10))


def test_stage_writes_every_output_and_is_deterministic(run_scdd, digits_teacher, tmp_path):
    args = (*FAST, f"teacher={digits_teacher}", "ipc=[1,2]", "recover.iterations=8")
    result = run_scdd(*args, run_dir=tmp_path / "a")
    out = tmp_path / "a" / "recover" / "supervised-noise"
    payload = DistilledSet.open(out).tensors()
    assert payload["images"].shape == (20, 1, 8, 8) and payload["images"].dtype == torch.uint8
    assert sorted(payload["labels"].tolist()) == sorted(list(range(10)) * 2)
    assert (payload["ipc_index"] < 2).all()
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 20 and {p.parent.name for p in pngs} == {str(c) for c in range(10)}
    with Image.open(out / "grid.png") as grid:
        grid.verify()
    log = (out / "loss_log.csv").read_text().splitlines()
    assert log[0].startswith("batch,step,lr,ce,bn,acc,bn0,bn1") and len(log) == 1 + 2 * 8
    assert result["sets"]["supervised-noise"]["first_ratio"] > 0
    # a rerun with the same config gives identical images
    run_scdd(*args, run_dir=tmp_path / "b")
    again = DistilledSet.open(tmp_path / "b" / "recover" / "supervised-noise").tensors()
    assert torch.equal(payload["images"], again["images"])


def test_resume_after_kill_gives_the_uninterrupted_images(run_scdd, digits_teacher, tmp_path, capsys):
    args = (*FAST, f"teacher={digits_teacher}", "ipc=[3]", "recover.iterations=6",
            "recover.classes_per_batch=5")
    run_scdd(*args, run_dir=tmp_path / "full")
    full = tmp_path / "full" / "recover" / "supervised-noise"
    # A killed run: two of six batches finished (images + records), no index yet, one torn record.
    killed = tmp_path / "killed" / "recover" / "supervised-noise"
    shutil.copytree(full, killed)
    (killed / "index.json").unlink()
    for name in ("b000001.json", "b000002.json", "b000005.json"):
        (killed / "batches" / name).unlink()
    (killed / "batches" / "b000004.json").write_bytes(b"half-written")  # a torn write is redone
    stamp = (killed / "batches" / "b000000.json").stat().st_mtime_ns
    capsys.readouterr()
    result = run_scdd(*args, "resume=true", run_dir=tmp_path / "killed")
    said = [line for line in capsys.readouterr().out.splitlines() if "redoing the batch" in line]
    assert said == [f"scdd: recover batch record {killed / 'batches' / 'b000004.json'} is unreadable "
                    f"(JSONDecodeError); redoing the batch"]  # the torn record is announced, once
    assert result["sets"]["supervised-noise"]["first_ratio"] > 0
    assert (killed / "batches" / "b000000.json").stat().st_mtime_ns == stamp  # not redone
    a = DistilledSet.open(full).tensors()
    b = DistilledSet.open(killed).tensors()
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_real_init_keeps_unrefined_images(run_scdd, digits_teacher, tmp_path):
    run_scdd(*FAST, f"teacher={digits_teacher}", "ipc=[2]", "recover.iterations=4",
             "recover.init=real", run_dir=tmp_path)
    out = tmp_path / "recover" / "supervised-real"
    refined, unrefined = DistilledSet.open(out), DistilledSet.open(out / "init")
    assert unrefined.index["unrefined"] and not refined.index["unrefined"]
    refined, unrefined = refined.tensors(), unrefined.tensors()
    assert torch.equal(refined["labels"], unrefined["labels"])
    assert not torch.equal(refined["images"], unrefined["images"])
    # the starting images are real training images of their own class (8-bit files: exact)
    bundle = build_data(DataConfig(name="digits"))
    train = bundle.train.images.int()
    for image, label in zip(unrefined["images"][:5], unrefined["labels"][:5]):
        match = (train - image.int()).flatten(1).abs().amax(1) <= 1
        assert match.any() and all(bundle.train.labels[i] == label for i in match.nonzero().flatten())


@pytest.mark.parametrize("override,message", [
    ("ipc=[0]", "ipc="),
    ("recover.classes_per_batch=11", "larger than the 10 classes"),
    ("recover.iterations=0", "iterations=0"),
    ("recover.init=zeros", "noise|real"),
])
def test_bad_recover_input(run_scdd, digits_teacher, override, message):
    with pytest.raises(ConfigError, match=message):
        run_scdd(*FAST, f"teacher={digits_teacher}", override)


def test_missing_and_mismatched_teacher(run_scdd, digits_teacher, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_scdd(*FAST, f"teacher={tmp_path / 'nope.pt'}")
    with pytest.raises(ConfigError, match="no teacher checkpoint"):
        run_scdd(*FAST)
    with pytest.raises(ConfigError, match="trained as model="):
        run_scdd("data=digits", "stage=recover", "model.width=32", "model.depth=2",
                 f"teacher={digits_teacher}")


def test_grouped_ipc_batches_write_every_class_and_index(run_scdd, digits_teacher, tmp_path):
    run_scdd(*FAST, f"teacher={digits_teacher}", "ipc=[3]", "recover.iterations=3", "recover.ipc_per_batch=2",
             run_dir=tmp_path)
    payload = DistilledSet.open(tmp_path / "recover" / "supervised-noise").tensors()
    pairs = sorted(zip(payload["ipc_index"].tolist(), payload["labels"].tolist()))
    assert pairs == [(i, c) for i in range(3) for c in range(10)]
    assert len(list((tmp_path / "recover" / "supervised-noise" / "batches").glob("*.json"))) == 2
