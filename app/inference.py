"""The batch pipeline shared by the embedded dispatcher and the Redis worker.

`run_batch(predictor, jobs)` drops expired jobs (never computing them), stacks the others into ONE
`predictor.infer` call, postprocesses each with its own options, encodes masks in the requested format
and returns one JSON-ready dict per job, in job order:

- success: `{"model": {name, version}, "task", "image": {width, height}, "verdict", "defects", ["top_k"],
  "timing_ms": {"queue", "inference"}}`
- failure: `{"error": "expired" | "failed", "detail": str}`; `raise_for_result` turns it into the
  matching `DispatchError`.

Every batch/inference metric is recorded here and only here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from app import metrics
from app.dispatch.base import DeadlineExceeded, DispatchError, Job, JobFailed

log = logging.getLogger("s2amnet.inference")

POSTPROCESS_OPTIONS = ("conf", "iou", "max_det", "top_k")


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types (recursively)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # torch tensor
        return value.tolist()
    return value


def encode_mask(mask: np.ndarray, mask_format: str) -> dict[str, Any]:
    from model import masks as mask_ops

    mask = np.asarray(mask).astype(bool, copy=False)
    h, w = (int(s) for s in mask.shape[:2])
    if mask_format == "polygon":
        polygons = mask_ops.mask_to_polygons(mask)
        return {
            "size": [h, w],
            "polygons": [[round(float(v), 2) for v in np.asarray(p).ravel()] for p in polygons],
        }
    if mask_format == "png":
        return {"size": [h, w], "png": mask_ops.mask_to_png_b64(mask)}
    rle = mask_ops.encode_rle(mask)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def _defect(defect: dict[str, Any], mask_format: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": str(defect["label"]),
        "class_id": int(defect["class_id"]),
        "score": round(float(defect["score"]), 6),
    }
    box = defect.get("box")
    if box is not None:
        if isinstance(box, dict):
            coords = [box["x1"], box["y1"], box["x2"], box["y2"]]
        else:
            coords = list(np.asarray(box, dtype=float).ravel()[:4])
        out["box"] = dict(zip(("x1", "y1", "x2", "y2"), (round(float(c), 2) for c in coords), strict=True))
    if defect.get("area") is not None:
        out["area"] = round(float(defect["area"]), 2)
    mask = defect.get("mask")
    if mask is not None:
        out["mask"] = mask if isinstance(mask, dict) else encode_mask(mask, mask_format)
    return out


def format_result(predictor: Any, job: Job, out: dict[str, Any]) -> dict[str, Any]:
    """Predictor.postprocess output -> the JSON-ready part of an InspectionResult computed by a worker."""
    mask_format = job.options.get("mask_format") or "rle"
    meta = job.meta
    result: dict[str, Any] = {
        "model": {"name": str(predictor.name), "version": str(predictor.version)},
        "task": str(predictor.task),
        "image": {"width": int(meta.get("orig_w", 0)), "height": int(meta.get("orig_h", 0))},
        "verdict": str(out["verdict"]),
        "defects": [_defect(d, mask_format) for d in out.get("defects", [])],
    }
    if predictor.task == "classify":
        result["top_k"] = [
            {"label": str(t["label"]), "class_id": int(t["class_id"]), "score": round(float(t["score"]), 6)}
            for t in out.get("top_k", [])
        ]
    return _plain(result)


def _record_outcome(predictor: Any, result: dict[str, Any]) -> None:
    name = str(predictor.name)
    metrics.IMAGES.labels(model=name, task=str(predictor.task)).inc()
    metrics.VERDICTS.labels(model=name, verdict=result["verdict"]).inc()
    for d in result["defects"]:
        metrics.DEFECTS.labels(model=name, label=d["label"]).inc()


def run_batch(predictor: Any, jobs: Sequence[Job], now: float | None = None) -> list[dict[str, Any]]:
    """Compute the live jobs of `jobs` in one forward pass; see the module docstring."""
    name = str(predictor.name)
    start = time.time() if now is None else now
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    live: list[int] = []
    for i, job in enumerate(jobs):
        if job.expired(start):
            metrics.JOBS_EXPIRED.labels(model=name).inc()
            results[i] = {
                "error": "expired",
                "detail": f"deadline passed {start - job.deadline:.3f} s before the job's batch",
            }
        else:
            live.append(i)
    if not live:
        return results  # type: ignore[return-value]

    for i in live:
        metrics.QUEUE_WAIT.labels(model=name).observe(max(0.0, start - jobs[i].enqueued_at))
    t0 = time.perf_counter()
    try:
        raws = predictor.infer([jobs[i].array for i in live])
    except Exception as exc:
        log.exception("forward pass of %s failed on a batch of %d", name, len(live))
        for i in live:
            results[i] = {"error": "failed", "detail": f"inference failed: {type(exc).__name__}: {exc}"}
        return results  # type: ignore[return-value]

    done: list[int] = []
    for i, raw in zip(live, raws, strict=True):
        job = jobs[i]
        opts = {k: job.options[k] for k in POSTPROCESS_OPTIONS if job.options.get(k) is not None}
        try:
            out = predictor.postprocess(raw, job.meta, **opts)
            results[i] = format_result(predictor, job, out)
            done.append(i)
        except Exception as exc:
            log.exception("postprocessing a %s result failed", name)
            results[i] = {"error": "failed", "detail": f"postprocessing failed: {type(exc).__name__}: {exc}"}
    elapsed = time.perf_counter() - t0

    metrics.BATCH_SIZE.labels(model=name).observe(len(live))
    metrics.BATCHES.labels(model=name).inc()
    metrics.INFERENCE_DURATION.labels(model=name).observe(elapsed)
    for i in done:
        res = results[i]
        assert res is not None
        res["timing_ms"] = {
            "queue": round(max(0.0, start - jobs[i].enqueued_at) * 1000.0, 3),
            "inference": round(elapsed * 1000.0, 3),
        }
        _record_outcome(predictor, res)
    return results  # type: ignore[return-value]


def raise_for_result(result: dict[str, Any]) -> dict[str, Any]:
    """Return a successful result; raise the DispatchError an error result stands for."""
    error = result.get("error")
    if not error:
        return result
    detail = str(result.get("detail") or error)
    if error == "expired":
        raise DeadlineExceeded(detail)
    if error == "failed":
        raise JobFailed(detail)
    raise DispatchError(detail)


def assemble_result(
    out: dict[str, Any], request_id: str, total_ms: float, mes: dict[str, Any]
) -> dict[str, Any]:
    """A worker's result + request context -> one InspectionResult dict (the API's answer per image)."""
    import uuid

    result: dict[str, Any] = {
        "result_id": str(uuid.uuid4()),
        "request_id": request_id,
        "model": out["model"],
        "task": out["task"],
        "image": out["image"],
        "verdict": out["verdict"],
        "defects": out["defects"],
    }
    if "top_k" in out:
        result["top_k"] = out["top_k"]
    timing = out.get("timing_ms", {})
    result["timing_ms"] = {
        "queue": timing.get("queue", 0.0),
        "inference": timing.get("inference", 0.0),
        "total": round(total_ms, 3),
    }
    result.update(mes)
    return result
