"""The batch pipeline shared by the embedded dispatcher and the Redis worker, in two stages:

- `run_forward(predictor, jobs)` drops expired jobs (never computing them) and stacks the others into ONE
  `predictor.infer` call; per job it returns a `Staged` (the raw output) or an error result.
- `finish(predictor, job, staged)` postprocesses one staged job with its own options and encodes masks in
  the requested format (a job whose deadline passed during the forward is answered `expired` instead).
  Postprocessing works at the original image size, so one large image can take seconds: the embedded
  dispatcher runs it on a small pool of threads, off the inference thread that batches every model.
- `run_batch(predictor, jobs)` is both stages on one thread (the Redis worker, `s2amnet predict`).

Each returns one JSON-ready dict per job, in job order:

- success: `{"model": {name, version}, "task", "image": {width, height}, "verdict", "defects", ["top_k"],
  "timing_ms": {"queue", "inference"}}`
- failure: `{"error": "expired" | "failed", "detail": str}`; `raise_for_result` turns it into the
  matching `DispatchError`.

Every batch/inference metric is recorded here and only here.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app import metrics
from app.dispatch.base import DeadlineExceeded, DispatchError, Job, JobFailed

if TYPE_CHECKING:
    from model.predictor import Predictor

log = logging.getLogger("s2amnet.inference")

POSTPROCESS_OPTIONS = ("conf", "iou", "max_det", "top_k", "rule")  # rule: a recipe's verdict rule


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


def encode_mask(mask: np.ndarray, mask_format: str, corner: Any = None, size: tuple[int, int] | None = None
                ) -> dict[str, Any]:
    """A defect mask -> its JSON encoding at the image's size. ``mask`` is full-size, or (with ``corner`` =
    (x1, y1) of the defect's box and ``size`` = (h, w)) the crop inside that box: RLE and polygons are
    computed from the crop alone (a defect is usually a small part of a large image); only PNG needs
    the full-size mask, made here, one defect at a time."""
    from model import masks as mask_ops

    mask = np.asarray(mask).astype(bool, copy=False)
    is_crop = size is not None and all(size) and mask.shape[:2] != tuple(size)
    h, w = (int(v) for v in (size if is_crop else mask.shape[:2]))
    x1, y1 = (int(corner[0]), int(corner[1])) if is_crop else (0, 0)
    if mask_format == "polygon":
        polygons = mask_ops.mask_to_polygons(mask)  # the crop's, moved to the image: the full mask's
        return {
            "size": [h, w],
            "polygons": [[round(float(v), 2) for v in (np.asarray(p).reshape(-1, 2) + (x1, y1)).ravel()]
                         for p in polygons],
        }
    if mask_format == "png":
        if is_crop:
            full = np.zeros((h, w), dtype=bool)
            full[y1:y1 + mask.shape[0], x1:x1 + mask.shape[1]] = mask
            mask = full
        return {"size": [h, w], "png": mask_ops.mask_to_png_b64(mask)}
    rle = mask_ops.encode_rle_at(mask, (x1, y1), (h, w)) if is_crop else mask_ops.encode_rle(mask)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def _defect(defect: dict[str, Any], mask_format: str, size: tuple[int, int] | None = None) -> dict[str, Any]:
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
        if isinstance(mask, dict):  # encoded already
            out["mask"] = _plain(mask)
        else:
            corner = (out["box"]["x1"], out["box"]["y1"]) if "box" in out else None
            out["mask"] = encode_mask(mask, mask_format, corner, size if corner is not None else None)
    return out


def format_result(predictor: Predictor, job: Job, out: dict[str, Any]) -> dict[str, Any]:
    """Predictor.postprocess output -> the JSON-ready part of an InspectionResult computed by a worker
    (built of plain str, int, float, list and dict as it goes: no second pass over it)."""
    mask_format = job.options.get("mask_format") or "rle"
    meta = job.meta
    result: dict[str, Any] = {
        "model": {"name": str(predictor.name), "version": str(predictor.version)},
        "task": str(predictor.task),
        "image": {"width": int(meta.get("orig_w", 0)), "height": int(meta.get("orig_h", 0))},
        "verdict": str(out["verdict"]),
        "defects": [_defect(d, mask_format, (int(meta.get("orig_h", 0)), int(meta.get("orig_w", 0))))
                    for d in out.get("defects", [])],
    }
    if predictor.task == "classify":
        result["top_k"] = [
            {"label": str(t["label"]), "class_id": int(t["class_id"]), "score": round(float(t["score"]), 6)}
            for t in out.get("top_k", [])
        ]
    return result


def _record_outcome(predictor: Predictor, result: dict[str, Any]) -> None:
    name = str(predictor.name)
    metrics.IMAGES.labels(model=name, task=str(predictor.task)).inc()
    metrics.VERDICTS.labels(model=name, verdict=result["verdict"]).inc()
    for label, n in Counter(d["label"] for d in result["defects"]).items():
        metrics.DEFECTS.labels(model=name, label=label).inc(n)


@dataclass
class Staged:
    """A job's raw model output between the two stages (`run_forward` -> `finish`)."""

    raw: Any
    start: float  # when its batch started (wall clock)
    forward_s: float  # duration of its batch's forward pass


