"""Evaluation through the `Predictor` — the same preprocess → batched forward → postprocess code the
service runs — over labelled records of a dataset (see `model.data.readers`).

classify: ``top1``, ``macro_recall``, confusion matrix (rows = true class).
detect: COCO ``map50`` / ``map50_95`` via pycocotools, per-class AP50 (predictions at conf 0.001, NMS at the
model's IoU threshold; `nms_iou_sweep` compares thresholds).
segment: ``miou`` (background and defect classes), ``iou_per_class``, ``f1`` (defect classes), computed on
the label map at the ORIGINAL image size.

Every task also gets ``parts``: escape and false-reject figures of the manifest's verdict rule
(`model.verdict`), from one `PartOutcome` per image.
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
from model.verdict import LOCALISE_IOU, Candidate, PartOutcome, part_metrics

__all__ = ["evaluate", "nms_iou_sweep", "part_outcome", "EVAL_CONF", "EVAL_MAX_DET", "PART_CONF"]

EVAL_CONF = 0.001  # COCO protocol: keep low-score detections, the PR curve needs them
EVAL_MAX_DET = 100
PART_CONF = 0.01  # lowest score a part-level candidate keeps (calibration never goes that low)


def _iou_any(box: np.ndarray, gt: np.ndarray) -> float:
    """Largest IoU of one xyxy box with any of the N×4 boxes ``gt`` (0 when there are none)."""
    if len(gt) == 0:
        return 0.0
    w = np.clip(np.minimum(box[2], gt[:, 2]) - np.maximum(box[0], gt[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], gt[:, 3]) - np.maximum(box[1], gt[:, 1]), 0, None)
    inter = w * h
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]) - inter
    return float((inter / np.maximum(union, 1e-9)).max())


def part_outcome(predictor: Predictor, rec: Record, raw: Any, defects: list[dict] | None = None,
                 gt_mask: np.ndarray | None = None) -> PartOutcome:
    """One image's `PartOutcome`: its ground truth (defective or not, which defect classes, where) and every
    defect the model reports above ``PART_CONF`` with whether it overlaps the ground truth. detect / segment:
    ``defects`` is the postprocessed answer at a conf no higher than ``PART_CONF`` (segment with
    ``mask_crops``), ``gt_mask`` the segment label mask at the original size."""
    task = predictor.task
    free = rec.is_defect_free(task) if task != "segment" else rec.defect_free
    if task == "classify":
        probs = np.asarray(raw["probs"], np.float64)
        pass_ids = predictor.rule().pass_ids
        if free is None:
            free = rec.label in pass_ids
        cands = [Candidate(k, float(probs[k])) for k in range(len(probs)) if k not in pass_ids]
        return PartOutcome(defective=not free, gt_classes=() if free else (int(rec.label),), candidates=cands,
                           defect_mass=float(1.0 - probs[pass_ids].sum()))
    defects = [d for d in defects or [] if d["score"] >= PART_CONF]
    if task == "detect":
        gt = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
        cands = []
        for d in defects:
            b = np.array([d["box"][k] for k in ("x1", "y1", "x2", "y2")], np.float64)
            cands.append(Candidate(d["class_id"], d["score"], d["area"], _iou_any(b, gt) >= LOCALISE_IOU))
        return PartOutcome(defective=not free, gt_classes=tuple(sorted({int(c) for c in rec.box_classes})),
                           candidates=cands, has_regions=len(gt) > 0)
    # segment: a component catches the part when any of its pixels is a ground-truth defect pixel
    defect = (gt_mask > 0) & (gt_mask != 255)
    cands = []
    for d in defects:
        x1, y1, x2, y2 = (int(d["box"][k]) for k in ("x1", "y1", "x2", "y2"))
        cands.append(Candidate(d["class_id"], d["score"], d["area"], bool(defect[y1:y2, x1:x2][d["mask"]].any())))
    classes = tuple(int(c) for c in np.unique(gt_mask[defect]))
    if free is None:
        free = not defect.any()
    return PartOutcome(defective=not free, gt_classes=classes, candidates=cands, has_regions=bool(defect.any()))


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


def _update_detect(meter: Any, predictor: Predictor, rec: Record, meta: dict, raw: Any,
                   iou: float | None = None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Postprocess one image's raw detect output for mAP (conf `EVAL_CONF`, NMS at ``iou``, None = the
    model's own), add it to ``meter`` and return the defects and the arrays the meter got."""
    dets = predictor.postprocess(raw, meta, conf=EVAL_CONF, iou=iou, max_det=EVAL_MAX_DET)["defects"]
    pred = {"boxes": np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in dets],
                              np.float64).reshape(-1, 4),
            "scores": np.array([d["score"] for d in dets], np.float64),
            "classes": np.array([d["class_id"] for d in dets], np.int64)}
    gt = {"boxes": rec.boxes, "classes": rec.box_classes, "width": meta["orig_w"], "height": meta["orig_h"]}
    meter.update([pred], [gt])
    return dets, pred


