"""The report of `s2amnet bench`: the machine it ran on, the Markdown tables (BENCHMARKS.md) and the figure."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any


def machine(device: str) -> dict[str, Any]:
    """CPU, cores, torch version and threads, device (and GPU name) of this run."""
    import torch

    from model.device import cpu_info

    name, flags = cpu_info()
    cpu = name or platform.processor() or platform.machine()
    info = {"cpu": cpu, "cores": os.cpu_count(), "vector": vector_units(flags),
            "kernels": str(torch.backends.cpu.get_cpu_capability()), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device, "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def vector_units(flags: AbstractSet[str]) -> str:
    """The widest vector / matrix units of a CPU from its /proc/cpuinfo flags (what decides which backend and
    precision pay on it): e.g. 'AVX-512 + BF16 + AMX', 'AVX2'."""
    if any(f.startswith("avx512") for f in flags):
        name = "AVX-512" + (" + BF16" if "avx512_bf16" in flags else "")
        return name + (" + AMX" if "amx_bf16" in flags else "")
    return "AVX2" if "avx2" in flags else ("unknown" if not flags else "SSE")


SERVICE_HEADING = "## Service"


def service_markdown(s: dict[str, Any], run: dict[str, Any] | None = None) -> list[str]:
    """The Service section; with ``run`` (the whole result) it names its own command and machine, as a
    section merged into a report of another run must."""
    lines = [f"{SERVICE_HEADING}: `s2amnet serve` (embedded batching), `POST {s['endpoint']}` with one "
             f"{s['image']} per request, model {s['model']}", "",
             "| requests in flight | max batch | requests | 200 OK | p50 ms | p95 ms | requests / s |",
             "|---|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        lines.append(f"| {r['concurrency']} | {r['max_batch_size']} | {r['requests']} | {r['ok']} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['requests_per_s']:.1f} |")
    c = s["rounds"][1]["concurrency"]
    lines += ["", f"- Dynamic batching gain (req/s at {c} in flight ÷ req/s at {c} in flight with "
              f"`--max-batch-size 1`): **{s['batching_gain']:.2f}×**.",
              f"- Concurrency gain (req/s at {c} in flight ÷ req/s one at a time): "
              f"**{s['concurrency_gain']:.2f}×**.",
              f"- Whole HTTP path over the bare forward (p50 one at a time ÷ batch-1 forward): "
              f"**{s['http_overhead_vs_forward']:.2f}×** (decode, letterbox, queue, postprocess, JSON)."]
    a = s.get("alone_ms") or {}
    if a.get("inference") is not None:
        backend = f"{a['forward_backend']}, " if a.get("forward_backend") else ""
        lines.append(f"- One at a time, p50 {a['p50']:.1f} ms = batch-1 forward {a['forward']:.1f} ms ({backend}"
                     f"timed in the benchmark's process in blocks between those requests) + "
                     f"{a['p50'] - a['forward']:.1f} ms. "
                     f"The answers' own `timing_ms` (medians): waiting in "
                     f"the queue {a['queue']:.2f} ms, forward + postprocess in the service {a['inference']:.1f} "
                     f"ms; the remaining {a['p50'] - a['queue'] - a['inference']:.1f} ms are HTTP, decoding, "
                     f"letterboxing and JSON.")
    if a.get("over_forward"):
        o = a["over_forward"]
        lines.append(f"- Block by block ({o['blocks']} blocks: the p50 of each block of requests less the median of "
                     f"the bare forwards timed just before it, so that both see the same spell of the machine): median "
                     f"+ {o['p50']:.1f} ms, quartiles + {o['p25']:.1f} to + {o['p75']:.1f} ms.")
    lines.append("")
    if run is not None:
        lines[1:1] = ["", own_line(run)]
    return lines


def kernels_limited(m: dict[str, Any]) -> bool:
    """Whether torch's CPU kernels use a narrower instruction set than the CPU has (``ATEN_CPU_CAPABILITY=avx2``
    on an AVX-512 CPU: what an AVX2 machine of the same cores would get)."""
    return m.get("vector", "").startswith("AVX-512") and not m.get("kernels", "AVX512").startswith("AVX512")


def machine_line(command: str, when: float, m: dict[str, Any]) -> str:
    """Where a section's figures come from: "`command` on DATE: CPU (cores, vector ISA), torch with threads"."""
    limited = f", torch's kernels limited to {m['kernels']}" if kernels_limited(m) else ""
    return (f"`{command}` on {time.strftime('%Y-%m-%d', time.gmtime(when))}: {m['cpu']} ({m['cores']} cores, "
            f"{m.get('vector', 'unknown')}{limited}), torch {m['torch']} with {m['torch_threads']} thread(s)")


def own_line(run: dict[str, Any]) -> str:
    """A merged section's first line: the command and machine of the run that measured it."""
    m = run["machine"]
    return (f"{machine_line(run['command'], run['time'], m)}; `s2amnet serve` backend "
            f"{m.get('service_backend', 'eager')}.")


