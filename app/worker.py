"""`s2amnet worker`: consume jobs from Redis Streams, batch them onto a model, reply, then ack.

One process per GPU (or CPU box). For every model it serves, the worker is a consumer of the group
``workers`` on ``s2amnet:jobs:<model>``:

- batch: ``XREADGROUP COUNT n BLOCK`` over all its streams (n: the smallest batch size of its models, so
  that a capped model's jobs are not taken in hand far ahead of their forward); once a job is in hand
  the batch of its model is topped up until it is full (``max_batch_size``, or the model's cap in
  ``model_max_batch_size``) or ``max_delay_ms`` has passed since that first job (``app.batching``, the
  policy of the embedded dispatcher too);
- jobs whose request went away (the API set ``s2amnet:cancelled:<job id>``, read with the batch) are
  acked without computing or answering;
- a job that carries the uploaded image instead of the array (``payload=image``, see
  ``app/queue/jobs.py``) is decoded here by the API's rule (``app.codec.decode_image``, then
  ``Predictor.preprocess``: the same array the API made), on a few threads when a batch holds several; an
  image that does not decode (the API decoded it already, so it should not happen) is dead-lettered and
  answered failed, like any malformed job;
- expired jobs (deadline passed) are acked and answered ``expired`` without computing; expiry is judged
  on Redis's clock (the entry ID's milliseconds + the job's ``ttl_ms`` against ``TIME``), so a worker
  whose clock differs from the API host's neither drops live jobs nor computes dead ones;
- the batch goes through ``app.inference.run_batch`` (the pipeline shared with the embedded dispatcher);
  when a batch fails, its jobs are retried one by one (``run_batch_isolating_failures``);
- replies are written (``XADD`` to the asking API instance's reply stream, ``MAXLEN ~`` + ``EXPIRE``)
  and *then* the jobs are acked and deleted, in one ``MULTI`` — at-least-once delivery;
- every stream keeps a heartbeat key ``s2amnet:worker:<consumer>`` in Redis, set every second with a
  TTL of a few seconds by a thread of its own (so a long batch never lets it lapse); the jobs pending
  under a consumer whose key is gone (its worker was killed, or its machine lost) are taken over at once
  with ``XCLAIM``, within seconds of the death and well inside the requests' deadlines;
- jobs idle longer than the visibility timeout in any consumer's pending list (a stuck worker, whose
  heartbeat goes on) are taken over with ``XAUTOCLAIM``; a job delivered more than ``max_deliveries`` times
  (or that failed that often) is moved to ``s2amnet:dead:<model>`` and answered with an error;
- Redis outages: the worker keeps retrying with backoff and carries on when Redis is back (the consumer
  group is recreated if Redis came back empty); replies computed during an outage are written when it
  returns;
- SIGTERM/SIGINT: stop reading, finish, reply and ack the jobs in hand, leave the group, exit 0.

With forwards on a CPU and an eager backend, a worker process runs several streams (``S2AMNET_CPU_STREAMS``,
``app.runtime.cpu_streams``), as the embedded dispatcher does: each a consumer of its own (the first named
after the worker, the others ``<name>-stream<i>``) with its own connection, all sharing the torch threads
(``app.runtime.ThreadShares``) through a `StreamGate`. The first stream reads as above; the others read, never
blocking in Redis, only while the first computes a batch behind which it saw jobs waiting in the streams
(entries not yet delivered: ``XLEN`` - ``XPENDING``, asked with the batch's cancel marks): a part sent alone
always goes to the first stream, on every thread, and under load two forwards run side by side on a share
each.

Each stream's heartbeat key holds its consumer name and stream number (1 for the first) and the process's
pid, host and models. `s2amnet worker` (app/commands/worker.py) loads the models, exports the worker's
metrics and runs its streams (`run_streams`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from app import metrics
from app.batching import BatchCollector
from app.codec import decode_image
from app.dispatch.base import Job
from app.inference import RunBatch, run_batch_isolating_failures
from app.inference import run_batch as default_run_batch
from app.queue.connections import CONNECTION_ERRORS, blocking_redis_client, ensure_group_blocking
from app.queue.constants import (
    DEFAULT_DEAD_MAXLEN,
    DEFAULT_REPLY_MAXLEN,
    DEFAULT_REPLY_TTL_S,
    GROUP,
    cancel_key,
    dead_stream,
    job_stream,
    worker_key,
)
from app.queue.jobs import DEAD, EXPIRED, OK, JobEntry, encode_reply, text
from app.runtime import ThreadShares

log = logging.getLogger(__name__)

# what Redis answers where a job stream or its group is gone (Redis restarted empty, or flushed): not an error
# to log, the worker recreates them
STREAMS_GONE = ("NOGROUP", "no such key", "UNBLOCKED the stream key no longer exists")
ORPHAN_MIN_IDLE_MS = 1000  # a job of a worker that is gone is taken over once it has been idle this long
ORPHANS_AT_ONCE = 1000  # most jobs of one such consumer taken over in one go

if TYPE_CHECKING:
    import numpy as np

    from model.predictor import Predictor


def decode_encoded(predictor: Predictor, job: Job) -> np.ndarray:
    """The array of a job that carries its uploaded image (``job.image``): decoded by the API's rule
    (`app.codec.decode_image`: EXIF, mode; at most the pixels the API decoded) and preprocessed for
    ``predictor``, as the API did. Raises when the bytes do not decode, or decode to another size."""
    w, h = int(job.meta["orig_w"]), int(job.meta["orig_h"])
    image = decode_image(job.image or b"", max_pixels=w * h, min_side=1)
    if image.size != (w, h):
        raise ValueError(f"the image decoded to {image.size[0]}x{image.size[1]}, the API's to {w}x{h}")
    return predictor.preprocess(image).array


def default_consumer() -> str:
    """A worker's consumer name when none is given: host-pid-random."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def stream_consumer(name: str, stream: int) -> str:
    """The consumer name of a worker's stream (0: the first, named after the worker)."""
    return name if not stream else f"{name}-stream{stream + 1}"


