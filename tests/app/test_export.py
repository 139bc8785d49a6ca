"""`s2amnet export` and `s2amnet eval --backend X` as a user runs them (real CLI processes), on the suite's
classifier whose graph and package are already in the service's export cache: export reports what the
cache holds with a parity check, eval runs it, and files for other runtimes are made from it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def _json(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _dataset(root: Path) -> Path:
    """A folder dataset of the classifier's classes (dent, good, scratch): random 64 px images."""
    rng = np.random.default_rng(1)
    for i in range(12):
        cls = ("dent", "good", "scratch")[i % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / cls / f"img{i:03d}.png")
    return root


def test_export_finds_what_the_service_cached_and_eval_scores_every_backend_as_eager(compiled_classifier,
                                                                                    tmp_path: Path):
    """`export --cache` checks (and here finds) the graph and the package a service would load; `eval
    --backend X` then scores exactly what eager scores, from the cache, building nothing again."""
    folder, cache = compiled_classifier
    env = {"S2AMNET_CACHE_DIR": str(cache)}
    before = sorted(p.name for p in cache.glob("*.*"))
    for fmt, suffix in (("onnx", ".onnx"), ("compile", ".pt2")):
        report = _json(_cli("export", "--weights", str(folder), "--format", fmt, "--cache", "--json", env=env))
        assert report["parity"] and report["cached"] and report["export_s"] is None
        assert Path(report["path"]).suffix == suffix and Path(report["path"]).parent == cache
        assert report["input"] == [1, 3, 64, 64]
        if fmt == "compile":  # compiled for the export process's threads, every core: the name says so too
            assert report["threads"] >= 1 and f"-t{report['threads']}-" in Path(report["path"]).name
            compiled = report
    # for a service on one thread, the package compiled for more serves (it runs correctly on fewer)
    one = _json(_cli("export", "--weights", str(folder), "--format", "compile", "--cache", "--threads", "1", "--json",
                     env=env))
    assert one["cached"] and one["path"] == compiled["path"] and one["threads"] == compiled["threads"]
    refused = _cli("export", "--weights", str(folder), "--format", "compile", "--threads", "0", env=env)
    assert refused.returncode == 2 and "--threads must be >= 1" in refused.stderr

    args = ["eval", "--weights", str(folder), "--data", str(_dataset(tmp_path / "data")), "--json"]
    eager = _json(_cli(*args, env=env))
    assert eager["backend"] == "eager"
    runs = ["onnxruntime", "compile"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    for backend in runs:
        got = _json(_cli(*args, "--backend", backend, env=env))
        assert got["backend"] == backend and got["top1"] == pytest.approx(eager["top1"], abs=1e-9)
        assert got["confusion"] == eager["confusion"]
    assert sorted(p.name for p in cache.glob("*.*")) == before  # nothing exported or compiled again
    bad = _cli(*args, "--backend", "tensorrt", env=env)
    assert bad.returncode == 2
    assert "--backend must be one of eager, eager-channels-last, eager-bf16, compile" in bad.stderr
    missing = _cli("export", "--weights", str(tmp_path / "missing"), env=env)
    assert missing.returncode == 2 and "error:" in missing.stderr
    # where the file would go, checked before any exporting: a folder; two places at once
    for extra, said in ((["--out", str(tmp_path)], f"--out {tmp_path} is a folder; name the file to write"),
                        (["--out", str(tmp_path / "m.onnx"), "--cache"], "--out and --cache name two places")):
        refused = _cli("export", "--weights", str(folder), *extra, env=env)
        assert refused.returncode == 2 and said in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing half-made


def test_export_to_a_file_is_made_from_the_cache_when_it_holds_these_weights(exported_classifier, tmp_path: Path):
    """`export --out`: a file for another runtime or device. With the service's cache holding this model's
    graph, the file is made from it (seconds); the report says so and checks the file against eager."""
    folder, cache = exported_classifier
    env = {"S2AMNET_CACHE_DIR": str(cache)}
    (graph,) = cache.glob("*.onnx")
    report = _json(_cli("export", "--weights", str(folder), "--out", str(tmp_path / "m.onnx"), "--json", env=env))
    assert report["parity"] and report["cached"] and report["export_s"] is None
    assert (tmp_path / "m.onnx").read_bytes() == graph.read_bytes()
    if importlib.util.find_spec("openvino") is None:
        return
    out = tmp_path / "ir" / "m.xml"
    report = _json(_cli("export", "--weights", str(folder), "--format", "openvino", "--out", str(out), "--json",
                        env=env))
    assert report["parity"] and report["cached"] and report["format"] == "openvino"
    assert out.is_file() and out.with_suffix(".bin").is_file()
