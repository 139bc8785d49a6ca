"""Evaluation metrics for classify, segment and detect.

classify  `ClassifyMetrics(num_classes)`: ``update(pred_or_logits, target)`` per batch, ``compute()`` →
          ``top1``, ``macro_recall`` (mean recall over classes that have samples), ``recall_per_class``,
          ``precision_per_class``, ``confusion`` (rows = true class, columns = predicted).
segment   `SegmentMetrics(num_classes, ignore_index=255)`: streaming confusion matrix (only a
          num_classes² matrix is kept, never the masks) → ``miou`` (mean IoU over all classes incl.
          background; classes absent from both prediction and ground truth are left out),
          ``iou_per_class``, ``f1`` (mean F1 of the defect classes 1..), ``f1_per_class``, ``pixel_acc``,
          ``confusion``.
detect    `DetectMetrics(num_classes)` / `coco_map(predictions, ground_truths, num_classes)`: COCO
          protocol through pycocotools, built in memory (no files, pycocotools' printing suppressed) →
          ``map50``, ``map50_95``, ``ap50_per_class``, ``ap_per_class`` (None for a class without ground
          truth), counts. Predictions per image: ``{"boxes": N×4 xyxy, "scores": N, "classes": N}``;
          ground truth per image: ``{"boxes": M×4 xyxy, "classes": M[, "ignore": M bool]}`` (ignored boxes,
          e.g. VOC difficult, are COCO "crowd" regions: matching them is neither TP nor FP).

Inputs may be numpy arrays, torch tensors or lists. All results are plain Python (JSON-serialisable).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

__all__ = [
    "confusion_matrix",
    "classify_metrics",
    "ClassifyMetrics",
    "SegmentMetrics",
    "segment_metrics_from_confusion",
    "coco_map",
    "DetectMetrics",
]


def _np(x) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def _nan_to_none(v):
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    v = float(v)
    return None if np.isnan(v) else v


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """int64 num_classes×num_classes matrix, rows = target, columns = prediction."""
    p = _np(pred).reshape(-1).astype(np.int64)
    t = _np(target).reshape(-1).astype(np.int64)
    valid = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    if ignore_index is not None:
        valid &= t != ignore_index
    idx = t[valid] * num_classes + p[valid]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# ----------------------------------------------------------------------------------------------------
# classify


def classify_metrics(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    cm = np.asarray(cm, np.int64)
    total = cm.sum()
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
    out = {
        "top1": float(tp.sum() / total) if total else 0.0,
        "macro_recall": float(np.nanmean(recall)) if np.any(support > 0) else 0.0,
        "recall_per_class": _nan_to_none(recall.tolist()),
        "precision_per_class": _nan_to_none(precision.tolist()),
        "support": support.astype(int).tolist(),
        "confusion": cm.tolist(),
        "num_samples": int(total),
    }
    if class_names is not None:
        out["classes"] = list(class_names)
    return out


class ClassifyMetrics:
    """Streaming classification metrics."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.cm = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred, target) -> None:
        """``pred``: class indices (B,) or logits/probabilities (B, C); ``target``: (B,)."""
        p = _np(pred)
        if p.ndim == 2:
            p = p.argmax(1)
        self.cm += confusion_matrix(p, target, self.num_classes)

    def compute(self) -> dict:
        return classify_metrics(self.cm, self.class_names)


# ----------------------------------------------------------------------------------------------------
# segment


def segment_metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        union = tp + fp + fn
        iou = np.where(union > 0, tp / union, np.nan)
        denom = 2 * tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    defect_f1 = f1[1:] if len(f1) > 1 else f1
    out = {
        "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else 0.0,
        "iou_per_class": _nan_to_none(iou.tolist()),
        "f1": float(np.nanmean(defect_f1)) if np.any(~np.isnan(defect_f1)) else 0.0,
        "f1_per_class": _nan_to_none(f1.tolist()),
        "pixel_acc": float(tp.sum() / cm.sum()) if cm.sum() else 0.0,
        "confusion": cm.astype(np.int64).tolist(),
    }
    if class_names is not None:
        out["classes"] = list(class_names)
    return out


