"""Measure what one forward costs on the main thread vs. on the dispatcher's inference thread.

Not a test (no assertions, not collected): run it by hand to check the embedded dispatcher's threading
choice on a machine:  .venv/bin/python tests/app/measure_thread_forward.py [--size 224] [--batch 8]

It times `Predictor.infer` for a tiny model with random weights (best of --repeat runs, in --rounds
interleaved rounds so that load from other processes hits every place alike), in these places:
  main                    the main thread
  thread                  one long-lived threading.Thread fed through a queue (what LocalDispatcher does)
  pool                    a concurrent.futures pool thread (what asyncio.to_thread / run_in_executor use)
  thread+torch-elsewhere  the long-lived thread while another thread runs torch ops at the same time
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import queue
import statistics
import tempfile
import threading
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--task", default="detect")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    args = ap.parse_args()

    from model.checkpoint import save_model
    from model.predictor import Predictor
    from model.registry import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    nc = 3
    with tempfile.TemporaryDirectory() as tmp:
        classes = ["background", "a", "b"] if args.task == "segment" else ["a", "b", "c"]
        save_model(
            build_model(args.task, "tiny", nc),
            f"{tmp}/m",
            {"name": "m", "classes": classes, "arch": {"variant": "tiny", "input_size": [args.size] * 2}},
        )
        predictor = Predictor.from_folder(f"{tmp}/m")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (3, args.size, args.size), dtype=np.uint8) for _ in range(args.batch)]

    def timed(n: int = args.repeat) -> float:
        predictor.infer(arrays)
        runs = []
        for _ in range(n):
            t0 = time.perf_counter()
            predictor.infer(arrays)
            runs.append(time.perf_counter() - t0)
        return min(runs) * 1000.0

    # One long-lived thread, like LocalDispatcher's; jobs handed to it through a queue.
    jobs: queue.Queue = queue.Queue()

    def serve() -> None:
        while (item := jobs.get()) is not None:
            fn, box = item
            box.put(fn())

    worker = threading.Thread(target=serve)
    worker.start()

    def on_worker(fn):
        box: queue.Queue = queue.Queue()
        jobs.put((fn, box))
        return box.get()

    stop = threading.Event()

    def background_torch():  # e.g. torch work in request threads while the inference thread runs
        x = torch.rand(1, 3, 256, 256)
        while not stop.is_set():
            torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear")

    places = ["main", "thread", "pool", "thread+torch-elsewhere"]
    samples: dict[str, list[float]] = {p: [] for p in places}
    with cf.ThreadPoolExecutor(4) as pool:
        for _ in range(args.rounds):  # interleaved, so that load from other processes hits all alike
            samples["main"].append(timed())
            samples["thread"].append(on_worker(timed))
            samples["pool"].append(pool.submit(timed).result())
            stop.clear()
            bg = pool.submit(background_torch)
            samples["thread+torch-elsewhere"].append(on_worker(timed))
            stop.set()
            bg.result()
    jobs.put(None)
    worker.join()
    results = {p: min(v) for p, v in samples.items()}
    medians = {p: statistics.median(v) for p, v in samples.items()}
    print(
        f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
        f"{args.task} tiny, batch {args.batch} x {args.size}px, "
        f"best of {args.rounds} rounds x {args.repeat} runs"
    )
    print("  place                    best ms  (vs main)   median-of-round-bests ms")
    for k, v in results.items():
        print(f"  {k:24s} {v:8.1f}  ({v / results['main']:.2f}x)     {medians[k]:8.1f}")


if __name__ == "__main__":
    main()
