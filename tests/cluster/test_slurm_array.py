"""launchers/slurm_array.sbatch for real: README's "Running on a cluster" commands run as SLURM would run
them (the array variables set, one task after another, a stub `scontrol` on PATH), and the job-based run dir."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from engine.artifacts.distilled import DistilledSet
from engine.config_store import job_run_dir
from teachers import MODEL_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
TINY = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "recover.iterations=2",
        "recover.classes_per_batch=5", "recover.ipc_per_batch=1", "evaluate.epochs=1", "evaluate.eval_every=1",
        "evaluate.full_data=false")
SCRIPT = "launchers/slurm_array.sbatch"


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SCDD_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {tmp_path / 'scontrol.log'}\n")
    (stubs / "scontrol").chmod(0o755)
    env.update(PATH=f"{stubs}:{env['PATH']}", PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               SCDD_ROOT=str(REPO))
    env.update(extra)
    return env


def _readme_array_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if SCRIPT in line and not line.startswith("#")
            and ("sbatch" in line.split()[0] or line.startswith("SCDD_JOB_ID="))]


def test_job_run_dir_comes_from_the_job(compose, monkeypatch):
    assert job_run_dir("2026-01-01/10-00-00", {}) == "outputs/2026-01-01/10-00-00"
    assert job_run_dir("t", {"SLURM_JOB_ID": "5"}) == "outputs/job-5"
    assert job_run_dir("t", {"SLURM_JOB_ID": "6", "SLURM_ARRAY_JOB_ID": "5"}) == "outputs/job-5"  # array-wide
    assert job_run_dir("t", {"SCDD_JOB_ID": "x1", "SLURM_ARRAY_JOB_ID": "5"}) == "outputs/job-x1"
    from hydra import compose as hydra_compose, initialize_config_dir

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=["data=digits"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/job-4242"


def test_readme_array_commands_recover_merge_evaluate_merge(digits_teacher, tmp_path):
    commands = _readme_array_commands()
    assert [c.split(SCRIPT)[1].split()[0] for c in commands] == ["stage=recover", "stage=merge", "stage=evaluate",
                                                                 "stage=merge"]
    run_dir = tmp_path / "run"
    out = run_dir / "recover" / "supervised-noise"
    for step, command in enumerate(commands):
        before, after = command.split(SCRIPT)
        prefix = dict(word.split("=", 1) for word in shlex.split(before) if re.fullmatch(r"[A-Z_]+=\S+", word))
        args = [f"teacher={digits_teacher}" if a.startswith("teacher=") else a for a in shlex.split(after)]
        array = re.search(r"--array=(\d+)-(\d+)", before)
        tasks = range(int(array.group(1)), int(array.group(2)) + 1) if array else [None]
        for task in tasks:  # what sbatch starts; an array's tasks one after another here
            env = _env(tmp_path, SLURM_JOB_ID=str(100 + step), **prefix)
            if task is not None:
                env.update(SLURM_ARRAY_JOB_ID=str(99 + step), SLURM_ARRAY_TASK_ID=str(task),
                           SLURM_ARRAY_TASK_COUNT=str(len(tasks)), SLURM_ARRAY_TASK_MIN=str(tasks[0]))
            result = subprocess.run(["bash", str(REPO / SCRIPT), *args, *TINY, f"hydra.run.dir={run_dir}"],
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            assert result.returncode == 0, (command, result.stderr[-3000:])
            if step == 0:
                assert f"recover task {task} of 3" in result.stdout and not (out / "index.json").exists()
        if step == 1:
            assert "batches verified and assembled" in result.stdout
            assert DistilledSet.open(out).tensors()["images"].shape[0] == 20
        if step == 2:
            assert not (run_dir / "report.json").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["ipc"]["2"]) == {"sre2l", "random_real"}
    assert not (tmp_path / "scontrol.log").exists()


def test_script_forwards_the_signal_and_requeues_on_status_75(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\ntrap 'sleep 0.2; exit 75' USR1\necho \"args: $*\"\n"
                    "for i in $(seq 400); do sleep 0.05; done\nexit 3\n")
    fake.chmod(0o755)
    env = _env(tmp_path, PYTHON=str(fake), SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="9")
    proc = subprocess.Popen(["bash", str(REPO / SCRIPT), "stage=recover"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "args:" not in (line := proc.stdout.readline()):
        assert line, proc.stderr.read()
    assert "-m engine.cli resume=true stage=recover" in line
    proc.send_signal(__import__("signal").SIGUSR1)  # what --signal=B:USR1 sends to the batch script
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "requeueing 7_2" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 7_2\n"
    # any other failure is the job's failure, not requeued
    fake.write_text("#!/usr/bin/env bash\nexit 3\n")
    (tmp_path / "scontrol.log").unlink()
    result = subprocess.run(["bash", str(REPO / SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 3 and not (tmp_path / "scontrol.log").exists()
