"""Suite-wide settings. CI has 2 cores and many test processes; one intra-op thread per test process
keeps model tests fast and their timing stable (server subprocesses choose their own threads)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def _classifier_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``weights/cls`` (a tiny random classifier, 64 px, classes dent/good/scratch in the
    order a folder dataset lists them) and ``cache`` (its export cache, empty at first)."""
    from model.checkpoint import save_model
    from model.registry import build_model

    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    save_model(build_model("classify", "tiny", 3), root / "weights" / "cls", {
        "name": "cls", "version": "1", "classes": ["dent", "good", "scratch"], "arch": {"input_size": [64, 64]},
        "verdict": {"type": "classify", "pass_labels": ["good"], "min_score": 0.5}})
    (root / "cache").mkdir()
    return root


@pytest.fixture(scope="session", autouse=True)
def _compile_in_the_background(request: pytest.FixtureRequest):
    """Compiling the classifier (`compiled_classifier`) costs minutes of one core, mostly in Python: when the
    session has tests that need it, `s2amnet export --format compile --cache` starts at once, at the lowest
    CPU priority, and uses what the tests leave idle; then, on a CPU with bf16 units, `--format compile-bf16`
    (which `auto` also tries). Killed at the end of the session if still running."""
    if not any("compiled_classifier" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    from model.backends import cpu_has_bf16_units

    root = request.getfixturevalue("_classifier_root")
    formats = ["compile", *(["compile-bf16"] if cpu_has_bf16_units() else [])]
    export = f'nice -n 19 "{sys.executable}" -m app.cli export --weights "{root / "weights" / "cls"}" --cache --json'
    script = "; ".join(f'{export} --format {f} > "{root / f}.json" 2> "{root / f}.log"' for f in formats)
    proc = subprocess.Popen(["sh", "-c", script], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "S2AMNET_CACHE_DIR": str(root / "cache")})
    yield proc, root, formats
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def exported_classifier(_classifier_root: Path) -> tuple[Path, Path]:
    """(weights folder of the tiny classifier of `_classifier_root`, its export cache holding its ONNX graph):
    an export takes tens of seconds, so the suite does it once. Tests that need a cache in a known state
    copy what they need from it."""
    from model.backends import exported_graph
    from model.predictor import Predictor

    folder, cache = _classifier_root / "weights" / "cls", _classifier_root / "cache"
    _, seconds = exported_graph(Predictor.from_folder(folder), cache)
    assert seconds is not None and seconds > 0  # exported here, not found
    return folder, cache


@pytest.fixture(scope="session")
def compiled_classifier(exported_classifier: tuple[Path, Path], _compile_in_the_background) -> tuple[Path, Path]:
    """`exported_classifier`, its cache also holding the package TorchInductor compiled for this CPU (and on a
    CPU with bf16 units the compile-bf16 one), by `s2amnet export --format compile --cache` as a user builds it
    ahead of a start (see `_compile_in_the_background`): the report says it was built there and agrees with
    eager."""
    folder, cache = exported_classifier
    if _compile_in_the_background is None:  # requested by a test that does not name it
        pytest.fail("compiled_classifier must be named in the test's arguments (it is built in the background)")
    proc, root, formats = _compile_in_the_background
    proc.wait(timeout=1200)
    for fmt in formats:  # compile-bf16's parity check may fail (exit 1): its report says so, and it is cached
        lines = (root / f"{fmt}.json").read_text().strip().splitlines()
        assert lines, (root / f"{fmt}.log").read_text()[-3000:]
        report = json.loads(lines[-1])
        assert (report["parity"] or fmt != "compile") and not report["cached"] and report["export_s"] > 0, report
        assert Path(report["path"]).parent == cache and Path(report["path"]).suffix == ".pt2"
    return folder, cache
