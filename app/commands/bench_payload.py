"""`s2amnet bench --payload`: the bytes one job puts through Redis, and how many jobs per second one Redis
moves, for the two payloads a job can carry (`app.queue.jobs`): the preprocessed array (3×H×W bytes at the
model's input size) and the uploaded image (sent instead when it is smaller).

* Bytes per job, for each shipped model's input size: the job's stream fields as `encode_job` writes them,
  and Redis's own memory per queued entry (``MEMORY USAGE`` of a stream holding them), for the uploads
  under ``--images`` (JPEGs, at most 64, spread over the folder) or synthetic JPEGs of camera-like surfaces.
* The Redis-bound ceiling, at each distinct input size and payload: ``--payload-producers`` processes
  ``XADD`` pipelined jobs (the backlog held at 256, as ``S2AMNET_MAX_QUEUE``) and ``--payload-consumers``
  processes take them as workers do (``XREADGROUP COUNT 16``, decode the fields with `decode_job`, then
  ``XACK`` + ``XDEL`` in one ``MULTI``) but run no forward. Jobs/s and MB/s over ``--payload-seconds``,
  and the redis-server's CPU seconds in that time: jobs per Redis CPU-second is the ceiling of a Redis that
  has a core of its own (it runs commands on one thread), whatever else shares this machine.

It starts its own redis-server (no persistence) on a free port and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STREAM = "s2amnet:bench:payload"
GROUP = "workers"
BATCH = 16  # jobs per XADD pipeline and per XREADGROUP, a worker's default batch
BACKLOG = 256  # jobs waiting at most (S2AMNET_MAX_QUEUE's default)
WARMUP_S = 0.5
MAX_IMAGES = 64


class PayloadBenchError(ValueError):
    """Bad options, no redis-server, no weights: reported as `error: ...`, exit 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--payload`` options of `s2amnet bench` (``--images`` is shared with ``--peers`` when present)."""
    g = p.add_argument_group("payload (--payload)")
    g.add_argument("--payload", action="store_true",
                   help="measure the bytes per job through Redis and the Redis-bound jobs/s for the array and "
                   "the encoded-image payload (needs redis-server), instead of the other parts")
    g.add_argument("--payload-seconds", type=float, default=2.0,
                   help="seconds per Redis ceiling round, after a short warm-up (default 2)")
    g.add_argument("--payload-producers", type=int, default=1, help="processes that XADD jobs (default 1)")
    g.add_argument("--payload-consumers", type=int, default=2,
                   help="processes that read, decode and ack jobs, with no forward (default 2)")
    g.add_argument("--payload-jobs", type=int, default=16,
                   help="distinct jobs (uploads spread over the set) the producers cycle through in a ceiling "
                   "round (default 16)")
    g.add_argument("--payload-synthetic", type=int, default=16,
                   help="synthetic JPEGs to send when no --images folder is given (default 16)")
    with contextlib.suppress(argparse.ArgumentError):  # already there when --peers defines it
        g.add_argument("--images", help="JPEGs under this folder (at most 64) instead of synthetic ones")


# ------------------------------------------------------------------------------------------------- uploads
def synthetic_jpegs(count: int = 16) -> list[bytes]:
    """Camera-like JPEGs (quality 90) of a textured grey surface with a dark defect, 256–640 px a side."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        w, h = int(rng.integers(256, 641)), int(rng.integers(256, 641))
        y, x = np.mgrid[0:h, 0:w]
        surface = 110 + 30 * np.sin(x / (9 + i)) * np.cos(y / 23) + rng.normal(0, 6, (h, w))
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        surface[y0:y0 + 40, x0:x0 + 3] -= 60  # a scratch
        buf = io.BytesIO()
        Image.fromarray(surface.clip(0, 255).astype(np.uint8)).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def load_uploads(folder: str | None, limit: int = MAX_IMAGES, synthetic: int = 16) -> tuple[list[bytes], str]:
    """The uploads and how to describe them: up to ``limit`` JPEGs spread over ``folder``, else ``synthetic``
    synthetic ones."""
    if not folder:
        images = synthetic_jpegs(synthetic)
        return images, f"{len(images)} synthetic JPEGs (256–640 px a side, quality 90)"
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not files:
        raise PayloadBenchError(f"--images {folder}: no JPEG files")
    picked = spread(files, limit)
    return [p.read_bytes() for p in picked], f"{len(picked)} JPEGs of {Path(folder).name}"


def spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced (a fair sample of a folder sorted by class)."""
    return items[:: max(1, len(items) // n)][:n]


def model_inputs(weights: list[str] | None) -> list[dict[str, Any]]:
    """Name, input size and letterbox settings of each model (``weights`` folders, else every one in
    ./weights), read from the manifests: no model is loaded."""
    if weights:
        folders = [Path(w) for w in weights]
    else:
        folders = sorted(f.parent for f in Path("weights").glob("*/manifest.json"))
    models = []
    for folder in folders:
        try:
            m = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise PayloadBenchError(f"{folder} is not a weights folder ({exc})") from None
        pre = m.get("preprocess", {})
        models.append({"name": str(m.get("name") or folder.name),
                       "input_size": [int(v) for v in m["arch"]["input_size"]],
                       "resize": pre.get("resize", "letterbox"), "pad_value": int(pre.get("pad_value", 114))})
    if not models:
        raise PayloadBenchError("no --weights given and no model folder in ./weights")
    return models


def job_fields(data: bytes, model: dict[str, Any], image: Any = None) -> tuple[dict, dict]:
    """(fields with the array, fields with the payload the API chooses) of one upload for ``model``: decoded
    (or ``image``, its decoded form) and preprocessed as the API does (`decode_image`, the manifest's
    letterbox)."""
    from app.codec import decode_image
    from app.dispatch.base import Job
    from app.queue.jobs import encode_job
    from model import transforms

    image = decode_image(data, max_pixels=10**9) if image is None else image
    array, meta = transforms.prepare(image, model["input_size"], model["resize"], model["pad_value"])
    deadline = time.time() + 3600
    plain = Job(model=model["name"], array=array, meta=meta, options={}, deadline=deadline)
    with_image = Job(model=model["name"], array=array, meta=meta, options={}, deadline=deadline, image=data)
    reply_to = "s2amnet:replies:0123456789abcdef"
    return encode_job(plain, reply_to), encode_job(with_image, reply_to)


def decode_ms(uploads: list[bytes], model: dict[str, Any]) -> float:
    """Median milliseconds a worker spends on one ``payload=image`` job before its forward: decode (the
    API's rule) and preprocess for ``model``, on one thread."""
    from app.codec import decode_image
    from model import transforms

    times = []
    for data in uploads:
        t0 = time.perf_counter()
        image = decode_image(data, max_pixels=10**9)
        transforms.prepare(image, model["input_size"], model["resize"], model["pad_value"])
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def field_bytes(fields: dict) -> int:
    """Bytes of a stream entry's field names and values (what XADD sends, before the protocol's framing)."""
    return sum(len(k if isinstance(k, bytes) else str(k).encode()) +
               len(v if isinstance(v, bytes) else str(v).encode()) for k, v in fields.items())


# --------------------------------------------------------------------------------------------------- redis
@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A redis-server without persistence on a free port: (url, pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise PayloadBenchError("--payload needs redis-server (apt-get install redis-server)")
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="s2amnet-payload-") as tmp:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
                                 "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            end = time.monotonic() + 15
            while True:
                with contextlib.suppress(redis.RedisError, OSError), redis.Redis.from_url(url) as r:
                    if r.ping():
                        break
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def memory_per_job(url: str, jobs: list[dict]) -> float:
    """Redis's memory per entry of a stream holding ``jobs`` (``MEMORY USAGE ... SAMPLES 0``)."""
    import redis

    key = STREAM + ":memory"
    with redis.Redis.from_url(url) as r:
        r.delete(key)
        pipe = r.pipeline(transaction=False)
        for fields in jobs:
            pipe.xadd(key, fields)
        pipe.execute()
        used = int(r.memory_usage(key, samples=0) or 0)
        r.delete(key)
    return used / len(jobs)


def _producer(url: str, jobs: list[dict], barrier: Any, stop: Any) -> None:
    """XADD the jobs round-robin, BATCH per pipeline, while the backlog is below BACKLOG."""
    import redis

    with redis.Redis.from_url(url) as r:
        barrier.wait()
        i = 0
        while not stop.is_set():
            pipe = r.pipeline(transaction=False)
            pipe.xlen(STREAM)
            for _ in range(BATCH):
                pipe.xadd(STREAM, jobs[i % len(jobs)])
                i += 1
            if pipe.execute()[0] >= BACKLOG:
                time.sleep(0.002)


def _consumer(url: str, name: str, barrier: Any, stop: Any, done: Any, nbytes: Any) -> None:
    """Take jobs as a worker does (XREADGROUP, decode_job, XACK + XDEL in one MULTI), with no forward."""
    import redis

    from app.queue.jobs import decode_job

    with redis.Redis.from_url(url) as r:
        barrier.wait()
        while not stop.is_set():
            res = r.xreadgroup(GROUP, name, {STREAM: ">"}, count=BATCH, block=100)
            ids, size = [], 0
            for _stream, entries in res or []:
                for entry_id, fields in entries:
                    decode_job("bench", fields)
                    size += field_bytes(fields)
                    ids.append(entry_id)
            if not ids:
                continue
            pipe = r.pipeline(transaction=True)
            pipe.xack(STREAM, GROUP, *ids)
            pipe.xdel(STREAM, *ids)
            pipe.execute()
            with done.get_lock():
                done.value += len(ids)
            with nbytes.get_lock():
                nbytes.value += size


def ceiling_round(url: str, redis_pid: int, jobs: list[dict], seconds: float, producers: int,
                  consumers: int) -> dict[str, Any]:
    """Jobs/s and MB/s through one stream with no forward, and the redis-server's CPU in that time."""
    import multiprocessing as mp
    import threading

    import redis

    from app.commands.bench_peers import cpu_seconds

    with redis.Redis.from_url(url) as r:
        r.delete(STREAM)
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ctx = mp.get_context("spawn")  # children without this process's threads (torch's, in s2amnet bench)
    barrier, stop = ctx.Barrier(producers + consumers + 1), ctx.Event()
    done, nbytes = ctx.Value("q", 0), ctx.Value("q", 0)
    procs = [ctx.Process(target=_producer, args=(url, jobs, barrier, stop), daemon=True) for _ in range(producers)]
    procs += [ctx.Process(target=_consumer, args=(url, f"c{i}", barrier, stop, done, nbytes), daemon=True)
              for i in range(consumers)]
    for p in procs:
        p.start()
    try:
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            raise RuntimeError("the producer and consumer processes did not start") from None
        time.sleep(WARMUP_S)
        n0, b0, c0, t0 = done.value, nbytes.value, cpu_seconds([redis_pid]), time.monotonic()
        time.sleep(seconds)
        n1, b1, c1, t1 = done.value, nbytes.value, cpu_seconds([redis_pid]), time.monotonic()
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    wall, cpu, n = t1 - t0, c1 - c0, n1 - n0
    return {"jobs": n, "seconds": round(wall, 3), "jobs_per_s": round(n / wall, 1),
            "mb_per_s": round((b1 - b0) / wall / 1e6, 2), "redis_cpu": round(cpu / wall, 3),
            "jobs_per_redis_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
            "mb_per_redis_cpu_s": round((b1 - b0) / cpu / 1e6, 1) if cpu > 0 else None}


# --------------------------------------------------------------------------------------------------- run
def _check(args: argparse.Namespace) -> None:
    for flag in ("payload_producers", "payload_consumers", "payload_jobs", "payload_synthetic"):
        if int(getattr(args, flag)) < 1:
            raise PayloadBenchError(f"--{flag.replace('_', '-')} must be >= 1")
    if not float(args.payload_seconds) > 0:
        raise PayloadBenchError("--payload-seconds must be > 0")


def _machine(url: str) -> dict[str, Any]:
    import redis

    from model.device import cpu_info

    cpu = cpu_info()[0]
    with redis.Redis.from_url(url) as r:
        version = r.info("server").get("redis_version")
    return {"cpu": cpu, "cores": os.cpu_count(), "redis": version}


def _size_row(model: dict[str, Any], pairs: list[tuple[dict, dict]], uploads: list[bytes]) -> dict[str, Any]:
    array = [field_bytes(a) for a, _ in pairs]
    chosen = [field_bytes(c) for _, c in pairs]
    as_image = sum(1 for _, c in pairs if c["payload"] == "image")
    return {"model": model["name"], "input_size": model["input_size"],
            "upload_bytes": round(statistics.fmean(len(d) for d in uploads)),
            "array_bytes": round(statistics.fmean(array)), "encoded_bytes": round(statistics.fmean(chosen)),
            "image_share": round(as_image / len(pairs), 3),
            "ratio": round(statistics.fmean(array) / statistics.fmean(chosen), 2)}


def bench_payload(args: argparse.Namespace, progress: bool = False) -> dict[str, Any]:
    """Bytes per job for each model and the Redis ceiling for each distinct input size and payload (see the
    module's doc); PayloadBenchError for bad options, RuntimeError when a process does not start."""
    from app.codec import decode_image

    _check(args)
    models = model_inputs(getattr(args, "weights", None))
    uploads, source = load_uploads(getattr(args, "images", None), synthetic=int(args.payload_synthetic))
    decoded = [decode_image(d, max_pixels=10**9) for d in uploads]
    rows, by_size = [], {}
    for model in models:
        pairs = [job_fields(d, model, image) for d, image in zip(uploads, decoded, strict=True)]
        rows.append({**_size_row(model, pairs, uploads), "decode_ms": decode_ms(uploads, model)})
        by_size.setdefault(tuple(model["input_size"]), pairs)
    result: dict[str, Any] = {"uploads": {"source": source, "count": len(uploads),
                                          "mean_bytes": round(statistics.fmean(len(d) for d in uploads)),
                                          "median_bytes": round(statistics.median(len(d) for d in uploads))},
                              "sizes": rows, "ceiling": [],
                              "settings": {"seconds": args.payload_seconds, "producers": args.payload_producers,
                                           "consumers": args.payload_consumers, "jobs": args.payload_jobs,
                                           "batch": BATCH, "backlog": BACKLOG}}
    with redis_server() as (url, pid):
        result["machine"] = _machine(url)
        memory = {size: [memory_per_job(url, [p[k] for p in pairs]) for k in (0, 1)] for size, pairs in by_size.items()}
        for row in rows:
            row["redis_array_bytes"], row["redis_encoded_bytes"] = (round(m) for m in memory[tuple(row["input_size"])])
        for size, pairs in sorted(by_size.items(), reverse=True):
            for k, payload in enumerate(("array", "encoded")):
                jobs = [p[k] for p in spread(pairs, int(args.payload_jobs))]
                if progress:
                    print(f"ceiling: {size[0]}x{size[1]} {payload} ...", file=sys.stderr, flush=True)
                out = ceiling_round(url, pid, jobs, float(args.payload_seconds), int(args.payload_producers),
                                    int(args.payload_consumers))
                result["ceiling"].append({"input_size": list(size), "payload": payload,
                                          "bytes_per_job": round(statistics.fmean(field_bytes(j) for j in jobs)),
                                          **out})
    return result


def _kb(n: float) -> str:
    return f"{n / 1000:.1f} KB" if n < 100_000 else f"{n / 1000:.0f} KB"


def payload_markdown(result: dict[str, Any]) -> list[str]:
    """The section of the report: bytes per job per model, then the ceiling per input size and payload."""
    m, u, st = result["machine"], result["uploads"], result["settings"]
    lines = ["## Bytes through Redis", "",
             f"`{result.get('command', 's2amnet bench --payload')}` on {m['cpu'] or 'an unnamed CPU'} "
             f"({m['cores']} cores), redis-server {m['redis']}; uploads: {u['source']}, mean {_kb(u['mean_bytes'])}, "
             f"median {_kb(u['median_bytes'])}.", "",
             "| model | input | array payload | chosen payload | sent as the image | Redis memory per queued job, "
             "array → chosen | smaller by | worker decode + preprocess |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["sizes"]:
        h, w = r["input_size"]
        lines.append(f"| {r['model']} | {h}×{w} | {_kb(r['array_bytes'])} | {_kb(r['encoded_bytes'])} | "
                     f"{r['image_share']:.0%} | {_kb(r['redis_array_bytes'])} → {_kb(r['redis_encoded_bytes'])} | "
                     f"{r['ratio']:.1f}× | {r['decode_ms']:.1f} ms |")
    lines += ["", f"Redis-bound ceiling: {st['producers']} producer and {st['consumers']} consumer processes, "
              f"batches of {st['batch']}, backlog ≤ {st['backlog']}, no forward, {st['seconds']:g} s per round "
              "(jobs per Redis CPU-second: the ceiling of a Redis with a core of its own).", "",
              "| input | payload | bytes/job | jobs/s | MB/s | Redis CPU busy | jobs per Redis CPU-s | "
              "MB per Redis CPU-s |", "|---|---|---|---|---|---|---|---|"]
    for c in result["ceiling"]:
        h, w = c["input_size"]
        lines.append(f"| {h}×{w} | {c['payload']} | {_kb(c['bytes_per_job'])} | {c['jobs_per_s']:.0f} | "
                     f"{c['mb_per_s']:.1f} | {c['redis_cpu']:.0%} | {c['jobs_per_redis_cpu_s'] or 0:.0f} | "
                     f"{c['mb_per_redis_cpu_s'] or 0:.0f} |")
    ratios = []
    for size in {tuple(c["input_size"]) for c in result["ceiling"]}:
        pair = {c["payload"]: c for c in result["ceiling"] if tuple(c["input_size"]) == size}
        if "array" in pair and "encoded" in pair and pair["array"]["jobs_per_s"]:
            ratios.append(f"{size[0]}×{size[1]}: {pair['encoded']['jobs_per_s'] / pair['array']['jobs_per_s']:.1f}×")
    if ratios:
        lines += ["", "Jobs/s with the chosen payload over the array, same run: " + ", ".join(sorted(ratios)) + "."]
    return lines


def _command() -> str:
    if Path(sys.argv[0]).name == "s2amnet":
        return shlex.join(["s2amnet", *sys.argv[1:]])
    return shlex.join(["python", "-m", "app.commands.bench_payload", *sys.argv[1:]])


def run_payload(args: argparse.Namespace) -> int:
    """`s2amnet bench --payload`: measure, print the Markdown section (and a JSON line with ``--json``)."""
    try:
        result = bench_payload(args, progress=not getattr(args, "json", False))
    except PayloadBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result["command"] = _command()
    print("\n".join(payload_markdown(result)))
    if getattr(args, "json", False):
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m app.commands.bench_payload``: the same measurement without the rest of `s2amnet bench`."""
    parser = argparse.ArgumentParser(prog="python -m app.commands.bench_payload", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", help="weights folders (default: every model folder in ./weights)")
    parser.add_argument("--json", action="store_true", help="last line of output is one JSON object")
    add_arguments(parser)
    return run_payload(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
