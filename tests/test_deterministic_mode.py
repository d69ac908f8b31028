"""`deterministic=true`: the torch flags it sets, and bit-identical recover/squeeze reruns and resumes on
the CPU (the same checks run on CUDA in tests/gpu/test_determinism_cuda.py)."""
import os

import pytest
import torch

from determinism_checks import recover_reruns_and_resumes_bit_identically, squeeze_resumes_to_identical_weights
from teachers import MODEL_OVERRIDES, train_digits_teacher

SMALL = ("data=digits", *MODEL_OVERRIDES, "device=cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", epochs=2)


def test_flag_switches_torch_to_deterministic_kernels_and_back(compose, tmp_path):
    from engine.cli import build_context

    assert not torch.are_deterministic_algorithms_enabled()
    build_context(compose(*SMALL, "deterministic=true"), tmp_path / "a")
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    build_context(compose(*SMALL), tmp_path / "b")  # the default restores PyTorch's defaults
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_recover_is_bit_identical_across_runs_and_resume(run_scdd, teacher, tmp_path):
    recover_reruns_and_resumes_bit_identically(run_scdd, teacher, tmp_path, *SMALL, "deterministic=true",
                                               "recover.iterations=4")


@pytest.mark.parametrize("method", ["mocov2", "supervised"])
def test_squeeze_resumes_to_identical_weights(run_scdd, tmp_path, method):
    squeeze_resumes_to_identical_weights(run_scdd, tmp_path, method, *SMALL, "deterministic=true")
