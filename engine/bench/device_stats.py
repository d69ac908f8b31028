"""Device facts every benchmark reports the same way: name, synchronization, peak memory."""
from __future__ import annotations

import resource

import torch


def resolve_device(text: str) -> torch.device:
    """A bench CLI's ``--device``: ``auto`` is CUDA when available, else the CPU; anything else as given."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return f"cpu ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max allocated since the last reset, or the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    # ru_maxrss is KiB on Linux; it never goes down, so it is the process's peak so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu max RSS (process)"
