"""The Redis Streams protocol, piece by piece, against a real redis-server and real worker processes:
backpressure without trimming, duplicate replies, expired jobs, poison jobs (dead letters, by failures and
by deliveries), graceful SIGTERM, worker metrics/heartbeats, Redis coming back empty, and the Redis
idempotency store."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support.harness import (
    GROUP,
    JOBS,
    RedisServer,
    Stack,
    consumer_of,
    group_pending,
    live_worker_pids,
    redis_stack,
    start_api,
    start_worker,
    wait_workers,
)
from support.images import png
from support.metrics import metric, metric_delta
from support.weights import SMALLEST_INPUT_SIZE as INPUT_SIZE

from app.dispatch.base import DeadlineExceeded, Job, JobFailed, QueueFull, Unavailable
from app.dispatch.redis_streams import RedisDispatcher
from app.queue.constants import cancel_key, reply_stream
from app.queue.jobs import encode_job, encode_reply
from model.predictor import Predictor

VISIBILITY_S = 1.5
MAX_DELIVERIES = 3


def good_array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)


def job(model: str, array: np.ndarray | None = None, timeout: float = 10.0, **kw) -> Job:
    return Job(model=model, array=good_array() if array is None else array, meta={
        "orig_w": INPUT_SIZE, "orig_h": INPUT_SIZE}, options={}, deadline=time.time() + timeout, **kw)


def read_replies(r: redis.Redis, stream: str, n: int, timeout: float = 20.0) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    last = "0-0"
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        res = r.xread({stream: last}, block=200)
        for _, entries in res or []:
            for eid, fields in entries:
                last = eid
                out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, e2e_weights: Path) -> Iterator[Stack]:
    """API serving cls and det; ONE worker, serving cls only (det gets its own workers in tests)."""
    with redis_stack(tmp_path_factory.mktemp("protocol"), e2e_weights, workers=1, models="cls,det",
                     visibility_s=VISIBILITY_S, max_deliveries=MAX_DELIVERIES,
                     worker_env={"S2AMNET_MODELS": "cls"}) as s:
        yield s


def worker_metrics(stack: Stack) -> str:
    return httpx.get(stack.workers[0].url, timeout=10).text


# ------------------------------------------------------------------------------ API side, no worker
def test_backpressure_refuses_without_trimming(redis_server: RedisServer):
    """Backlog = jobs no worker has taken yet. At max_queue the dispatcher refuses (QueueFull, 503 +
    Retry-After) and leaves the stream alone; a job taken by a worker frees a place."""

    async def go():
        d = RedisDispatcher(["m"], redis_url=redis_server.url, max_queue=3, retry_after_s=2)
        await d.start()
        try:
            assert d.ready()
            waiting = [asyncio.create_task(d.submit(job("m", timeout=3))) for _ in range(3)]
            await asyncio.sleep(0.3)
            with pytest.raises(QueueFull) as exc:
                await d.submit(job("m"))
            assert exc.value.status == 503 and exc.value.retry_after == 2
            r = redis_server.client()
            assert r.xlen(JOBS.format("m")) == 3  # refused, not trimmed
            # a worker takes one job: one place frees up
            taken = r.xreadgroup(GROUP, "someone", {JOBS.format("m"): ">"}, count=1)[0][1][0][0]
            extra = asyncio.create_task(d.submit(job("m", timeout=1)))
            await asyncio.sleep(0.3)
            assert r.xlen(JOBS.format("m")) == 4
            await asyncio.sleep(0.6)  # the health loop refreshes the backlog gauge
            assert d.queue_depth("m") == 3
            with pytest.raises(QueueFull):
                await d.submit(job("m"))
            # done with it, the way workers finish a job (ack + delete): the group's lag (what a KEDA
            # redis-streams scaler reads) stays defined and equals the backlog
            r.xack(JOBS.format("m"), GROUP, taken)
            r.xdel(JOBS.format("m"), taken)
            assert r.xinfo_groups(JOBS.format("m"))[0]["lag"] == 3
            # nobody answers: every request ends at its deadline with 504, none hangs
            for t in [*waiting, extra]:
                with pytest.raises(DeadlineExceeded):
                    await t
        finally:
            await d.stop(1)

    asyncio.run(go())


def test_a_deadline_shorter_than_queueing_is_a_504_not_redis_down(redis_server: RedisServer, monkeypatch):
    """The enqueue command is bounded by the request's deadline; when that deadline is what runs out
    (a tiny X-Request-Timeout, a slow Redis round trip), the request gets 504 and the service stays
    ready: Redis was not unreachable."""

    async def go():
        d = RedisDispatcher(["m"], redis_url=redis_server.url)
        await d.start()
        try:
            assert d.ready()
            admit = d._admit

            async def slow_admit(*args, **kwargs):
                await asyncio.sleep(0.3)
                return await admit(*args, **kwargs)

            monkeypatch.setattr(d, "_admit", slow_admit)
            with pytest.raises(DeadlineExceeded, match="while the job was being queued"):
                await d.submit(job("m", timeout=0.05))
            assert d.ready()
        finally:
            await d.stop(1)

    asyncio.run(go())


def test_a_request_that_goes_away_marks_its_job_cancelled(redis_server: RedisServer):
    """A request cancelled while its job waits for a worker (the client disconnected) sets the job's
    cancel mark, with a TTL; the entry stays, so the group's lag (what autoscalers read) stays defined."""

    async def go():
        d = RedisDispatcher(["m"], redis_url=redis_server.url)
        await d.start()
        try:
            r = redis_server.client()
            stream = JOBS.format("m")
            j = job("m")
            waiting = asyncio.create_task(d.submit(j))
            await asyncio.sleep(0.3)
            assert r.xlen(stream) == 1
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            for _ in range(100):
                if r.exists(cancel_key(j.job_id)):
                    break
                await asyncio.sleep(0.02)
            assert r.exists(cancel_key(j.job_id)) and 0 < r.pttl(cancel_key(j.job_id)) <= 70_000
            assert r.xlen(stream) == 1 and r.xinfo_groups(stream)[0]["lag"] == 1
        finally:
            await d.stop(1)

    asyncio.run(go())