def to_markdown(result: dict[str, Any]) -> str:
    """BENCHMARKS.md from the result of a run."""
    m = result["machine"]
    lines = ["# Benchmarks", "",
             f"{machine_line(result['command'], result['time'], m)}, device {m.get('gpu', m['device'])}; "
             "glibc allocator tuning "
             f"{'on' if m.get('allocator_tuning') else 'off'} (as in the service); `s2amnet serve` backend "
             f"{m.get('service_backend', 'eager')} (`S2AMNET_BACKEND`).", "",
             "Every figure that compares is a ratio of two numbers measured in this same run; absolute "
             "times move between runs on a shared machine.", "",
             "## Models: `Predictor.infer` on random images at the model's input size", "",
             "| model | task | input | TTA | batch | ms / image | images / s | gain vs batch 1 |"
             + (" peak GPU MiB |" if m["device"].startswith("cuda") else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if m["device"].startswith("cuda") else "")]
    for r in result["models"]:
        for row in r["rows"]:
            gain = row["gain_vs_batch1"]
            lines.append(f"| {r['model']} {r['version']} | {r['task']} | {r['input_size'][1]}x{r['input_size'][0]} "
                         f"| {'+'.join(r['tta']) or 'none'} | {row['batch']} | {row['ms_per_image']:.1f} "
                         f"| {row['images_per_s']:.1f} | {gain:.2f}× |"
                         + (f" {row['peak_gpu_mib']} |" if "peak_gpu_mib" in row else ""))
    folded = [r for r in result["models"] if r.get("batchnorm_folding")]
    if folded:
        gains = ", ".join(f"{r['model']} {r['batchnorm_folding']['gain']:.2f}×" for r in folded)
        lines += ["", f"BatchNorm folded into the convs (`TaskModel.fuse`, as the service loads every model), "
                  f"ms / image at batch {folded[0]['batchnorm_folding']['batch']} unfused ÷ folded, timed in the "
                  f"same rounds: {gains}."]
    tuned = [r for r in result["models"] if r.get("forward_batch")]
    if tuned:
        lines += ["", "## Forward batch: what `S2AMNET_FORWARD_BATCH=auto` picks on this CPU", "",
                  "`Predictor.tune_forward_batch` (run by the service after warm-up): forwards of 1, 2, 4, … "
                  "images, the size with the fewest ms per image; then the largest batch above timed in the "
                  "same rounds as one forward and as forwards of that size.", "",
                  "| model | ms / image measured at 1, 2, 4, … | chosen | batch | ms / image, one forward "
                  "| ms / image, forwards of the chosen size | gain |", "|---|---|---|---|---|---|---|"]
        for r in tuned:
            f = r["forward_batch"]
            measured = ", ".join(f"{v:.1f}" for v in f["measured_ms_per_image"].values())
            lines.append(f"| {r['model']} | {measured} | {f['chosen']} | {f['batch']} | {f['ms_per_image_whole']:.1f} "
                         f"| {f['ms_per_image_chosen']:.1f} | {f['gain']:.2f}× |")
    lines += ["", f"Peak RSS of the benchmark process: {result['peak_rss_mib']:.0f} MiB (all models loaded one "
              "after another, each also unfused for the BatchNorm ratio).", ""]
    if result.get("backends"):
        from app.commands.bench_backends import backends_markdown

        lines += backends_markdown(result["backends"])
    if result.get("service"):
        lines += service_markdown(result["service"])
    if result.get("peers"):
        from app.commands.bench_peers import peers_markdown

        lines += peers_markdown(result["peers"], result)
    if result.get("redis_path"):
        from app.commands.bench_redis_path import redis_path_markdown

        lines += redis_path_markdown(result["redis_path"], result)
    if result.get("line"):
        from app.commands.bench_line import line_markdown

        lines += line_markdown(result["line"])
    if result.get("soak"):
        from app.commands.bench_soak import soak_markdown

        lines += soak_markdown(result["soak"])
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """ms per image per model and batch size, and the service's requests/s per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if result.get("service") else 1
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2), squeeze=False)
    ax = axes[0][0]
    models = result["models"]
    sizes = sorted({row["batch"] for r in models for row in r["rows"]})
    width = 0.8 / max(1, len(sizes))
    for j, b in enumerate(sizes):
        vals = [next((row["ms_per_image"] for row in r["rows"] if row["batch"] == b), 0.0) for r in models]
        ax.bar([i + j * width for i in range(len(models))], vals, width, label=f"batch {b}")
    ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(models))],
                  [r["model"] for r in models], rotation=15)
    ax.set_ylabel("ms per image (lower is better)")
    ax.set_title(f"Predictor.infer, {result['machine'].get('gpu', result['machine']['device'])}")
    ax.legend()
    if n == 2:
        s = result["service"]
        ax = axes[0][1]
        labels = [f"{r['concurrency']} in flight" + (", max batch 1" if r["max_batch_size"] == "1" else "")
                  for r in s["rounds"]]
        ax.bar(labels, [r["requests_per_s"] for r in s["rounds"]], color=["#999", "#2a7", "#c84"])
        ax.set_ylabel("requests / s (higher is better)")
        ax.set_title(f"service, {s['model']}: batching gain {s['batching_gain']:.2f}×")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
