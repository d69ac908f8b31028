"""All rank / world / device set-up in one place: torchrun env, SLURM env, or one process."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from engine.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[03-05,09],cpu1' -> 'gpu03', 'node1,node2' -> 'node1',
    'rack[1-2]-n[07-08]' -> 'rack1-n07'."""
    text = (nodelist or "").strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first entry ends at a comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    head = text[:end]
    if not head or depth < 0 or head.count("[") != head.count("]"):
        raise ConfigError(f"SLURM nodelist {nodelist!r} is malformed; set MASTER_ADDR to the first "
                          f"host's name")
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0].strip(), head)
    if not host or "[" in host:
        raise ConfigError(f"SLURM nodelist {nodelist!r} is malformed; set MASTER_ADDR to the first "
                          f"host's name")
    return host


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer; fix the "
                          f"launcher") from None


def _check_rank(facts: dict, source: str) -> dict:
    if facts["world_size"] < 1 or not 0 <= facts["rank"] < facts["world_size"]:
        raise ConfigError(f"{source} rank {facts['rank']} is outside world size "
                          f"{facts['world_size']}; fix the launcher's variables")
    if not 0 < facts["master_port"] < 65536:
        raise ConfigError(f"MASTER_PORT={facts['master_port']} is not a TCP port; use 1024-65535")
    return facts


def read_launch_env(env: Mapping[str, str]) -> dict:
    """Rank facts from torchrun's variables, else SLURM's, else a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ConfigError(f"torchrun environment is incomplete: {missing} unset; launch with "
                              f"torchrun or launchers/torchrun.sh")
        return _check_rank(dict(rank=_int_var(env, "RANK"), world_size=_int_var(env, "WORLD_SIZE"),
                                local_rank=_int_var(env, "LOCAL_RANK"),
                                master_addr=env["MASTER_ADDR"],
                                master_port=_int_var(env, "MASTER_PORT")), "torchrun")
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        raise ConfigError(f"torchrun environment is incomplete: {missing} unset; launch with "
                          f"torchrun or launchers/torchrun.sh")
    ntasks = _int_var(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
    if ("SLURM_PROCID" in env or "SLURM_NTASKS" in env) and ntasks > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
        if nodelist is None and "MASTER_ADDR" not in env:
            missing.append("SLURM_JOB_NODELIST")
        if missing:
            raise ConfigError(f"SLURM environment is incomplete: {missing} unset; start the job with "
                              f"srun (see launchers/slurm.sbatch)")
        return _check_rank(dict(rank=_int_var(env, "SLURM_PROCID"), world_size=ntasks,
                                local_rank=_int_var(env, "SLURM_LOCALID"),
                                master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
                                master_port=_int_var(env, "MASTER_PORT") if "MASTER_PORT" in env
                                else 29500), "SLURM")
    return dict(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500)


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present else CPU; 'cpu' forces the CPU; 'cuda' requires a GPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={preference!r} is not one of auto|cpu|cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    if preference != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def configure_determinism(enabled: bool) -> None:
    """``deterministic=true``: deterministic kernels only (an op without one raises), cuDNN's
    deterministic algorithms without autotuning, and the cuBLAS workspace setting deterministic
    matrix products need (read when cuBLAS first initializes, so set before any CUDA work).
    ``False`` restores PyTorch's defaults (CPU kernels are deterministic either way)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


_CURRENT: Optional[DistEnv] = None


def init_distributed(device: str = "auto", env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the launch environment, pick the device, and join the process group when world > 1."""
    global _CURRENT
    facts = read_launch_env(os.environ if env is None else env)
    dev = resolve_device(device, facts["local_rank"])
    dist_env = DistEnv(device=dev, **facts)
    if dist_env.distributed:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        ensure_process_group(dist_env)
    _CURRENT = dist_env
    return dist_env


def current() -> DistEnv:
    """The environment set up by init_distributed, or a single CPU process if never called."""
    return _CURRENT if _CURRENT is not None else DistEnv()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def ensure_process_group(env: DistEnv) -> None:
    """Join a process group even with one process (DDP and DeepSpeed need one); no-op if joined."""
    if not torch.distributed.is_initialized():
        # DeepSpeed and torch.distributed read these; SLURM launches do not set them.
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        if env.world_size == 1 and "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())  # a lone process must not collide with a job
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        torch.distributed.init_process_group(backend="nccl" if env.device.type == "cuda" else "gloo",
                                             rank=env.rank, world_size=env.world_size)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over all ranks (identity without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BN running statistics) over ranks, in place."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            torch.distributed.all_reduce(buf)
            buf.div_(world)


# ------------------------------------------------------------------------------- job-array shares
@dataclass(frozen=True)
class TaskShare:
    """Which share of a stage's work this job-array task runs: task ``index`` of ``count`` (0-based).

    Tasks of an array never talk to each other (no process group): each writes its share through the
    artifact layer and ``scdd stage=merge`` assembles and verifies them. ``count == 1``: the whole work."""

    index: int = 0
    count: int = 1
    source: str = "single task"

    @property
    def is_array(self) -> bool:
        return self.count > 1


def read_task_share(env: Mapping[str, str]) -> TaskShare:
    """SCDD_TASK_ID / SCDD_TASK_COUNT (any scheduler), else SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT
    (the task id counted from SLURM_ARRAY_TASK_MIN, so ``--array=1-3`` works), else one task."""
    for id_var, count_var in (("SCDD_TASK_ID", "SCDD_TASK_COUNT"),
                              ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")):
        if id_var not in env and count_var not in env:
            continue
        missing = [k for k in (id_var, count_var) if k not in env]
        if missing:
            raise ConfigError(f"job-array environment is incomplete: {missing} unset; set both {id_var} and "
                              f"{count_var}")
        index, count = _int_var(env, id_var), _int_var(env, count_var)
        if id_var.startswith("SLURM") and "SLURM_ARRAY_TASK_MIN" in env:
            index -= _int_var(env, "SLURM_ARRAY_TASK_MIN")
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"job-array task {index} is outside {count} tasks ({id_var}={env[id_var]}, "
                              f"{count_var}={env[count_var]}); task ids run from 0 to count-1")
        return TaskShare(index, count, f"{id_var}/{count_var}")
    return TaskShare()


def task_share() -> TaskShare:
    """This process's job-array share, read from the environment."""
    return read_task_share(os.environ)
