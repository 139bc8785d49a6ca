"""`s2amnet bench --backends`: each model's forward under every inference backend installed here, timed in the
same rounds (`model.backends`: eager PyTorch, ONNX Runtime, OpenVINO), at batch 1 and at the forward batch the
service would pick on this machine."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


def bench_backends(folder: Path, iters: int, device: str, threads: int | None) -> dict[str, Any]:
    import numpy as np

    from model.backends import GRAPH_BACKENDS, check_parity, load_runner
    from model.predictor import Predictor

    predictor = Predictor.from_folder(folder, device=device)
    runners: dict[str, Any] = {"eager": None}
    parity: dict[str, Any] = {}
    export_s, cached, missing = None, True, {}
    for backend in GRAPH_BACKENDS:
        try:
            runner, spent, was_cached = load_runner(predictor, backend, threads=threads)
        except ImportError as exc:
            missing[backend] = f"not installed ({exc.name})"
            continue
        export_s, cached = spent if spent is not None else export_s, cached and was_cached
        ok, why = check_parity(predictor, runner)
        runners[backend] = runner
        parity[backend] = {"ok": ok, "detail": why}
    tuned = predictor.tune_forward_batch(8) if predictor.device.type == "cpu" else {}
    batch = predictor.forward_batch or 8
    h, w = predictor.input_size
    rng = np.random.default_rng(0)
    inputs = {b: [rng.integers(0, 256, (3, h, w), dtype=np.uint8) for _ in range(b)] for b in sorted({1, batch})}
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
                     "gain": {n: round(ms["eager"] / v, 2) for n, v in ms.items() if n != "eager"}})
    return {"model": predictor.name, "version": predictor.version, "forward_batch": batch,
            "forward_batch_measured": {str(k): round(v, 2) for k, v in tuned.items()}, "rows": rows,
            "parity": parity, "missing": missing, "export_s": None if export_s is None else round(export_s, 1),
            "cached": cached}


def backends_markdown(results: list[dict[str, Any]]) -> list[str]:
    names = list(dict.fromkeys(n for r in results for n in r["parity"]))
    lines = ["## Backends: eager PyTorch, ONNX Runtime, OpenVINO (`S2AMNET_BACKEND`)", "",
             "The same `Predictor.infer` with the forward run by eager PyTorch and by each graph backend (the model "
             "exported once to ONNX with its real-valued frequency blocks; OpenVINO compiles that graph in fp32), "
             "timed in the same rounds, at batch 1 and at the forward batch the service picks on this machine "
             "(`S2AMNET_FORWARD_BATCH=auto`). Gain = eager ms ÷ backend ms. Parity: outputs agree with eager on the "
             "check set of `model.backends.check_parity`.", "",
             "| model | batch | eager ms / image | " + " | ".join(f"{n} ms / image | {n} gain" for n in names)
             + " | parity |",
             "|---|---|---|" + "---|---|" * len(names) + "---|"]
    for r in results:
        parity = ", ".join(f"{n} {'ok' if p['ok'] else 'FAILED'}" for n, p in r["parity"].items())
        for row in r["rows"]:
            ms, gain = row["ms_per_image"], row["gain"]
            cells = " | ".join(f"{ms[n]:.1f} | {gain[n]:.2f}×" if n in ms else "– | –" for n in names)
            lines.append(f"| {r['model']} {r['version']} | {row['batch']} | {ms['eager']:.1f} | {cells} | {parity} |")
        for n, why in r.get("missing", {}).items():
            lines.append(f"| {r['model']} {r['version']} | – | – | {n}: {why} |")
    return lines + [""]
