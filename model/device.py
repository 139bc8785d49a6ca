"""Which torch device to run on: one rule for every command and the service; and what this machine's CPU is."""

from __future__ import annotations

import functools
from pathlib import Path

AUTO = "auto"


@functools.cache  # the CPU does not change while a process runs; /proc/cpuinfo lists every core (large on servers)
def cpu_info() -> tuple[str, frozenset[str]]:
    """This machine's CPU from /proc/cpuinfo: (model name, instruction-set flags) of its first processor;
    ("", empty) where there is no /proc/cpuinfo."""
    name, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        if line.startswith("model name") and not name:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = frozenset(line.split(":", 1)[1].split())
            break
    return name, flags


def gpu_available() -> bool:
    """Whether torch sees a usable CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str | None = AUTO) -> str:
    """``auto`` (or unset) -> ``cuda`` when torch sees a GPU, else ``cpu``; any other name as given."""
    if not name or name == AUTO:
        return "cuda" if gpu_available() else "cpu"
    return name


def missing_gpu(name: str) -> bool:
    """Whether ``name`` is a CUDA device while torch sees no GPU here."""
    return name.startswith("cuda") and not gpu_available()
