"""Suite-wide settings. CI has 2 cores and many test processes; one intra-op thread per test process
keeps model tests fast and their timing stable (server subprocesses choose their own threads)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("S2AMNET_DATA_DIR", ROOT.parent / "shared" / "data"))

torch.set_num_threads(1)


def dataset_path(name: str) -> Path:
    """A dataset folder under ../shared/data; the calling test is skipped when it is absent."""
    path = DATA_DIR / name
    if not path.is_dir():
        pytest.skip(f"dataset {name} not found at {path} (set S2AMNET_DATA_DIR)")
    return path
