"""Tiny random-weight model folders, written like the shipped ones (model.checkpoint.save_model)."""

from __future__ import annotations

from pathlib import Path

INPUT_SIZE = 64  # tiny models at 64x64 keep CPU cost low
DET_NMS_IOU = 0.6  # the detect model's own NMS IoU threshold (manifest postprocess.iou), not the default 0.7
SMALLEST_INPUT_SIZE = 32  # the smallest input the model family supports: cheapest forwards

# name -> (task, classes, verdict rule)
TEST_MODELS = {
    "cls": ("classify", ["good", "scratch", "dent"], {"type": "classify", "pass_labels": ["good"], "min_score": 0.5}),
    "det": ("detect", ["scratch", "dent"], {"type": "any_defect", "min_score": 0.5, "min_area": 0}),
    "seg": ("segment", ["background", "scratch", "dent"], {"type": "any_defect", "min_score": 0.5, "min_area": 0}),
}


def make_weights(root: Path, input_size: int = INPUT_SIZE, names: list[str] | None = None) -> Path:
    """Write the model folders of TEST_MODELS (only ``names`` if given) under ``root``; returns ``root``."""
    import torch

    from model.checkpoint import save_model
    from model.registry import build_model

    torch.manual_seed(0)
    for name, (task, classes, verdict) in TEST_MODELS.items():
        if names and name not in names:
            continue
        model = build_model(task, "tiny", len(classes))
        save_model(model, Path(root) / name, {
            "name": name, "version": "1", "classes": classes, "verdict": verdict,
            "arch": {"variant": "tiny", "input_size": [input_size, input_size]},
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            **({"postprocess": {"iou": DET_NMS_IOU}} if task == "detect" else {}),
        })
    return Path(root)