def run_streams(workers: Sequence[Worker]) -> None:
    """Run a worker process's streams: the first on this thread, the others on threads of their own, each
    in torch's inference mode, until the first stops (`Worker.request_stop`: then the others stop too); each
    finishes the jobs in hand and leaves its group. A stream that fails stops them all, and the failure is
    raised here (the process exits and is restarted, rather than serving on with fewer streams)."""
    import torch  # noqa: PLC0415 - loaded with the models already

    failures: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            with torch.inference_mode():
                worker.run()
        except BaseException as exc:
            if not worker.stream:  # the first stream's failure is raised by its own call
                raise
            log.exception("inference stream %d failed; stopping the worker", worker.stream + 1)
            failures.append(exc)
            workers[0].request_stop()

    others = [threading.Thread(target=run, args=(w,), name=f"s2amnet-worker-stream{w.stream + 1}")
              for w in workers[1:]]
    for t in others:
        t.start()
    try:
        run(workers[0])
    finally:
        for w in workers[1:]:
            w.request_stop()
        for t in others:
            t.join()
    if failures:
        raise RuntimeError(f"an inference stream failed: {type(failures[0]).__name__}: {failures[0]}") \
            from failures[0]


class StreamGate:
    """What a worker process's streams share: the torch threads (`ThreadShares`), and whether the first
    stream computes a batch behind which it saw jobs waiting in Redis; the other streams read jobs only then."""

    def __init__(self, shares: ThreadShares):
        self.shares = shares
        self._cond = threading.Condition()
        self._open = False  # the first stream computes, and jobs waited behind its batch

    def first_computes(self, jobs_waiting: bool) -> None:
        """The first stream starts a forward (``jobs_waiting``: it saw jobs waiting behind its batch)."""
        with self._cond:
            self._open = jobs_waiting
            if jobs_waiting:
                self._cond.notify_all()

    def close(self) -> None:
        """The other streams stop reading: the first stream's forward ended, or a stream found nothing left
        (the jobs seen waiting are in hand elsewhere)."""
        with self._cond:
            self._open = False

    def wait_open(self, timeout: float) -> bool:
        """Whether the other streams may read now, waiting up to ``timeout`` seconds for it."""
        with self._cond:
            return self._cond.wait_for(lambda: self._open, timeout)