class SegmentMetrics:
    """Streaming semantic-segmentation metrics from a confusion matrix (pixels with target ==
    ``ignore_index`` are skipped). ``update`` accepts torch tensors on any device (counted there with
    ``torch.bincount``) or numpy arrays."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.cm = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred, target) -> None:
        """``pred``: label map (B,H,W) / (H,W) or logits (B,C,H,W); ``target``: label map, same H×W."""
        try:
            import torch
        except ImportError:  # pragma: no cover
            torch = None
        n = self.num_classes
        if torch is not None and isinstance(pred, torch.Tensor):
            p = pred.detach()
            if p.ndim == 4:
                p = p.argmax(1)
            t = torch.as_tensor(target, device=p.device).detach()
            if p.shape != t.shape:
                raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} differ")
            p, t = p.reshape(-1).long(), t.reshape(-1).long()
            valid = (t >= 0) & (t < n) & (t != self.ignore_index)
            idx = t[valid] * n + p[valid].clamp(0, n - 1)
            self.cm += torch.bincount(idx, minlength=n * n).reshape(n, n).cpu().numpy()
            return
        p = _np(pred)
        if p.ndim == 4:
            p = p.argmax(1)
        t = _np(target)
        if p.shape != t.shape:
            raise ValueError(f"prediction {p.shape} and target {t.shape} differ")
        self.cm += confusion_matrix(np.clip(p, 0, n - 1), t, n, self.ignore_index)

    def compute(self) -> dict:
        return segment_metrics_from_confusion(self.cm, self.class_names)


# ----------------------------------------------------------------------------------------------------
# detect


def _boxes(x) -> np.ndarray:
    return _np(x).astype(np.float64).reshape(-1, 4) if x is not None else np.zeros((0, 4))


def _coco_records(predictions: Sequence[dict], ground_truths: Sequence[dict], num_classes: int
                  ) -> tuple[list[dict], list[dict], list[dict]]:
    """(images, annotations, detections) in COCO's form; category ids are class + 1."""
    images: list[dict] = []
    anns: list[dict] = []
    dets: list[dict] = []
    for img_id, (pred, gt) in enumerate(zip(predictions, ground_truths, strict=True), start=1):
        gb = _boxes(gt.get("boxes"))
        gc = _np(gt.get("classes", np.zeros(0))).reshape(-1).astype(np.int64)
        ign = _np(gt["ignore"]).reshape(-1).astype(bool) if gt.get("ignore") is not None else \
            np.zeros(len(gb), bool)
        w = float(max(gt.get("width") or 0, gb[:, 2].max() if len(gb) else 0, 1))
        h = float(max(gt.get("height") or 0, gb[:, 3].max() if len(gb) else 0, 1))
        images.append({"id": img_id, "width": w, "height": h})
        for b, c, ig in zip(gb, gc, ign, strict=True):
            bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c) + 1,
                         "bbox": [float(b[0]), float(b[1]), bw, bh], "area": bw * bh,
                         "iscrowd": int(ig), "ignore": int(ig)})
        pb = _boxes(pred.get("boxes"))
        ps = _np(pred.get("scores", np.zeros(0))).reshape(-1).astype(np.float64)
        pc = _np(pred.get("classes", np.zeros(0))).reshape(-1).astype(np.int64)
        for b, s, c in zip(pb, ps, pc, strict=True):
            if not 0 <= c < num_classes:
                continue
            dets.append({"image_id": img_id, "category_id": int(c) + 1,
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                         "score": float(s)})
    return images, anns, dets


