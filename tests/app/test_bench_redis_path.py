"""`s2amnet bench --redis-path` as a user runs it, at a tiny scale: a real redis-server, `s2amnet serve
--redis-url` and one `s2amnet worker` whose own metrics say where its time went; the section merged into an
existing BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.harness import ROOT, process_env, require_redis_server
from support.images import jpeg
from support.weights import make_weights


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "bench", *args], cwd=ROOT,
                          env=process_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=timeout)


def test_bench_redis_path_reports_where_one_workers_time_goes(tmp_path):
    require_redis_server()
    weights = make_weights(tmp_path / "weights", names=["det"])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):  # JPEGs far smaller than the 64x64 array: the jobs carry them, the worker decodes them
        (images / f"part{i}.jpg").write_bytes(jpeg(96, 64, seed=i))
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept\n\n## Redis path: an older run\n\nold table\n\n## Later\n\nkept too\n")
    proc = _bench("--weights", str(weights / "det"), "--no-http", "--batch-sizes", "1,2", "--iters", "1",
                  "--threads", "2", "--device", "cpu", "--redis-path", "--redis-path-model", str(weights / "det"),
                  "--redis-path-concurrency", "1,4", "--redis-path-requests", "12", "--images", str(images),
                  "--out", str(out), "--merge", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    r = result["redis_path"]
    assert r["model"] == "det" and r["task"] == "detect" and r["images"].startswith("4 JPG files")
    assert r["raw"]["images_per_s"] == max(row["images_per_s"] for row in result["models"][0]["rows"])
    assert [x["concurrency"] for x in r["levels"]] == [1, 4]
    for x in r["levels"]:
        assert x["requests"] == x["ok"] == 12 and x["errors"] == 0 and x["statuses"] == {"200": 12}, x
        assert 0 < x["p50_ms"] <= x["p95_ms"] <= x["p99_ms"] and x["images_per_s"] > 0
        assert x["share_of_raw"] == pytest.approx(x["images_per_s"] / r["raw"]["images_per_s"], abs=1e-3)
        w = x["worker"]  # from the worker's own metrics, before and after the level
        assert w["streams"] == 2  # two threads: two inference streams, whose times add up to the worker's
        assert w["images"] == 12 and 1.0 <= w["batch_mean"] <= x["concurrency"] and w["queue_wait_ms"] >= 0
        ms = w["ms_per_image"]
        assert min(ms["decode"], ms["forward"], ms["postprocess"], ms["commit"]) > 0, ms
        assert ms["other"] >= 0 and 0 < w["busy_pct"] <= 100
    assert r["levels"][0]["worker"]["batch_mean"] == 1.0  # one request at a time: batches of one
    assert r["target"]["concurrency"] == 256 and r["target"]["measured"] is None and r["target"]["met"] is None

    md = out.read_text()  # --merge: only the Redis path section replaced, with its own command line
    assert md.startswith("# Benchmarks\n\nkept\n") and md.endswith("## Later\n\nkept too\n") and "old table" not in md
    section = md.split("## Redis path: ")[1]
    assert section.startswith("det ") and "`s2amnet bench --weights" in section
    assert "| 4 | 12 | 0 |" in section and "replies + acks to Redis" in section
    assert "the worker ran 2 inference streams, and each one's time counts" in section


@pytest.mark.parametrize(("args", "says"), [
    (["--redis-path-concurrency", "0,4"], "--redis-path-concurrency must be integers >= 1"),
    (["--redis-path-requests", "-1"], "--redis-path-requests must be >= 0"),
    (["--redis-path-model", "README.md"], "--redis-path-model README.md is not a weights folder"),
])
def test_bench_redis_path_refuses_bad_options_before_timing_anything(args, says):
    bad = _bench("--no-http", "--redis-path", *args, timeout=120)
    assert bad.returncode == 2 and says in bad.stderr and not bad.stdout
