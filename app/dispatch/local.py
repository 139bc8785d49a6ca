"""Embedded dispatcher: in-process dynamic batching on long-lived inference threads.

- One bounded FIFO per model (`max_queue`); a full queue refuses with `QueueFull` (503 + Retry-After).
- Inference threads own every forward pass, and no other thread starts torch's intra-op (OpenMP) thread
  teams: the first one warms the models up and runs the forwards alone, as the main thread would, while a
  pool of threads each running torch would build competing OpenMP teams on the same cores; with forwards on
  the CPU, the threads that load models and postprocess use one torch thread each (`one_torch_thread`), so
  that no idle OpenMP team makes libgomp throttle the forwards'. With forwards on a CPU and an eager backend,
  more inference threads ("streams", `S2AMNET_CPU_STREAMS`, 2 by default, `app.runtime.cpu_streams`) run
  forwards at the same time, sharing the torch threads (`app.runtime.ThreadShares`): a forward alone gets
  them all, forwards side by side a share each, never more than there are.
- Each inference thread picks the model whose oldest job has waited longest, waits until `max_batch_size`
  jobs are queued for it or `max_delay_ms` have passed since its first job was queued (`app.batching`, the
  policy the Redis worker uses too), and runs `app.inference.run_forward` (which drops expired jobs without
  computing them). Once the forward batch is known (`S2AMNET_FORWARD_BATCH`), no batch is larger than one
  forward (`one_forward_per_batch`).
- An inference thread hands each computed job straight to a small pool of threads (`decode_threads`) that
  postprocesses it (`app.inference.finish`), so a large image's full-size masks never hold up the forwards
  of other requests and models; the answer goes back to the job's asyncio future with
  `loop.call_soon_threadsafe` (one wake-up of the event loop per job). `submit` waits
  at most until the job's deadline (then `DeadlineExceeded`, 504); a job whose deadline passed or whose
  request went away leaves its queue at once (counted in `s2amnet_jobs_expired_total` when expired) and
  is never computed; one already taken into a batch is dropped by `run_forward` unless its forward has
  started, and is not postprocessed once its deadline has passed.
- `stop()` refuses new work, lets the threads finish what is queued (up to `drain_timeout`), then fails
  whatever is left with `Unavailable`, the batch still in its forward included.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app import metrics
from app.batching import BatchCollector
from app.dispatch.base import DeadlineExceeded, Dispatcher, Job, QueueFull, Unavailable, UnknownModel
from app.inference import Staged, finish, raise_for_result, run_forward
from app.runtime import (
    ThreadShares,
    configure_runtime,
    cpu_streams,
    one_forward_per_batch,
    one_torch_thread,
    prepare_predictors,
    runs_on_cpu,
)

if TYPE_CHECKING:
    from app.settings import Settings
    from model.predictor import Predictor

log = logging.getLogger("s2amnet.dispatch")


@dataclass(eq=False)  # identity: deque.remove must never compare the numpy arrays of two jobs
class _Pending:
    job: Job
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    computed: bool = False  # its forward is done: it is being postprocessed


def _resolve(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class LocalDispatcher(Dispatcher):
    def __init__(self, predictors: Mapping[str, Predictor], settings: Settings):
        self._predictors = dict(predictors)
        self._max_batch = settings.batch_sizes(self._predictors)  # per model
        self._max_queue = int(settings.max_queue)
        self._retry_after = float(settings.retry_after_s)
        self._settings = settings
        self._batches: BatchCollector[_Pending] = BatchCollector(
            self._predictors, settings.max_batch_size, float(settings.max_delay_ms) / 1000.0,
            caps=self._max_batch, dropped=lambda p: p.cancelled)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []  # the inference threads: the first, then the other streams
        # postprocessing (full-size masks of large images can take seconds) on its own bounded pool, not
        # the event loop's default executor, which /metrics and shutdown also use
        # forwards on the CPU: the pool's threads use one torch thread (`one_torch_thread`); with a GPU they
        # keep torch's default, so that large masks resample on every core
        on_cpu = any(runs_on_cpu(p) for p in self._predictors.values())
        self._post_pool = ThreadPoolExecutor(max_workers=settings.decode_threads,
                                             thread_name_prefix="s2amnet-post",
                                             initializer=one_torch_thread if on_cpu else None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._closing = False  # stop accepting, flush the queues, then exit
        self._abort = False  # exit after the batch in hand
        self._in_hand: dict[int, list[_Pending]] = {}  # per stream, the batch it is computing
        self._shares: ThreadShares | None = None
        self.streams = 1
        self._ready = False
        self.warmup_seconds: dict[str, float] = {}
        for name, predictor in self._predictors.items():
            metrics.QUEUE_DEPTH.labels(model=name).set(0)
            metrics.init_model_series(name, predictor.task)

    # ------------------------------------------------------------------ Dispatcher interface
    async def start(self) -> None:
        if self._threads:
            return
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future = self._loop.create_future()
        first = threading.Thread(target=self._thread_main, args=(started,), name="s2amnet-inference", daemon=True)
        self._threads.append(first)
        first.start()
        await started  # re-raises a warm-up failure
        self._accepting = True
        self._ready = True

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self._accepting = False
        self._ready = False
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if any(t.is_alive() for t in self._threads):
            await asyncio.to_thread(self._join, time.monotonic() + max(0.0, drain_timeout))
            if any(t.is_alive() for t in self._threads):
                log.warning(
                    "inference thread still busy after %.1f s drain; abandoning queued jobs", drain_timeout
                )
                with self._cond:
                    self._abort = True
                    self._cond.notify_all()
        # Whatever is still queued will not be computed; nor waited for, if still being computed.
        with self._cond:
            for name in self._predictors:
                for p in self._batches.clear(name):
                    _fail(p.future, Unavailable("service is shutting down", self._retry_after))
                metrics.QUEUE_DEPTH.labels(model=name).set(0)
            if self._abort:
                for batch in self._in_hand.values():
                    for p in batch:
                        _fail(p.future, Unavailable("service is shutting down", self._retry_after))

    def _join(self, until: float) -> None:
        for t in list(self._threads):
            t.join(max(0.0, until - time.monotonic()))

    async def submit(self, job: Job) -> dict[str, Any]:
        if job.model not in self._predictors:
            raise UnknownModel(f"model {job.model!r} is not loaded")
        if not self._accepting:
            raise Unavailable("service is not ready or is shutting down", self._retry_after)
        assert self._loop is not None
        pending = _Pending(job, self._loop.create_future())
        with self._cond:
            if self._batches.depth(job.model) >= self._max_queue:
                raise QueueFull(
                    f"queue of model {job.model!r} is full ({self._max_queue} jobs waiting)",
                    self._retry_after,
                )
            depth = self._batches.put(job.model, pending)
            metrics.QUEUE_DEPTH.labels(model=job.model).set(depth)
            self._cond.notify_all()  # the first stream among the inference threads, whichever waits
        timeout = job.deadline - time.time()
        try:
            result = await asyncio.wait_for(asyncio.shield(pending.future), timeout=max(0.0, timeout))
        except TimeoutError:
            # a postprocessing thread is not stopped by a timeout; `finish` itself skips jobs already expired
            self._withdraw(pending, expired=True)
            when = "while its result was postprocessed" if pending.computed else "before its batch was computed"
            raise DeadlineExceeded(self._late(job, when)) from None
        except asyncio.CancelledError:  # the request went away
            self._withdraw(pending, expired=False)
            raise
        return raise_for_result(result)

    @staticmethod
    def _late(job: Job, when: str) -> str:
        return f"request deadline passed {when} ({time.time() - job.enqueued_at:.3f} s after it was queued)"

    def _withdraw(self, pending: _Pending, expired: bool) -> None:
        """Take a job whose request gave up out of its queue (freeing its slot), never computing it. If the
        inference thread already holds it, mark it expired so run_forward drops it unless it is running."""
        job = pending.job
        pending.cancelled = True
        with self._cond:
            if not self._batches.remove(job.model, pending):  # already taken by the inference thread
                if expired:
                    job.deadline = min(job.deadline, time.time())
                return
            metrics.QUEUE_DEPTH.labels(model=job.model).set(self._batches.depth(job.model))
        (metrics.JOBS_EXPIRED if expired else metrics.JOBS_CANCELLED).labels(model=job.model).inc()

    def ready(self) -> bool:
        return self._ready and bool(self._threads) and all(t.is_alive() for t in self._threads)

    def queue_depth(self, model: str) -> int:
        return self._batches.depth(model)

    # ------------------------------------------------------------------ inference thread
    def _finish(self, predictor: Predictor, pending: _Pending, staged: Staged) -> None:
        """On a postprocessing thread: the job's answer, to its future (nothing for a request gone away)."""
        if pending.cancelled:
            return
        try:
            result = finish(predictor, pending.job, staged)
        except BaseException as exc:  # noqa: BLE001 - finish reports its own failures; never lose a job
            result = {"error": "failed", "detail": f"postprocessing failed: {type(exc).__name__}: {exc}"}
        self._post(_resolve, pending.future, result)

    def _hand_over(self, predictor: Predictor, batch: list[_Pending], results: list[Any]) -> None:
        """The batch's outcomes: computed jobs to the postprocessing pool, the others straight to their futures."""
        for p, r in zip(batch, results, strict=True):
            if not isinstance(r, Staged):
                self._post(_resolve, p.future, r)
                continue
            p.computed = True
            try:
                self._post_pool.submit(self._finish, predictor, p, r)
            except RuntimeError:  # the pool is gone: the interpreter is shutting down
                self._post(_fail, p.future, Unavailable("service is shutting down", self._retry_after))

    def _post(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed meanwhile
            pass

    def _thread_main(self, started: asyncio.Future) -> None:
        try:
            configure_runtime(self._settings)
            self.warmup_seconds.update(prepare_predictors(self._predictors, self._settings, self._max_batch))
            with self._cond:
                self._batches.caps.update(one_forward_per_batch(self._predictors, self._batches.caps))
            self._start_streams()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            log.exception("warm-up failed")
            self._post(_fail, started, exc)
            return
        self._post(_resolve, started, None)
        self._stream_main(0)

    def _start_streams(self) -> None:
        """After warm-up, on the first inference thread: how many forwards run at once (`cpu_streams`), and
        the threads of the other streams."""
        import torch

        threads = torch.get_num_threads()  # as configure_runtime set them for the forwards
        self.streams, why = cpu_streams(self._settings.cpu_streams, self._predictors, threads)
        self._shares = ThreadShares(threads, self.streams)
        log.info("inference streams: %d (%s)", self.streams, why)
        metrics.CPU_STREAMS.set(self.streams)
        for i in range(1, self.streams):
            t = threading.Thread(target=self._stream_main, args=(i,), name=f"s2amnet-inference-{i + 1}", daemon=True)
            self._threads.append(t)
            t.start()

    def _stream_main(self, stream: int) -> None:
        import torch

        with torch.inference_mode():
            self._batch_loop(stream)
        log.info("inference thread %d stopped", stream + 1)

    def _next_batch(self, stream: int) -> tuple[str, list[_Pending], bool] | None:
        """The next batch (see `app.batching`), waiting for jobs, and whether more jobs wait behind it; None
        once closing with nothing queued, or aborted."""
        with self._cond:
            while True:
                if self._abort:
                    return None
                name = self._batches.oldest()
                if name is None:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                if stream and 0 not in self._in_hand:  # the other streams help while the first one computes
                    self._cond.wait()
                    continue
                self._batches.fill(name, self._cond.wait, lambda: self._closing or self._abort)
                batch = self._batches.take(name)
                metrics.QUEUE_DEPTH.labels(model=name).set(self._batches.depth(name))
                if batch:
                    self._in_hand[stream] = batch
                    waiting = not self._batches.empty()
                    if waiting and stream == 0:
                        self._cond.notify_all()  # work for the other streams
                    return name, batch, waiting

    def _batch_loop(self, stream: int) -> None:
        assert self._shares is not None
        while True:
            nxt = self._next_batch(stream)
            if nxt is None:
                return
            name, batch, waiting = nxt
            predictor = self._predictors[name]
            threads = self._shares.take(waiting, first=stream == 0)
            try:
                results = run_forward(predictor, [p.job for p in batch])
            except BaseException as exc:  # noqa: BLE001 - never let the thread die
                log.exception("batch of %s failed", name)
                results = [{"error": "failed", "detail": f"{type(exc).__name__}: {exc}"}] * len(batch)
            finally:
                self._shares.give(threads)
            with self._cond:  # before the answers go out: the next part sent alone must find this stream idle
                self._in_hand.pop(stream, None)
            self._hand_over(predictor, batch, results)
