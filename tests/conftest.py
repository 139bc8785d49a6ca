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


@pytest.fixture(scope="session")
def exported_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(weights folder ``weights/cls`` of a tiny random classifier, 64 px, classes dent/good/scratch in the
    order a folder dataset lists them; the export cache ``cache`` beside ``weights`` holding its ONNX graph):
    an export takes tens of seconds, so the suite does it once. Tests that need a cache in a known state
    copy what they need from it."""
    from model.backends import exported_graph
    from model.checkpoint import save_model
    from model.predictor import Predictor
    from model.registry import build_model

    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    folder = save_model(build_model("classify", "tiny", 3), root / "weights" / "cls", {
        "name": "cls", "version": "1", "classes": ["dent", "good", "scratch"], "arch": {"input_size": [64, 64]},
        "verdict": {"type": "classify", "pass_labels": ["good"], "min_score": 0.5}})
    cache = root / "cache"
    _, seconds = exported_graph(Predictor.from_folder(folder), cache)
    assert seconds is not None and seconds > 0  # exported here, not found
    return Path(folder), cache


@pytest.fixture(scope="session")
def compiled_classifier(exported_classifier: tuple[Path, Path]) -> tuple[Path, Path]:
    """`exported_classifier`, its cache also holding the package TorchInductor compiled for this CPU:
    compiling takes a minute or more, so the suite does it once."""
    from model.backends import compiled_package
    from model.predictor import Predictor

    folder, cache = exported_classifier
    _, seconds = compiled_package(Predictor.from_folder(folder), cache)
    assert seconds is not None and seconds > 0  # built here, not found
    return folder, cache
