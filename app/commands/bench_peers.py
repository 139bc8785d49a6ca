"""`s2amnet bench --peers`: `s2amnet serve` beside the servers the same model could be put behind, in the
same run, with the same weights, the same decoding and preprocessing and eager PyTorch in every one:

* s2amnet — `s2amnet serve` (embedded dynamic batching), `POST /{task}`;
* fastapi — a plain FastAPI app, one forward per request (`app.commands.peers.plain_fastapi`);
* litserve — LitServe with its own batching (`app.commands.peers.litserve_server`; the `bench` extra:
  reported as skipped, with the reason, when it is not installed);
* with `--peer-redis`, s2amnet in Redis mode (`s2amnet serve --redis-url` and one, then two `s2amnet worker`
  processes behind a redis-server of its own).

One client drives them all. Closed loop: `--peer-requests` requests per server at each level of
`--peer-concurrency` (at most that many in flight); images/s, p50/p95/p99, errors, the CPU the server's
processes used (% of all cores), and ratios to the bare forward (`Predictor.infer` at its best batch in
this run) and to LitServe at the same level. Open loop: requests at fixed intervals for `--open-loop-s`
seconds, at `--open-loop-load` (70 %) of the best images/s that server reached in the closed loop, sent on
time whatever is still unanswered (a line with a steady part rate); latency counts from the scheduled
send. All servers run at once and are driven one after another in three alternating slices per level,
so that the slow spells of a shared machine hit all of them alike; each server's CPU is also sampled
while none is driven (idle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.commands.bench import BenchError, _free_port, _launch, _process_env, _serve_cmd, positive_ints
from app.commands.bench_report import machine_line

SLICES = 3
IDLE_S = 3.0
TARGET = {"server": "s2amnet", "versus": "litserve", "concurrency": 16, "ratio": 1.5}
_TICKS = os.sysconf("SC_CLK_TCK")
# s2amnet serve as the peers run: serving only, no inspection records (the peers keep none either)
SERVE_ENV = {"S2AMNET_RECORDS": "false"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peers (--peers)")
    g.add_argument("--peers", action="store_true",
                   help="also run a plain FastAPI server and LitServe on the same weights beside s2amnet serve")
    g.add_argument("--peer-model", default="weights/mt-classify", help="weights folder the peers serve")
    g.add_argument("--peer-concurrency", default="1,4,16,64", help="closed-loop requests in flight (1,4,16,64)")
    g.add_argument("--peer-requests", type=int, default=240,
                   help="closed-loop requests per server at each concurrency level (default 240: a p99 between "
                        "the 3rd and 4th slowest, not the slowest)")
    g.add_argument("--open-loop-s", type=float, default=30.0, help="open-loop seconds per server (0: none)")
    g.add_argument("--open-loop-load", type=float, default=0.7,
                   help="open-loop arrival rate as a fraction of the server's best closed-loop images/s")
    g.add_argument("--images", help="send the images under this folder (JPEGs, else PNG/BMP; at most 64) "
                   "instead of random PNGs at the model's input size")
    g.add_argument("--peer-redis", action="store_true",
                   help="also s2amnet in Redis mode with one and with two workers (needs redis-server)")
    g.add_argument("--litserve-batch", type=int, default=4, help="LitServe's max_batch_size (default 4)")
    g.add_argument("--peers-plot", help="write a PNG of throughput and p99 per concurrency here")
    g.add_argument("--merge", action="store_true",
                   help="with --out: replace only the sections of an existing file that this run measures "
                        "and that stand on their own (Backends, Service, Peers, Redis path), keep the others")


def check_args(args: argparse.Namespace) -> list[int]:
    """The concurrency levels; BenchError for bad peer options."""
    levels = positive_ints(args.peer_concurrency, "--peer-concurrency")
    if args.merge and not args.out:
        raise BenchError("--merge needs --out")
    if not args.peers:
        return levels
    if not (Path(args.peer_model) / "manifest.json").is_file():
        raise BenchError(f"--peer-model {args.peer_model} is not a weights folder (no manifest.json)")
    for flag, v in (("--peer-requests", args.peer_requests), ("--litserve-batch", args.litserve_batch)):
        if v < 1:
            raise BenchError(f"{flag} must be >= 1, got {v}")
    if args.peer_requests < SLICES:
        raise BenchError(f"--peer-requests must be >= {SLICES} (one per slice), got {args.peer_requests}")
    if args.open_loop_s < 0 or not 0 < args.open_loop_load <= 1:
        raise BenchError("--open-loop-s must be >= 0 and --open-loop-load in (0, 1]")
    if args.images and not Path(args.images).is_dir():
        raise BenchError(f"--images {args.images} is not a folder")
    if args.peer_redis and not shutil.which("redis-server"):
        raise BenchError("--peer-redis needs redis-server on PATH")
    if args.peers_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--peers-plot needs matplotlib: pip install 's2amnet[train]'") from None
    return levels


# ---------------------------------------------------------------------------------------------------- images
def load_images(folder: str | None, input_size: list[int], limit: int = 64) -> tuple[list[tuple], str]:
    """The request bodies ((filename, bytes, content type), ...) and how to describe them: up to `limit`
    files spread over `folder` (JPEGs; PNG/BMP when it has none), else 8 random PNGs at the input size."""
    if folder is None:
        import numpy as np

        from app.client import _image_bytes  # the client's lossless PNG encoding of an array

        rng = np.random.default_rng(1)
        parts = [_image_bytes(rng.integers(0, 256, (*input_size, 3), dtype=np.uint8)) for _ in range(8)]
        return parts, f"8 random {input_size[1]}x{input_size[0]} PNGs"
    files: list[Path] = []
    for suffixes in ((".jpg", ".jpeg"), (".png", ".bmp")):
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        if files:
            break
    if not files:
        raise BenchError(f"--images {folder}: no JPEG, PNG or BMP files")
    picked = files[:: max(1, len(files) // limit)][:limit]
    parts = [(p.name, p.read_bytes(), "image/jpeg" if p.suffix.lower() in (".jpg", ".jpeg") else
              "application/octet-stream") for p in picked]
    kb = sum(len(b) for _, b, _ in parts) / len(parts) / 1024
    kind = picked[0].suffix.lstrip(".").upper()
    return parts, f"{len(parts)} {kind} files of {Path(folder).name} (mean {kb:.0f} KiB)"


# ------------------------------------------------------------------------------------------------------- CPU
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(roots: list[int]) -> list[int]:
    """The processes `roots` and all their live descendants (from /proc), each once."""
    kids = _children()
    todo, seen = list(roots), []
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(kids.get(pid, []))
    return seen


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU seconds of the processes `roots` and all their live descendants (from /proc)."""
    total = 0.0
    for pid in process_tree(roots):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has been busy (all cores, from /proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS


# --------------------------------------------------------------------------------------------------- servers
@dataclass
class Server:
    name: str
    what: str
    url: str
    path: str
    pids: list[int] = field(default_factory=list)


def _s2amnet(stack: contextlib.ExitStack, folder: Path, task: str, device: str, threads: int | None,
             log_dir: Path) -> Server:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = stack.enter_context(_launch(_serve_cmd(folder, device, threads, port), _process_env(**SERVE_ENV),
                                       url + "/readyz", log_dir / "s2amnet.log", "s2amnet serve"))
    return Server("s2amnet", "`s2amnet serve`, embedded dynamic batching, records off", url, f"/{task}", [proc.pid])


def _script(stack: contextlib.ExitStack, name: str, module: str, what: str, folder: Path, device: str,
            threads: int | None, log_dir: Path, extra: tuple[str, ...] = ()) -> Server:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", f"app.commands.peers.{module}", "--weights", str(folder), "--port", str(port),
           "--device", device, *(["--threads", str(threads)] if threads else []), *extra]
    proc = stack.enter_context(_launch(cmd, _process_env(), url + "/health", log_dir / f"{name}.log", name))
    return Server(name, what, url, "/predict", [proc.pid])


