"""`s2amnet bench --soak` as a user runs it, at a tiny scale: a real redis-server, `s2amnet serve --redis-url`
and `s2amnet worker` with a classify, a detect and a segment model, driven by mixed traffic while the resident
memory of the API and of the worker is sampled. No memory or timing bound is asserted here: the benchmark
measures those."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from support.harness import ROOT, process_env
from support.weights import make_weights

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def test_bench_soak_drives_mixed_traffic_and_samples_the_memory_of_api_and_worker(tmp_path):
    weights = make_weights(tmp_path / "weights", names=["cls", "det", "seg"])
    out, png = tmp_path / "BENCHMARKS.md", tmp_path / "soak.png"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--weights", *(str(weights / n) for n in ("cls", "det", "seg")),
         "--no-http", "--soak", "--soak-minutes", "0.25", "--soak-concurrency", "2", "--batch-sizes", "1",
         "--iters", "1", "--threads", "1", "--device", "cpu", "--out", str(out), "--soak-plot", str(png), "--json"],
        cwd=ROOT, env=process_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    soak = json.loads(proc.stdout.strip().splitlines()[-1])["soak"]

    assert [(m["name"], m["task"]) for m in soak["models"]] == [("cls", "classify"), ("det", "detect"),
                                                                ("seg", "segment")]
    assert soak["minutes"] == 0.25 and soak["concurrency"] == 2
    # every answer is one the request calls for: 200, a 504 once a tiny deadline passed, 4xx for an invalid
    # image; no other 5xx and no transport error
    assert soak["unexpected"] == {} and soak["warmup"]["unexpected"] == {}
    assert soak["warmup"]["requests"] == 3 * 10
    by_kind = soak["by_kind"]
    assert {"single", "options", "multi"} <= set(by_kind)
    for kind, statuses in by_kind.items():
        allowed = {"invalid": lambda s: s.startswith("4") and len(s) == 3,
                   "deadline": lambda s: s in ("200", "504")}.get(kind, lambda s: s == "200")
        assert all(allowed(s) for s in statuses), (kind, statuses)
    assert sum(sum(s.values()) for s in by_kind.values()) == soak["requests"] == sum(soak["statuses"].values())
    assert soak["statuses"].get("200", 0) > 0 and soak["images_ok"] >= soak["statuses"]["200"]
    assert soak["images_per_s"] == pytest.approx(soak["images_ok"] / soak["seconds"], rel=0.02)

    # samples of both processes over the run; first and last: medians of their windows
    assert soak["sample_columns"] == ["s", "api", "worker"]
    samples = soak["samples"]
    assert len(samples) >= 4 and all(len(s) == 3 and s[1] > 0 and s[2] > 0 for s in samples)
    assert [s[0] for s in samples] == sorted(s[0] for s in samples)
    for i, name in enumerate(("api", "worker"), start=1):
        p = soak["processes"][name]
        assert p["first_samples"] >= 1 and p["last_samples"] >= 1 and soak["ready_mib"][name] > 0
        assert p["ratio"] == pytest.approx(p["last_mib"] / p["first_mib"], abs=2e-3)
        assert p["max_mib"] == pytest.approx(max(s[i] for s in samples), abs=0.1)
        assert p["within"] == (abs(p["last_mib"] / p["first_mib"] - 1) <= 0.10)
    assert soak["met"] == all(p["within"] for p in soak["processes"].values())

    text = out.read_text()
    assert "## Soak: resident memory over 0.25 minutes of mixed traffic" in text
    assert f"| api | {soak['ready_mib']['api']:.0f} | {soak['processes']['api']['first_mib']:.0f} |" in text
    assert png.stat().st_size > 0
