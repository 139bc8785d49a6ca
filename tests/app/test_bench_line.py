"""`s2amnet bench --line` as a user runs it: two real `s2amnet serve` processes (records, MQTT and OPC UA on;
all of it off) driven by the same client; every answered result of the line server recorded and published."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.harness import ROOT, process_env
from support.weights import make_weights


def test_bench_line_compares_the_service_with_and_without_recording_and_publishing(tmp_path):
    weights = make_weights(tmp_path / "weights", names=["det"])
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--weights", str(weights / "det"), "--no-http", "--line",
         "--line-concurrency", "2", "--line-requests", "8", "--batch-sizes", "1", "--iters", "1",
         "--threads", "1", "--device", "cpu", "--out", str(out), "--json"],
        cwd=ROOT, env=process_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])["line"]
    assert line["model"] == "det" and line["concurrency"] == 2 and line["requests"] == 8
    for r in line["rounds"].values():
        assert r["requests"] == r["ok"] == 8 and r["statuses"] == {"200": 8}
    off, on = line["rounds"]["off"]["requests_per_s"], line["rounds"]["line"]["requests_per_s"]
    assert line["throughput_ratio"] == pytest.approx(on / off, abs=1e-3)
    assert line["cost_pct"] == pytest.approx(100 * (1 - on / off), abs=0.1)
    sent = 8 + 2  # and the warm-up
    outlets = line["outlets"]
    assert outlets["records"]["written"] == sent and outlets["records"]["dropped"] == 0
    assert outlets["opcua"]["published"] == sent
    installed = shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()
    assert line["mqtt"] == installed == ("mqtt" in outlets)
    if installed:
        assert outlets["mqtt"]["published"] == sent
    text = out.read_text()
    assert "## Line integration" in text and f"(cost {line['cost_pct']:.1f} %)" in text
