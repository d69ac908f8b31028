import os
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests run on 2 cores; keep torch from oversubscribing them when pytest-xdist is not used.
os.environ.setdefault("OMP_NUM_THREADS", "2")

GPU_TIER = "gpu"
"""Marker of the GPU tier (tests/gpu/): compiled Triton kernels on CUDA tensors, CUDA determinism, the
bench breakdown on CUDA. It runs in its own invocation, `TRITON_INTERPRET=0 pytest -m gpu tests/gpu`
(`make test-gpu`); every other run deselects it and says how many tests that was."""


def _selects_gpu_tier(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects a test marked only ``gpu`` (``-m gpu``, not ``-m "not gpu"``)."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(markexpr).evaluate(lambda name, **kwargs: name == GPU_TIER))
    except Exception:  # noqa: BLE001 - a pytest without this module: read the expression plainly
        return GPU_TIER in markexpr.split() and f"not {GPU_TIER}" not in markexpr


def _markexpr_from_command_line() -> str:
    """The last ``-m`` expression of this pytest's arguments (PYTEST_ADDOPTS first, as pytest reads them)."""
    args = shlex.split(os.environ.get("PYTEST_ADDOPTS", "")) + sys.argv[1:]
    expr = ""
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            expr = args[i + 1]
        elif arg.startswith("-m") and not arg.startswith("--"):
            expr = arg[2:].lstrip("=")
    return expr


# Triton reads TRITON_INTERPRET when a kernel is decorated, and conftests of the test folders (loaded
# before pytest_configure) may import the kernels or Triton (directly or through deepspeed/torch), so it
# is decided here, before anything else is imported. CPU runs execute the Triton kernels in the
# interpreter; the GPU tier (-m gpu) must compile them, so interpreter mode stays off there.
if _selects_gpu_tier(_markexpr_from_command_line()):
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{GPU_TIER}: needs a CUDA GPU and compiled Triton kernels; runs only in "
                                       f"`TRITON_INTERPRET=0 pytest -m gpu tests/gpu` (make test-gpu)")
    config._scdd_gpu_tier = _selects_gpu_tier(config.getoption("markexpr", ""))
    if config._scdd_gpu_tier and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError("the GPU tier runs the compiled Triton kernels but TRITON_INTERPRET is on; run "
                                "`TRITON_INTERPRET=0 pytest -m gpu tests/gpu`")


def pytest_collection_modifyitems(config, items):
    """Outside the GPU tier, gpu-marked tests are deselected (counted in pytest's "N deselected")."""
    if config._scdd_gpu_tier:
        return
    gpu = [item for item in items if item.get_closest_marker(GPU_TIER)]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker(GPU_TIER)]
    config._scdd_gpu_deselected = len(gpu)


def pytest_terminal_summary(terminalreporter, config):
    count = getattr(config, "_scdd_gpu_deselected", 0)
    if count:
        terminalreporter.write_line(f"{count} GPU-tier tests deselected (marker '{GPU_TIER}'); on a CUDA machine "
                                    f"run them with `TRITON_INTERPRET=0 pytest -m gpu tests/gpu` (make test-gpu)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds barrier waits on a shared 2-core machine, and
    in-process runs compared with `OMP_NUM_THREADS=1` subprocesses must use one thread to agree
    bitwise. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _torch_threads_per_module():
    """A module that changes torch's thread count (a loader library, a fixture) gives it back: with 2
    threads on a loaded 2-core machine, tiny-tensor runs later in the session got 10-40x slower."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _default_determinism():
    """A run with deterministic=true switches PyTorch's process-wide flags; the next test starts from
    the defaults again."""
    yield
    import torch

    if torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic:
        from engine.distributed import configure_determinism

        configure_determinism(False)


@pytest.fixture(autouse=True, scope="session")
def _config_store():
    """The config groups come from the dataclasses (engine.config_store), as `scdd` registers them at
    import; every Hydra compose in the suite, through the fixture below or directly, needs them."""
    from engine.config_store import register

    register()


@pytest.fixture
def compose():
    """Compose the real Hydra config with overrides, as `scdd` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def run_scdd(compose, tmp_path):
    """Run a stage in-process on a composed config; returns the stage's result dict."""
    from engine.cli import execute

    def _run(*overrides: str, run_dir: Path | None = None):
        # Evaluate rows train in this process unless a test asks for row processes: forked rows would print
        # past capsys and record past monkeypatches (tests/cluster/test_row_processes.py covers them).
        if not any(o.startswith("evaluate.row_processes=") for o in overrides):
            overrides = (*overrides, "evaluate.row_processes=1")
        cfg = compose(*overrides)
        return execute(cfg, run_dir or tmp_path / "run")

    return _run
