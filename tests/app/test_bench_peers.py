"""`s2amnet bench --peers` as a user runs it: real `s2amnet serve`, plain FastAPI and LitServe processes on
the same tiny weights, one client, and the Peers section merged into an existing BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from support.harness import ROOT, process_env
from support.weights import make_weights

from app.cli import main
from app.commands.bench_peers import merge_section, shown_command

LITSERVE = importlib.util.find_spec("litserve") is not None


def _run_peers(tmp_path):
    weights = make_weights(tmp_path / "weights", names=["cls"])
    out, png = tmp_path / "BENCHMARKS.md", tmp_path / "peers.png"
    out.write_text("# Benchmarks\n\nkept\n\n## Peers: an older run\n\nold table\n\n## Later\n\nkept too\n")
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--weights", str(weights / "cls"), "--no-http",
         "--batch-sizes", "2", "--iters", "1", "--threads", "1", "--device", "cpu", "--peers",
         "--peer-model", str(weights / "cls"), "--peer-concurrency", "1,2", "--peer-requests", "6",
         "--open-loop-s", "1.5", "--out", str(out), "--merge", "--peers-plot", str(png), "--json"],
        cwd=ROOT, env=process_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out.read_text(), png


def _check_closed_loop(p: dict, running: list[str]) -> None:
    rows = {(r["server"], r["concurrency"]): r for r in p["closed_loop"]}
    assert set(rows) == {(name, c) for name in running for c in (1, 2)}
    for (_, c), r in rows.items():
        assert r["requests"] == r["ok"] == 6 and r["errors"] == 0 and r["statuses"] == {"200": 6}, r
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["images_per_s"] > 0 and r["cpu_pct"] >= 0
        assert r["ratio_to_raw"] == pytest.approx(r["images_per_s"] / p["raw"]["images_per_s"], abs=1e-3)
        if LITSERVE:
            ls = rows[("litserve", c)]["images_per_s"]
            assert r["ratio_to_litserve"] == pytest.approx(r["images_per_s"] / ls, abs=1e-3)
        else:
            assert r["ratio_to_litserve"] is None
    for s in p["servers"]:
        if "skipped" not in s:  # the best level is the one with the most images/s
            best = max((rows[(s["name"], c)] for c in (1, 2)), key=lambda r: r["images_per_s"])
            assert (s["best_images_per_s"], s["best_concurrency"]) == (best["images_per_s"], best["concurrency"])
            assert s["idle_cpu_pct"] >= 0


def _check_open_loop(p: dict, running: list[str]) -> None:
    best = {s["name"]: s["best_images_per_s"] for s in p["servers"] if "skipped" not in s}
    assert [r["server"] for r in p["open_loop"]] == running
    for r in p["open_loop"]:
        assert r["load"] == 0.7 and r["rate_per_s"] == pytest.approx(0.7 * best[r["server"]], abs=0.01)
        per_slice = max(1, round(r["rate_per_s"] * 1.5 / 3))  # sent on schedule, whatever is unanswered
        assert r["requests"] == r["ok"] == 3 * per_slice and r["errors"] == 0 and r["sent_late"] >= 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["seconds"] > 0


def test_bench_peers_drives_every_server_with_one_client_and_merges_its_section(tmp_path):
    result, md, png = _run_peers(tmp_path)
    p = result["peers"]
    assert p["model"] == "cls" and p["task"] == "classify" and p["images"] == "8 random 64x64 PNGs"
    assert p["raw"]["images_per_s"] == max(r["images_per_s"] for r in result["models"][0]["rows"])
    assert 0 <= p["other_load_pct"] <= 100  # what the rest of the machine took while the rounds ran
    servers = {s["name"]: s for s in p["servers"]}
    assert set(servers) == {"s2amnet", "fastapi", "litserve"}
    assert servers["s2amnet"]["endpoint"] == "/classify" and servers["fastapi"]["endpoint"] == "/predict"
    running = ["s2amnet", "fastapi", "litserve"] if LITSERVE else ["s2amnet", "fastapi"]
    if not LITSERVE:  # reported, with the reason, and the other two still measured
        assert "not installed" in servers["litserve"]["skipped"]
    _check_closed_loop(p, running)
    _check_open_loop(p, running)
    t = p["target"]  # 16 in flight was not measured here: no verdict
    assert (t["concurrency"], t["ratio"], t["met"], t["measured"]) == (16, 1.5, None, None) and t["why"]

    # --merge: only the Peers section of the existing file is replaced
    assert md.startswith("# Benchmarks\n\nkept\n\n## Peers: cls 1 behind") and md.count("## Peers") == 1
    assert "old table" not in md and md.endswith("## Later\n\nkept too\n")
    assert "## Models" not in md and "| s2amnet | 2 | 6 | 0 |" in md and "### Open loop" in md
    assert "Target: s2amnet at least 1.5× the images/s of litserve with 16 in flight: not measured" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_merge_section_appends_a_missing_section_and_replaces_one_that_is_there():
    assert merge_section("", ["## Peers: x", "", "t"]) == "## Peers: x\n\nt\n"
    text = "# Benchmarks\n\n## Models\n\nrows\n"
    merged = merge_section(text, ["## Peers: x", "", "t", ""])
    assert merged == "# Benchmarks\n\n## Models\n\nrows\n\n## Peers: x\n\nt\n"
    again = merge_section(merged + "\n## Later\n\nkept\n", ["## Models: new", "", "n", ""], "## Models")
    assert again == "# Benchmarks\n\n## Models: new\n\nn\n\n## Peers: x\n\nt\n\n## Later\n\nkept\n"


def test_the_report_names_an_images_folder_outside_the_repository_by_its_name_only(tmp_path):
    outside, inside = str(tmp_path / "tiles"), str(ROOT / "weights")
    assert shown_command(["bench", "--images", outside], outside) == "s2amnet bench --images …/tiles"
    assert shown_command(["bench", "--images", inside], inside) == f"s2amnet bench --images {inside}"


@pytest.mark.parametrize(("args", "message"), [
    (["--peers", "--peer-concurrency", "0"], "--peer-concurrency must be integers >= 1"),
    (["--peers", "--peer-concurrency", "a,b"], "comma-separated integers"),
    (["--peers", "--peer-model", "/nonexistent/model"], "--peer-model"),
    (["--peers", "--peer-requests", "2"], "--peer-requests must be >= 3"),
    (["--peers", "--open-loop-load", "1.5"], "--open-loop-load in (0, 1]"),
    (["--peers", "--images", "/nonexistent/images"], "--images /nonexistent/images is not a folder"),
])
def test_bench_peers_rejects_bad_options_before_any_work(args, message, tmp_path, capsys):
    weights = make_weights(tmp_path / "weights", names=["cls"])
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "--weights", str(weights / "cls"), "--no-http", "--out", str(out), *args]
    if "--peer-model" not in args:
        argv += ["--peer-model", str(weights / "cls")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_bench_peers_reports_litserve_skipped_when_it_cannot_be_imported(tmp_path):
    """Without the bench extra the other two are still measured and the target has no verdict, with the reason."""
    weights = make_weights(tmp_path / "weights", names=["cls"])
    shadow = tmp_path / "shadow" / "litserve"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no litserve here')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--weights", str(weights / "cls"), "--no-http",
         "--batch-sizes", "1", "--iters", "1", "--threads", "1", "--device", "cpu", "--peers",
         "--peer-model", str(weights / "cls"), "--peer-concurrency", "1", "--peer-requests", "3",
         "--open-loop-s", "0", "--json"],
        cwd=ROOT, env=process_env(PYTHONPATH=f"{shadow.parent}:{ROOT}"), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = json.loads(proc.stdout.strip().splitlines()[-1])["peers"]
    assert [s["name"] for s in p["servers"]] == ["s2amnet", "fastapi", "litserve"]
    assert "no litserve here" in p["servers"][2]["skipped"] and "s2amnet[bench]" in p["servers"][2]["skipped"]
    assert [(r["server"], r["ok"], r["ratio_to_litserve"]) for r in p["closed_loop"]] == [
        ("s2amnet", 3, None), ("fastapi", 3, None)]
    assert p["open_loop"] == [] and p["target"]["met"] is None and "no litserve here" in p["target"]["why"]
    assert "| litserve | skipped: litserve is not installed (no litserve here)" in proc.stdout


def test_two_cpu_workers_on_one_machine_share_its_cores(tmp_path):
    """--peer-redis's two workers: real processes, each started with its share of the forward threads, and
    the pair answers through Redis."""
    import contextlib
    from pathlib import Path

    import httpx
    from support.harness import require_redis_server
    from support.images import png

    from app.commands.bench_peers import _redis_mode

    require_redis_server()
    weights = make_weights(tmp_path / "weights", names=["cls"])
    logs = tmp_path / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        server = _redis_mode(stack, weights / "cls", "classify", "cpu", 4, logs, workers=2)
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in server.pids]
        workers = [c for c in cmdlines if b"worker" in c]
        assert len(workers) == 2
        assert all(c[c.index(b"--torch-threads") + 1] == b"2" for c in workers)  # 4 threads, 2 workers
        assert "2 `s2amnet worker`s (Redis Streams), 2 torch threads each" in server.what
        answer = httpx.post(server.url + server.path, files={"file": ("p.png", png(), "image/png")}, timeout=60)
        assert answer.status_code == 200 and answer.json()["verdict"] in ("pass", "fail")