def nms_iou_sweep(predictor: Predictor, records: Sequence[Record], candidates: Sequence[float], *,
                  batch_size: int = 16, progress: bool = True) -> dict[float, dict[str, Any]]:
    """Detect: the box metrics of ``records`` (``map50``, ``map50_95``, ``ap50_per_class``) with each NMS IoU
    threshold of ``candidates``, from one forward pass over the images, and the `PartOutcome` of every image
    at that threshold (``outcomes``, for calibrating the verdict rule with it)."""
    if predictor.task != "detect":
        raise ValueError(f"an NMS IoU threshold is a detect setting; {predictor.name} is a {predictor.task} model")
    meters = {float(c): _meter("detect", predictor.classes) for c in candidates}
    outcomes: dict[float, list[PartOutcome]] = {iou: [] for iou in meters}
    bar = tqdm(total=len(records), desc=f"NMS sweep {predictor.name}", unit="img", disable=not progress,
               leave=False)
    for chunk in _batches(list(records), batch_size):
        samples = [predictor.preprocess(r.load_image()) for r in chunk]
        for rec, s, raw in zip(chunk, samples, predictor.infer([s.array for s in samples]), strict=True):
            for iou, meter in meters.items():
                dets, _ = _update_detect(meter, predictor, rec, s.meta, raw, iou)
                outcomes[iou].append(part_outcome(predictor, rec, raw, dets))
        bar.update(len(chunk))
    bar.close()
    return {iou: {**meter.compute(), "outcomes": outcomes[iou]} for iou, meter in meters.items()}


def evaluate(predictor: Predictor, records: Sequence[Record], *, batch_size: int = 16,
             progress: bool = True, keep_predictions: bool = False,
             groups: Sequence[str] | None = None, keep_outcomes: bool = False) -> dict[str, Any]:
    """Run `predictor` over `records` and return the task's metrics (plain JSON-able dict).

    With ``keep_predictions`` the per-image outputs are returned under ``"predictions"`` (for plots).
    With ``groups`` (one name per record, e.g. the data folder it came from) the metrics of each group's
    records are returned too, under ``"by_group": {name: metrics}`` (one inference pass for all).
    With ``keep_outcomes`` the per-image `PartOutcome` list is returned under ``"outcomes"`` (calibration).
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
    outcomes: list[PartOutcome] = []
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
                outcome = part_outcome(predictor, rec, raw)
            elif task == "segment":
                labels, probs = T.logits_to_original(raw["logits"], s.meta)
                gt_mask = rec.load_mask(labels.shape)
                meter.update(labels, gt_mask)
                out = labels if keep_predictions else None
                found = predictor.segment_defects(labels, probs, conf=PART_CONF, max_det=1 << 30, mask_crops=True)
                outcome = part_outcome(predictor, rec, raw, found["defects"], gt_mask)
            else:
                dets, out = _update_detect(meter, predictor, rec, s.meta, raw)
                outcome = part_outcome(predictor, rec, raw, dets)  # the same NMS answer, at PART_CONF and up
            outcomes.append(outcome)
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
    metrics["parts"] = part_metrics(outcomes, predictor.verdict_rule, classes)
    if keep_outcomes:
        metrics["outcomes"] = outcomes
    if keep_predictions:
        metrics["predictions"] = kept
    return metrics
