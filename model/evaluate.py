"""Evaluation through the `Predictor` — the same preprocess → batched forward → postprocess code the
service runs — over labelled records of a dataset (see `model.data.readers`).

classify: ``top1``, ``macro_recall``, confusion matrix (rows = true class).
detect: COCO ``map50`` / ``map50_95`` via pycocotools, per-class AP50 (predictions at conf 0.001).
segment: ``miou`` (background and defect classes), ``iou_per_class``, ``f1`` (defect classes), computed on
the label map at the ORIGINAL image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from model import transforms as T
from model.data.readers import Record
from model.metrics import ClassifyMetrics, DetectMetrics, SegmentMetrics
from model.predictor import Predictor

__all__ = ["evaluate", "EVAL_CONF", "EVAL_MAX_DET"]

EVAL_CONF = 0.001  # COCO protocol: keep low-score detections, the PR curve needs them
EVAL_MAX_DET = 100


def _batches(records: Sequence[Record], size: int):
    for start in range(0, len(records), size):
        yield records[start:start + size]


def evaluate(predictor: Predictor, records: Sequence[Record], *, batch_size: int = 16,
             progress: bool = True, keep_predictions: bool = False) -> dict[str, Any]:
    """Run `predictor` over `records` and return the task's metrics (plain JSON-able dict).

    With ``keep_predictions`` the per-image outputs are returned under ``"predictions"`` (for plots).
    """
    task = predictor.task
    classes = predictor.classes
    if task == "classify":
        meter: Any = ClassifyMetrics(len(classes), classes)
    elif task == "segment":
        meter = SegmentMetrics(len(classes), class_names=classes)
    else:
        meter = DetectMetrics(len(classes), class_names=classes, max_dets=EVAL_MAX_DET)
    kept: list[Any] = []
    bar = tqdm(total=len(records), desc=f"eval {predictor.name}", unit="img", disable=not progress,
               leave=False)
    for chunk in _batches(list(records), batch_size):
        samples = [predictor.preprocess(r.load_image()) for r in chunk]
        raws = predictor.infer([s.array for s in samples])
        for rec, s, raw in zip(chunk, samples, raws, strict=True):
            if task == "classify":
                pred = int(np.argmax(np.asarray(raw["probs"])))
                meter.update(np.array([pred]), np.array([rec.label]))
                out: Any = pred
            elif task == "segment":
                labels, _ = T.logits_to_original(raw["logits"], s.meta)
                meter.update(labels, rec.load_mask(labels.shape))
                out = labels if keep_predictions else None
            else:
                res = predictor.postprocess(raw, s.meta, conf=EVAL_CONF, iou=0.7, max_det=EVAL_MAX_DET)
                dets = res["defects"]
                pred = {"boxes": np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in dets],
                                          np.float64).reshape(-1, 4),
                        "scores": np.array([d["score"] for d in dets], np.float64),
                        "classes": np.array([d["class_id"] for d in dets], np.int64)}
                w, h = s.meta["orig_w"], s.meta["orig_h"]
                gt = {"boxes": rec.boxes, "classes": rec.box_classes, "width": w, "height": h}
                meter.update([pred], [gt])
                out = pred
            if keep_predictions:
                kept.append(out)
        bar.update(len(chunk))
    bar.close()
    metrics = meter.compute()
    metrics["num_images"] = len(records)
    if keep_predictions:
        metrics["predictions"] = kept
    return metrics