def test_duplicate_and_unknown_replies_are_harmless(redis_server: RedisServer):
    """A reply for a job already resolved (redelivery after a slow worker) or for an unknown job id is
    ignored; the request resolves once, with the first reply."""

    async def go():
        d = RedisDispatcher(["m"], redis_url=redis_server.url, instance_id="dup")
        await d.start()
        r = redis_server.client()
        try:
            j = job("m")
            task = asyncio.create_task(d.submit(j))
            await asyncio.sleep(0.2)
            entries = r.xreadgroup(GROUP, "w", {JOBS.format("m"): ">"}, count=1)[0][1]
            fields = entries[0][1]
            assert fields[b"job_id"].decode() == j.job_id and fields[b"reply_to"] == b"s2amnet:replies:dup"
            for n in (1, 2):  # the same job answered twice (two workers)
                r.xadd(reply_stream("dup"), encode_reply(j.job_id, "ok", {"n": n}))
            r.xadd(reply_stream("dup"), encode_reply("no-such-job", "ok", {"n": 3}))
            assert await task == {"n": 1}
            await asyncio.sleep(0.3)
            assert d.replies_ignored == 2
            assert r.xlen(reply_stream("dup")) == 0  # consumed replies are deleted
            # and the dispatcher still works
            j2 = job("m")
            task2 = asyncio.create_task(d.submit(j2))
            await asyncio.sleep(0.2)
            r.xadd(reply_stream("dup"), encode_reply(j2.job_id, "dead", detail="job dead-lettered: boom"))
            with pytest.raises(JobFailed, match="boom"):
                await task2
        finally:
            await d.stop(1)
        assert not r.exists(reply_stream("dup"))  # the instance's reply stream goes with it

    asyncio.run(go())


