"""The dispatcher interface shared by the embedded and the Redis implementation.

Routes call `submit()` with a preprocessed sample and get back a JSON-ready result dict (the output of
`app.inference.run_batch` for that sample). Everything about batching, queues and workers is hidden here.
"""

from __future__ import annotations

import abc
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DispatchError(Exception):
    """Base class; each subclass maps to one HTTP status in the routes."""

    status = 503
    reason = "unavailable"

    def __init__(self, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class QueueFull(DispatchError):
    status = 503
    reason = "queue_full"


class Unavailable(DispatchError):
    """Not ready, shutting down, or the backend (Redis) is unreachable."""

    status = 503
    reason = "unavailable"


class DeadlineExceeded(DispatchError):
    status = 504
    reason = "timeout"


class JobFailed(DispatchError):
    """The job could not be computed (e.g. dead-lettered after too many deliveries)."""

    status = 500
    reason = "failed"


class UnknownModel(DispatchError):
    status = 404
    reason = "unknown_model"


@dataclass
class Job:
    """One image for one model. `deadline` is wall-clock epoch seconds so it can cross processes.

    ``image``: the uploaded (encoded) bytes, kept only for a dispatcher that `accepts_encoded` and only when
    they are smaller than ``array``; such a job may then travel as the encoded image (`app.queue.jobs`), and
    the worker that reads it decodes it again into ``array`` (None until then)."""

    model: str
    array: np.ndarray | None  # uint8 C×H×W at the model's input size (Predictor.preprocess)
    meta: dict[str, Any]  # JSON-serialisable preprocessing metadata (original size, scale, pad)
    options: dict[str, Any]  # conf, iou, max_det, top_k, mask_format
    deadline: float
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = field(default_factory=time.time)
    image: bytes | None = None

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline


class Dispatcher(abc.ABC):
    """Accepts jobs, batches them onto models, resolves each job with its result.

    ``accepts_encoded``: whether jobs may carry their uploaded bytes (`Job.image`) beside the array, for a
    dispatcher that can ship the smaller of the two to another process (Redis); an in-process dispatcher
    never needs them, and the API then frees them as soon as the images are decoded."""

    accepts_encoded: bool = False

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting work, let in-flight jobs finish (up to drain_timeout), release resources."""

    @abc.abstractmethod
    async def submit(self, job: Job) -> dict[str, Any]:
        """Run one job; return its JSON-ready result or raise a DispatchError subclass."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """True when every model is loaded and warmed and the backend is reachable."""

    @abc.abstractmethod
    def queue_depth(self, model: str) -> int: ...
