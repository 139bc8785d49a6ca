"""Evaluation plots (matplotlib, PNG): confusion matrix for classify, per-class AP50 / IoU bars for
detect / segment, each with a few example predictions drawn over their images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def plot_eval(path: str | Path, predictor, records: Sequence, metrics: dict[str, Any],
              predictions: Sequence[Any] | None, examples: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(predictor.classes)
    n_ex = min(examples, len(records)) if predictor.task != "classify" and predictions else 0
    fig, axes = plt.subplots(1, 1 + n_ex, figsize=(5 + 4 * n_ex, 4.5), squeeze=False)
    ax = axes[0, 0]
    if predictor.task == "classify":
        cm = np.asarray(metrics["confusion"], float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"top1 {metrics['top1']:.3f}  macro recall {metrics['macro_recall']:.3f}")
    else:
        key, names = (("ap50_per_class", classes) if predictor.task == "detect"
                      else ("iou_per_class", classes))
        vals = [v if v is not None else 0.0 for v in metrics[key]]
        ax.barh(range(len(vals)), vals, color="tab:blue")
        ax.set_yticks(range(len(vals)), names[: len(vals)], fontsize=8)
        ax.set_xlim(0, 1)
        head = (f"mAP50 {metrics['map50']:.3f}" if predictor.task == "detect" else f"mIoU {metrics['miou']:.3f}")
        ax.set_title(f"{key.replace('_', ' ')} — {head}")
    idx = np.linspace(0, len(records) - 1, n_ex).astype(int) if n_ex else []
    for a, i in zip(axes[0, 1:], idx, strict=False):
        img = records[i].load_image()
        a.imshow(img, cmap="gray")
        pred = predictions[i]
        if predictor.task == "detect":
            keep = pred["scores"] >= 0.25
            for (x1, y1, x2, y2), c in zip(pred["boxes"][keep], pred["classes"][keep], strict=True):
                a.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=1.5))
                a.text(x1, y1, classes[int(c)], color="yellow", fontsize=7, va="bottom")
            for x1, y1, x2, y2 in records[i].boxes:
                a.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1, ls="--"))
        elif pred is not None:
            overlay = np.ma.masked_where(pred == 0, pred)
            a.imshow(overlay, cmap="autumn", alpha=0.5, vmin=0, vmax=max(1, len(classes) - 1))
        a.set_title(records[i].stem, fontsize=8)
        a.axis("off")
    fig.suptitle(f"{predictor.name} ({predictor.task}) on {metrics.get('num_images', len(records))} images")
    return _save(fig, path)


def plot_verdict(path: str | Path, name: str, sweep: dict[str, list], point: dict[str, Any] | None = None,
                 title: str = "") -> Path:
    """Escape rate and false-reject rate against one threshold for every class (`model.verdict.threshold_sweep`),
    with the rule in use (``point``: its part-level figures) marked on both curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = np.asarray(sweep["threshold"], float)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    esc = np.array([np.nan if v is None else v for v in sweep["escape_rate"]], float)
    ax.plot(thr, esc, color="tab:red", label="escape (defective judged pass or not located)")
    fr = np.array([np.nan if v is None else v for v in sweep["false_reject_rate"]], float)
    if not np.isnan(fr).all():
        ax.plot(thr, fr, color="tab:blue", label="false reject (defect-free judged fail)")
    if point is not None:
        label = "the manifest's rule"
        if point.get("escape_rate") is not None:
            ax.axhline(point["escape_rate"], color="tab:red", ls=":", lw=1)
        if point.get("false_reject_rate") is not None:
            ax.axhline(point["false_reject_rate"], color="tab:blue", ls=":", lw=1)
        ax.plot([], [], color="grey", ls=":", label=label + " (per-class thresholds)")
    ax.set_xlabel("min score (every class)")
    ax.set_ylabel("rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"{name}: part-level verdicts", fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
