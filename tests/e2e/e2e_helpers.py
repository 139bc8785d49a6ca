"""Tiny models, synthetic images and reference answers for the Redis-mode tests."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from promtext import metric  # noqa: F401  (re-exported: the e2e tests import it from here)

INPUT_SIZE = 32  # the smallest input the model family supports: cheapest forwards

# name -> (task, classes, verdict rule): the cheapest models that still exercise the whole pipeline.
E2E_MODELS = {
    "cls": ("classify", ["good", "scratch", "dent"],
            {"type": "classify", "pass_labels": ["good"], "min_score": 0.5}),
    "det": ("detect", ["scratch", "dent"], {"type": "any_defect", "min_score": 0.5, "min_area": 0}),
}


def make_weights(root: Path, names: list[str] | None = None) -> Path:
    import torch

    from model.checkpoint import save_model
    from model.registry import build_model

    torch.manual_seed(0)
    for name, (task, classes, verdict) in E2E_MODELS.items():
        if names and name not in names:
            continue
        model = build_model(task, "tiny", len(classes))
        save_model(model, Path(root) / name, {
            "name": name, "version": "1", "classes": classes, "verdict": verdict,
            "arch": {"variant": "tiny", "input_size": [INPUT_SIZE, INPUT_SIZE]},
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        })
    return Path(root)


def image_array(seed: int, w: int = 48, h: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))[:h, :w]  # blocky, distinct per seed


def png_bytes(seed: int, w: int = 48, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, w, h)).save(buf, "PNG")
    return buf.getvalue()


def size_for(i: int) -> tuple[int, int]:
    """A distinct (width, height) per request index, so every answer can be matched to its request."""
    return 40 + i % 50, 36 + i // 50


class Reference:
    """Answers computed in this process through the same decode -> preprocess -> run_batch pipeline."""

    def __init__(self, weights_dir: Path, model: str):
        from model.predictor import Predictor

        self.predictor = Predictor.from_folder(Path(weights_dir) / model, device="cpu")

    def answers(self, images: list[bytes], batch: int = 50) -> list[dict[str, Any]]:
        """One answer per image (computed in batches: the predictor answers the same alone or batched)."""
        from app.codec import decode_image
        from app.dispatch.base import Job
        from app.inference import run_batch

        jobs = []
        for data in images:
            sample = self.predictor.preprocess(decode_image(data, max_pixels=10**8))
            jobs.append(Job(model=self.predictor.name, array=sample.array, meta=sample.meta, options={},
                            deadline=time.time() + 600))
        out: list[dict[str, Any]] = []
        for i in range(0, len(jobs), batch):
            out += run_batch(self.predictor, jobs[i:i + batch])
        return out


def assert_same_answer(got: dict[str, Any], want: dict[str, Any], tol: float = 1e-4) -> None:
    """Same model, image size, verdict and labels; scores equal up to float noise of batching."""
    assert got["model"] == want["model"]
    assert got["image"] == want["image"]
    assert got["verdict"] == want["verdict"], (got, want)
    for key in ("defects", "top_k"):
        g, w = got.get(key, []), want.get(key, [])
        assert [d["label"] for d in g] == [d["label"] for d in w], (key, got, want)
        for a, b in zip(g, w, strict=True):
            assert abs(a["score"] - b["score"]) <= tol, (key, a, b)
            if "box" in b:
                for c in ("x1", "y1", "x2", "y2"):
                    assert abs(a["box"][c] - b["box"][c]) <= 0.05, (a, b)


