"""`s2amnet bench --redis-path`: the path a deployment with workers takes, `s2amnet serve --redis-url` → Redis
Streams → one `s2amnet worker`, driven closed-loop at each level of `--redis-path-concurrency` (16, 64, 256
requests in flight), with the worker on the run's device (`--device cuda`: a GPU worker).

Per level: images/s, p50/p95/p99 and errors at the client, and the worker's images/s as a share of the bare
forward's (`Predictor.infer` at its best batch in the models part of the same run, on the same device: the
most that device gives this model). Where the worker's time goes, per image, read from its own metrics
(its Prometheus port) before and after each level: decoding uploaded images, the forward passes,
postprocessing, writing replies and acks to Redis, and the rest of its wall time (waiting for and reading
jobs, forming batches), each stream's time counted (a worker with two CPU streams has two seconds of stream
time per second); also the mean batch, and how long a job waited between the API's enqueue and the
start of its batch (Redis transit and queueing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.commands.bench import BenchError, _free_port, positive_ints
from app.commands.bench_report import machine_line

HEADING = "## Redis path"
TARGET = {"concurrency": 256, "share_of_raw": 0.7}  # one worker through Redis, of its device's bare forward
STAGES = ("decode", "forward", "postprocess", "commit")
# throughput, not deadlines, is measured here: the API waits for every job of the deepest level and admits all
API_ENV = {"S2AMNET_REQUEST_TIMEOUT_S": "600", "S2AMNET_MAX_QUEUE": "100000"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Redis path (--redis-path)")
    g.add_argument("--redis-path", action="store_true",
                   help="also drive s2amnet serve --redis-url with one s2amnet worker (needs redis-server) and "
                        "report where the worker's time goes")
    g.add_argument("--redis-path-model", default="weights/neu-det-detect", help="weights folder the worker serves")
    g.add_argument("--redis-path-concurrency", default="16,64,256",
                   help="closed-loop requests in flight (default 16,64,256)")
    g.add_argument("--redis-path-requests", type=int, default=0,
                   help="requests per level (default: four per request in flight, at least 64)")


def check_args(args: argparse.Namespace) -> list[int]:
    """The concurrency levels ([] without --redis-path); BenchError for bad options."""
    if not args.redis_path:
        return []
    levels = positive_ints(args.redis_path_concurrency, "--redis-path-concurrency")
    if not (Path(args.redis_path_model) / "manifest.json").is_file():
        raise BenchError(f"--redis-path-model {args.redis_path_model} is not a weights folder (no manifest.json)")
    if args.redis_path_requests < 0:
        raise BenchError("--redis-path-requests must be >= 0")
    if not shutil.which("redis-server"):
        raise BenchError("--redis-path needs redis-server on PATH")
    return levels


def worker_totals(metrics_url: str, model: str) -> dict[str, float]:
    """The worker's running totals for ``model``: seconds per stage, images, batches, queue-wait seconds and
    jobs; and its inference streams (``streams``; from its Prometheus text)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"s2amnet_inference_duration_seconds_sum": "forward",
              "s2amnet_postprocess_duration_seconds_sum": "postprocess",
              "s2amnet_batch_size_sum": "images", "s2amnet_batches_total": "batches",
              "s2amnet_queue_wait_seconds_sum": "wait", "s2amnet_queue_wait_seconds_count": "waited"}
    totals = dict.fromkeys([*STAGES, "images", "batches", "wait", "waited"], 0.0)
    totals["streams"] = 1.0
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for s in family.samples:
            if s.name == "s2amnet_cpu_streams":
                totals["streams"] = max(1.0, s.value)
            if s.labels.get("model") != model:
                continue
            if s.name in wanted:
                totals[wanted[s.name]] += s.value
            elif s.name == "s2amnet_worker_stage_seconds_sum" and s.labels.get("stage") in STAGES:
                totals[s.labels["stage"]] += s.value
    return totals


def level_row(concurrency: int, tally, before: dict[str, float], after: dict[str, float],
              raw_images_per_s: float) -> dict[str, Any]:
    """One level's figures: the client's (``tally``) and the worker's, from its totals before and after."""
    from app.commands.bench_peers import _latency_ms

    d = {k: after[k] - before[k] for k in after if k != "streams"}
    streams = int(after.get("streams", 1))
    images = d["images"]
    ok = tally.statuses.get("200", 0)
    per_image = {k: round(1000.0 * d[k] / images, 2) if images else None for k in STAGES}
    busy = sum(d[k] for k in STAGES)
    stream_time = tally.wall * streams  # each stream's wall time: forwards side by side both count
    per_image["other"] = round(1000.0 * (stream_time - busy) / images, 2) if images else None
    return {"concurrency": concurrency, "requests": len(tally.latencies), "ok": ok,
            "errors": len(tally.latencies) - ok, "statuses": dict(sorted(tally.statuses.items())),
            **_latency_ms(tally.latencies), "images_per_s": round(ok / tally.wall, 2),
            "share_of_raw": round(ok / tally.wall / raw_images_per_s, 3),
            "worker": {"images": int(images), "batch_mean": round(images / d["batches"], 2) if d["batches"] else None,
                       "streams": streams, "ms_per_image": per_image,
                       "busy_pct": round(100.0 * busy / stream_time, 1),
                       "queue_wait_ms": round(1000.0 * d["wait"] / d["waited"], 2) if d["waited"] else None}}