def run_forward(predictor: Predictor, jobs: Sequence[Job], now: float | None = None) -> list[Staged | dict[str, Any]]:
    """Stage 1: one forward pass over the live jobs of `jobs`; see the module docstring."""
    name = str(predictor.name)
    start = time.time() if now is None else now
    results: list[Staged | dict[str, Any] | None] = [None] * len(jobs)
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
    forward_s = time.perf_counter() - t0
    metrics.BATCH_SIZE.labels(model=name).observe(len(live))
    metrics.BATCHES.labels(model=name).inc()
    metrics.INFERENCE_DURATION.labels(model=name).observe(forward_s)
    for i, raw in zip(live, raws, strict=True):
        results[i] = Staged(raw, start, forward_s)
    return results  # type: ignore[return-value]


def finish(predictor: Predictor, job: Job, staged: Staged) -> dict[str, Any]:
    """Stage 2: postprocess and format one job (thread-safe: any thread may call it)."""
    import torch  # noqa: PLC0415 - torch-heavy; loaded by the predictor already

    name = str(predictor.name)
    now = time.time()
    if job.expired(now):
        metrics.JOBS_EXPIRED.labels(model=name).inc()
        return {"error": "expired", "detail": f"deadline passed {now - job.deadline:.3f} s before postprocessing"}
    opts = {k: job.options[k] for k in POSTPROCESS_OPTIONS if job.options.get(k) is not None}
    if predictor.task == "segment":
        opts["mask_crops"] = True  # full-size masks are made one at a time while encoding
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = predictor.postprocess(staged.raw, job.meta, **opts)
        result = format_result(predictor, job, out)
    except Exception as exc:
        log.exception("postprocessing a %s result failed", name)
        return {"error": "failed", "detail": f"postprocessing failed: {type(exc).__name__}: {exc}"}
    post_s = time.perf_counter() - t0
    metrics.POSTPROCESS_DURATION.labels(model=name).observe(post_s)
    result["timing_ms"] = {
        "queue": round(max(0.0, staged.start - job.enqueued_at) * 1000.0, 3),
        "inference": round((staged.forward_s + post_s) * 1000.0, 3),
    }
    _record_outcome(predictor, result)
    return result


def run_batch(predictor: Predictor, jobs: Sequence[Job], now: float | None = None) -> list[dict[str, Any]]:
    """Both stages on this thread: `run_forward`, then `finish` for each computed job, in job order."""
    return [finish(predictor, job, r) if isinstance(r, Staged) else r
            for job, r in zip(jobs, run_forward(predictor, jobs, now), strict=True)]


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


RunBatch = Callable[["Predictor", list[Job]], list[dict[str, Any]]]


def _guarded(run: RunBatch, predictor: Predictor, jobs: list[Job]) -> list[dict[str, Any]]:
    """``run`` that never raises: a failure or a malformed answer becomes a ``failed`` result per job."""
    try:
        results = list(run(predictor, jobs))
        if len(results) != len(jobs):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} jobs")
        return [r if isinstance(r, dict) else {"error": "failed", "detail": f"bad result {r!r}"} for r in results]
    except Exception as exc:  # noqa: BLE001 - reported per job
        log.exception("run_batch raised")
        return [{"error": "failed", "detail": f"{type(exc).__name__}: {exc}"} for _ in jobs]


def run_batch_isolating_failures(predictor: Predictor, jobs: list[Job], run: RunBatch = run_batch
                                 ) -> list[dict[str, Any]]:
    """``run`` (`run_batch`) over the batch; when jobs of a batch fail, each of them is tried once more
    alone, so that one bad job does not fail the others. Never raises."""
    results = _guarded(run, predictor, jobs)
    failed = [i for i, r in enumerate(results) if r.get("error") == "failed"]
    if len(jobs) > 1 and failed:
        log.warning("%d of a batch of %d failed; retrying them one by one", len(failed), len(jobs))
        for i in failed:
            results[i] = _guarded(run, predictor, [jobs[i]])[0]
    return results
