"""deterministic=true on CUDA: recover (compiled Triton BN matching in the loop) and squeeze are
bit-identical across runs and across kill/resume, for the small ConvNet and for ResNet-18 (max-pool,
global pooling); and the ops it avoids do raise in this mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from determinism_checks import recover_reruns_and_resumes_bit_identically, squeeze_resumes_to_identical_weights
from engine.artifacts.teacher import save_teacher
from engine.data import DataConfig, build_data
from engine.models import ModelConfig, build_model
from teachers import MODEL_OVERRIDES, train_digits_teacher

pytestmark = pytest.mark.gpu

CUDA_DETERMINISTIC = ("device=cuda", "deterministic=true")
MODELS = {
    "convnet": ("data=digits", *MODEL_OVERRIDES),
    "resnet18": ("data=digits", "data.image_size=32", "data.channels=3", "model=resnet18"),
}


def _resnet18_teacher(path):
    """A ResNet-18 on digits at 32 px with BN statistics of the data (recover needs no accuracy)."""
    bundle = build_data(DataConfig(name="digits", image_size=32, channels=3))
    cfg = ModelConfig(name="resnet18")
    torch.manual_seed(0)
    model = build_model(cfg, bundle.num_classes, bundle.channels, bundle.image_size).train()
    with torch.no_grad():
        for start in range(0, 512, 128):
            model(bundle.normalize(bundle.train.images[start:start + 128].float() / 255))
    save_teacher(path, model.eval(), kind="supervised", model_cfg=cfg, bundle=bundle, metrics={})
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return {"convnet": train_digits_teacher(folder / "convnet.pt"),
            "resnet18": _resnet18_teacher(folder / "resnet18.pt")}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_recover_is_bit_identical_across_runs_and_resume_on_cuda(run_scdd, teachers, tmp_path, model):
    recover_reruns_and_resumes_bit_identically(run_scdd, teachers[model], tmp_path, *MODELS[model],
                                               *CUDA_DETERMINISTIC, "recover.iterations=20")


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("method", ["mocov2", "supervised"])
def test_squeeze_resumes_to_identical_weights_on_cuda(run_scdd, tmp_path, method, model):
    squeeze_resumes_to_identical_weights(run_scdd, tmp_path, method, *MODELS[model], *CUDA_DETERMINISTIC)


def test_the_avoided_ops_have_no_deterministic_cuda_backward():
    """Why recover resizes with matrices and the heads pool with a mean: with deterministic
    algorithms on, these backward passes raise on CUDA."""
    from engine.distributed import configure_determinism

    configure_determinism(True)
    try:
        x = torch.randn(2, 3, 16, 16, device="cuda", requires_grad=True)
        with pytest.raises(RuntimeError, match="deterministic"):
            F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False).sum().backward()
        with pytest.raises(RuntimeError, match="deterministic"):
            F.adaptive_avg_pool2d(x, 1).sum().backward()
        from engine.recover.augment import crop_resize
        from engine.models.pooling import GlobalAvgPool

        crop_resize(x, 2, 3, 10, 12, 24).sum().backward()  # the replacements go through
        GlobalAvgPool()(x).sum().backward()
    finally:
        configure_determinism(False)
