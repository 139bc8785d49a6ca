"""`s2amnet bench`: speed (and peak memory) of the shipped models and of the service, as ratios measured in
the same run (these machines are noisy: absolute milliseconds move between runs, ratios much less).

Two parts:

* model — `Predictor.infer` (the forward the service runs, TTA as in each manifest) on random images at the
  model's input size, per batch size (timed in interleaved rounds; medians): ms per image, images/s and
  the batching gain (images/s at batch B ÷ images/s at batch 1). On CUDA also the peak GPU memory per batch;
  on a CPU also what `S2AMNET_FORWARD_BATCH=auto` picks (`Predictor.tune_forward_batch`) and the largest
  batch timed in forwards of that size. The process tunes glibc's allocator as the service does
  (`S2AMNET_ALLOCATOR_TUNING`, on by default).
* service (`--http`, on by default) — `s2amnet serve` started as a real process (embedded batching) with one
  model, and a second one with `--max-batch-size 1`; the same requests (one PNG each) sent one at a time
  and `--concurrency` at a time to the first, `--concurrency` at a time to the second (in alternating
  slices): latency p50/p95, requests/s, the dynamic-batching gain (req/s concurrent ÷ req/s concurrent
  without batching), the concurrency gain (÷ req/s one at a time) and the overhead of the whole HTTP path
  over the bare forward (p50 one at a time ÷ the batch-1 forward time, timed in this process in blocks that
  alternate with blocks of those requests, so that both see the same spells of a shared machine; also block
  by block: the quartiles of each block's p50 less the median of the forwards timed just before it).

`--out BENCHMARKS.md` writes the tables with the machine they ran on; `--plot PNG` draws them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from tqdm import tqdm


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the models and the service (ratios measured in one run)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--weights", nargs="+", help="weights folders (default: every model folder in ./weights)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per batch size (median; default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads, here and in the service")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                   help="also benchmark the HTTP service (default on; --no-http skips it)")
    p.add_argument("--http-model", help="weights folder the service part uses (default: the first --weights)")
    p.add_argument("--http-image", help="image file the service part sends (a real part; default: a random PNG "
                   "at the model's input size, the costliest to decode)")
    p.add_argument("--requests", type=int, default=48, help="requests at each concurrency level (default 48)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight in the concurrent round (>= 2; default 8)")
    p.add_argument("--backends", nargs="?", const="all", default=None, metavar="LIST",
                   help="also time each model under every inference backend beside eager PyTorch (or only "
                        "those of a comma-separated LIST, e.g. onnxruntime,openvino; exports and compiled "
                        "packages are cached: the first run of 'compile' takes minutes per model)")
    p.add_argument("--out", help="write the results as Markdown here (e.g. BENCHMARKS.md)")
    p.add_argument("--plot", help="write a PNG of the results here")
    p.add_argument("--json", action="store_true", help="last line of output is one JSON object")
    from app.commands.bench_peers import add_arguments as add_peer_arguments

    add_peer_arguments(p)
    from app.commands.bench_redis_path import add_arguments as add_redis_path_arguments

    add_redis_path_arguments(p)
    from app.commands.bench_line import add_arguments as add_line_arguments
    from app.commands.bench_payload import add_arguments as add_payload_arguments

    add_payload_arguments(p)  # after the peers' arguments: it reuses their --images
    add_line_arguments(p)
    from app.commands.bench_soak import add_arguments as add_soak_arguments

    add_soak_arguments(p)
    p.set_defaults(func=run)


class BenchError(ValueError):
    """Bad options or weights: reported as `error: ...`, exit 2."""


def _allocator_tuning_setting() -> bool:
    """S2AMNET_ALLOCATOR_TUNING as the service reads it (the timed forwards run like the service's; the
    `--http` servers inherit the environment)."""
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings().allocator_tuning
    except ValidationError as exc:
        raise BenchError(f"service settings from the environment: {exc}") from None


def positive_ints(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers >= 1 (option ``flag``), sorted and without repeats; BenchError else."""
    try:
        values = {int(t) for t in text.split(",") if t.strip()}
    except ValueError:
        raise BenchError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise BenchError(f"{flag} must be integers >= 1, got {text!r}")
    return sorted(values)


def _batch_sizes(text: str) -> list[int]:
    return sorted(set(positive_ints(text, "--batch-sizes")) | {1})  # batch 1: what every gain is measured against


