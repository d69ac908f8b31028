"""recover.groups_per_step: G class-batches per teacher pass give the images of running them one by one;
recover.precision=bf16 stays close to fp32; recover.cuda_graphs is refused on CPU."""
import pytest
import torch

from engine.artifacts.distilled import DistilledSet
from engine.artifacts.layout import RunLayout
from engine.artifacts.teacher import load_teacher
from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.recover.distill import set_fingerprint
from engine.recover.init import noise_init
from engine.recover.plan import plan_batches, step_groups
from engine.recover.settings import RecoverConfig, StepAugment
from engine.recover.synthesize import Objective, synthesize_batch, synthesize_groups
from kernels import fused_bn_matching
from teachers import MODEL_OVERRIDES, SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

# crop + flip + roll all on: a group that drew another batch's augmentation would differ at once
AUG = StepAugment(image_size=8, crop_scale=(0.5, 1.0), flip=True, jitter=2)
SEEDS = (101, 202, 303, 404, 505)
IMAGE_ATOL = 1e-5  # float rounding only: the teacher's convolutions run on a G-times bigger batch


def _teacher(path):
    bundle = build_data(DataConfig(name="digits"))
    teacher, _ = load_teacher(path, SMALL_MODEL, bundle)
    return teacher.eval().requires_grad_(False), bundle


def _batches(n, classes=10):
    """Per-batch generators and noise inits, made as distill makes them (init first, then augmentation)."""
    gens = [torch.Generator().manual_seed(s) for s in SEEDS[:n]]
    return gens, [noise_init(classes, 1, 8, g) for g in gens]


def _objective(iterations):
    return Objective(r_bn=1.0, first_bn_multiplier=10.0, iterations=iterations, lr=0.25, log_every=2)


def _sequential(teacher, bundle, backend, n, iterations):
    gens, inits = _batches(n)
    with fused_bn_matching(teacher, backend=backend) as modules:
        return [synthesize_batch(teacher, modules, init, torch.arange(10), _objective(iterations), AUG,
                                 bundle.pixel_bounds(), gen) for init, gen in zip(inits, gens)]


def _grouped(teacher, bundle, backend, n, iterations, sizes):
    gens, inits = _batches(n)
    out, start = [], 0
    with fused_bn_matching(teacher, backend=backend) as modules:
        for size in sizes:
            part = slice(start, start + size)
            out += synthesize_groups(teacher, modules, inits[part], [torch.arange(10)] * size,
                                     _objective(iterations), AUG, bundle.pixel_bounds(), gens[part])
            start += size
    return out


def _assert_same(reference, grouped):
    assert len(reference) == len(grouped)
    for ref, got in zip(reference, grouped):
        torch.testing.assert_close(got.images, ref.images, rtol=0, atol=IMAGE_ATOL)
        assert [r["step"] for r in got.log] == [r["step"] for r in ref.log]
        for a, b in zip(got.log, ref.log):
            assert a.keys() == b.keys()
            for key in ("ce", "bn", "acc", "bn0", "bn1"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert got.first_ratio == pytest.approx(ref.first_ratio, rel=1e-5)


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 1), (2, 2, 1), (3, 2), (5,)],
                         ids=lambda s: "G=" + "+".join(map(str, s)))
def test_groups_give_the_sequential_images_torch(digits_teacher, sizes):
    """G = 1, 2 (uneven last group of 1), 3 (last group of 2) and 5 against one batch at a time."""
    teacher, bundle = _teacher(digits_teacher)
    reference = _sequential(teacher, bundle, "torch", 5, 8)
    grouped = _grouped(teacher, bundle, "torch", 5, 8, sizes)
    _assert_same(reference, grouped)
    # the batches really differ from each other (each group kept its own seed and augmentation)
    assert (grouped[0].images - grouped[1].images).abs().max() > 0.1


def test_groups_give_the_sequential_images_triton(digits_teacher):
    """The Triton kernels (interpreter): G = 2 with an uneven last group of 1."""
    teacher, bundle = _teacher(digits_teacher)
    reference = _sequential(teacher, bundle, "triton", 3, 3)
    _assert_same(reference, _grouped(teacher, bundle, "triton", 3, 3, (2, 1)))


def test_groups_of_unequal_batches_are_refused(digits_teacher):
    teacher, bundle = _teacher(digits_teacher)
    gens, inits = _batches(2)
    with fused_bn_matching(teacher, backend="torch") as modules:
        with pytest.raises(ValueError, match="one shape"):
            synthesize_groups(teacher, modules, [inits[0], inits[1][:4]], [torch.arange(10), torch.arange(4)],
                              _objective(1), AUG, bundle.pixel_bounds(), gens)
        # the modules are back to one group after a run
        assert all(m.groups == 1 for m in modules)


