"""`s2amnet bench --backends`: each model's forward under every inference backend installed here (`model.backends`:
eager PyTorch, TorchInductor-compiled, ONNX Runtime, OpenVINO fp32 and bf16), timed in the same rounds at batch 1
and at each backend's own best forward batch (what the service picks for it on this machine).

The same rounds also time one large matrix product in fp32 (and in bf16 on a CPU with bf16 units): the rate this
machine's math libraries reach at their best. With each model's counted GFLOPs per image (`s2amnet info`'s count),
that says how much of it each backend uses, and how much a given speed-up over eager would need."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from app.commands.bench_report import own_line


def _load(predictor, names: list[str], threads: int | None) -> tuple[dict[str, Any], dict, dict, list]:
    """(runners by name with eager's None, parity per backend, why each missing one is missing, build seconds).
    A runner whose outputs disagree with eager is kept, to be timed and reported as failing parity."""
    from model.backends import try_backend

    runners: dict[str, Any] = {"eager": None}
    parity: dict[str, Any] = {}
    missing: dict[str, str] = {}
    builds: list[tuple[float | None, bool]] = []
    for backend in names:
        trial = try_backend(predictor, backend, threads=threads)
        if trial.runner is None:
            missing[backend] = trial.detail
            continue
        builds.append((trial.spent, trial.cached))
        runners[backend] = trial.runner
        parity[backend] = {"ok": trial.agrees, "detail": trial.detail}
    return runners, parity, missing, builds


MATMUL_N = 2048  # large enough for the math library's best rate, small enough for a round


def _matmuls(device: str) -> dict[str, Any]:
    """Timers of one MATMUL_N² product, by dtype: fp32, and bf16 where this CPU has bf16 units that torch's
    kernels may use (or on a GPU). Each returns the GFLOP/s of one product."""
    import torch

    from app.commands.bench_report import kernels_limited, machine
    from model.backends import cpu_has_bf16_units

    dtypes = {"fp32": torch.float32}
    dev = torch.device(device)
    if dev.type == "cuda" or (cpu_has_bf16_units() and not kernels_limited(machine("cpu"))):
        dtypes["bf16"] = torch.bfloat16
    timers = {}
    for name, dtype in dtypes.items():
        a = torch.randn(MATMUL_N, MATMUL_N, device=dev).to(dtype)
        b = torch.randn(MATMUL_N, MATMUL_N, device=dev).to(dtype)

        def timer(a=a, b=b) -> float:
            if a.is_cuda:
                torch.cuda.synchronize(a.device)
            t0 = time.perf_counter()
            a @ b
            if a.is_cuda:
                torch.cuda.synchronize(a.device)
            return 2 * MATMUL_N**3 / (time.perf_counter() - t0) / 1e9

        timer()  # warm-up
        timers[name] = timer
    return timers


def bench_backends(folder: Path, iters: int, device: str, threads: int | None,
                   names: list[str] | None = None) -> dict[str, Any]:
    import numpy as np

    from app.commands.info import forward_gflops
    from model.backends import RUNNER_BACKENDS
    from model.predictor import Predictor

    predictor = Predictor.from_folder(folder, device=device)
    gflop = forward_gflops(predictor.model, *predictor.input_size)
    runners, parity, missing, builds = _load(predictor, list(names or RUNNER_BACKENDS), threads)
    best_batch: dict[str, int] = {}
    tuned: dict[str, dict[str, float]] = {}
    for name, runner in runners.items():  # each backend's own best forward batch, as the service tunes it
        predictor.runner = runner
        timings = predictor.tune_forward_batch(8) if predictor.device.type == "cpu" else {8: 0.0}
        best_batch[name] = predictor.forward_batch or 8
        tuned[name] = {str(k): round(v, 2) for k, v in timings.items()}
    predictor.runner, predictor.forward_batch = None, None
    h, w = predictor.input_size
    rng = np.random.default_rng(0)
    inputs = {b: [rng.integers(0, 256, (3, h, w), dtype=np.uint8) for _ in range(b)]
              for b in sorted({1, *best_batch.values()})}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runners for b in inputs}
    for r in runners.values():  # warm-up
        predictor.runner = r
        for arrays in inputs.values():
            predictor.infer(arrays)
    matmuls = _matmuls(device)
    rates: dict[str, list[float]] = {n: [] for n in matmuls}
    for _ in range(iters):  # interleaved, so that a slow spell hits every backend alike
        for b, arrays in inputs.items():
            for name, r in runners.items():
                predictor.runner = r
                t0 = time.perf_counter()
                predictor.infer(arrays)
                times[(name, b)].append((time.perf_counter() - t0) * 1000.0 / b)
        for name, timer in matmuls.items():
            rates[name].append(timer())
    predictor.runner = None
    ms = {(n, b): statistics.median(v) for (n, b), v in times.items()}
    matmul = {n: round(statistics.median(v), 1) for n, v in rates.items()}
    rows = [{"batch": b, "ms_per_image": {n: round(ms[(n, b)], 2) for n in runners},
             "gain": {n: round(ms[("eager", b)] / ms[(n, b)], 2) for n in runners if n != "eager"}} for b in inputs]
    # each at its best batch among those timed in the rounds (the tuned sizes, and 1): a tuning disturbed by a
    # slow spell does not decide the comparison
    at = {n: min(inputs, key=lambda b, n=n: ms[(n, b)]) for n in runners}
    best = {n: ms[(n, at[n])] for n in runners}
    spent = [s for s, _ in builds if s is not None]
    return {"model": predictor.name, "version": predictor.version, "forward_batch": best_batch["eager"],
            "best_batch": best_batch, "forward_batch_measured": tuned, "rows": rows,
            "best": {n: {"batch": at[n], "ms_per_image": round(v, 2), "gain": round(best["eager"] / v, 2),
                         **({} if gflop is None else {"gflops": round(gflop / v * 1000.0, 1)})}
                     for n, v in best.items()},
            "gflop_per_image": None if gflop is None else round(gflop, 3), "matmul_gflops": matmul,
            "parity": parity, "missing": missing, "export_s": round(sum(spent), 1) if spent else None,
            "cached": all(c for _, c in builds)}


def _cell(ms: float, gain: float | None, batch: int | None = None, parity: dict | None = None) -> str:
    text = f"{ms:.1f}" + (f" @{batch}" if batch else "") + ("" if gain is None else f", {gain:.2f}×")
    return text if parity is None or parity["ok"] else f"{text} (disagrees)"


BACKENDS_HEADING = "## Backends"


def _share(gflops: float, of: float) -> str:
    return f"{gflops:.0f} GFLOP/s ({100.0 * gflops / of:.0f} %)"


def _work_rate_lines(results: list[dict[str, Any]]) -> list[str]:
    """How much of this machine's matrix-product rate each model's forward uses (eager, and the fastest backend
    whose outputs agree), and how much twice eager's speed would need."""
    rows = [r for r in results if r.get("gflop_per_image") and r.get("matmul_gflops", {}).get("fp32")]
    if not rows:
        return []
    bf16 = any("bf16" in r["matmul_gflops"] for r in rows)
    lines = ["", f"Work per second at each one's best batch: the model's counted GFLOPs per image (`s2amnet info`'s "
             f"count) ÷ its time per image, and in brackets its share of this machine's rate for one {MATMUL_N}² fp32 "
             "matrix product, timed in the same rounds (the best the math library does on this CPU):", "",
             "| model | GFLOP per image | fp32 matmul | " + ("bf16 matmul | " if bf16 else "")
             + "eager | fastest that agrees | twice eager would need |",
             "|---|---|---|" + ("---|" if bf16 else "") + "---|---|---|"]
    for r in rows:
        fp32 = r["matmul_gflops"]["fp32"]
        agree = [n for n in r["best"] if n == "eager" or r["parity"].get(n, {}).get("ok")]
        fastest = min(agree, key=lambda n: r["best"][n]["ms_per_image"])
        eager = r["best"]["eager"]["gflops"]
        cells = [f"{r['model']} {r['version']}", f"{r['gflop_per_image']:.2f}", f"{fp32:.0f} GFLOP/s"]
        if bf16:
            cells.append(f"{r['matmul_gflops']['bf16']:.0f} GFLOP/s" if "bf16" in r["matmul_gflops"] else "–")
        cells += [_share(eager, fp32), f"{fastest}: {_share(r['best'][fastest]['gflops'], fp32)}",
                  f"{100.0 * 2 * eager / fp32:.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def backends_markdown(results: list[dict[str, Any]], run: dict[str, Any] | None = None) -> list[str]:
    """The Backends section of BENCHMARKS.md; with ``run`` (the whole result) it names its own command and
    machine, as a section merged into a report of another run must."""
    names = list(dict.fromkeys(n for r in results for n in (*r["parity"], *r.get("missing", {}))))
    head = "| model | eager | " + " | ".join(names) + " |"
    rule = "|---|---|" + "---|" * len(names)
    own = [own_line(run), ""] if run is not None else []
    lines = [f"{BACKENDS_HEADING}: eager PyTorch, compiled, ONNX Runtime, OpenVINO (`S2AMNET_BACKEND`)", "", *own,
             "The same `Predictor.infer` with the forward run by eager PyTorch and by each backend of "
             "`model.backends` (`eager-channels-last`: the module with its weights and input in NHWC memory order; "
             "`eager-bf16`: that under autocast to bfloat16; `compile`: TorchInductor native code for this CPU, "
             "`compile-bf16` the same compiled under autocast to bfloat16; `onnxruntime` and `openvino`: the "
             "model exported once to ONNX with its real-valued frequency blocks; `openvino-bf16`: OpenVINO computing "
             "in bfloat16), timed in interleaved rounds. Cells: ms per image, gain = eager ms ÷ backend ms. "
             "\"(disagrees)\": the outputs fail the parity check of `model.backends.check_parity` (classify "
             "probabilities within 1e-3, the same detections, 99.9 % of the segment labels), so `auto` never picks it.",
             "", "Each backend at its best forward batch (@N: the fastest of batch 1 and the sizes that "
             "`S2AMNET_FORWARD_BATCH=auto` picked for each backend here, timed in the same rounds); the gain "
             "compares with eager at eager's best:", "", head, rule]
    for r in results:
        cells = [_cell(r["best"][n]["ms_per_image"], r["best"][n]["gain"], r["best"][n]["batch"], r["parity"][n])
                 if n in r["best"] else r.get("missing", {}).get(n, "–") for n in names]
        eager = r["best"]["eager"]
        lines.append(f"| {r['model']} {r['version']} | {_cell(eager['ms_per_image'], None, eager['batch'])} | "
                     + " | ".join(cells) + " |")
    lines += _work_rate_lines(results)
    lines += ["", "Every backend at the same batch:", "", head.replace("| model |", "| model | batch |"),
              rule.replace("|---|", "|---|---|", 1)]
    for r in results:
        for row in r["rows"]:
            ms, gain = row["ms_per_image"], row["gain"]
            cells = [_cell(ms[n], gain[n], None, r["parity"][n]) if n in ms else "–" for n in names]
            lines.append(f"| {r['model']} {r['version']} | {row['batch']} | {ms['eager']:.1f} | " + " | ".join(cells)
                         + " |")
    return lines + [""]