def test_redis_down_fails_fast_and_recovers(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()

    async def go():
        d = RedisDispatcher(["m"], redis_url=server.url, health_interval_s=0.1)
        await d.start()
        try:
            assert d.ready()
            server.stop()
            t0 = time.monotonic()
            with pytest.raises(Unavailable):
                await d.submit(job("m"))
            assert time.monotonic() - t0 < 0.5
            await asyncio.sleep(0.3)
            assert not d.ready()
            server.start()
            for _ in range(50):
                if d.ready():
                    break
                await asyncio.sleep(0.1)
            assert d.ready()
            task = asyncio.create_task(d.submit(job("m")))
            await asyncio.sleep(0.3)
            assert not task.done() and server.client().xlen(JOBS.format("m")) == 1  # queued again
            task.cancel()
        finally:
            await d.stop(1)

    try:
        asyncio.run(go())
    finally:
        server.stop()


# ------------------------------------------------------------------------------ with a worker process
def test_expired_job_is_acked_answered_and_not_computed(stack: Stack):
    r = stack.r()
    before = worker_metrics(stack)
    late = job("cls", timeout=-1.0)  # its deadline passed while it was queued
    r.xadd(JOBS.format("cls"), encode_job(late, "s2amnet:replies:test-expired"))
    replies = read_replies(r, "s2amnet:replies:test-expired", 1)
    assert replies and replies[0]["job_id"] == late.job_id and replies[0]["status"] == "expired"
    after = worker_metrics(stack)
    delta = metric_delta(before, after)
    assert delta("s2amnet_jobs_expired_total", model="cls") == 1
    assert metric(after, "s2amnet_images_total", model="cls") == metric(before, "s2amnet_images_total",
                                                                         model="cls")
    assert metric(after, "s2amnet_batches_total", model="cls") == metric(before, "s2amnet_batches_total",
                                                                          model="cls")
    assert group_pending(r, "cls") == 0 and r.xlen(JOBS.format("cls")) == 0


def test_expiry_is_judged_on_redis_clock_not_the_hosts(stack: Stack):
    """The API host's clock is an hour behind the worker's (its absolute deadline has long passed for
    the worker) but the job still has 10 s to live by Redis's clock: it is computed. And a job queued
    with no time left expires even though the API host's deadline lies an hour ahead."""
    r = stack.r()
    live, dead = job("cls"), job("cls")
    f_live = encode_job(live, "s2amnet:replies:test-skew")
    f_live["deadline"] = repr(time.time() - 3600.0)
    f_dead = encode_job(dead, "s2amnet:replies:test-skew")
    f_dead.update(deadline=repr(time.time() + 3600.0), ttl_ms="0")
    r.xadd(JOBS.format("cls"), f_live)
    r.xadd(JOBS.format("cls"), f_dead)
    replies = {x["job_id"]: x for x in read_replies(r, "s2amnet:replies:test-skew", 2)}
    assert replies[live.job_id]["status"] == "ok", replies[live.job_id]
    assert replies[dead.job_id]["status"] == "expired"


def test_failing_job_is_dead_lettered_after_n_tries_others_in_its_batch_succeed(stack: Stack):
    """A job whose forward fails is retried (alone, so the good jobs of its batch are answered), then
    moved to the dead-letter stream after MAX_DELIVERIES tries; its client gets a clear error at once."""
    r = stack.r()
    before = worker_metrics(stack)

    async def go():
        d = RedisDispatcher(["cls"], redis_url=stack.redis.url)
        await d.start()
        try:
            poison = job("cls", np.zeros((5, INPUT_SIZE, INPUT_SIZE), np.uint8))  # 5 channels: forward fails
            t0 = time.monotonic()
            results = await asyncio.gather(d.submit(poison), *(d.submit(job("cls", good_array(i)))
                                                               for i in range(3)), return_exceptions=True)
            return poison, results, time.monotonic() - t0
        finally:
            await d.stop(1)

    poison, results, took = asyncio.run(go())
    assert isinstance(results[0], JobFailed), results[0]
    assert "dead-lettered" in results[0].detail and f"failed {MAX_DELIVERIES} times" in results[0].detail
    assert took < 10  # a clear error, not a wait for deadlines or visibility timeouts
    for res in results[1:]:
        assert isinstance(res, dict) and res["model"]["name"] == "cls" and res["verdict"] in ("pass", "fail")
    dead = r.xrange("s2amnet:dead:cls")
    assert len(dead) == 1
    fields = {k.decode(): v for k, v in dead[0][1].items()}
    assert fields["job_id"].decode() == poison.job_id
    assert fields["deliveries"] == str(MAX_DELIVERIES).encode() and b"error" in dead[0][1]
    assert "array" not in fields  # the dead letter keeps the job's description, not its pixels
    after = worker_metrics(stack)
    delta = metric_delta(before, after)
    assert delta("s2amnet_jobs_dead_lettered_total", model="cls") == 1
    assert group_pending(r, "cls") == 0 and r.xlen(JOBS.format("cls")) == 0
    r.delete("s2amnet:dead:cls")


def test_job_delivered_too_often_is_dead_lettered_without_computing(stack: Stack):
    """Workers that die on a job (crash, OOM) never ack it; once it has been delivered more than
    MAX_DELIVERIES times, the worker that takes it over dead-letters it instead of running it again."""
    r = stack.r()
    before = worker_metrics(stack)
    crasher = job("cls", timeout=30)
    stream = JOBS.format("cls")
    with r.pipeline(transaction=True) as pipe:  # atomic: the live worker cannot take it first
        pipe.xadd(stream, encode_job(crasher, "s2amnet:replies:test-crash"))
        pipe.xreadgroup(GROUP, "crashed-worker", {stream: ">"}, count=1)
        added, read = pipe.execute()
    entry_id = read[0][1][0][0]
    assert entry_id == added, "the crashed consumer read another job than the one injected"
    # as if it had been delivered to (and killed) MAX_DELIVERIES workers already
    r.xclaim(stream, GROUP, "crashed-worker", 0, [entry_id], retrycount=MAX_DELIVERIES)
    replies = read_replies(r, "s2amnet:replies:test-crash", 1, timeout=VISIBILITY_S + 10)
    assert replies and replies[0]["status"] == "dead" and "delivered" in replies[0]["detail"]
    after = worker_metrics(stack)
    delta = metric_delta(before, after)
    assert delta("s2amnet_jobs_dead_lettered_total", model="cls") == 1
    assert delta("s2amnet_jobs_redelivered_total", model="cls") == 1
    assert metric(after, "s2amnet_images_total", model="cls") == metric(before, "s2amnet_images_total",
                                                                         model="cls")
    assert group_pending(r, "cls") == 0
    r.delete("s2amnet:dead:cls")


def test_worker_metrics_and_heartbeat(stack: Stack):
    assert httpx.post(stack.api.url + "/classify", files=[("file", ("a.png", png(seed=1), "image/png"))],
                      timeout=30).status_code == 200
    text = worker_metrics(stack)
    heartbeat = [s for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "s2amnet_worker_heartbeat_timestamp_seconds"]
    assert len(heartbeat) == 1 and time.time() - heartbeat[0].value < 5
    worker = heartbeat[0].labels["worker"]
    assert metric(text, "s2amnet_worker_up", worker=worker) == 1
    assert metric(text, "s2amnet_batches_total", model="cls") >= 1
    assert metric(text, "s2amnet_batch_size_count", model="cls") >= 1
    assert metric(text, "s2amnet_inference_duration_seconds_count", model="cls") >= 1
    # S2AMNET_FORWARD_BATCH=auto on this CPU worker: measured after the warm-up, logged and exported
    chosen = re.search(r"forward batch of cls: (\d+) \(measured ms per image: 1: ", stack.workers[0].log())
    assert chosen and metric(text, "s2amnet_forward_batch_size", model="cls") == int(chosen.group(1))
    assert "start-up objects moved out of the garbage collector's reach" in stack.workers[0].log()
    info = json.loads(stack.r().get(f"s2amnet:worker:{worker}"))
    assert info["pid"] == stack.workers[0].pid and info["models"] == ["cls"] and info["stream"] == 1
    assert 0 < stack.r().pttl(f"s2amnet:worker:{worker}") <= 10_000  # a dead worker's key expires


def test_sigterm_finishes_the_batch_in_hand_then_exits(stack: Stack, e2e_weights: Path):
    """A det worker with slow forwards holds a batch of 3; SIGTERM: it answers and acks them, leaves the
    consumer group and exits 0 -- the clients get 200s without waiting for a visibility timeout."""
    r = stack.r()
    w = start_worker(stack.redis.url, e2e_weights, stack.log_dir,
                     visibility_s=60, S2AMNET_MODELS="det", S2AMNET_TEST_INFER_DELAY_S="1.0",
                     S2AMNET_MAX_DELAY_MS="300")
    try:
        wait_workers(r, [w])
        consumer = consumer_of(r, w.pid)

        async def go():
            async with httpx.AsyncClient(base_url=stack.api.url, timeout=60) as c:
                async def one(i):
                    return await c.post("/detect", files=[("file", ("a.png", png(seed=i), "image/png"))])

                tasks = [asyncio.create_task(one(i)) for i in range(3)]
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    held = {c_["name"].decode(): c_["pending"] for c_ in
                            r.xpending(JOBS.format("det"), GROUP)["consumers"]}
                    if held.get(consumer) == 3:
                        break
                    await asyncio.sleep(0.01)
                assert held.get(consumer) == 3, held
                w.send(signal.SIGTERM)
                t0 = time.monotonic()
                responses = await asyncio.gather(*tasks)
                return responses, time.monotonic() - t0

        responses, took = asyncio.run(go())
        assert [x.status_code for x in responses] == [200] * 3
        assert took < 10
        assert w.wait(20) == 0, w.log()[-3000:]
        assert group_pending(r, "det") == 0
        names = [c["name"].decode() for c in r.xinfo_consumers(JOBS.format("det"), GROUP)]
        assert consumer not in names  # left the group
        assert w.pid not in live_worker_pids(r)  # heartbeat key removed
    finally:
        w.stop(signal.SIGKILL, 10)


def test_jobs_of_a_worker_that_is_gone_are_taken_over_at_once(stack: Stack, e2e_weights: Path):
    """A job pending under a consumer without a heartbeat key (its worker was killed) is taken over and
    answered within seconds, long before the visibility timeout (60 s here); a job pending under a consumer
    whose key is there (a live worker busy with it) is left to it."""
    r = stack.r()
    stream = JOBS.format("det")
    w = start_worker(stack.redis.url, e2e_weights, stack.log_dir, visibility_s=60, S2AMNET_MODELS="det")
    try:
        wait_workers(r, [w])
        det = Predictor.from_folder(e2e_weights / "det")
        samples = [det.preprocess(Image.open(io.BytesIO(png(seed=i))).convert("RGB")) for i in range(2)]
        jobs = {name: Job(model="det", array=s.array, meta=s.meta, options={}, deadline=time.time() + 30)
                for name, s in zip(("gone-worker", "busy-worker"), samples, strict=True)}
        r.set("s2amnet:worker:busy-worker", json.dumps({"consumer": "busy-worker", "pid": 0}), px=60_000)
        for name, j in jobs.items():
            with r.pipeline(transaction=True) as pipe:  # atomic: the live worker cannot read it first
                pipe.xadd(stream, encode_job(j, f"s2amnet:replies:test-{name}"))
                pipe.xreadgroup(GROUP, name, {stream: ">"}, count=1)
                added, read = pipe.execute()
            assert read[0][1][0][0] == added
        t0 = time.monotonic()
        replies = read_replies(r, "s2amnet:replies:test-gone-worker", 1, timeout=20)
        took = time.monotonic() - t0
        assert replies and replies[0]["status"] == "ok" and replies[0]["job_id"] == jobs["gone-worker"].job_id
        assert took < 10, took  # not the visibility timeout
        assert "took over 1 job(s) of det of gone-worker, whose worker is gone" in w.log()
        time.sleep(2)  # two more rounds of looking for such jobs
        held = {c["name"].decode(): c["pending"] for c in r.xpending(stream, GROUP)["consumers"]}
        assert held == {"busy-worker": 1}, held
        r.delete("s2amnet:worker:busy-worker")  # now that worker is gone too
        replies = read_replies(r, "s2amnet:replies:test-busy-worker", 1, timeout=20)
        assert replies and replies[0]["status"] == "ok"
        assert group_pending(r, "det") == 0
    finally:
        w.stop(signal.SIGKILL, 10)
        r.delete("s2amnet:worker:busy-worker")


def test_a_worker_in_a_long_forward_keeps_its_heartbeat(stack: Stack, e2e_weights: Path):
    """The heartbeat key is kept by a thread of its own: a forward longer than the key's TTL (3 s) does not
    let it lapse, so no other worker takes that worker's jobs."""
    r = stack.r()
    w = start_worker(stack.redis.url, e2e_weights, stack.log_dir, visibility_s=60, S2AMNET_MODELS="det",
                     S2AMNET_TEST_INFER_DELAY_S="4.5")
    try:
        wait_workers(r, [w])
        consumer = consumer_of(r, w.pid)

        async def go():
            async with httpx.AsyncClient(base_url=stack.api.url, timeout=60) as c:
                task = asyncio.create_task(c.post("/detect", files=[("file", ("a.png", png(seed=1), "image/png"))]))
                end = time.monotonic() + 20
                while not r.xpending(JOBS.format("det"), GROUP)["pending"] and time.monotonic() < end:
                    await asyncio.sleep(0.01)
                lapsed = 0
                t0 = time.monotonic()
                while not task.done():
                    lapsed += not r.exists(f"s2amnet:worker:{consumer}")
                    await asyncio.sleep(0.1)
                return await task, lapsed, time.monotonic() - t0

        resp, lapsed, held = asyncio.run(go())
        assert resp.status_code == 200 and held > 3.5, held
        assert lapsed == 0
    finally:
        w.stop(signal.SIGKILL, 10)


def test_a_request_whose_client_left_is_not_computed(stack: Stack, e2e_weights: Path):
    """Real HTTP: a client gives up (read timeout) while its /detect job waits (no det worker yet). The
    worker that comes later acks the job without computing it (its batch counter stays 0) and computes the
    next live request."""
    r = stack.r()
    stream = JOBS.format("det")
    assert r.xlen(stream) == 0
    before = set(r.scan_iter("s2amnet:cancelled:*"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.api.url + "/detect", files=[("file", ("a.png", png(seed=7), "image/png"))], timeout=1.0)
    end = time.monotonic() + 10
    while time.monotonic() < end and not set(r.scan_iter("s2amnet:cancelled:*")) - before:
        time.sleep(0.05)
    assert len(set(r.scan_iter("s2amnet:cancelled:*")) - before) == 1
    assert r.xlen(stream) == 1 and r.xinfo_groups(stream)[0]["lag"] == 1
    w = start_worker(stack.redis.url, e2e_weights, stack.log_dir, S2AMNET_MODELS="det")
    try:
        wait_workers(r, [w])
        end = time.monotonic() + 30
        while time.monotonic() < end and (r.xlen(stream) or group_pending(r, "det")):
            time.sleep(0.05)
        assert r.xlen(stream) == 0 and group_pending(r, "det") == 0  # acked and deleted
        text = httpx.get(w.url, timeout=10).text
        assert metric(text, "s2amnet_batches_total", model="det") == 0
        assert metric(text, "s2amnet_jobs_cancelled_total", model="det") == 1
        ok = httpx.post(stack.api.url + "/detect", files=[("file", ("a.png", png(seed=8), "image/png"))],
                        timeout=60)
        assert ok.status_code == 200, ok.text
        assert metric(httpx.get(w.url, timeout=10).text, "s2amnet_batches_total", model="det") == 1
    finally:
        w.stop(signal.SIGKILL, 10)


def test_worker_caps_the_batch_of_a_model(stack: Stack, e2e_weights: Path):
    """S2AMNET_MODEL_MAX_BATCH_SIZE=det=2 on a det worker with slow forwards: 5 requests in flight are
    answered in batches of at most 2 (without the cap the same worker batches 3 at once: test above)."""
    w = start_worker(stack.redis.url, e2e_weights, stack.log_dir, S2AMNET_MODELS="det",
                     S2AMNET_TEST_INFER_DELAY_S="0.5", S2AMNET_MAX_DELAY_MS="300",
                     S2AMNET_MODEL_MAX_BATCH_SIZE="det=2")
    try:
        wait_workers(stack.r(), [w])

        async def go():
            async with httpx.AsyncClient(base_url=stack.api.url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/detect", files=[("file", ("a.png", png(seed=i), "image/png"))])
                                              for i in range(5)))

        assert [x.status_code for x in asyncio.run(go())] == [200] * 5
        text = httpx.get(w.url, timeout=10).text
        batches = metric(text, "s2amnet_batch_size_count", model="det")
        assert metric(text, "s2amnet_batch_size_sum", model="det") == 5 and batches >= 3
        assert metric(text, "s2amnet_batch_size_bucket", model="det", le="2.0") == batches  # none above 2
        assert metric(text, "s2amnet_batch_size_bucket", model="det", le="1.0") < batches  # but batched
        assert "max_batch=det=2" in w.log()
    finally:
        w.stop(signal.SIGTERM, 20)


def test_redis_coming_back_empty_recreates_the_group(stack: Stack):
    """Redis restarted without its data (FLUSHALL here): the worker recreates its consumer group and
    requests are answered again, without restarting anything."""
    r = stack.r()
    refused = stack.workers[0].log().count("Redis refused a command")
    r.flushall()
    end = time.monotonic() + 10  # the worker recreates its stream and group by itself, before any request
    while not (r.exists(JOBS.format("cls")) and r.xinfo_groups(JOBS.format("cls"))) and time.monotonic() < end:
        time.sleep(0.05)
    assert r.exists(JOBS.format("cls")), stack.workers[0].log()[-2000:]
    assert stack.workers[0].log().count("Redis refused a command") == refused
    t0 = time.monotonic()
    resp = httpx.post(stack.api.url + "/classify", files=[("file", ("a.png", png(seed=7), "image/png"))],
                      timeout=30)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - t0 < 8
    assert GROUP.encode() in [g["name"] for g in r.xinfo_groups(JOBS.format("cls"))]
    assert stack.workers[0].alive()
    wait_workers(r, stack.workers, timeout=5)  # heartbeat key written again


# ------------------------------------------------------------------------------ several API processes
def test_two_api_processes_report_the_backlog_once(redis_server: RedisServer, e2e_weights: Path, tmp_path: Path):
    """`s2amnet serve --workers 2` in Redis mode: both API processes poll the same stream backlog and
    /metrics merges their values; 3 waiting jobs must read 3 (a sum over processes would say 6)."""
    import os

    prom = tmp_path / "prom"
    prom.mkdir()
    api = start_api(e2e_weights, tmp_path, args=("--workers", "2"), S2AMNET_REDIS_URL=redis_server.url,
                    S2AMNET_MODELS="cls", PROMETHEUS_MULTIPROC_DIR=str(prom))
    try:
        r = redis_server.client()
        for i in range(3):  # no worker: the jobs stay in the stream
            r.xadd(JOBS.format("cls"), encode_job(job("cls", good_array(i)), "nobody"))

        def processes() -> set[str]:  # each API process writes its own value files
            return {p.stem.rsplit("_", 1)[1] for p in prom.glob("gauge_*.db")}

        end = time.monotonic() + 60
        while len(processes()) < 2 and time.monotonic() < end:
            time.sleep(0.2)
        assert len(processes()) >= 2, api.log()[-3000:]
        time.sleep(1.5)  # three health polls (0.5 s) of each process
        seen = [metric(httpx.get(api.url + "/metrics", timeout=5).text, "s2amnet_queue_depth", model="cls")
                for _ in range(6)]
        assert seen == [3] * 6
    finally:
        api.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(api.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ idempotency store
def test_redis_idempotency_store(redis_server: RedisServer):
    from app.idempotency_redis import RedisIdempotencyStore

    async def go():
        store = RedisIdempotencyStore(redis_url=redis_server.url, lock_wait_s=0.5, lock_ttl_s=5)
        r = redis_server.client()
        try:
            assert await store.get("k") is None
            await store.put("k", {"fingerprint": "f", "status": 200, "body": {"a": 1}}, ttl_s=1.0)
            assert await store.get("k") == {"fingerprint": "f", "status": 200, "body": {"a": 1}}
            assert 0 < r.pttl("s2amnet:idem:k") <= 1000
            # the lock serialises holders of the same key (across API instances: it lives in Redis)
            order = []

            async def holder(name: str, hold: float):
                async with store.lock("k"):
                    order.append(f"{name}+")
                    await asyncio.sleep(hold)
                    order.append(f"{name}-")

            await asyncio.gather(holder("a", 0.2), holder("b", 0.0))
            assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
            assert not r.exists("s2amnet:idem-lock:k")
            # a holder that waits longer than lock_wait_s gets 503, not a hang
            async with store.lock("k"):
                with pytest.raises(Unavailable):
                    async with store.lock("k"):
                        pass
            await asyncio.sleep(1.1)
            assert await store.get("k") is None  # expired
            redis_server.stop()
            with pytest.raises(Unavailable):
                await store.get("k")
        finally:
            await store.close()

    asyncio.run(go())
