"""`s2amnet bench --backends`: each model's forward under every inference backend, timed in the same rounds
(`model.backends`: eager PyTorch and ONNX Runtime), at batch 1 and at the forward batch the service would
pick on this machine."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


def bench_backends(folder: Path, iters: int, device: str, threads: int | None) -> dict[str, Any]:
    import numpy as np

    from model.backends import check_parity, load_runner
    from model.predictor import Predictor

    predictor = Predictor.from_folder(folder, device=device)
    runner, export_s, cached = load_runner(predictor, "onnxruntime", threads=threads)
    ok, why = check_parity(predictor, runner)
    tuned = predictor.tune_forward_batch(8) if predictor.device.type == "cpu" else {}
    batch = predictor.forward_batch or 8
    h, w = predictor.input_size
    rng = np.random.default_rng(0)
    inputs = {b: [rng.integers(0, 256, (3, h, w), dtype=np.uint8) for _ in range(b)] for b in sorted({1, batch})}
    runners = {"eager": None, "onnxruntime": runner}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runners for b in inputs}
    for r in runners.values():  # warm-up
        predictor.runner = r
        for arrays in inputs.values():
            predictor.infer(arrays)
    for _ in range(iters):  # interleaved, so that a slow spell hits every backend alike
        for b, arrays in inputs.items():
            for name, r in runners.items():
                predictor.runner = r
                t0 = time.perf_counter()
                predictor.infer(arrays)
                times[(name, b)].append((time.perf_counter() - t0) * 1000.0 / b)
    predictor.runner = None
    rows = []
    for b in inputs:
        ms = {n: statistics.median(times[(n, b)]) for n in runners}
        rows.append({"batch": b, "ms_per_image": {n: round(v, 2) for n, v in ms.items()},
                     "gain": round(ms["eager"] / ms["onnxruntime"], 2)})
    return {"model": predictor.name, "version": predictor.version, "forward_batch": batch,
            "forward_batch_measured": {str(k): round(v, 2) for k, v in tuned.items()}, "rows": rows,
            "parity": ok, "parity_detail": why, "export_s": None if export_s is None else round(export_s, 1),
            "cached": cached}


def backends_markdown(results: list[dict[str, Any]]) -> list[str]:
    lines = ["## Backends: eager PyTorch and ONNX Runtime (`S2AMNET_BACKEND`)", "",
             "The same `Predictor.infer` with the forward run by eager PyTorch and by ONNX Runtime (the model "
             "exported once to ONNX with its real-valued frequency blocks), timed in the same rounds, at batch 1 "
             "and at the forward batch the service picks on this machine (`S2AMNET_FORWARD_BATCH=auto`). "
             "Parity: outputs agree with eager on the check set of `model.backends.check_parity`.", "",
             "| model | batch | eager ms / image | onnxruntime ms / image | onnxruntime gain | parity |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            ms = row["ms_per_image"]
            lines.append(f"| {r['model']} {r['version']} | {row['batch']} | {ms['eager']:.1f} | "
                         f"{ms['onnxruntime']:.1f} | {row['gain']:.2f}× | {'ok' if r['parity'] else 'FAILED'} |")
    return lines + [""]