def _redis_mode(stack: contextlib.ExitStack, folder: Path, task: str, device: str, threads: int | None,
                log_dir: Path, workers: int, metrics_port: int = 0, api_env: dict[str, str] | None = None) -> Server:
    """A redis-server of its own, `workers` `s2amnet worker` processes (up once each heartbeats) and
    `s2amnet serve --redis-url` in front of them. ``metrics_port``: the (one) worker's Prometheus port, 0: off;
    ``api_env``: settings of the API beside SERVE_ENV."""
    import redis

    if metrics_port and workers > 1:
        raise ValueError("one metrics port serves one worker")
    port = _free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    r = stack.enter_context(contextlib.closing(redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)))

    def answers(test=lambda: r.ping()):
        try:
            return bool(test())
        except (redis.RedisError, OSError):
            return False

    tag = f"redis-{workers}w"
    pids = [stack.enter_context(_launch(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(log_dir)], _process_env(), answers, log_dir / f"{tag}-redis.log", "redis-server")).pid]
    # CPU workers on one machine share its cores: each gets its share of the threads, as DEPLOY.md advises
    # (each with every core's worth of threads, their forwards wait for each other's at every op)
    per_worker = threads
    if workers > 1 and not device.startswith("cuda"):
        from app.runtime import default_torch_threads

        per_worker = max(1, (threads or default_torch_threads()) // workers)
    base = [sys.executable, "-m", "app.cli", "worker", "--redis-url", redis_url, "--weights-dir",
            str(folder.resolve().parent), "--models", folder.name, "--device", device,
            "--metrics-port", str(metrics_port), "--log-level", "warning",
            *(["--torch-threads", str(per_worker)] if per_worker else [])]
    for i in range(workers):
        up = i + 1
        pids.append(stack.enter_context(_launch(
            base, _process_env(), lambda up=up: answers(lambda: len(list(r.scan_iter("s2amnet:worker:*"))) >= up),
            log_dir / f"{tag}-worker{i}.log", "s2amnet worker")).pid)
    api_port = _free_port()
    url = f"http://127.0.0.1:{api_port}"
    cmd = _serve_cmd(folder, device, threads, api_port, ("--redis-url", redis_url))
    pids.append(stack.enter_context(_launch(cmd, _process_env(**SERVE_ENV, **(api_env or {})), url + "/readyz",
                                            log_dir / f"{tag}-api.log", "s2amnet serve --redis-url")).pid)
    each = f", {per_worker} torch thread{'s' if per_worker > 1 else ''} each" if workers > 1 and per_worker else ""
    return Server(f"s2amnet-{tag}", f"`s2amnet serve --redis-url` with {workers} `s2amnet worker`"
                  f"{'s' if workers > 1 else ''} (Redis Streams){each}, records off", url, f"/{task}", pids)


def start_servers(stack: contextlib.ExitStack, folder: Path, task: str, args, device: str,
                  log_dir: Path) -> tuple[list[Server], dict[str, str]]:
    """Every server, started; and {name: why} for those skipped."""
    servers = [_s2amnet(stack, folder, task, device, args.threads, log_dir),
               _script(stack, "fastapi", "plain_fastapi", "plain FastAPI + uvicorn, one forward per request",
                       folder, device, args.threads, log_dir)]
    skipped: dict[str, str] = {}
    try:
        import litserve  # noqa: F401
    except ImportError as exc:
        skipped["litserve"] = f"litserve is not installed ({exc}); pip install 's2amnet[bench]'"
    else:
        servers.append(_script(stack, "litserve", "litserve_server", f"LitServe, max_batch_size "
                               f"{args.litserve_batch}, batch_timeout 5 ms, 1 inference worker", folder, device,
                               args.threads, log_dir, ("--max-batch-size", str(args.litserve_batch))))
    if args.peer_redis:
        for workers in (1, 2):
            servers.append(_redis_mode(stack, folder, task, device, args.threads, log_dir, workers))
    return servers, skipped


# ---------------------------------------------------------------------------------------------------- client
@dataclass
class Tally:
    """What rounds against one server measured: latencies (s), answers by status, wall and CPU seconds."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    cpu: float = 0.0
    late: int = 0  # open loop: sends that left more than 10 ms after their scheduled time

    def count(self, status: str, latency: float) -> None:
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def add(self, other: Tally) -> None:
        self.latencies += other.latencies
        for k, v in other.statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + v
        self.wall += other.wall
        self.cpu += other.cpu
        self.late += other.late


async def _post(client, path: str, part: tuple) -> str:
    """One image; its HTTP status, or the name of the transport error."""
    import httpx

    try:
        return str((await client.post(path, files={"file": part})).status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def closed_round(server: Server, parts: list[tuple], n: int, concurrency: int, start: int = 0) -> Tally:
    """`n` requests, at most `concurrency` in flight (each sent when one is answered)."""
    import httpx

    t = Tally()
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                status = await _post(client, server.path, parts[(start + i) % len(parts)])
                t.count(status, time.perf_counter() - t0)

        cpu0, t0 = cpu_seconds(server.pids), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        t.wall, t.cpu = time.perf_counter() - t0, cpu_seconds(server.pids) - cpu0
    return t


async def open_round(server: Server, parts: list[tuple], rate: float, seconds: float, start: int = 0) -> Tally:
    """Requests at fixed intervals (`rate` per second) for `seconds`, each sent on time whatever is still
    unanswered; latency counts from the scheduled send, so a late send counts against the server."""
    import httpx

    t = Tally()
    n = max(1, round(rate * seconds))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        cpu0, t0 = cpu_seconds(server.pids), time.perf_counter() + 0.02

        async def one(i: int) -> None:
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if time.perf_counter() - due > 0.010:
                t.late += 1
            status = await _post(client, server.path, parts[(start + i) % len(parts)])
            t.count(status, time.perf_counter() - due)

        await asyncio.gather(*(one(i) for i in range(n)))
        t.wall, t.cpu = time.perf_counter() - t0, cpu_seconds(server.pids) - cpu0
    return t


def idle_cpu(servers: list[Server], seconds: float = IDLE_S) -> dict[str, float]:
    """CPU seconds per wall second of each server while no request is sent (all sampled together)."""
    before = {s.name: cpu_seconds(s.pids) for s in servers}
    time.sleep(seconds)
    return {s.name: (cpu_seconds(s.pids) - before[s.name]) / seconds for s in servers}


def _rotated(servers: list[Server], k: int) -> list[Server]:
    k %= len(servers)
    return servers[k:] + servers[:k]


def drive_closed(servers: list[Server], parts: list[tuple], levels: list[int], requests: int,
                 bar) -> dict[tuple[str, int], Tally]:
    """Every level, in SLICES slices: in each, every server in turn (the order rotating) gets its share."""
    shares = [len(range(requests)[i::SLICES]) for i in range(SLICES)]
    tallies = {(s.name, c): Tally() for s in servers for c in levels}
    for c in levels:
        for k, n in enumerate(shares):
            for s in _rotated(servers, k):
                tallies[(s.name, c)].add(asyncio.run(closed_round(s, parts, n, c, start=k * n)))
                bar.update(1)
    return tallies


def drive_open(servers: list[Server], parts: list[tuple], rates: dict[str, float], seconds: float,
               bar) -> dict[str, Tally]:
    tallies = {s.name: Tally() for s in servers}
    for k in range(SLICES):
        for s in _rotated(servers, k):
            tallies[s.name].add(asyncio.run(open_round(s, parts, rates[s.name], seconds / SLICES, start=k * 7)))
            bar.update(1)
    return tallies


# --------------------------------------------------------------------------------------------------- figures
def _latency_ms(latencies: list[float]) -> dict[str, float]:
    if len(latencies) > 1:
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        p50, p95, p99 = statistics.median(latencies), q[94], q[98]
    else:
        p50 = p95 = p99 = latencies[0]
    return {"p50_ms": round(p50 * 1000, 2), "p95_ms": round(p95 * 1000, 2), "p99_ms": round(p99 * 1000, 2)}


def _row(t: Tally, cores: int) -> dict[str, Any]:
    ok = t.statuses.get("200", 0)
    return {"requests": len(t.latencies), "ok": ok, "errors": len(t.latencies) - ok,
            "statuses": dict(sorted(t.statuses.items())), **_latency_ms(t.latencies),
            "images_per_s": round(ok / t.wall, 2), "cpu_pct": round(100 * t.cpu / (t.wall * cores), 1)}


def closed_rows(tallies: dict[tuple[str, int], Tally], raw_images_per_s: float, cores: int) -> list[dict]:
    """One row per server and level; ratios are quotients of the rounded images/s shown beside them."""
    rows = [{"server": name, "concurrency": c, **_row(t, cores)} for (name, c), t in tallies.items()]
    litserve = {r["concurrency"]: r["images_per_s"] for r in rows if r["server"] == "litserve"}
    for r in rows:
        r["ratio_to_raw"] = round(r["images_per_s"] / raw_images_per_s, 3)
        ls_ips = litserve.get(r["concurrency"])
        r["ratio_to_litserve"] = round(r["images_per_s"] / ls_ips, 3) if ls_ips else None
    return rows


def target(rows: list[dict], skipped: dict[str, str]) -> dict[str, Any]:
    """Whether s2amnet served at least TARGET['ratio'] times LitServe's images/s at TARGET['concurrency']."""
    out: dict[str, Any] = dict(TARGET)
    row = next((r for r in rows if r["server"] == TARGET["server"] and r["concurrency"] == TARGET["concurrency"]),
               None)
    if "litserve" in skipped or row is None or row["ratio_to_litserve"] is None:
        why = skipped.get("litserve") or f"concurrency {TARGET['concurrency']} was not measured"
        return {**out, "measured": None, "met": None, "why": why}
    return {**out, "measured": row["ratio_to_litserve"], "met": row["ratio_to_litserve"] >= TARGET["ratio"]}


# ------------------------------------------------------------------------------------------------------- run
def shown_command(argv: list[str], *paths: str | None) -> str:
    """The command line as the report shows it: each of ``paths`` (an --images folder, an image file) that lies
    outside the repository by its name only."""
    import shlex

    root = Path(__file__).resolve().parents[2]
    outside = {p for p in paths if p and not Path(p).resolve().is_relative_to(root)}
    return " ".join(["s2amnet", *(f"…/{Path(a).resolve().name}" if a in outside else shlex.quote(a) for a in argv)])


def bench_peers(args, levels: list[int], device: str, raw: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The peers part of `s2amnet bench`; `raw`: the peer model's entry of the models part (its rows give
    the bare forward's best images/s)."""
    from tqdm import tqdm

    folder = Path(args.peer_model)
    parts, images = load_images(args.images, raw["input_size"])
    best = max(raw["rows"], key=lambda r: r["images_per_s"])
    cores = os.cpu_count() or 1
    log_dir = Path(tempfile.mkdtemp(prefix="s2amnet-bench-peers-"))
    with contextlib.ExitStack() as stack:
        servers, skipped = start_servers(stack, folder, raw["task"], args, device, log_dir)
        rounds = len(servers) * SLICES * (len(levels) + (1 if args.open_loop_s > 0 else 0))
        bar = tqdm(total=rounds, desc="peers", unit="round", disable=not progress, leave=False)
        for s in servers:  # warm-up: connections, first batches of every size
            asyncio.run(closed_round(s, parts, 2, 1))
            asyncio.run(closed_round(s, parts, max(4, levels[-1]), levels[-1]))
        time.sleep(0.5)
        idle = idle_cpu(servers)
        # what other processes of the machine take while the rounds run: this process's tree is the client
        # and every server
        busy0, own0, t0 = machine_busy_seconds(), cpu_seconds([os.getpid()]), time.monotonic()
        closed = closed_rows(drive_closed(servers, parts, levels, args.peer_requests, bar), best["images_per_s"],
                             cores)
        capacity = {s.name: max((r for r in closed if r["server"] == s.name), key=lambda r: r["images_per_s"])
                    for s in servers}
        opened = []
        if args.open_loop_s > 0:
            rates = {name: round(args.open_loop_load * r["images_per_s"], 2) for name, r in capacity.items()}
            for name, t in drive_open(servers, parts, rates, args.open_loop_s, bar).items():
                opened.append({"server": name, "load": args.open_loop_load, "rate_per_s": rates[name],
                               "seconds": round(t.wall, 2), "sent_late": t.late, **_row(t, cores)})
        other = machine_busy_seconds() - busy0 - (cpu_seconds([os.getpid()]) - own0)
        other_pct = round(100 * max(0.0, other) / ((time.monotonic() - t0) * cores), 1)
        bar.close()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept when a server failed
    listed = [{"name": s.name, "what": s.what, "endpoint": s.path, "idle_cpu_pct": round(100 * idle[s.name] / cores, 2),
               "best_images_per_s": capacity[s.name]["images_per_s"],
               "best_concurrency": capacity[s.name]["concurrency"]} for s in servers]
    listed += [{"name": name, "skipped": why} for name, why in skipped.items()]
    return {"command": shown_command(sys.argv[1:], args.images),
            "model": raw["model"], "version": raw["version"], "task": raw["task"], "folder": str(folder),
            "input_size": raw["input_size"], "images": images, "cores": cores, "slices": SLICES,
            "requests_per_level": args.peer_requests, "idle_s": IDLE_S, "other_load_pct": other_pct,
            "raw": {"batch": best["batch"], "images_per_s": best["images_per_s"]},
            "servers": listed, "closed_loop": closed, "open_loop": opened, "target": target(closed, skipped)}


def run_peers(args, levels: list[int], result: dict[str, Any], sizes: list[int], device: str,
              progress: bool) -> int:
    """The peers part of `s2amnet bench`'s run: result["peers"] (and --peers-plot); 0, or the exit code."""
    from app.commands.bench import timings_of
    from model.checkpoint import CheckpointError

    try:
        raw = timings_of(Path(args.peer_model), result, sizes, args.iters, device)
        result["peers"] = bench_peers(args, levels, device, raw, progress)
    except (BenchError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a server did not start: its log tail is in the message
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.peers_plot:
        plot_peers(result["peers"], args.peers_plot)
    return 0


def out_text(args, result: dict[str, Any], md: str) -> str:
    """What --out gets: the whole report, or with --merge the file as it is with the sections this run
    measured (Backends, Service, Peers, Redis path; each with its own command and machine line) replaced."""
    if not args.merge:
        return md + "\n"
    from app.commands.bench_backends import BACKENDS_HEADING, backends_markdown
    from app.commands.bench_report import SERVICE_HEADING, service_markdown

    path = Path(args.out)
    text = path.read_text() if path.exists() else ""
    if result.get("service"):
        text = merge_section(text, service_markdown(result["service"], result), SERVICE_HEADING)
    if result.get("peers"):
        text = merge_section(text, peers_markdown(result["peers"], result), PEERS_HEADING)
    if result.get("redis_path"):
        from app.commands.bench_redis_path import HEADING, redis_path_markdown

        text = merge_section(text, redis_path_markdown(result["redis_path"], result), HEADING)
    if result.get("backends"):
        text = merge_section(text, backends_markdown(result["backends"], result), BACKENDS_HEADING)
    return text


# ---------------------------------------------------------------------------------------------------- report
PEERS_HEADING = "## Peers"


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def peers_markdown(p: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """The Peers section of BENCHMARKS.md (self-contained: its own command and machine line)."""
    m = result["machine"]
    lines = [f"{PEERS_HEADING}: {p['model']} {p['version']} behind s2amnet serve, plain FastAPI and LitServe", "",
             f"{machine_line(p['command'], result['time'], m)}, device {m.get('gpu', m['device'])}. "
             f"Requests: {p['images']}, one per request (`POST` multipart `file`), "
             f"{p['task']} at {p['input_size'][1]}x{p['input_size'][0]}.", "",
             "Every server loads the same weights with `Predictor.from_folder` (BatchNorm folded) and runs the "
             "service's decoding, preprocessing, forward and JSON answer; the peers run the forward in eager "
             f"PyTorch as their documentation shows, `s2amnet serve` with backend "
             f"{m.get('service_backend', 'eager')} (`S2AMNET_BACKEND`). All run at once; one "
             f"client on the same machine drives them one after another in {p['slices']} alternating slices per "
             "level, so compare the ratios (CPU % is of all cores, for the server's processes only). Other "
             f"processes of the machine took {p['other_load_pct']:.0f} % of all cores while the rounds ran.", "",
             "| server | what | CPU while idle |", "|---|---|---|"]
    for s in p["servers"]:
        lines.append(f"| {s['name']} | {s['what']} | {s['idle_cpu_pct']:.1f} % |" if "skipped" not in s
                     else f"| {s['name']} | skipped: {s['skipped']} | – |")
    raw = p["raw"]
    lines += ["", f"### Closed loop: at most N requests in flight, {p['requests_per_level']} requests per server "
              "and level", "",
              f"Bare forward (`Predictor.infer`, batch {raw['batch']}, its best in this run): "
              f"{raw['images_per_s']:.1f} images/s.", "",
              "| server | in flight | requests | errors | images / s | p50 ms | p95 ms | p99 ms | CPU busy "
              "| × bare forward | × LitServe |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(p["closed_loop"], key=lambda r: (r["concurrency"], r["server"])):
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['cpu_pct']:.0f} % | {_ratio(r['ratio_to_raw'])} | {_ratio(r['ratio_to_litserve'])} |")
    t = p["target"]
    verdict = (f"not measured ({t['why']})" if t["met"] is None else
               f"**{t['measured']:.2f}×: {'met' if t['met'] else 'not met'}**")
    lines += ["", f"Target: {t['server']} at least {t['ratio']}× the images/s of {t['versus']} with "
              f"{t['concurrency']} in flight: {verdict}.", ""]
    if p["open_loop"]:
        load = p["open_loop"][0]["load"]
        lines += [f"### Open loop: requests at fixed intervals, {load:.0%} of each server's best closed-loop "
                  "images/s", "",
                  "Each request is sent on time whatever is still unanswered; latency counts from its scheduled "
                  "send. *Sent late*: sends more than 10 ms behind schedule (the client's own lag).", "",
                  "| server | arrivals / s | seconds | requests | errors | sent late | answered / s | p50 ms | p99 ms "
                  "| CPU busy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in p["open_loop"]:
            lines.append(f"| {r['server']} | {r['rate_per_s']:.1f} | {r['seconds']:.0f} | {r['requests']} | "
                         f"{r['errors']} | {r['sent_late']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | "
                         f"{r['p99_ms']:.0f} | {r['cpu_pct']:.0f} % |")
        lines.append("")
    return lines


def merge_section(text: str, section: list[str], heading: str = PEERS_HEADING) -> str:
    """``text`` with its section under ``heading`` (from that heading to the next `## ` heading) replaced by
    `section`, or `section` appended when it has none."""
    old = text.rstrip("\n").split("\n") if text.strip() else []
    start = next((i for i, line in enumerate(old) if line.startswith(heading)), None)
    if start is None:
        return "\n".join([*old, *([""] if old and old[-1] else []), *section]).rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    return "\n".join([*old[:start], *section, *old[end:]]).rstrip("\n") + "\n"


def plot_peers(p: dict[str, Any], path: str) -> None:
    """Images/s and p99 against requests in flight, one line per server, the bare forward as a level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for s in p["servers"]:
        if "skipped" in s:
            continue
        rows = sorted((r for r in p["closed_loop"] if r["server"] == s["name"]), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        a.plot(xs, [r["images_per_s"] for r in rows], marker="o", label=s["name"])
        b.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=s["name"])
    a.axhline(p["raw"]["images_per_s"], color="#888", ls="--", label=f"bare forward, batch {p['raw']['batch']}")
    a.set_ylabel("images / s (higher is better)")
    b.set_ylabel("p99 latency, ms (lower is better)")
    b.set_yscale("log")
    levels = sorted({r["concurrency"] for r in p["closed_loop"]})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("requests in flight (closed loop)")
        ax.legend()
    a.set_title(f"{p['model']} {p['version']}: throughput")
    b.set_title(f"{p['model']} {p['version']}: p99")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
