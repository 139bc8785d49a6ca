"""Wrappers of real Predictors for in-process tests, and jobs made from synthetic images."""

from __future__ import annotations

import threading
import time

from app.dispatch.base import Job
from support.images import pattern


class Recording:
    """Wraps a real Predictor: records the thread and batch size of every infer call; can be held. Reads and
    writes of any other attribute go to the Predictor (the runtime sets its backend and forward batch)."""

    _OWN = frozenset({"p", "calls", "gate", "fail"})

    def __init__(self, predictor):
        self.p = predictor
        self.calls: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def __getattr__(self, name):
        return getattr(self.p, name)

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.p, name, value)

    def infer(self, arrays):
        self.calls.append((threading.current_thread().name, len(arrays)))
        self.gate.wait(30)
        if self.fail:
            raise RuntimeError("boom")
        return self.p.infer(arrays)


def job(predictor, seed: int = 0, deadline_in: float = 30.0, **options) -> Job:
    """A job of one synthetic image, preprocessed by ``predictor``, due in ``deadline_in`` seconds."""
    s = predictor.preprocess(pattern(60 + seed, 40, seed))
    opts = {"conf": 0.0, "iou": 0.7, "max_det": 5, "top_k": 5, "mask_format": "rle", **options}
    return Job(model=predictor.name, array=s.array, meta=s.meta, options=opts, deadline=time.time() + deadline_in)
