"""`s2amnet export` and `s2amnet eval --backend onnxruntime` as a user runs them (real CLI processes): the
export lands in the service's cache with a parity report, and eval then runs the cached graph."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import save_model
from model.registry import build_model

pytest.importorskip("onnxruntime")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_export_into_the_cache_then_eval_with_onnxruntime(tmp_path: Path):
    torch.manual_seed(0)
    weights = save_model(build_model("classify", "tiny", 2).eval(), tmp_path / "cls",
                         {"name": "t-cls", "version": "1", "classes": ["bad", "good"],
                          "arch": {"input_size": [64, 64]},
                          "verdict": {"type": "classify", "pass_labels": ["good"], "min_score": 0.5}})
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(30):
        cls = "bad" if i % 3 == 0 else "good"
        (data / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(data / cls / f"img{i:03d}.png")
    env = {"S2AMNET_CACHE_DIR": str(tmp_path / "cache")}  # folder classes are sorted: bad, good

    out = _cli("export", "--weights", str(weights), "--cache", "--json", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["parity"] and not report["cached"] and report["export_s"] > 0
    assert Path(report["path"]).is_file() and Path(report["path"]).parent == tmp_path / "cache"
    assert report["input"] == [1, 3, 64, 64]

    args = ["eval", "--weights", str(weights), "--data", str(data), "--json"]
    eager = _cli(*args, env=env)
    assert eager.returncode == 0, eager.stderr[-2000:]
    eager = json.loads(eager.stdout.strip().splitlines()[-1])
    ort = _cli(*args, "--backend", "onnxruntime", env=env)
    assert ort.returncode == 0, ort.stderr[-2000:]
    ort = json.loads(ort.stdout.strip().splitlines()[-1])
    assert eager["backend"] == "eager" and ort["backend"] == "onnxruntime"
    assert ort["top1"] == pytest.approx(eager["top1"], abs=1e-9) and ort["confusion"] == eager["confusion"]
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1  # eval found the export: no second one

    again = _cli("export", "--weights", str(weights), "--cache", "--json", env=env)
    assert json.loads(again.stdout.strip().splitlines()[-1])["cached"]
    assert _cli("export", "--weights", str(tmp_path / "missing"), env=env).returncode == 2

    if importlib.util.find_spec("openvino") is None:
        return
    ov = _cli(*args, "--backend", "openvino", env=env)  # compiles the cached graph: no second export
    assert ov.returncode == 0, ov.stderr[-2000:]
    ov = json.loads(ov.stdout.strip().splitlines()[-1])
    assert ov["backend"] == "openvino" and ov["top1"] == pytest.approx(eager["top1"], abs=1e-9)
    assert ov["confusion"] == eager["confusion"] and len(list((tmp_path / "cache").glob("*.onnx"))) == 1
    ir = _cli("export", "--weights", str(weights), "--format", "openvino", "--out", str(tmp_path / "ir" / "m.xml"),
              "--json", env=env)
    assert ir.returncode == 0, ir.stderr[-2000:]
    report = json.loads(ir.stdout.strip().splitlines()[-1])
    assert report["parity"] and report["format"] == "openvino"
    assert (tmp_path / "ir" / "m.xml").is_file() and (tmp_path / "ir" / "m.bin").is_file()


def test_export_compile_finds_the_cached_package_and_eval_runs_it(compiled_classifier, tmp_path: Path):
    """`export --format compile --cache` checks (and here finds) the package the service would load;
    `eval --backend compile` then scores exactly what eager scores."""
    folder, cache = compiled_classifier
    env = {"S2AMNET_CACHE_DIR": str(cache)}
    out = _cli("export", "--weights", str(folder), "--format", "compile", "--cache", "--json", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["parity"] and report["cached"] and report["export_s"] is None
    assert Path(report["path"]).suffix == ".pt2" and Path(report["path"]).parent == cache
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for i in range(12):
        cls = ("dent", "good", "scratch")[i % 3]
        (data / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(data / cls / f"img{i:03d}.png")
    args = ["eval", "--weights", str(folder), "--data", str(data), "--json"]
    results = {}
    for backend in ("eager", "compile"):
        run = _cli(*args, "--backend", backend, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        results[backend] = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["compile"]["backend"] == "compile"
    assert results["compile"]["confusion"] == results["eager"]["confusion"]
    assert len(list(cache.glob("*.pt2"))) == 1  # nothing compiled again
    bad = _cli(*args, "--backend", "tensorrt", env=env)
    assert bad.returncode == 2 and "--backend must be one of eager, compile" in bad.stderr