def settle(metrics_url: str, model: str, timeout_s: float = 60.0) -> dict[str, float]:
    """The worker's totals once it has stopped working (two readings 0.3 s apart agree): a level starts and ends
    with the jobs of the round before it done."""
    end = time.monotonic() + timeout_s
    last = worker_totals(metrics_url, model)
    while time.monotonic() < end:
        time.sleep(0.3)
        now = worker_totals(metrics_url, model)
        if now == last:
            break
        last = now
    return last


def bench_redis_path(args, levels: list[int], device: str, raw: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The Redis-path part of `s2amnet bench`; ``raw``: the model's entry of the models part (its rows give the
    bare forward's best images/s on this device)."""
    from tqdm import tqdm

    from app.commands.bench_peers import _redis_mode, closed_round, load_images, shown_command

    folder = Path(args.redis_path_model)
    parts, images = load_images(args.images, raw["input_size"])
    best = max(raw["rows"], key=lambda r: r["images_per_s"])
    log_dir = Path(tempfile.mkdtemp(prefix="s2amnet-bench-redis-path-"))
    metrics_port = _free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    rows = []
    with contextlib.ExitStack() as stack:
        server = _redis_mode(stack, folder, raw["task"], device, args.threads, log_dir, 1, metrics_port, API_ENV)
        bar = tqdm(total=len(levels), desc="redis path", unit="level", disable=not progress, leave=False)
        asyncio.run(closed_round(server, parts, 2, 1))  # warm-up: connections, first batches of every size
        asyncio.run(closed_round(server, parts, 2 * min(32, levels[-1]), min(32, levels[-1])))
        for c in levels:
            n = args.redis_path_requests or max(64, 4 * c)
            before = settle(metrics_url, raw["model"])
            tally = asyncio.run(closed_round(server, parts, n, c))
            after = settle(metrics_url, raw["model"])  # the last batch's commit is timed after its replies
            rows.append(level_row(c, tally, before, after, best["images_per_s"]))
            bar.update(1)
        bar.close()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept when a process failed
    at = next((r for r in rows if r["concurrency"] == TARGET["concurrency"]), None)
    return {"command": shown_command(sys.argv[1:], args.images), "model": raw["model"], "version": raw["version"],
            "task": raw["task"], "input_size": raw["input_size"], "images": images,
            "raw": {"batch": best["batch"], "images_per_s": best["images_per_s"]}, "levels": rows,
            "target": {**TARGET, "measured": at["share_of_raw"] if at else None,
                       "met": at["share_of_raw"] >= TARGET["share_of_raw"] if at else None}}


def run_redis_path(args, levels: list[int], result: dict[str, Any], sizes: list[int], device: str,
                   progress: bool) -> None:
    """result["redis_path"]; the model's bare forward comes from the models part when it timed this model."""
    from app.commands.bench import timings_of

    raw = timings_of(Path(args.redis_path_model), result, sizes, args.iters, device)
    result["redis_path"] = bench_redis_path(args, levels, device, raw, progress)


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def redis_path_markdown(r: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """The Redis path section of BENCHMARKS.md (self-contained: its own command and machine line)."""
    m = result["machine"]
    raw = r["raw"]
    lines = [f"{HEADING}: {r['model']} {r['version']} behind `s2amnet serve --redis-url` and one `s2amnet worker`",
             "", f"{machine_line(r['command'], result['time'], m)}, device {m.get('gpu', m['device'])}. "
             f"Requests: {r['images']}, one per request, {r['task']} at {r['input_size'][1]}x{r['input_size'][0]}; "
             "one client on the same machine, closed loop; the API's request deadline and backlog limit raised so "
             "that every level is answered, not refused or timed out. The bare forward (`Predictor.infer`, same "
             f"device, this run) gives {raw['images_per_s']:.1f} images/s at its best batch ({raw['batch']}).", "",
             "| in flight | requests | errors | images/s | of the bare forward | p50 ms | p99 ms "
             "| worker's mean batch | job's wait for its batch, ms |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["levels"]:
        w = x["worker"]
        lines.append(f"| {x['concurrency']} | {x['requests']} | {x['errors']} | {x['images_per_s']:.1f} | "
                     f"{100 * x['share_of_raw']:.0f} % | {x['p50_ms']:.0f} | {x['p99_ms']:.0f} | "
                     f"{_ms(w['batch_mean'])} | {_ms(w['queue_wait_ms'])} |")
    streams = max((x["worker"].get("streams", 1) for x in r["levels"]), default=1)
    each = (f"; the worker ran {streams} inference streams, and each one's time counts: forwards side by side "
            "each take longer, and busy is of their time together" if streams > 1 else "")
    lines += ["", "Where the worker's time goes, ms per image (its own metrics, before and after each level; "
              f"\"other\": the rest of its wall time: waiting for and reading jobs, forming batches{each}):", "",
              "| in flight | decode | forward | postprocess | replies + acks to Redis | other | worker busy |",
              "|---|---|---|---|---|---|---|"]
    for x in r["levels"]:
        ms = x["worker"]["ms_per_image"]
        lines.append(f"| {x['concurrency']} | " + " | ".join(_ms(ms[k]) for k in (*STAGES, "other"))
                     + f" | {x['worker']['busy_pct']:.0f} % |")
    t = r["target"]
    if t["measured"] is not None:
        lines += ["", f"- One worker through Redis at {t['concurrency']} in flight: {100 * t['measured']:.0f} % of "
                  f"the bare forward's images/s (aim: at least {100 * t['share_of_raw']:.0f} %: "
                  f"{'met' if t['met'] else 'not met'})."]
    return [*lines, ""]
