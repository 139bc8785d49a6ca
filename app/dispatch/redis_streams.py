"""Redis Streams dispatcher: the API side of the Redis mode (DESIGN.md, "Data flow").

The API enqueues each job on the stream of its model, ``s2amnet:jobs:<model>``; ``s2amnet worker``
processes read it through the consumer group ``workers`` (see ``app/worker.py``), batch, compute, and
write one reply per job to the reply stream of the API instance that asked
(``s2amnet:replies:<instance>``). One background task per API instance reads that stream and resolves
the waiting request by job id; a reply for an unknown job id (a duplicate after a redelivery, or a
request that already timed out) is ignored.

Bounded by construction:
- the job stream holds only live jobs: workers ``XACK`` *and* ``XDEL`` a job in the same ``MULTI`` as its
  reply, so ``XLEN`` = jobs waiting + jobs taken by a worker. The backlog (jobs no worker has taken yet,
  ``XLEN`` minus the group's pending count; the same figure as the group's ``lag``, which stays defined
  because only delivered entries are ever deleted) is checked by the admission script, which refuses new
  jobs (``QueueFull``: 503 + ``Retry-After``) at ``max_queue`` -- the stream is never trimmed;
- reply streams are written with ``MAXLEN ~`` and an ``EXPIRE`` by the workers, their entries are
  deleted by the reading API instance, and the stream is deleted when the instance stops;
- the dead-letter stream ``s2amnet:dead:<model>`` is capped with ``MAXLEN ~`` (it keeps the job's
  fields and error, not the image bytes);
- a request whose deadline passes gets ``DeadlineExceeded`` (504) at its deadline; its job stays queued
  and the worker that gets it acks it as expired without computing it (and counts it);
- a request that goes away first (client disconnect) sets the job's cancel mark ``s2amnet:cancelled:<job
  id>`` (TTL: a minute past the deadline); the worker reads the marks of a batch with Redis's time, in one
  round trip, and acks marked jobs without computing them.

Payload: the API decodes and preprocesses every upload (limits, EXIF, 4xx answers, ``meta``), but a job
carries the uploaded bytes instead of the preprocessed array when they are smaller (``accepts_encoded``;
``payload=image`` in ``app/queue/jobs.py``): a 30 KB JPEG instead of a 442 KB array at 384². The worker
decodes them again with the same rule.

While Redis is unreachable ``ready()`` is False and ``submit`` fails fast with ``Unavailable`` (503);
the client library reconnects by itself on the next command once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app import metrics
from app.dispatch.base import (
    DeadlineExceeded,
    Dispatcher,
    Job,
    JobFailed,
    QueueFull,
    Unavailable,
    UnknownModel,
)
from app.queue.connections import CONNECTION_ERRORS, ensure_group, redis_client
from app.queue.constants import GROUP, cancel_key, job_stream, reply_stream
from app.queue.jobs import DEAD, EXPIRED, OK, decode_reply, encode_job, reply_result, text

if TYPE_CHECKING:
    from app.settings import Settings
    from model.predictor import Predictor

log = logging.getLogger(__name__)

# Admission: refuse (nil) when the model's backlog -- jobs no worker has taken yet: XLEN minus the group's
# pending entries (acked jobs are deleted, so XLEN = waiting + taken) -- is at its bound, else XADD.
# Atomic and one round trip; it never trims: the bound is kept by refusing.
_ADMIT_LUA = """
local waiting = redis.call('XLEN', KEYS[1])
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[2])
if ok and pending then waiting = waiting - tonumber(pending[1]) end
if waiting >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
"""


class RedisDispatcher(Dispatcher):
    """API-side dispatcher of the Redis mode: ``RedisDispatcher(predictors, settings)``.

    ``predictors``: the models the API serves (name -> Predictor, or names; only the names are used
    here, preprocessing happens in the routes). From ``settings``: ``redis_url``; ``max_queue``, the
    backlog per model (``XLEN`` of its stream = waiting + in progress) at which ``submit`` raises
    ``QueueFull``; ``retry_after_s``. Keyword arguments override the rest (tests, tuning).
    """

    accepts_encoded = True  # a job's uploaded bytes travel instead of its array when they are smaller

    def __init__(
        self,
        predictors: Mapping[str, Predictor] | Iterable[str],
        settings: Settings | None = None,
        *,
        redis_url: str | None = None,
        max_queue: int | None = None,
        instance_id: str | None = None,
        health_interval_s: float = 0.5,
        read_block_ms: int = 1000,
        retry_after_s: float | None = None,
        command_timeout_s: float = 2.0,
        max_connections: int = 64,
    ):
        if settings is not None:
            redis_url = redis_url or settings.redis_url
            max_queue = settings.max_queue if max_queue is None else max_queue
            retry_after_s = float(settings.retry_after_s) if retry_after_s is None else retry_after_s
        if not redis_url:
            raise ValueError("RedisDispatcher needs a Redis URL (S2AMNET_REDIS_URL)")
        max_queue = 256 if max_queue is None else max_queue  # the defaults of Settings
        retry_after_s = 1.0 if retry_after_s is None else retry_after_s
        models = list(predictors)
        self.redis_url = redis_url
        self.models = models
        self.max_queue = int(max_queue)
        self.instance_id = instance_id or uuid.uuid4().hex[:16]
        self.reply_key = reply_stream(self.instance_id)
        self.health_interval_s = health_interval_s
        self.read_block_ms = read_block_ms
        self.retry_after_s = retry_after_s
        self.command_timeout_s = command_timeout_s
        self._max_connections = max_connections
        self._redis: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._admit = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._depth: dict[str, int] = dict.fromkeys(self.models, 0)
        self._healthy = False
        self._started = False
        self._closing = False
        self._shutdown = False
        self._tasks: list[asyncio.Task] = []
        self._withdrawals: set[asyncio.Task] = set()  # cancel marks of jobs whose request went away
        self._last_reply_id = "0-0"
        self.replies_ignored = 0  # duplicates / late replies, for tests and debugging

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._redis = redis_client(self.redis_url, socket_timeout=self.command_timeout_s,
                                   max_connections=self._max_connections)
        # The blocking reader has its own connection, with a socket timeout above its BLOCK time.
        self._reader = redis_client(self.redis_url, socket_timeout=self.read_block_ms / 1000 + 3.0)
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._started = True
        await self._check_health()  # ready at once if Redis is up; never raises
        self._tasks = [
            asyncio.create_task(self._reply_loop(), name=f"redis-replies-{self.instance_id}"),
            asyncio.create_task(self._health_loop(), name=f"redis-health-{self.instance_id}"),
        ]

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self._closing = True
        end = time.monotonic() + drain_timeout
        while self._waiting and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for fut in list(self._waiting.values()):
            if not fut.done():
                fut.set_exception(Unavailable("the service is shutting down", retry_after=self.retry_after_s))
        self._waiting.clear()
        # The loops also watch `_shutdown`: redis-py may turn a cancellation that lands inside a
        # command into a connection error, which the loops treat as an outage and retry.
        self._shutdown = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.read_block_ms / 1000 + 2.0)
        self._tasks = []
        if self._withdrawals:
            await asyncio.wait(set(self._withdrawals), timeout=self.command_timeout_s)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._redis.delete(self.reply_key), 2.0)
        for client in (self._redis, self._reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._started = False
        self._healthy = False

    def ready(self) -> bool:
        return self._started and self._healthy and not self._closing

    def queue_depth(self, model: str) -> int:
        return self._depth.get(model, 0)

    @property
    def redis(self) -> aioredis.Redis:
        """The command client (e.g. for the Redis idempotency store)."""
        if self._redis is None:
            raise RuntimeError("dispatcher not started")
        return self._redis

    # -- submit ------------------------------------------------------------------------------------

    async def submit(self, job: Job) -> dict[str, Any]:
        if job.model not in self._depth:
            raise UnknownModel(f"model {job.model!r} is not served here")
        if not self._started or self._closing:
            raise Unavailable("the service is shutting down", retry_after=self.retry_after_s)
        if not self._healthy:
            raise Unavailable("the job queue (Redis) is unreachable", retry_after=self.retry_after_s)
        remaining = job.deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded("the request deadline passed before the job was queued")

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting[job.job_id] = fut
        stream = job_stream(job.model)
        try:
            return await self._queue_and_wait(job, fut, stream, remaining)
        except asyncio.CancelledError:
            # The request went away (its client disconnected), while its job was being queued or waited:
            # mark the job cancelled, so the worker that reads it acks it without computing it (as the
            # embedded dispatcher withdraws it). The entry itself stays: deleting an entry no worker has
            # read yet would leave the group's lag undefined (autoscalers read it). A worker that already
            # computes the job finishes it; its reply is then ignored.
            self._withdraw(job)
            raise
        finally:
            self._waiting.pop(job.job_id, None)

    async def _queue_and_wait(self, job: Job, fut: asyncio.Future, stream: str, remaining: float) -> dict[str, Any]:
        """Admit the job onto its stream (or refuse it), then wait for its reply until its deadline."""
        fields = encode_job(job, self.reply_key)
        args: list[Any] = [self.max_queue, GROUP]
        for k, v in fields.items():
            args += [k, v]
        try:
            entry_id = await asyncio.wait_for(
                self._admit(keys=[stream], args=args), min(remaining, self.command_timeout_s)
            )
        except (TimeoutError, *CONNECTION_ERRORS) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the request was cancelled, not Redis
                raise asyncio.CancelledError from None
            if isinstance(exc, TimeoutError) and remaining < self.command_timeout_s:
                # the request's own deadline was the shorter limit: a 504 for this request, not Redis
                # down for everyone (a job that did get queued is acked as expired by its worker)
                raise DeadlineExceeded("the request deadline passed while the job was being queued") from None
            self._mark_down(exc)
            raise Unavailable("the job queue (Redis) is unreachable",
                              retry_after=self.retry_after_s) from None
        except RedisError as exc:  # e.g. Redis loading its AOF after a restart, or OOM
            raise Unavailable(f"the job queue refused the job: {exc}",
                              retry_after=self.retry_after_s) from None
        if entry_id is None:
            raise QueueFull(
                f"queue of model {job.model!r} is full ({self.max_queue} jobs waiting for a worker)",
                retry_after=self.retry_after_s,
            )
        try:
            return await asyncio.wait_for(fut, max(0.0, job.deadline - time.time()))
        except TimeoutError:
            # The job stays queued with its deadline: the worker that gets it acks it as expired,
            # counts it and does not compute it.
            raise DeadlineExceeded("the request deadline passed before a worker answered") from None

    def _withdraw(self, job: Job) -> None:
        """Set the job's cancel mark in the background (the request that waited for it is being cancelled)."""
        ttl_ms = int(max(0.0, job.deadline - time.time()) * 1000) + 60_000

        async def mark() -> None:
            with contextlib.suppress(Exception):  # best effort: the deadline still bounds the job
                await asyncio.wait_for(self._redis.set(cancel_key(job.job_id), 1, px=ttl_ms), self.command_timeout_s)

        task = asyncio.get_running_loop().create_task(mark())
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    # -- background tasks --------------------------------------------------------------------------

    def _mark_down(self, exc: BaseException) -> None:
        if self._healthy:
            log.warning("Redis unreachable (%s); answering 503 until it is back", exc)
        self._healthy = False

    async def _check_health(self) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.ping()
            for m in self.models:
                pipe.xlen(job_stream(m))
                pipe.xpending(job_stream(m), GROUP)
            res = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.command_timeout_s)
            if isinstance(res[0], Exception):
                raise res[0]
            for i, m in enumerate(self.models):
                n, pending = res[1 + 2 * i], res[2 + 2 * i]
                taken = 0 if isinstance(pending, Exception) else int(pending["pending"])
                self._depth[m] = max(0, int(n) - taken) if not isinstance(n, Exception) else 0
                metrics.QUEUE_DEPTH.labels(model=m).set(self._depth[m])
            if not self._healthy:
                log.info("Redis reachable at %s", self._redacted_url())
                # groups first, so jobs added now are delivered to workers that start later
                for m in self.models:
                    await ensure_group(self._redis, m)
            self._healthy = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            self._mark_down(exc)

    async def _health_loop(self) -> None:
        while not self._shutdown:
            await asyncio.sleep(self.health_interval_s)
            await self._check_health()

    async def _reply_loop(self) -> None:
        backoff = 0.05
        while not self._shutdown:
            try:
                res = await self._reader.xread({self.reply_key: self._last_reply_id},
                                               count=512, block=self.read_block_ms)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as exc:
                self._mark_down(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except Exception:  # noqa: BLE001 - keep the only reader alive whatever happens
                log.exception("reply reader failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if not res:
                continue
            ids = []
            for _stream, entries in res:
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    self._resolve(fields)
            self._last_reply_id = text(ids[-1])
            with contextlib.suppress(Exception):  # consumed: delete (workers' MAXLEN/TTL backstop)
                await self._reader.xdel(self.reply_key, *ids)

    def _resolve(self, fields: dict[bytes, bytes]) -> None:
        reply = decode_reply(fields)
        fut = self._waiting.get(reply.get("job_id", ""))
        if fut is None or fut.done():
            self.replies_ignored += 1
            return
        status = reply.get("status")
        if status == OK:
            try:
                fut.set_result(reply_result(reply))
            except (KeyError, ValueError) as exc:
                fut.set_exception(JobFailed(f"malformed reply from worker: {exc}"))
        elif status == EXPIRED:
            fut.set_exception(DeadlineExceeded(reply.get("detail") or "the job expired before a worker ran it"))
        elif status == DEAD:
            fut.set_exception(JobFailed(reply.get("detail") or "the job failed repeatedly and was dead-lettered"))
        else:
            fut.set_exception(JobFailed(reply.get("detail") or f"the job failed ({status})"))

    def _redacted_url(self) -> str:
        url = self.redis_url
        if "@" in url:
            scheme, rest = url.split("://", 1) if "://" in url else ("", url)
            url = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url

