"""Reference answers computed in the test process, to check what a service answered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


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
