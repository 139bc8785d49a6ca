"""Suite-wide settings. CI has 2 cores and many test processes; one intra-op thread per test process
keeps model tests fast and their timing stable (server subprocesses choose their own threads)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("S2AMNET_DATA_DIR", ROOT.parent / "shared" / "data"))

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _records_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory):
    """Services built in this process record every result (S2AMNET_RECORDS is on by default): into a
    temporary folder, never into the repository. (Server processes get a folder each: support/harness.py.)"""
    before = os.environ.get("S2AMNET_RECORDS_DIR")
    os.environ["S2AMNET_RECORDS_DIR"] = str(tmp_path_factory.mktemp("records"))
    yield
    if before is None:
        os.environ.pop("S2AMNET_RECORDS_DIR", None)
    else:
        os.environ["S2AMNET_RECORDS_DIR"] = before


def dataset_path(name: str) -> Path:
    """A dataset folder under ../shared/data; the calling test is skipped when it is absent."""
    path = DATA_DIR / name
    if not path.is_dir():
        pytest.skip(f"dataset {name} not found at {path} (set S2AMNET_DATA_DIR)")
    return path