def _weights(args) -> list[Path]:
    if args.weights:
        folders = [Path(w) for w in args.weights]
    else:
        from app.models import find_model_folders

        try:
            folders = [folder for _, folder in find_model_folders(Path("weights"))]
        except RuntimeError as exc:
            raise BenchError(f"no --weights given and {exc}") from None
    for f in folders:
        if not (f / "manifest.json").is_file():
            raise BenchError(f"{f} is not a weights folder (no manifest.json)")
    return folders


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ------------------------------------------------------------------------------------------------ model part
def bench_model(folder: Path, batch_sizes: list[int], iters: int, device: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from model.predictor import Predictor

    predictor = Predictor.from_folder(folder, device=device)
    unfused = Predictor.from_folder(folder, device=device, fuse=False)  # BatchNorm as trained, for the ratio
    h, w = predictor.input_size
    rng = np.random.default_rng(0)
    inputs = {b: [rng.integers(0, 256, (3, h, w), dtype=np.uint8) for _ in range(b)] for b in batch_sizes}
    for arrays in inputs.values():
        predictor.infer(arrays)  # warm-up (allocator, cudnn autotune)
    unfused.infer(inputs[batch_sizes[0]])
    cuda = device.startswith("cuda")
    top = max(batch_sizes)
    tuned: dict[str, Any] | None = None
    if not cuda and top > 1:  # what S2AMNET_FORWARD_BATCH=auto picks for the service on this CPU
        measured = predictor.tune_forward_batch(top)
        tuned = {"chosen": predictor.forward_batch, "batch": top,
                 "measured_ms_per_image": {str(k): round(v, 3) for k, v in measured.items()}}
        predictor.forward_batch = None
    chunked: list[float] = []
    unfused_times: list[float] = []
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    peak: dict[int, float] = {}
    # interleaved: every round times each batch size once, so a slow spell of a shared machine hits all
    # of them alike and the ratios between them hold better than the absolute times
    for _ in range(iters):
        for b, arrays in inputs.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            predictor.infer(arrays)  # returns CPU tensors: the GPU work is finished
            times[b].append(time.perf_counter() - t0)
            if cuda:
                peak[b] = max(peak.get(b, 0.0), torch.cuda.max_memory_allocated() / 2**20)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        unfused.infer(inputs[batch_sizes[0]])
        unfused_times.append(time.perf_counter() - t0)
        if tuned and tuned["chosen"] < top:  # the largest batch again, in forwards of the chosen size
            predictor.forward_batch = tuned["chosen"]
            t0 = time.perf_counter()
            predictor.infer(inputs[top])
            chunked.append(time.perf_counter() - t0)
            predictor.forward_batch = None
    rows = []
    for b in batch_sizes:
        ms = statistics.median(times[b]) / b * 1000.0
        row = {"batch": b, "ms_per_image": round(ms, 3), "images_per_s": round(1000.0 / ms, 1)}
        if cuda:
            row["peak_gpu_mib"] = round(peak[b], 1)
        rows.append(row)
    base = rows[0]["images_per_s"]  # batch 1 (always measured)
    for r in rows:
        r["gain_vs_batch1"] = round(r["images_per_s"] / base, 2)
    del unfused
    out = {"model": predictor.name, "folder": str(folder), "task": predictor.task,
           "version": str(predictor.version), "input_size": [h, w], "tta": list(predictor.tta), "rows": rows}
    b0 = batch_sizes[0]
    ms_unfused = statistics.median(unfused_times) / b0 * 1000.0
    out["batchnorm_folding"] = {"batch": b0, "ms_per_image_unfused": round(ms_unfused, 3),
                                "gain": round(ms_unfused / rows[0]["ms_per_image"], 3)}
    if tuned:
        whole = rows[-1]["ms_per_image"]
        split = statistics.median(chunked) / top * 1000.0 if chunked else whole
        out["forward_batch"] = {**tuned, "ms_per_image_whole": whole, "ms_per_image_chosen": round(split, 3),
                                "gain": round(whole / split, 2)}
    return out


# ---------------------------------------------------------------------------------------------- service part
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timings_of(folder: Path, result: dict[str, Any], sizes: list[int], iters: int, device: str) -> dict[str, Any]:
    """The models part's entry for ``folder`` in ``result``, or the model timed now when that part did not time it
    (the bare forward that the server parts compare with)."""
    folder = Path(folder).resolve()
    found = next((m for m in result["models"] if Path(m["folder"]).resolve() == folder), None)
    return found or bench_model(folder, sizes, iters, device)


def _serve_cmd(folder: Path, device: str, threads: int | None, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The `s2amnet serve` command line with the one model of `folder` on `port`."""
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--weights-dir", str(folder.resolve().parent), "--models", folder.name, "--device", device,
           "--log-level", "warning", *extra]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    return cmd


def _task_and_size(folder: Path) -> tuple[str, list[int]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest["task"], list(manifest["arch"]["input_size"])


SERVICE_BACKEND_ENV = ("S2AMNET_BACKEND", "S2AMNET_MODEL_BACKEND", "S2AMNET_CACHE_DIR")


def service_backend(device: str) -> str:
    """What runs the forwards of the benchmark's `s2amnet serve` processes on ``device``, as the report states it."""
    from app.runtime import default_backend
    from app.settings import Settings

    settings = Settings()
    backend = settings.backend or f"{default_backend(device.split(':')[0])} (default)"
    per_model = ",".join(f"{name}={b}" for name, b in settings.model_backend.items())
    return backend + (f" ({per_model})" if per_model else "")


def _as_served(predictor) -> None:
    """Let ``predictor`` run its forwards with the backend the benchmark's `s2amnet serve` gives its model
    (S2AMNET_BACKEND / S2AMNET_MODEL_BACKEND, unset: the device's default), so that the bare forward that the
    service is compared with is the service's own."""
    from app.runtime import set_backend
    from app.settings import Settings

    set_backend(predictor.name, predictor, Settings(), max_batch=1)


def _process_env(**extra: str) -> dict[str, str]:
    """This environment without S2AMNET_* settings (the benchmark's servers get only their flags) except what
    runs the forwards (`SERVICE_BACKEND_ENV`: `S2AMNET_BACKEND=compile s2amnet bench ...` measures the service
    on that backend), the repository on PYTHONPATH, records off (nothing written where the benchmark runs;
    `--line` measures them), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2AMNET_") or k in SERVICE_BACKEND_ENV}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return {**env, "S2AMNET_RECORDS": "false", **extra}


@contextlib.contextmanager
def _launch(cmd: list[str], env: dict[str, str], ready: str | Callable[[], bool], log_path: Path,
            what: str = "the service"):
    """`cmd` as a process in a session of its own, until GET `ready` (a URL) answers 200 or `ready()` is
    true; yields the process and ends its whole process group (SIGTERM, then SIGKILL after 30 s) on exit."""
    import signal

    import httpx

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if ready() if callable(ready) else httpx.get(ready, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready after 180 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the group is the process's own session: it and its children
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived it (none, normally)


@contextlib.contextmanager
def _service(folder: Path, device: str, threads: int | None, log_path: Path, extra: tuple[str, ...] = ()):
    """`s2amnet serve` (embedded batching) with the one model of `folder`, on a free local port."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with _launch(_serve_cmd(folder, device, threads, port, extra), _process_env(), url + "/readyz", log_path):
        yield url


BLOCK = 8  # one at a time: requests between two blocks of bare forwards, and forwards per block


def _count(r, latency: float, latencies: list[float], statuses: dict[int, int],
           server: list[tuple[float, float]] | None, bar) -> None:
    """One answer into a round's tallies."""
    latencies.append(latency)
    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    if server is not None and r.status_code == 200:
        timing = r.json()["timing_ms"]
        server.append((timing["queue"], timing["inference"]))
    bar.update(1)


async def _concurrent(url: str, path: str, part: tuple[str, bytes, str], n: int, concurrency: int,
                      bar, server: list[tuple[float, float]] | None) -> tuple[list[float], dict, float]:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(path, files={"file": part})
                _count(r, time.perf_counter() - t0, latencies, statuses, server, bar)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
    return latencies, statuses, wall


def _one_at_a_time(url: str, path: str, part: tuple[str, bytes, str], n: int, bar,
                   server: list[tuple[float, float]] | None,
                   between: Callable[[], None] | None) -> tuple[list[float], dict, float]:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    paused = 0.0
    with httpx.Client(base_url=url, timeout=120) as client:
        t0 = time.perf_counter()
        for i in range(n):
            if between is not None and i % BLOCK == 0:
                t1 = time.perf_counter()
                between()
                paused += time.perf_counter() - t1
            t1 = time.perf_counter()
            r = client.post(path, files={"file": part})
            _count(r, time.perf_counter() - t1, latencies, statuses, server, bar)
        wall = time.perf_counter() - t0 - paused
    return latencies, statuses, wall


def run_round(url: str, path: str, part: tuple[str, bytes, str], n: int, concurrency: int, bar,
              server: list[tuple[float, float]] | None = None,
              between: Callable[[], None] | None = None) -> tuple[list[float], dict, float]:
    """`n` requests, at most `concurrency` in flight: (latencies s, {status: count}, wall s). ``server``
    collects each answer's own ``timing_ms`` (queue, inference) when given. One at a time, a blocking
    client sends them (with one request in flight there is nothing to overlap, and an asyncio client,
    httpx.AsyncClient, added about 0.7 ms of its own to each request, measured side by side), and
    ``between`` runs before every BLOCK requests, outside their latencies and the round's wall time."""
    if concurrency == 1:
        return _one_at_a_time(url, path, part, n, bar, server, between)
    if between is not None:
        raise ValueError("between runs between requests one at a time only")
    return asyncio.run(_concurrent(url, path, part, n, concurrency, bar, server))


def _summary(concurrency: int, latencies: list[float], statuses: dict[int, int], wall: float) -> dict[str, Any]:
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"concurrency": concurrency, "requests": len(latencies), "ok": statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "p50_ms": round(statistics.median(latencies) * 1000, 2), "p95_ms": round(q[18] * 1000, 2),
            "requests_per_s": round(len(latencies) / wall, 2)}


def bench_service(folder: Path, task: str, input_size: list[int], args, device: str,
                  progress: bool) -> dict[str, Any]:
    """Three rounds of `--requests` each: one at a time and `--concurrency` at a time against the service
    as configured, and `--concurrency` at a time against a second instance with `--max-batch-size 1` (the
    same service without dynamic batching: the baseline of the batching gain). The rounds alternate in
    three slices, so that all see the same spells of a shared machine; before every BLOCK requests one at a
    time, this process times BLOCK bare batch-1 forwards of the same image (`Predictor.infer`), the figure
    that the one-at-a-time latency is compared with, block by block. Blocks, not a forward before each
    request: two processes' forwards back to back slow each other (caches, torch's spinning threads), so the
    service's forward right after this process's is slower than between requests that come on their own.
    The image: ``--http-image`` when given (a real part, as a line sends it), else a random RGB PNG at the
    input size (incompressible: the costliest to decode)."""
    import tempfile

    import numpy as np

    from app.client import _image_bytes  # the client's lossless PNG encoding of an array
    from app.codec import decode_image
    from model.predictor import Predictor

    predictor = Predictor.from_folder(folder, device=device)
    _as_served(predictor)
    if args.http_image:
        path = Path(args.http_image)
        part = (path.name, path.read_bytes(), "application/octet-stream")
        decoded = decode_image(part[1], max_pixels=10**9)
        kind = Path(part[0]).suffix.lstrip(".").upper() or "image"
        described = f"{decoded.width}x{decoded.height} {kind} ({part[0]}, {len(part[1]) / 1024:.0f} KiB)"
        chw = predictor.preprocess(decoded).array
    else:
        image = np.random.default_rng(1).integers(0, 256, (*input_size, 3), dtype=np.uint8)
        part = _image_bytes(image)
        described = f"{input_size[1]}x{input_size[0]} PNG"
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    predictor.infer([chw])  # warm-up
    forwards: list[list[float]] = []  # one block of bare forwards before every BLOCK requests one at a time, s

    def bare_forwards() -> None:
        times = []
        for _ in range(BLOCK):
            t0 = time.perf_counter()
            predictor.infer([chw])
            times.append(time.perf_counter() - t0)
        forwards.append(times)
        time.sleep(0.05)  # torch's idle threads spin for a while after a forward: not into the requests' time

    path = f"/{task}"
    tmp = Path(tempfile.gettempdir())
    c = args.concurrency
    rounds = [("batched", 1), ("batched", c), ("unbatched", c)]
    slices = [len(part) for part in (range(args.requests)[i::3] for i in range(3)) if len(part)]
    acc: dict[tuple[str, int], tuple[list[float], dict[int, int], float]] = {k: ([], {}, 0.0) for k in rounds}
    with contextlib.ExitStack() as stack:
        urls = {"batched": stack.enter_context(_service(folder, device, args.threads,
                                                        tmp / f"s2amnet-bench-{os.getpid()}.log")),
                "unbatched": stack.enter_context(_service(folder, device, args.threads,
                                                          tmp / f"s2amnet-bench-{os.getpid()}-b1.log",
                                                          ("--max-batch-size", "1")))}
        bar = tqdm(total=3 * args.requests + 4, desc="service", unit="req", disable=not progress, leave=False)
        for url in urls.values():
            run_round(url, path, part, 2, 1, bar)  # warm-up: connections, first batch
        alone: list[tuple[float, float]] = []  # the service's own queue and inference ms, one at a time
        for n in slices:
            for key in rounds:
                one_at_a_time = key == ("batched", 1)
                lat, st, wall = run_round(urls[key[0]], path, part, n, key[1], bar,
                                          alone if one_at_a_time else None,
                                          bare_forwards if one_at_a_time else None)
                lat0, st0, wall0 = acc[key]
                for k, v in st.items():
                    st0[k] = st0.get(k, 0) + v
                acc[key] = (lat0 + lat, st0, wall0 + wall)
        bar.close()
    seq, conc, unbatched = ({**_summary(key[1], *acc[key]), "max_batch_size": "1" if key[0] == "unbatched"
                             else "default"} for key in rounds)
    forward_ms = statistics.median(t for block in forwards for t in block) * 1000.0
    # block by block: the p50 of each block of requests less the median of the forwards timed just before it
    starts = [sum(slices[:k]) + i for k, n in enumerate(slices) for i in range(0, n, BLOCK)]
    seq_lat = acc[rounds[0]][0]
    by_block = [(statistics.median(seq_lat[a:b]) - statistics.median(fw)) * 1000.0
                for a, b, fw in zip(starts, [*starts[1:], len(seq_lat)], forwards, strict=True)]
    over = statistics.quantiles(by_block, n=4, method="inclusive") if len(by_block) > 1 else by_block * 3
    return {"model": folder.name, "endpoint": path, "image": described,
            "rounds": [seq, conc, unbatched],
            "batching_gain": round(conc["requests_per_s"] / unbatched["requests_per_s"], 2),
            "concurrency_gain": round(conc["requests_per_s"] / seq["requests_per_s"], 2),
            "http_overhead_vs_forward": round(seq["p50_ms"] / forward_ms, 2),
            "alone_ms": {"p50": seq["p50_ms"], "forward": round(forward_ms, 2), "forward_backend": predictor.backend,
                         "over_forward": {"blocks": len(by_block), "p25": round(over[0], 2),
                                          "p50": round(over[1], 2), "p75": round(over[2], 2)},
                         "queue": round(statistics.median(q for q, _ in alone), 2) if alone else None,
                         "inference": round(statistics.median(i for _, i in alone), 2) if alone else None}}


def _checked(args) -> tuple[list[int], list[Path], Path, str, bool, dict[str, list[int]]]:
    """The options, checked: (batch sizes, weights folders, the service part's folder, device, allocator tuning,
    the concurrency levels of the peers and of the Redis path). Raises BenchError."""
    from app.commands import bench_peers
    from app.commands.bench_redis_path import check_args as check_redis_path_args
    from app.commands.bench_soak import check_args as check_soak_args
    from model.device import missing_gpu, resolve_device

    sizes = _batch_sizes(args.batch_sizes)
    folders = _weights(args)
    http_folder = Path(args.http_model) if args.http_model else folders[0]
    if args.http and not (http_folder / "manifest.json").is_file():
        raise BenchError(f"--http-model {http_folder} is not a weights folder (no manifest.json)")
    if args.http_image and not Path(args.http_image).is_file():
        raise BenchError(f"--http-image {args.http_image}: no such file")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 's2amnet[train]'") from None
    for flag, v in (("--iters", args.iters), ("--requests", args.requests), ("--threads", args.threads)):
        if v is not None and v < 1:
            raise BenchError(f"{flag} must be >= 1, got {v}")
    if args.http and args.concurrency < 2:  # its round is compared with the one-at-a-time round
        raise BenchError(f"--concurrency must be >= 2 (one at a time is always measured), got {args.concurrency}")
    device = resolve_device(args.device)
    if missing_gpu(device):
        raise BenchError(f"--device {device}: no CUDA device here")
    from app.settings import BackendName

    if os.environ.get("S2AMNET_BACKEND", "").strip() not in ("", *get_args(BackendName)):
        raise BenchError(f"S2AMNET_BACKEND={os.environ['S2AMNET_BACKEND']}: not one of "
                         f"{', '.join(get_args(BackendName))}")
    if args.backends not in (None, "all"):
        known = [b for b in get_args(BackendName) if b not in ("auto", "eager")]
        unknown = [b.strip() for b in args.backends.split(",") if b.strip() not in known]
        if unknown:
            raise BenchError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    allocator_tuning = _allocator_tuning_setting()
    levels = {"peers": bench_peers.check_args(args), "redis_path": check_redis_path_args(args)}
    check_soak_args(args)
    return sizes, folders, http_folder, device, allocator_tuning, levels


def _time_models(args, folders: list[Path], sizes: list[int], device: str,
                 progress: bool) -> tuple[list[dict], list[dict] | None]:
    """(each model's timings, each model's backends or None)."""
    models = [bench_model(folder, sizes, args.iters, device)
              for folder in tqdm(folders, desc="models", unit="model", disable=not progress, leave=False)]
    backends = None
    if args.backends:
        from app.commands.bench_backends import bench_backends

        names = None if args.backends == "all" else [b.strip() for b in args.backends.split(",") if b.strip()]
        backends = [bench_backends(folder, args.iters, device, args.threads, names)
                    for folder in tqdm(folders, desc="backends", unit="model", disable=not progress, leave=False)]
    return models, backends


def _servers(args, result: dict[str, Any], http_folder: Path, sizes: list[int], device: str,
             levels: dict[str, list[int]], progress: bool) -> int:
    """The parts that start servers (--http, --peers, --redis-path, --line, --soak), into ``result``; an exit
    status."""
    from app.commands import bench_peers
    from model.checkpoint import CheckpointError

    try:
        if args.http:
            result["service"] = bench_service(http_folder, *_task_and_size(http_folder), args, device, progress)
        if args.peers and (code := bench_peers.run_peers(args, levels["peers"], result, sizes, device, progress)):
            return code
        if args.redis_path:
            from app.commands.bench_redis_path import run_redis_path

            run_redis_path(args, levels["redis_path"], result, sizes, device, progress)
        if args.line:
            from app.commands.bench_line import bench_line

            result["line"] = bench_line(http_folder, *_task_and_size(http_folder), args, device, progress)
        if args.soak:
            from app.commands.bench_soak import bench_soak

            result["soak"] = bench_soak(args, device, progress)
    except (BenchError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a process did not start: its log tail is in the message
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    if args.payload:  # Redis bytes only: no models timed
        from app.commands.bench_payload import run_payload

        return run_payload(args)
    import torch

    from app.commands import bench_peers
    from app.commands.bench_peers import shown_command
    from app.commands.bench_report import machine, plot, to_markdown
    from app.runtime import tune_allocator
    from model.checkpoint import CheckpointError

    try:
        sizes, folders, http_folder, device, allocator_tuning, levels = _checked(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator_tuned = tune_allocator() if allocator_tuning else False  # as the service does
    progress = not args.json
    try:
        models, backends = _time_models(args, folders, sizes, device, progress)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = shown_command(sys.argv[1:], getattr(args, "images", None), args.http_image)
    result: dict[str, Any] = {"command": command, "time": time.time(),
                              "machine": {**machine(device), "allocator_tuning": allocator_tuned,
                                          "service_backend": service_backend(device)}, "models": models,
                              "peak_rss_mib": round(_peak_rss_mib(), 1)}
    if backends is not None:
        result["backends"] = backends
    if code := _servers(args, result, http_folder, sizes, device, levels, progress):
        return code
    md = to_markdown(result)
    if args.out:
        Path(args.out).write_text(bench_peers.out_text(args, result, md))
    if args.plot:
        plot(result, args.plot)
    print(md)
    if args.json:
        print(json.dumps(result))
    return 0
