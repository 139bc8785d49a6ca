"""The batching policy shared by the embedded dispatcher and the Redis worker.

Jobs wait in one FIFO per model. The model whose oldest job has waited longest is served first; its batch
is collected until it holds the model's cap (``max_batch_size``, lowered per model by
``model_max_batch_size``) or ``max_delay_s`` has passed since that oldest job arrived, whichever comes
first -- but only when company can be expected: the batch goes at once when the model's recent jobs came
further apart (the median of the last gaps between them) than ``max_delay_s``. So a lone request (a line
sending one part at a time) never waits for company that is not coming, while under load, where jobs come
close together, and for a model's first jobs, batches fill as before. Jobs whose request gave up
(cancelled, or withdrawn at their deadline) are skipped, never batched. How the caller waits for more jobs
differs -- a condition variable in the embedded dispatcher, a blocking ``XREADGROUP`` in the worker -- and
is passed in.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the collector needs of a job in hand: when it arrived (``time.monotonic()``)."""

    arrived: float


T = TypeVar("T", bound=Queued)


def batch_caps(models: Iterable[str], max_batch_size: int, caps: Mapping[str, int] | None = None) -> dict[str, int]:
    """Most jobs per batch for each model: ``max_batch_size`` unless ``caps`` lowers it (at least 1)."""
    most = max(1, int(max_batch_size))
    caps = caps or {}
    return {m: max(1, min(most, int(caps.get(m, most)))) for m in models}


class BatchCollector(Generic[T]):
    """Per-model FIFOs of jobs in hand and the policy that turns them into batches.

    Not thread-safe: the embedded dispatcher calls it under its condition's lock, the worker from its
    one thread. ``dropped(job)`` says whether a queued job is to be skipped (its request went away).
    """

    GAPS = 5  # how many of a model's latest gaps between jobs predict the next one

    def __init__(self, models: Iterable[str], max_batch_size: int, max_delay_s: float,
                 caps: Mapping[str, int] | None = None, dropped: Callable[[T], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        models = list(models)
        self.caps = batch_caps(models, max_batch_size, caps)
        self.max_delay_s = max(0.0, float(max_delay_s))
        self.queues: dict[str, deque[T]] = {m: deque() for m in models}
        self._dropped = dropped or (lambda _job: False)
        self._clock = clock
        self._last_put: dict[str, float] = {}
        self._gaps: dict[str, deque[float]] = {m: deque(maxlen=self.GAPS) for m in models}

    # -- the FIFOs
    def put(self, model: str, job: T) -> int:
        """Queue ``job``; returns the model's queue length."""
        now = self._clock()
        if model in self._last_put:
            self._gaps[model].append(now - self._last_put[model])
        self._last_put[model] = now
        q = self.queues[model]
        q.append(job)
        return len(q)

    def expected_gap(self, model: str) -> float:
        """Seconds until the model's next job is expected: the median of its latest gaps between jobs (0
        before it has had two: a new service's first requests often come together, so they wait as always)."""
        gaps = self._gaps[model]
        return statistics.median(gaps) if gaps else 0.0

    def remove(self, model: str, job: T) -> bool:
        """Take ``job`` out of its queue; False when it is no longer there (already batched)."""
        try:
            self.queues[model].remove(job)
        except ValueError:
            return False
        return True

    def discard(self, model: str, jobs: Iterable[T]) -> None:
        """Remove ``jobs`` (the same objects) from the model's queue, keeping the order of the rest."""
        done = {id(j) for j in jobs}
        self.queues[model] = deque(j for j in self.queues[model] if id(j) not in done)

    def clear(self, model: str) -> list[T]:
        """Empty the model's queue; returns what it held, oldest first."""
        q = self.queues[model]
        out = list(q)
        q.clear()
        return out

    def depth(self, model: str) -> int:
        q = self.queues.get(model)
        return len(q) if q is not None else 0

    def empty(self) -> bool:
        return not any(self.queues.values())

    def room(self, model: str) -> int:
        """How many more jobs the model's next batch can take."""
        return max(0, self.caps[model] - len(self.queues[model]))

    # -- the policy
    def oldest(self) -> str | None:
        """The model whose oldest live job has waited longest (None when no job waits); jobs to be skipped
        at the head of a queue are removed."""
        best, best_t = None, None
        for name, q in self.queues.items():
            while q and self._dropped(q[0]):
                q.popleft()
            if q and (best_t is None or q[0].arrived < best_t):
                best, best_t = name, q[0].arrived
        return best

    def fill(self, model: str, wait: Callable[[float], object], stop: Callable[[], bool]) -> None:
        """Let the model's batch fill: call ``wait(seconds left)`` (which may queue more jobs) until the
        batch is full, ``max_delay_s`` has passed since its oldest job arrived, or ``stop()`` -- unless the
        model's jobs come further apart than ``max_delay_s`` (`expected_gap`): then it does not wait."""
        while not stop():
            q = self.queues[model]  # read again after each wait: another thread may have taken jobs meanwhile
            if not q or len(q) >= self.caps[model]:
                return
            left = q[0].arrived + self.max_delay_s - self._clock()
            if left <= 0 or self.expected_gap(model) > self.max_delay_s:
                return
            wait(left)

    def peek(self, model: str) -> list[T]:
        """The model's next batch, left in its queue (the worker removes it once answered)."""
        q = self.queues[model]
        return [q[i] for i in range(min(len(q), self.caps[model]))]

    def take(self, model: str) -> list[T]:
        """Remove and return the model's next batch: up to its cap, skipped jobs left out."""
        q = self.queues[model]
        batch: list[T] = []
        while q and len(batch) < self.caps[model]:
            job = q.popleft()
            if not self._dropped(job):
                batch.append(job)
        return batch
