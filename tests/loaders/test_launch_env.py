"""Rank set-up: torchrun and SLURM variables, a real 2-process gloo group, the launchers."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.distributed import first_slurm_host, read_launch_env
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[03-05,09]"}


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[03-05,09]", "gpu03"), ("node1,node2", "node1"), ("gpu[09,03-05],cpu1", "gpu09"),
    ("rack[1-2]-n[07-08]", "rack1-n07"), ("single", "single"), ("a-[10-11]", "a-10"),
])
def test_first_host_of_nodelists(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "gpu[03-05", "gpu]1["])
def test_malformed_nodelist_is_a_config_error(nodelist):
    with pytest.raises(ConfigError, match="nodelist .* is malformed"):
        first_slurm_host(nodelist)


def test_slurm_environment_gives_rank_world_and_master():
    facts = read_launch_env(SLURM)
    assert facts == dict(rank=5, world_size=8, local_rank=1, master_addr="gpu03", master_port=29500)
    assert read_launch_env({**SLURM, "MASTER_PORT": "29611"})["master_port"] == 29611


@pytest.mark.parametrize("drop", ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NODELIST"])
def test_incomplete_slurm_environment_is_a_config_error(drop):
    env = {k: v for k, v in SLURM.items() if k != drop}
    with pytest.raises(ConfigError, match=f"SLURM environment is incomplete: \\['{drop}'\\]"):
        read_launch_env(env)


@pytest.mark.parametrize("env, message", [
    ({**SLURM, "SLURM_NTASKS": "eight"}, "SLURM_NTASKS='eight' is not an integer"),
    ({**SLURM, "SLURM_PROCID": "8"}, "SLURM rank 8 is outside world size 8"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "\\['MASTER_PORT'\\] unset"),
    ({"RANK": "1"}, "\\['WORLD_SIZE'\\] unset"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"},
     "MASTER_PORT=99999 is not a TCP port"),
])
def test_bad_launch_variables_are_config_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        read_launch_env(env)


def test_single_slurm_task_and_bare_process_run_alone():
    one = dict(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500)
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == one
    assert read_launch_env({}) == one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_join_a_gloo_group(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from engine.distributed import init_distributed\n"
        "env = init_distributed('cpu')\n"
        "t = torch.tensor([float(env.rank + 1)])\n"
        "dist.all_reduce(t)\n"
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[1], f'rank{env.rank}.txt').write_text(\n"
        "    f'rank={env.rank} world={env.world_size} sum={t.item():g}')\n"
        "dist.destroy_process_group()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           "--nproc_per_node=2", f"--master_port={_free_port()}", str(script), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    # each rank writes its own file: two processes sharing one stdout pipe can interleave lines
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == [
        "rank=0 world=2 sum=3", "rank=1 world=2 sum=3"]


def test_torchrun_launcher_forwards_arguments_to_engine_cli():
    env = {**os.environ, "NPROC": "1", "MASTER_PORT": str(_free_port()), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "launchers" / "torchrun.sh"), "--help"],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Configuration groups") == 1


@pytest.mark.parametrize("name", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
def test_launcher_scripts_parse(name):
    assert subprocess.run(["bash", "-n", str(REPO / "launchers" / name)]).returncode == 0
