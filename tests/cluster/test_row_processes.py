"""evaluate.row_processes: rows trained side by side in forked one-thread processes equal one process."""
import json
import shutil

import pytest
import torch

from engine.evaluate.stage import balance
from teachers import MODEL_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "ipc=[1,2]", "recover.iterations=3",
        "recover.classes_per_batch=10", "recover.ipc_per_batch=2")
EVAL = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "ipc=[1,2]", "stage=evaluate",
        "evaluate.epochs=3", "evaluate.eval_every=2", "evaluate.full_data_epochs=1")


def test_balance_splits_rows_by_cost_largest_first():
    groups = balance([(0, 10), (1, 10), (2, 100), (3, 50), (4, 45)], 2)
    assert sorted(p for g in groups for p in g) == [0, 1, 2, 3, 4]
    assert sorted(groups) == [[2, 1], [3, 4, 0]]  # loads 110 and 105
    assert balance([(0, 5)], 3) == [[0], [], []]


def test_rows_in_two_processes_equal_one_process_bit_for_bit(run_scdd, digits_teacher, tmp_path, capfd):
    run_scdd(*ARGS, "stage=recover", f"teacher={digits_teacher}", run_dir=tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    run_scdd(*EVAL, f"teacher={digits_teacher}", "evaluate.row_processes=1", run_dir=tmp_path / "one")
    capfd.readouterr()
    assert torch.get_num_threads() == 1  # the processes run one thread each, as this one
    run_scdd(*EVAL, f"teacher={digits_teacher}", "evaluate.row_processes=2", run_dir=tmp_path / "two")
    finished = [line for line in capfd.readouterr().out.splitlines() if line.startswith("evaluate: ")]
    rows = sorted((tmp_path / "one" / "evaluate").rglob("result.json"))
    assert len(rows) == 5 and len(finished) == 5  # sre2l + random_real per ipc, full data; a line each
    for path in rows:
        a = json.loads(path.read_text())
        b = json.loads((tmp_path / "two" / path.relative_to(tmp_path / "one")).read_text())
        assert (a["top1"], a["top5"], a["history"], a["fingerprint"]) == (b["top1"], b["top5"], b["history"],
                                                                          b["fingerprint"])
    one, two = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two"))
    assert {i: {k: r["top1"] for k, r in v.items()} for i, v in one["ipc"].items()} == \
        {i: {k: r["top1"] for k, r in v.items()} for i, v in two["ipc"].items()}


def test_rows_train_in_one_process_per_thread_by_default():
    from types import SimpleNamespace

    from engine.evaluate.settings import EvaluateConfig
    from engine.evaluate.stage import row_processes

    cfg = EvaluateConfig()
    assert cfg.row_processes is None
    one = SimpleNamespace(is_array=False)
    cpu = SimpleNamespace(dist=SimpleNamespace(world_size=1, device=torch.device("cpu")))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert row_processes(cpu, cfg, one, None) == 2
        torch.set_num_threads(1)
        assert row_processes(cpu, cfg, one, None) == 1
    finally:
        torch.set_num_threads(before)
    gpu = SimpleNamespace(dist=SimpleNamespace(world_size=1, device=torch.device("cuda")))
    ddp = SimpleNamespace(dist=SimpleNamespace(world_size=2, device=torch.device("cpu")))
    assert row_processes(gpu, cfg, one, None) == 1 and row_processes(ddp, cfg, one, None) == 1
    assert row_processes(cpu, cfg, SimpleNamespace(is_array=True), None) == 1
    assert row_processes(cpu, cfg, one, 2) == 1  # merge gathers in one process


CHILDREN = """
import sys, time
from pathlib import Path
from engine.evaluate.stage import _train_in_processes

folder = Path(sys.argv[1])

def train(group):
    import os
    (folder / f"child{group[0]}.pid").write_text(str(os.getpid()))
    time.sleep(120)

_train_in_processes([[0], [1]], train)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped has ended)."""
    from pathlib import Path

    status = Path(f"/proc/{pid}/status")
    try:
        return "\\tZ" not in next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_row_processes_die_with_a_killed_run(tmp_path):
    """A SIGKILLed run (kill -9, the OOM killer) leaves no row process training into its run directory."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = tmp_path / "children.py"
    script.write_text(CHILDREN)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("child*.pid"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the row processes did not start"
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("child*.pid"))]
        assert all(_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids), "row processes outlived the killed run"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid_file in tmp_path.glob("child*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
