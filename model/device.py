"""Which torch device to run on: one rule for every command and the service."""

from __future__ import annotations

AUTO = "auto"


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
