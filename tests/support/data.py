"""The real defect datasets, read in place from the data folder (`S2AMNET_DATA_DIR`, else `shared/data` beside
the project: `model.data.readers.default_data_root`, as `s2amnet train` and `eval` resolve it). A test that
needs one is skipped when it is absent, so the suite runs without them."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data.readers import default_data_root

DATA = default_data_root()


def dataset(name: str) -> Path:
    """The dataset folder ``name`` (e.g. ``neu-det``); skips the calling test when it is absent."""
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"dataset {name} not found at {path} (set S2AMNET_DATA_DIR)")
    return path