def test_step_groups_pack_equal_sizes_and_keep_order():
    plan = plan_batches(num_classes=10, ipc=2, classes_per_batch=4)  # sizes 4, 4, 2, 4, 4, 2
    assert [len(b.classes) for b in plan] == [4, 4, 2, 4, 4, 2]
    groups = step_groups(plan, 3)
    assert [[b.index for b in g] for g in groups] == [[0, 1, 3], [2, 5], [4]]
    assert [[b.index for b in g] for g in step_groups(plan, 1)] == [[b.index] for b in plan]
    assert sorted(b.index for g in step_groups(plan, 2) for b in g) == [b.index for b in plan]
    with pytest.raises(ConfigError, match="groups_per_step=0"):
        step_groups(plan, 0)


RECOVER = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "stage=recover", "progress=false",
           "recover.iterations=4", "recover.classes_per_batch=4", "recover.ipc_per_batch=1", "ipc=[2]")


def _stored(run_dir):
    return DistilledSet.open(RunLayout(run_dir).recover_set("supervised", "noise")).tensors()


def test_recover_stage_with_groups_writes_the_same_set(run_scdd, digits_teacher, tmp_path):
    """The stage end to end: 6 batches of 4, 4, 2 classes; G=3 packs [0, 1, 3], [2, 5], [4]."""
    one = run_scdd(*RECOVER, f"teacher={digits_teacher}", run_dir=tmp_path / "g1")
    three = run_scdd(*RECOVER, f"teacher={digits_teacher}", "recover.groups_per_step=3", run_dir=tmp_path / "g3")
    a, b = _stored(tmp_path / "g1"), _stored(tmp_path / "g3")
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["ipc_index"], b["ipc_index"])
    # stored as 8-bit PNG: float rounding may at most move a pixel to the next level
    assert (a["images"] - b["images"]).abs().max() <= 1 / 255 + 1e-6
    # G is not part of the set: resuming with another G reuses the finished set
    again = run_scdd(*RECOVER, f"teacher={digits_teacher}", "recover.groups_per_step=2", "resume=true",
                     run_dir=tmp_path / "g1")
    assert one["sets"]["supervised-noise"]["path"] == again["sets"]["supervised-noise"]["path"]
    assert again["sets"]["supervised-noise"]["image_iterations_per_s"] == 0.0  # nothing was synthesized
    assert three["sets"]["supervised-noise"]["image_iterations_per_s"] > 0


def test_fingerprint_ignores_groups_and_graphs_but_not_bf16():
    bundle = build_data(DataConfig(name="digits"))
    base = set_fingerprint(RecoverConfig(precision="fp32"), bundle, 1, 0, "t")
    assert set_fingerprint(RecoverConfig(precision="fp32", groups_per_step=4, cuda_graphs=True),
                           bundle, 1, 0, "t") == base
    assert "precision" not in base["recover"]  # fp32 sets made before the setting keep their fingerprint
    assert set_fingerprint(RecoverConfig(precision="bf16"), bundle, 1, 0, "t") != base


def test_bf16_losses_stay_close_to_fp32(digits_teacher):
    """CPU bf16 autocast from the same start: the BN-loss trajectory within 3% and CE within 10% of
    fp32 over 10 steps (measured: <= 1% and <= 4%); pixels stay fp32."""
    teacher, bundle = _teacher(digits_teacher)
    results = {}
    for precision in ("fp32", "bf16"):
        gens, inits = _batches(2)
        with fused_bn_matching(teacher, backend="torch") as modules:
            results[precision] = synthesize_groups(teacher, modules, inits, [torch.arange(10)] * 2, _objective(10),
                                                   AUG, bundle.pixel_bounds(), gens, precision=precision)
    for full, half in zip(results["fp32"], results["bf16"]):
        assert half.images.dtype == torch.float32
        assert len(full.log) == len(half.log) == 6
        for a, b in zip(full.log, half.log):
            assert b["bn"] == pytest.approx(a["bn"], rel=0.03)
            assert b["ce"] == pytest.approx(a["ce"], rel=0.10)
        # bf16 really ran: the trajectories are not bit-identical
        assert any(a["bn"] != b["bn"] for a, b in zip(full.log, half.log))


def test_bad_settings_are_one_line_errors(compose, digits_teacher, tmp_path):
    from engine.cli import build_context
    from engine.recover.stage import validate

    with pytest.raises(ConfigError, match="groups_per_step=0 must be >= 1"):
        RecoverConfig(groups_per_step=0)
    with pytest.raises(ConfigError, match="precision='fp16' is not one of fp32|bf16"):
        RecoverConfig(precision="fp16")
    ctx = build_context(compose(*RECOVER, f"teacher={digits_teacher}", "recover.cuda_graphs=true"), tmp_path / "run")
    with pytest.raises(ConfigError, match="cuda_graphs=true needs a CUDA device") as err:
        validate(ctx)
    assert "\n" not in str(err.value)

