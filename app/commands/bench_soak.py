"""`s2amnet bench --soak`: does resident memory stay flat under long mixed traffic? One `s2amnet serve` in
Redis mode and one `s2amnet worker` (a redis-server of their own) with every model of the run, driven for
`--soak-minutes` by a closed-loop client keeping `--soak-concurrency` requests in flight. The requests cycle
over /classify, /detect and /segment and over every model: synthetic JPEG and PNG images from 200x200 to
1024x768, one or several per request, with options (mask_format polygon / png, top_k, conf), with an
X-Request-Timeout of a few milliseconds (the deadline passes: 504), and invalid images (answered 4xx).

The resident memory (VmRSS) of the API's and of the worker's process, children included, is sampled every
few seconds. Reported per process: the median of the samples in the first minute (after a warm-up that sent
every kind of request once) and in the last minute, their ratio, the largest sample, and whether the last
minute stays within ±10 % of the first; with the requests by status and the images answered per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.commands.bench import BenchError

TOLERANCE = 0.10  # resident memory of the last minute within ±10 % of the first
SIZES = [(200, 200), (320, 240), (512, 384), (640, 480), (800, 600), (1024, 768)]  # width, height
# what each request of the cycle is; "options": mask_format (segment), top_k (classify), conf (detect)
KINDS = ("single", "options", "multi", "single", "deadline", "options", "single", "multi", "invalid", "single")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("soak (--soak)")
    g.add_argument("--soak", action="store_true",
                   help="also run s2amnet serve (Redis mode) and one s2amnet worker with every model under "
                        "mixed traffic and sample their resident memory")
    g.add_argument("--soak-minutes", type=float, default=10.0, help="minutes of traffic for --soak (default 10)")
    g.add_argument("--soak-concurrency", type=int, default=8, help="requests in flight for --soak (default 8)")
    g.add_argument("--soak-plot", help="write a PNG of resident memory over time here")


def check_args(args: argparse.Namespace) -> None:
    """BenchError for bad soak options (checked before any model is timed)."""
    if not args.soak:
        return
    if not args.soak_minutes > 0:
        raise BenchError(f"--soak-minutes must be > 0, got {args.soak_minutes}")
    if args.soak_concurrency < 1:
        raise BenchError(f"--soak-concurrency must be >= 1, got {args.soak_concurrency}")
    if not shutil.which("redis-server"):
        raise BenchError("--soak needs redis-server on PATH")
    if args.soak_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--soak-plot needs matplotlib: pip install 's2amnet[train]'") from None


# ---------------------------------------------------------------------------------------------------- memory
def rss_kib(root: int) -> int:
    """VmRSS of process `root` and all its live descendants, KiB (from /proc/<pid>/status)."""
    from app.commands.bench_peers import process_tree

    total = 0
    for pid in process_tree([root]):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    return total


def _sampler(pids: dict[str, int], interval: float, samples: list, stop: threading.Event, t0: float) -> None:
    """Append (seconds since t0, {name: MiB}) every `interval` s until `stop`, and once more after it."""
    while True:
        samples.append((time.monotonic() - t0, {k: rss_kib(p) / 1024 for k, p in pids.items()}))
        if stop.wait(interval):
            samples.append((time.monotonic() - t0, {k: rss_kib(p) / 1024 for k, p in pids.items()}))
            return


def rss_summary(samples: list[tuple[float, dict[str, float]]], name: str, window: float) -> dict[str, Any]:
    """Medians of the samples of `name` in the first and in the last `window` s, their ratio and the max."""
    end = samples[-1][0]
    first = [v[name] for t, v in samples if t <= window] or [samples[0][1][name]]
    last = [v[name] for t, v in samples if t >= end - window] or [samples[-1][1][name]]
    f, la = statistics.median(first), statistics.median(last)
    top = max(v[name] for _, v in samples)
    ratio = round(la / f, 3)
    return {"start_mib": round(samples[0][1][name], 1), "first_mib": round(f, 1), "last_mib": round(la, 1),
            "ratio": ratio, "max_mib": round(top, 1), "max_ratio": round(top / f, 3),
            "first_samples": len(first), "last_samples": len(last), "within": abs(la / f - 1) <= TOLERANCE}


# ---------------------------------------------------------------------------------------------------- images
def _picture(width: int, height: int, seed: int):
    """A synthetic part: a lit gradient, a few dark blobs and scratches, some sensor noise (uint8 HxWx3)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 90 + 60 * (x / width) + 40 * np.sin(y / max(1.0, height / 6))
    for _ in range(rng.integers(2, 6)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, min(width, height) / 6)
        base -= 70 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    row = rng.integers(0, height)
    base[row:row + 2, :] -= 50
    img = base[..., None] + rng.normal(0, 6, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encoded(img, fmt: str) -> tuple[str, bytes, str]:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return f"part.{'jpg' if fmt == 'jpeg' else 'png'}", buf.getvalue(), f"image/{fmt}"


def image_pool() -> dict[tuple[int, int, str], tuple[str, bytes, str]]:
    """Every size of SIZES as a JPEG and as a PNG (multipart parts)."""
    return {(w, h, fmt): _encoded(_picture(w, h, i), fmt)
            for i, (w, h) in enumerate(SIZES) for fmt in ("jpeg", "png")}


def invalid_parts(pool: dict) -> list[tuple[str, bytes, str]]:
    """Bodies the service must refuse with a 4xx: not an image, a truncated JPEG, an image too small."""
    import numpy as np

    jpeg = pool[(*SIZES[2], "jpeg")][1]
    return [("junk.jpg", b"this is not an image" * 20, "image/jpeg"),
            ("cut.jpg", jpeg[: len(jpeg) // 3], "image/jpeg"),
            _encoded(np.full((4, 4, 3), 128, np.uint8), "png")]


# -------------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Spec:
    """One request of the cycle: endpoint, multipart parts, query options, headers; how many images."""

    kind: str
    path: str
    files: tuple[tuple[str, bytes, str], ...]
    params: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def images(self) -> int:
        return len(self.files)


def expected(kind: str, status: str) -> bool:
    """Whether `status` is a right answer to a request of `kind` (a transport error never is)."""
    if kind == "invalid":
        return len(status) == 3 and status.startswith("4")
    if kind == "deadline":  # the deadline usually passes first; a very quick answer may still make it
        return status in ("200", "504")
    return status == "200"


def _options(task: str, k: int) -> tuple[tuple[str, str], ...]:
    if task == "segment":
        return (("mask_format", "polygon" if (k // len(KINDS)) % 2 == 0 else "png"),)
    return (("top_k", "3"),) if task == "classify" else (("conf", "0.05"), ("max_det", "50"))


def request_deck(models: list[tuple[str, str]], pool: dict, bad: list) -> list[Spec]:
    """The cycle of requests: 60 steps (every kind of KINDS at sizes and formats that vary), each step once
    per model, so that consecutive requests go to different endpoints."""
    deck = []
    for k in range(60):
        kind = KINDS[k % len(KINDS)]
        w, h = SIZES[k % len(SIZES)]
        fmt = ("jpeg", "png")[(k // len(SIZES)) % 2]
        for name, task in models:
            params: tuple[tuple[str, str], ...] = (("model", name),)
            files = (pool[(w, h, fmt)],)
            headers: tuple[tuple[str, str], ...] = ()
            if kind == "multi":
                files = tuple(pool[(*SIZES[(k + 2 * j) % len(SIZES)], ("jpeg", "png")[j % 2])]
                              for j in range(2 + k % 3))
            elif kind == "options":
                params += _options(task, k)
            elif kind == "deadline":
                headers = (("X-Request-Timeout", "0.002" if k % 20 < 10 else "0.02"),)
            elif kind == "invalid":
                files = (bad[k % len(bad)],)
            deck.append(Spec(kind, f"/{task}", files, params, headers))
    return deck


@dataclass
class Answers:
    """Answers by kind and status, those that were not right, images answered 200."""

    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    images_ok: int = 0

    def count(self, spec: Spec, status: str) -> None:
        self.requests += 1
        kind = self.by_kind.setdefault(spec.kind, {})
        kind[status] = kind.get(status, 0) + 1
        if status == "200":
            self.images_ok += spec.images
        if not expected(spec.kind, status):
            key = f"{spec.kind} {status}"
            self.unexpected[key] = self.unexpected.get(key, 0) + 1

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in self.by_kind.values():
            for status, n in kind.items():
                out[status] = out.get(status, 0) + n
        return dict(sorted(out.items()))


async def _send(client, spec: Spec) -> str:
    """One request; its HTTP status, or the name of the transport error."""
    import httpx

    try:
        r = await client.post(spec.path, files=[("file", f) for f in spec.files], params=dict(spec.params),
                              headers=dict(spec.headers))
        return str(r.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def drive(url: str, deck: list[Spec], concurrency: int, answers: Answers, seconds: float | None = None,
                count: int | None = None, start: int = 0) -> float:
    """Closed loop: `concurrency` senders, each sending the next request of the cycle (from `start`) as soon
    as its last one is answered, for `seconds` or `count` requests; the wall seconds."""
    import httpx

    order = itertools.count(start)
    stop_at = start + count if count is not None else None
    end = time.monotonic() + seconds if seconds is not None else None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def sender() -> None:
            while end is None or time.monotonic() < end:
                i = next(order)
                if stop_at is not None and i >= stop_at:
                    return
                spec = deck[i % len(deck)]
                answers.count(spec, await _send(client, spec))

        t0 = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        return time.monotonic() - t0


# ------------------------------------------------------------------------------------------------------- run
def _models(args) -> tuple[Path, list[tuple[str, str]]]:
    """The weights folder and (name, task) of every model of the run (--weights, else all of ./weights)."""
    from app.commands.bench import _task_and_size, _weights

    folders = _weights(args)
    parents = {f.resolve().parent for f in folders}
    if len(parents) != 1:
        raise BenchError("--soak serves every --weights folder from one weights folder: they must share a parent")
    return parents.pop(), [(f.name, _task_and_size(f)[0]) for f in folders]


def bench_soak(args, device: str, progress: bool) -> dict[str, Any]:
    """The soak part of `s2amnet bench` (see the module's doc); draws --soak-plot when given."""
    from tqdm import tqdm

    from app.commands.bench_peers import _redis_mode, shown_command
    from app.commands.bench_report import machine

    weights_dir, models = _models(args)
    seconds, c = args.soak_minutes * 60.0, args.soak_concurrency
    window, interval = min(60.0, seconds / 4), min(2.0, max(0.25, seconds / 120))
    pool = image_pool()
    deck = request_deck(models, pool, invalid_parts(pool))
    warm_n = len(models) * len(KINDS)  # every kind for every model
    log_dir = Path(tempfile.mkdtemp(prefix="s2amnet-bench-soak-"))
    # `--models` is comma-separated: a folder named by the list makes the command lines of `_redis_mode` (one
    # redis-server, one worker, the API in front) load every model
    joined = weights_dir / ",".join(name for name, _ in models)
    samples: list[tuple[float, dict[str, float]]] = []
    warm, answers = Answers(), Answers()
    with contextlib.ExitStack() as stack:
        server = _redis_mode(stack, joined, models[0][1], device, args.threads, log_dir, 1)
        pids = {"api": server.pids[-1], "worker": server.pids[1]}
        ready = {k: round(rss_kib(p) / 1024, 1) for k, p in pids.items()}
        asyncio.run(drive(server.url, deck, c, warm, count=warm_n))
        stop = threading.Event()
        thread = threading.Thread(target=_sampler, args=(pids, interval, samples, stop, time.monotonic()),
                                  daemon=True)
        thread.start()
        bar = tqdm(total=round(seconds), desc="soak", unit="s", disable=not progress, leave=False)
        ticker = threading.Thread(target=_tick, args=(bar, stop), daemon=True)
        ticker.start()
        try:
            wall = asyncio.run(drive(server.url, deck, c, answers, seconds=seconds, start=warm_n))
        finally:
            stop.set()
            thread.join()
            ticker.join()
            bar.close()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept when a process failed
    statuses = answers.statuses()
    processes = {k: rss_summary(samples, k, window) for k in pids}
    out = {"command": shown_command(sys.argv[1:], None), "time": time.time(), "machine": machine(device),
           "what": server.what, "models": [{"name": n, "task": t} for n, t in models], "minutes": args.soak_minutes,
           "seconds": round(wall, 1), "concurrency": c, "sample_s": interval, "window_s": window,
           "sizes": [f"{w}x{h}" for w, h in SIZES], "warmup": {"requests": warm.requests,
                                                              "unexpected": warm.unexpected},
           "requests": answers.requests, "statuses": statuses, "by_kind": answers.by_kind,
           "unexpected": answers.unexpected, "images_ok": answers.images_ok,
           "images_per_s": round(answers.images_ok / wall, 2), "requests_per_s": round(answers.requests / wall, 2),
           "ready_mib": ready, "processes": processes, "tolerance": TOLERANCE,
           "met": all(p["within"] for p in processes.values()),
           "samples": [[round(t, 2), *(round(v[k], 1) for k in pids)] for t, v in samples],
           "sample_columns": ["s", *pids], "plot": args.soak_plot}
    if args.soak_plot:
        plot_soak(out, args.soak_plot)
    return out


def _tick(bar, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        bar.update(1)


# ---------------------------------------------------------------------------------------------------- report
SOAK_HEADING = "## Soak"
_KIND_WORDS = {"single": "one image", "options": "one image with options", "multi": "2–4 images",
               "deadline": "X-Request-Timeout 2 or 20 ms", "invalid": "an invalid image"}


def _minutes(v: float) -> str:
    return f"{v:g} minute{'' if v == 1 else 's'}"


def soak_markdown(r: dict[str, Any]) -> list[str]:
    """The Soak section of BENCHMARKS.md (self-contained: its own command and machine line)."""
    m = r["machine"]
    date = time.strftime("%Y-%m-%d", time.gmtime(r["time"]))
    win = f"{r['window_s']:g} s" if r["window_s"] < 60 else "minute"
    models = ", ".join(f"{x['name']} ({x['task']})" for x in r["models"])
    lines = [f"{SOAK_HEADING}: resident memory over {_minutes(r['minutes'])} of mixed traffic", "",
             f"`{r['command']}` on {date}: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, device "
             f"{m.get('gpu', m['device'])}. {r['what']}, with {models}. One client keeps {r['concurrency']} "
             f"requests in flight for {r['seconds']:.0f} s after a warm-up of {r['warmup']['requests']} requests "
             "(every kind for every model), cycling over the endpoints and models: synthetic JPEG and PNG parts "
             f"from {r['sizes'][0]} to {r['sizes'][-1]}, one or 2–4 per request, some with options (mask_format "
             "polygon / png, top_k, conf), some with an X-Request-Timeout of 2 or 20 ms (the deadline passes: "
             "504), some invalid (not an image, a truncated JPEG, 4x4 pixels: 4xx).", "",
             f"Resident memory (VmRSS, the process and its children) sampled every {r['sample_s']:g} s; *first* "
             f"and *last*: the median of the samples in the first and in the last {win} of traffic.", "",
             "| process | ready MiB | first MiB | last MiB | last ÷ first | max MiB (÷ first) | within ±10 % |",
             "|---|---|---|---|---|---|---|"]
    for name, p in r["processes"].items():
        lines.append(f"| {name} | {r['ready_mib'][name]:.0f} | {p['first_mib']:.0f} | {p['last_mib']:.0f} | "
                     f"{p['ratio']:.3f} | {p['max_mib']:.0f} ({p['max_ratio']:.2f}×) | "
                     f"{'yes' if p['within'] else '**no**'} |")
    lines += ["", "| requests | answers |", "|---|---|"]
    for kind, statuses in r["by_kind"].items():
        answered = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
        lines.append(f"| {_KIND_WORDS.get(kind, kind)} | {answered} |")
    total = ", ".join(f"{s}: {n}" for s, n in r["statuses"].items())
    wrong = ", ".join(f"{k}: {n}" for k, n in r["unexpected"].items()) or "none"
    verdict = "met" if r["met"] else "not met"
    lines += ["", f"{r['requests']} requests ({total}); answers other than expected: {wrong}. "
              f"{r['images_per_s']:.1f} images answered per second ({r['requests_per_s']:.1f} requests/s).", "",
              f"Target: resident memory of the API and of the worker flat (last ÷ first within ±10 %): "
              f"**{verdict}**." + (f" Plot: `{r['plot']}`." if r.get("plot") else ""), ""]
    return lines


def plot_soak(r: dict[str, Any], path: str) -> None:
    """Resident memory of each process over time, with the first and last windows and the ±10 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    ts = [s[0] / 60 for s in r["samples"]]
    end, win = ts[-1], r["window_s"] / 60
    for i, name in enumerate(r["sample_columns"][1:], start=1):
        p = r["processes"][name]
        line, = ax.plot(ts, [s[i] for s in r["samples"]], label=f"{name}: last ÷ first {p['ratio']:.3f}")
        ax.fill_between([0, end], p["first_mib"] * (1 - TOLERANCE), p["first_mib"] * (1 + TOLERANCE),
                        color=line.get_color(), alpha=0.1)
    ax.axvspan(0, win, color="#888", alpha=0.12, lw=0)
    ax.axvspan(end - win, end, color="#888", alpha=0.12, lw=0)
    ax.set_xlabel("minutes of traffic (grey: first and last window; bands: ±10 % of the first)")
    ax.set_ylabel("resident memory, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"soak: {r['concurrency']} in flight, {r['images_per_s']:.1f} images/s, mixed requests")
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
