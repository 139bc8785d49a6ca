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


def _meter(task: str, classes: list[str]) -> Any:
    if task == "classify":
        return ClassifyMetrics(len(classes), classes)
    if task == "segment":
        return SegmentMetrics(len(classes), class_names=classes)
    return DetectMetrics(len(classes), class_names=classes, max_dets=EVAL_MAX_DET)


class _Fanout:
    """Feeds each update to the pooled meter and to the meter of the record's group."""

    def __init__(self, pooled: Any, by_group: dict[str, Any]):
        self.pooled, self.by_group, self.group = pooled, by_group, ""

    def update(self, *args) -> None:
        self.pooled.update(*args)
        self.by_group[self.group].update(*args)


def evaluate(predictor: Predictor, records: Sequence[Record], *, batch_size: int = 16,
             progress: bool = True, keep_predictions: bool = False,
             groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Run `predictor` over `records` and return the task's metrics (plain JSON-able dict).

    With ``keep_predictions`` the per-image outputs are returned under ``"predictions"`` (for plots).
    With ``groups`` (one name per record, e.g. the data folder it came from) the metrics of each group's
    records are returned too, under ``"by_group": {name: metrics}`` (one inference pass for all).
    """
    task = predictor.task
    classes = predictor.classes
    meter: Any = _meter(task, classes)
    group_of: list[str] = []
    if groups is not None:
        group_of = list(groups)
        if len(group_of) != len(records):
            raise ValueError(f"groups: {len(group_of)} names for {len(records)} records")
        meter = _Fanout(meter, {g: _meter(task, classes) for g in dict.fromkeys(group_of)})
    kept: list[Any] = []
    index = 0
    bar = tqdm(total=len(records), desc=f"eval {predictor.name}", unit="img", disable=not progress,
               leave=False)
    for chunk in _batches(list(records), batch_size):
        samples = [predictor.preprocess(r.load_image()) for r in chunk]
        raws = predictor.infer([s.array for s in samples])
        for rec, s, raw in zip(chunk, samples, raws, strict=True):
            if group_of:
                meter.group = group_of[index]
            index += 1
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
    if group_of:
        by_group = {g: {**m.compute(), "num_images": group_of.count(g)} for g, m in meter.by_group.items()}
        metrics = meter.pooled.compute()
        metrics["by_group"] = by_group
    else:
        metrics = meter.compute()
    metrics["num_images"] = len(records)
    if keep_predictions:
        metrics["predictions"] = kept
    return metrics