def coco_map(predictions: Sequence[dict], ground_truths: Sequence[dict], num_classes: int,
             class_names: Sequence[str] | None = None, max_dets: int = 100) -> dict:
    """COCO bbox mAP via pycocotools for per-image predictions and ground truths (same order/length).

    Boxes are xyxy in pixels. Images without ground truth count (their detections are false positives);
    images without predictions are fine. Returns ``map50``, ``map50_95``, ``map75``, ``ap50_per_class``,
    ``ap_per_class`` (None for classes with no ground truth), ``num_images``, ``num_gt``, ``num_pred``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truths):
        raise ValueError("predictions and ground_truths must have one entry per image")
    images, anns, dets = _coco_records(predictions, ground_truths, num_classes)
    n_gt = sum(1 for a in anns if not a["iscrowd"])
    out = {"map50": 0.0, "map50_95": 0.0, "map75": 0.0, "ap50_per_class": [None] * num_classes,
           "ap_per_class": [None] * num_classes, "num_images": len(images), "num_gt": n_gt,
           "num_pred": len(dets)}
    if class_names is not None:
        out["classes"] = list(class_names)
    gt_classes = {a["category_id"] - 1 for a in anns if not a["iscrowd"]}
    if not dets or not gt_classes:
        for c in gt_classes:
            out["ap50_per_class"][c] = 0.0
            out["ap_per_class"][c] = 0.0
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns,
                           "categories": [{"id": i + 1, "name": str(i)} for i in range(num_classes)]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"]  # T×R×K×A×M, -1 where undefined
    cat_ids = ev.params.catIds

    def _ap(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else None

    ap50, ap = [None] * num_classes, [None] * num_classes
    for k, cid in enumerate(cat_ids):
        c = cid - 1
        if c not in gt_classes:
            continue
        ap50[c] = _ap(prec[0, :, k, 0, -1])
        ap[c] = _ap(prec[:, :, k, 0, -1])
    valid50 = [v for v in ap50 if v is not None]
    valid = [v for v in ap if v is not None]
    t75 = int(np.argmin(np.abs(ev.params.iouThrs - 0.75)))
    p75 = prec[t75, :, :, 0, -1]
    out.update({
        "map50": float(np.mean(valid50)) if valid50 else 0.0,
        "map50_95": float(np.mean(valid)) if valid else 0.0,
        "map75": float(p75[p75 > -1].mean()) if (p75 > -1).any() else 0.0,
        "ap50_per_class": ap50,
        "ap_per_class": ap,
    })
    return out


class DetectMetrics:
    """Accumulates per-image predictions and ground truths (only boxes, small), COCO mAP on `compute`."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, max_dets: int = 100):
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.max_dets = max_dets
        self.reset()

    def reset(self) -> None:
        self.predictions: list[dict] = []
        self.ground_truths: list[dict] = []

    def update(self, predictions: Sequence[dict], ground_truths: Sequence[dict]) -> None:
        """One dict per image for both (see module docstring); arrays are copied to numpy."""
        if len(predictions) != len(ground_truths):
            raise ValueError("one prediction dict per ground-truth dict")
        for p, g in zip(predictions, ground_truths, strict=True):
            self.predictions.append({
                "boxes": _boxes(p.get("boxes")),
                "scores": _np(p.get("scores", np.zeros(0))).reshape(-1).astype(np.float64),
                "classes": _np(p.get("classes", np.zeros(0))).reshape(-1).astype(np.int64),
            })
            gg = {"boxes": _boxes(g.get("boxes")),
                  "classes": _np(g.get("classes", np.zeros(0))).reshape(-1).astype(np.int64)}
            if g.get("ignore") is not None:
                gg["ignore"] = _np(g["ignore"]).reshape(-1).astype(bool)
            for k in ("width", "height"):
                if g.get(k) is not None:
                    gg[k] = g[k]
            self.ground_truths.append(gg)

    def compute(self) -> dict:
        return coco_map(self.predictions, self.ground_truths, self.num_classes, self.class_names,
                        self.max_dets)