class Heartbeat:
    """A consumer's key ``s2amnet:worker:<consumer>`` in Redis, set every ``interval_s`` with a TTL of ``ttl_s``
    by a thread of its own while the worker runs, and deleted when it stops: the key is there exactly while
    the process lives, whatever its forwards do. Other workers take over the jobs of a consumer whose key is
    gone (`Worker._take_over_orphans`)."""

    def __init__(self, r: Any, consumer: str, info: Mapping[str, Any], ttl_s: float, interval_s: float = 1.0):
        self._r, self.key = r, worker_key(consumer)
        self._info, self._ttl_ms = dict(info), max(1, int(ttl_s * 1000))
        self.interval_s = min(float(interval_s), ttl_s / 3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Set the key once (raises Redis's errors)."""
        self._r.set(self.key, json.dumps({**self._info, "time": time.time()}), px=self._ttl_ms)

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.beat()
                except (RedisError, *CONNECTION_ERRORS):  # Redis away: the worker's loop says so
                    pass

        self._thread = threading.Thread(target=run, name=f"s2amnet-heartbeat-{self.key}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating (the key then lapses, or the worker deletes it on leaving)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Worker:
    """Consumes ``s2amnet:jobs:<model>`` for each model in ``predictors`` (name -> Predictor); stream
    ``stream`` of a worker process whose streams share ``gate`` (None: one stream)."""

    def __init__(
        self,
        redis_url: str,
        predictors: dict[str, Predictor],
        *,
        consumer: str | None = None,
        max_batch_size: int = 16,
        batch_sizes: Mapping[str, int] | None = None,
        max_delay_ms: float = 5.0,
        visibility_timeout_s: float = 30.0,
        max_deliveries: int = 3,
        block_ms: int = 500,
        reply_maxlen: int = DEFAULT_REPLY_MAXLEN,
        reply_ttl_s: int = DEFAULT_REPLY_TTL_S,
        dead_maxlen: int = DEFAULT_DEAD_MAXLEN,
        heartbeat_ttl_s: float = 3.0,
        run_batch: RunBatch | None = None,
        decode_threads: int | None = None,
        stream: int = 0,
        gate: StreamGate | None = None,
    ):
        if not predictors:
            raise ValueError("a worker needs at least one model")
        if stream and gate is None:
            raise ValueError("a worker's other streams share the first one's StreamGate")
        self.stream = int(stream)
        self._gate = gate
        self.redis_url = redis_url
        self.predictors = dict(predictors)
        self.models = list(self.predictors)
        self.consumer = consumer or default_consumer()
        self.max_batch_size = max(1, int(max_batch_size))
        # the jobs in hand, batched by the policy of the embedded dispatcher; most jobs per forward for
        # each model: max_batch_size unless batch_sizes caps the model
        self._batches: BatchCollector[JobEntry] = BatchCollector(
            self.models, self.max_batch_size, float(max_delay_ms) / 1000.0, caps=batch_sizes)
        self.batch_sizes = self._batches.caps
        self.max_delay_s = self._batches.max_delay_s
        self.visibility_ms = max(1, int(visibility_timeout_s * 1000))
        self.max_deliveries = max(1, int(max_deliveries))
        self.block_ms = max(1, int(block_ms))
        self.reply_maxlen = reply_maxlen
        self.reply_ttl_s = int(reply_ttl_s)
        self.dead_maxlen = dead_maxlen
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.claim_interval_s = max(0.2, visibility_timeout_s / 4)
        self.orphan_interval_s = 1.0  # how often the first stream looks for jobs of workers that are gone
        self.janitor_interval_s = 60.0
        self.consumer_max_idle_ms = max(600_000, 10 * self.visibility_ms)
        self._run_batch = run_batch or default_run_batch
        # decodes the jobs that carry their uploaded image (created at the first batch with several): one
        # thread per job of a full batch, at most one per core (PIL decodes and resizes without the GIL)
        self.decode_threads = max(1, int(decode_threads or min(self.max_batch_size, os.cpu_count() or 1)))
        self._decode_pool: ThreadPoolExecutor | None = None
        self._r = blocking_redis_client(redis_url, socket_timeout=self.block_ms / 1000 + 5.0)
        self._stop = threading.Event()
        self._held: set[tuple[str, str]] = set()
        self._claim_cursor: dict[str, str] = dict.fromkeys(self.models, "0-0")
        self._next_claim = 0.0
        self._next_orphans = 0.0
        self._next_janitor = time.monotonic() + self.janitor_interval_s
        self._heartbeat = Heartbeat(self._r, self.consumer, {"consumer": self.consumer, "stream": self.stream + 1,
                                                            "models": self.models, "pid": os.getpid(),
                                                            "host": socket.gethostname()}, heartbeat_ttl_s)
        self._connected = False
        self._groups_ok = False
        self.stats = {"batches": 0, "jobs": 0, "expired": 0, "cancelled": 0, "dead": 0, "redelivered": 0,
                      "requeued": 0}

    # -- control -----------------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        """Finish the jobs in hand, then leave ``run()``. Safe from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        log.info("worker %s serving %s (max_batch=%s, max_delay=%.1f ms, visibility=%d ms)",
                 self.consumer, ",".join(self.models),
                 ",".join(f"{m}={n}" for m, n in self.batch_sizes.items()), self.max_delay_s * 1000,
                 self.visibility_ms)
        if not self.stream:
            metrics.WORKER_UP.labels(worker=self.consumer).set(1)
        backoff = 0.05
        self._heartbeat.start()
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                    backoff = 0.05
                except CONNECTION_ERRORS as exc:
                    self._on_disconnect(exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 1.0)
                except ResponseError as exc:
                    if any(why in str(exc) for why in STREAMS_GONE):  # Redis came back without our streams
                        self._groups_ok = False
                        continue
                    log.exception("Redis refused a command; retrying")
                    self._stop.wait(0.5)
            self._drain()
        finally:
            if not self.stream:
                metrics.WORKER_UP.labels(worker=self.consumer).set(0)
            self._heartbeat.stop()
            self._leave()
            self._r.close()
            if self._decode_pool is not None:
                self._decode_pool.shutdown(wait=False)
            log.info("worker %s stopped (%s)", self.consumer, self.stats)

    # -- the loop ----------------------------------------------------------------------------------

    def _step(self) -> None:
        if not self._groups_ok:
            self._ensure_groups()
        now = time.monotonic()
        if not self.stream:  # one loop heartbeat per process, the first stream's
            metrics.WORKER_HEARTBEAT.labels(worker=self.consumer).set(time.time())
            if now >= self._next_orphans:
                self._take_over_orphans()
                self._next_orphans = now + self.orphan_interval_s
        if now >= self._next_claim:
            self._claim()
            self._next_claim = now + self.claim_interval_s
        if now >= self._next_janitor:
            self._janitor()
            self._next_janitor = now + self.janitor_interval_s
        if self._batches.empty():
            count = min(self.batch_sizes.values())
            if not self.stream:
                self._read(self.models, count, self.block_ms)
            elif self._gate is not None and self._gate.wait_open(self.block_ms / 1000):
                # never blocking in Redis: a job that arrives while the first stream is idle is the first's
                self._read(self.models, count, None)
                if self._batches.empty():
                    self._gate.close()
        model = self._batches.oldest()
        if model is None:
            return
        self._batches.fill(model, lambda left: self._read([model], self._batches.room(model),
                                                          max(1, int(left * 1000))), self._stop.is_set)
        self._process(model, self._batches.peek(model))

    def _ensure_groups(self) -> None:
        self._heartbeat.beat()  # before the first read: a consumer holding jobs always has its key
        for m in self.models:
            ensure_group_blocking(self._r, m)
        if not self._connected:
            log.info("worker %s connected to Redis", self.consumer)
        self._connected = True
        self._groups_ok = True
        # Jobs this consumer (same name) held before a restart: take them back at once.
        for m in self.models:
            self._read([m], self.max_batch_size * 4, None, history=True)

    def _on_disconnect(self, exc: BaseException) -> None:
        if self._connected:
            log.warning("worker %s lost Redis (%s); retrying", self.consumer, exc)
        self._connected = False
        self._groups_ok = False

    def _add(self, model: str, entry_id: bytes | str, fields: dict | None, deliveries: int) -> bool:
        """Put an entry in hand; False when it is already held (or has no fields)."""
        eid = text(entry_id)
        if not fields or (model, eid) in self._held:
            return False
        try:
            deliveries += int(text(fields.get(b"attempts", b"0")))
        except ValueError:
            pass
        self._batches.put(model, JobEntry(model, eid, fields, deliveries))
        self._held.add((model, eid))
        return True

    def _read(self, models: Sequence[str], count: int, block_ms: int | None, history: bool = False) -> None:
        streams = {job_stream(m): ("0" if history else ">") for m in models}
        res = self._r.xreadgroup(GROUP, self.consumer, streams, count=count, block=block_ms)
        by_stream = {job_stream(m): m for m in models}
        for stream, entries in res or []:
            model = by_stream[text(stream)]
            gone = []
            for entry_id, fields in entries:
                if not fields:  # pending here but deleted from the stream: nothing to do but ack it
                    gone.append(entry_id)
                    continue
                # history entries were delivered before; reading them again counts as a delivery
                self._add(model, entry_id, fields, 2 if history else 1)
            if gone:
                self._r.xack(job_stream(model), GROUP, *gone)

    def _claim(self) -> None:
        """Take over jobs idle longer than the visibility timeout in any consumer's pending list."""
        for m in self.models:
            start = self._claim_cursor[m]
            res = self._r.xautoclaim(job_stream(m), GROUP, self.consumer, self.visibility_ms,
                                     start_id=start, count=self.max_batch_size)
            self._claim_cursor[m] = text(res[0])
            self._hold_claimed(m, res[1], f"idle > {self.visibility_ms} ms")

    def _take_over_orphans(self) -> None:
        """Take over the jobs pending under consumers whose heartbeat key is gone: their worker is gone (killed,
        or its machine lost), so it will never answer them. Each job must have been idle a moment
        (`ORPHAN_MIN_IDLE_MS`): of two workers taking over at once, only one gets it."""
        for m in self.models:
            stream = job_stream(m)
            holders = [text(c["name"]) for c in self._r.xinfo_consumers(stream, GROUP)
                       if int(c["pending"]) and text(c["name"]) != self.consumer]
            if not holders:
                continue
            pipe = self._r.pipeline(transaction=False)
            for name in holders:
                pipe.exists(worker_key(name))
            for name, alive in zip(holders, pipe.execute(), strict=True):
                if alive:
                    continue
                ids = [p["message_id"] for p in self._r.xpending_range(stream, GROUP, min="-", max="+",
                                                                       count=ORPHANS_AT_ONCE, consumername=name)]
                if ids:
                    entries = self._r.xclaim(stream, GROUP, self.consumer, ORPHAN_MIN_IDLE_MS, ids)
                    self._hold_claimed(m, entries, f"of {name}, whose worker is gone")

    def _hold_claimed(self, model: str, entries: Sequence[tuple[Any, Any]], why: str) -> None:
        """Put claimed entries in hand with their delivery counts (entries deleted meanwhile have no fields)."""
        entries = [(e, f) for e, f in entries if f]
        if not entries:
            return
        stream = job_stream(model)
        pipe = self._r.pipeline(transaction=False)
        for eid, _ in entries:
            pipe.xpending_range(stream, GROUP, min=eid, max=eid, count=1)
        taken = 0
        for (eid, fields), p in zip(entries, pipe.execute(), strict=True):
            deliveries = int(p[0]["times_delivered"]) if p else 2
            taken += self._add(model, eid, fields, deliveries)  # not counted: jobs already in hand here
        if taken:
            self.stats["redelivered"] += taken
            metrics.JOBS_REDELIVERED.labels(model=model).inc(taken)
            log.warning("worker %s took over %d job(s) of %s %s", self.consumer, taken, model, why)

    def _janitor(self) -> None:
        """Remove consumers that hold nothing and have been silent for long (workers that exited
        without leaving, e.g. killed), so the group's consumer list stays bounded."""
        for m in self.models:
            for c in self._r.xinfo_consumers(job_stream(m), GROUP):
                name = text(c["name"])
                idle = int(c["idle"])
                if name != self.consumer and int(c["pending"]) == 0 and idle > self.consumer_max_idle_ms:
                    self._r.xgroup_delconsumer(job_stream(m), GROUP, name)

    # -- one batch ---------------------------------------------------------------------------------

    def _clock_and_cancelled(self, batch: list[JobEntry]) -> tuple[int | None, set[str], bool]:
        """Redis's time in ms, the job ids of the batch whose request went away (cancel marks set by the
        API) and, for the first of several streams, whether jobs wait in the streams (not yet delivered), in
        one round trip; (None, nothing cancelled, False) when Redis cannot be asked."""
        watch = self.models if self._gate is not None and not self.stream else []
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.time()
            pipe.mget([cancel_key(e.job_id) for e in batch])
            for m in watch:
                pipe.xlen(job_stream(m))
                pipe.xpending(job_stream(m), GROUP)
            clock, marks, *sizes = pipe.execute(raise_on_error=False)
        except Exception:  # noqa: BLE001 - Redis away: judged below like a failed reply
            clock = marks = None
        if clock is None or isinstance(clock, Exception) or isinstance(marks, Exception):
            return None, set(), False  # judge expiry by the deadline field, compute all
        sec, usec = clock
        # a stream or group gone (Redis came back empty) says nothing waits there
        waiting = any(not isinstance(n, Exception) and not isinstance(p, Exception) and int(n) > int(p["pending"])
                      for n, p in zip(sizes[::2], sizes[1::2], strict=True))
        return (int(sec) * 1000 + int(usec) // 1000,
                {e.job_id for e, m in zip(batch, marks, strict=True) if m}, waiting)

    def _process(self, model: str, batch: list[JobEntry]) -> None:
        redis_now_ms, cancelled, waiting = self._clock_and_cancelled(batch)
        waiting = waiting or sum(self._batches.depth(m) for m in self.models) > len(batch)  # more in hand
        replies: list[tuple[JobEntry, dict]] = []
        dead: list[tuple[JobEntry, str]] = []
        requeue: list[JobEntry] = []
        live: list[tuple[JobEntry, Job]] = []
        for e in batch:
            if e.job_id in cancelled:  # nobody waits for it: acked with the batch, not computed, no reply
                self.stats["cancelled"] += 1
                metrics.JOBS_CANCELLED.labels(model=model).inc()
            elif e.expired(redis_now_ms):
                detail = "the job expired before a worker ran it"
                replies.append((e, encode_reply(e.job_id, EXPIRED, detail=detail)))
                metrics.JOBS_EXPIRED.labels(model=model).inc()
                self.stats["expired"] += 1
            elif e.deliveries > self.max_deliveries:
                dead.append((e, f"delivered {e.deliveries} times without an answer (workers died on it?)"))
            else:
                try:
                    live.append((e, e.decode(redis_now_ms)))
                except Exception as exc:  # noqa: BLE001 - a malformed job never succeeds
                    dead.append((e, f"malformed job: {type(exc).__name__}: {exc}"))
        t0 = time.perf_counter()
        if any(job.array is None for _, job in live):
            live = self._decode_images(model, live, dead)
            metrics.WORKER_STAGE.labels(model=model, stage="decode").observe(time.perf_counter() - t0)

        if live:
            results = self._compute(model, [j for _, j in live], waiting)
            self.stats["batches"] += 1
            self.stats["jobs"] += len(live)
            for (e, _job), res in zip(live, results, strict=True):
                error = res.get("error")
                if not error:
                    replies.append((e, encode_reply(e.job_id, OK, res)))
                elif error == "expired":  # expired while waiting for its batch (counted by run_batch)
                    replies.append((e, encode_reply(e.job_id, EXPIRED, detail=str(res.get("detail", "")))))
                    self.stats["expired"] += 1
                elif e.deliveries >= self.max_deliveries:
                    dead.append((e, f"failed {e.deliveries} times, last error: {res.get('detail', error)}"))
                else:
                    log.warning("job %s failed (%s), try %d of %d", e.job_id, res.get("detail", error),
                                e.deliveries, self.max_deliveries)
                    requeue.append(e)
        for e, reason in dead:
            replies.append((e, encode_reply(e.job_id, DEAD, detail=f"job dead-lettered: {reason}")))
        t0 = time.perf_counter()
        self._commit(model, batch, replies, dead, requeue)
        metrics.WORKER_STAGE.labels(model=model, stage="commit").observe(time.perf_counter() - t0)

    def _compute(self, model: str, jobs: list[Job], waiting: bool) -> list[dict[str, Any]]:
        """The batch's answers (`run_batch_isolating_failures`); with several streams, on the torch threads
        `ThreadShares` gives this one (``waiting``: jobs wait behind the batch), the first stream letting the
        others read meanwhile when jobs wait."""
        gate = self._gate
        if gate is None:
            return run_batch_isolating_failures(self.predictors[model], jobs, self._run_batch)
        first = not self.stream
        if first:
            gate.first_computes(waiting)
        threads = gate.shares.take(waiting, first=first)
        try:
            return run_batch_isolating_failures(self.predictors[model], jobs, self._run_batch)
        finally:
            gate.shares.give(threads)
            if first:
                gate.close()

    def _decode_images(self, model: str, live: list[tuple[JobEntry, Job]],
                       dead: list[tuple[JobEntry, str]]) -> list[tuple[JobEntry, Job]]:
        """Fill in the array of the jobs that carry their uploaded image (`decode_encoded`, on the decode
        threads when there are several); the jobs whose image does not decode go to ``dead``."""
        encoded = [job for _, job in live if job.array is None]
        predictor = self.predictors[model]

        def decode(job: Job) -> BaseException | None:
            try:
                job.array, job.image = decode_encoded(predictor, job), None
            except Exception as exc:  # noqa: BLE001 - answered failed below
                return exc
            return None

        if len(encoded) == 1:
            errors = [decode(encoded[0])]
        else:
            if self._decode_pool is None:
                self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="worker-decode")
            errors = list(self._decode_pool.map(decode, encoded))
        failed = {id(job): exc for job, exc in zip(encoded, errors, strict=True) if exc is not None}
        for e, job in live:
            if id(job) in failed:
                exc = failed[id(job)]
                dead.append((e, f"undecodable image: {type(exc).__name__}: {exc}"))
        return [(e, job) for e, job in live if id(job) not in failed]

    def _commit(self, model: str, batch: list[JobEntry], replies: list[tuple[JobEntry, dict]],
                dead: list[tuple[JobEntry, str]], requeue: list[JobEntry]) -> None:
        """Write replies, dead letters and retries, THEN ack + delete the batch: one MULTI/EXEC.

        On a Redis error the results are kept and the write retried (Redis may come back, AOF-backed,
        with the jobs still pending); after a visibility timeout others may have redone them and the
        batch is dropped here (its jobs stay pending in Redis, so nothing is lost)."""
        stream = job_stream(model)
        ids = [e.entry_id for e in batch]
        give_up = time.monotonic() + self.visibility_ms / 1000
        backoff = 0.05
        while True:
            try:
                pipe = self._r.pipeline(transaction=True)
                for e, reply in replies:
                    if e.reply_to:
                        pipe.xadd(e.reply_to, reply, maxlen=self.reply_maxlen, approximate=True)
                for reply_to in {e.reply_to for e, _ in replies if e.reply_to}:
                    pipe.expire(reply_to, self.reply_ttl_s)
                for e, reason in dead:
                    pipe.xadd(dead_stream(model), e.dead_letter(reason, self.consumer), maxlen=self.dead_maxlen,
                              approximate=True)
                for e in requeue:  # a fresh entry, delivered again at once, carrying its tries so far
                    pipe.xadd(stream, e.requeued())
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
                pipe.execute()
                break
            except CONNECTION_ERRORS as exc:
                self._on_disconnect(exc)
                if time.monotonic() > give_up or (self._stop.is_set() and time.monotonic() > give_up - 5):
                    log.error("could not write %d replies; leaving the jobs to be redelivered", len(batch))
                    break
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        for e in batch:
            self._held.discard((model, e.entry_id))
        self._batches.discard(model, batch)
        if dead:
            metrics.JOBS_DEAD_LETTERED.labels(model=model).inc(len(dead))
            self.stats["dead"] += len(dead)
            for e, reason in dead:
                log.error("job %s of %s dead-lettered: %s", e.job_id, model, reason)
        self.stats["requeued"] += len(requeue)

    # -- shutdown ----------------------------------------------------------------------------------

    def _drain(self) -> None:
        """The jobs already read are in hand: answer them (best effort) before leaving."""
        end = time.monotonic() + 30.0
        for m in self.models:
            while self._batches.depth(m) and time.monotonic() < end:
                try:
                    self._process(m, self._batches.peek(m))
                except CONNECTION_ERRORS:
                    return  # they stay pending in Redis: another worker takes them over
                except RedisError:
                    return

    def _leave(self) -> None:
        """Leave the group if this consumer holds nothing, and drop the heartbeat key."""
        try:
            for m in self.models:
                if not self._r.xpending_range(job_stream(m), GROUP, min="-", max="+", count=1,
                                              consumername=self.consumer):
                    self._r.xgroup_delconsumer(job_stream(m), GROUP, self.consumer)
            self._r.delete(worker_key(self.consumer))
        except (RedisError, *CONNECTION_ERRORS) as exc:
            log.info("could not leave the group cleanly (%s)", exc)
