"""A Redis worker's inference streams (S2AMNET_CPU_STREAMS) against a real redis-server: in one process, a
part sent alone always computed by the first stream on every torch thread, two forwards side by side on a
share each while jobs wait, every job answered once; and `s2amnet worker` as a real process running two
streams under one heartbeat, leaving the group with both on SIGTERM."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import torch
from support.harness import GROUP, JOBS, RedisServer, live_worker_pids, start_worker, wait_workers
from support.metrics import metric
from support.predictors import job

from app.inference import run_batch
from app.queue.constants import cancel_key
from app.queue.jobs import JobEntry, encode_job
from app.runtime import ThreadShares
from app.worker import StreamGate, Worker, run_streams, stream_consumer
from model.predictor import Predictor

REPLIES = "s2amnet:replies:test-streams"


class Spy:
    """`run_batch` that records each batch's thread, torch threads and size, and can hold the forwards."""

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, predictor, jobs):
        self.calls.append((threading.current_thread().name, torch.get_num_threads(), len(jobs)))
        self.hold.wait(30)
        return run_batch(predictor, jobs)


def replies(r, n: int, after: str, timeout: float = 30.0) -> tuple[list[dict[str, str]], str]:
    out: list[dict[str, str]] = []
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        for _, entries in r.xread({REPLIES: after}, block=200) or []:
            for eid, fields in entries:
                after = eid.decode()
                out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out, after


def test_a_part_alone_goes_to_the_first_stream_and_waiting_jobs_to_both(redis_server: RedisServer, e2e_weights):
    det = Predictor.from_folder(e2e_weights / "det")
    spy = Spy()
    gate = StreamGate(ThreadShares(2, 2))
    workers = [Worker(redis_server.url, {"det": det}, consumer=stream_consumer("w", i), max_batch_size=1,
                      max_delay_ms=0, run_batch=spy, stream=i, gate=gate) for i in range(2)]
    runner = threading.Thread(target=run_streams, args=(workers,), name="first-stream")
    r = redis_server.client()
    runner.start()
    try:
        end = time.monotonic() + 20
        while len({c["name"] for c in _consumers(r)}) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert sorted(c["name"].decode() for c in _consumers(r)) == ["w", "w-stream2"]
        assert sorted(k.decode() for k in r.scan_iter("s2amnet:worker:*")) == ["s2amnet:worker:w",
                                                                              "s2amnet:worker:w-stream2"]

        after = "0-0"
        for i in range(5):  # one part at a time, each once the last one's answer is back
            r.xadd(JOBS.format("det"), encode_job(job(det, i), REPLIES))
            got, after = replies(r, 1, after)
            assert [g["status"] for g in got] == ["ok"]
        assert spy.calls == [("first-stream", 2, 1)] * 5

        spy.calls.clear()
        spy.hold.clear()  # forwards held: the first stream computes while the other jobs wait in Redis
        jobs = [job(det, i) for i in range(6)]
        with r.pipeline(transaction=True) as pipe:  # all queued at once: the first stream sees five wait
            for j in jobs:
                pipe.xadd(JOBS.format("det"), encode_job(j, REPLIES))
            pipe.execute()
        end = time.monotonic() + 20
        while len(spy.calls) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        in_forward = sorted(spy.calls)
        spy.hold.set()
        got, after = replies(r, len(jobs), after)
        assert in_forward == [("first-stream", 1, 1), ("s2amnet-worker-stream2", 1, 1)]
        assert sorted(g["job_id"] for g in got) == sorted(j.job_id for j in jobs)  # each answered once
        assert all(g["status"] == "ok" for g in got)
        assert r.xlen(JOBS.format("det")) == 0
    finally:
        spy.hold.set()
        workers[0].request_stop()
        runner.join(30)
    assert not runner.is_alive() and all(w.stopping for w in workers)  # the others stopped with the first
    assert _consumers(r) == []  # both streams left the group
    assert list(r.scan_iter("s2amnet:worker:*")) == []


def _consumers(r) -> list[dict]:
    try:
        return r.xinfo_consumers(JOBS.format("det"), GROUP)
    except Exception:  # noqa: BLE001 - the group is made by the first worker that connects
        return []


def test_the_worker_command_runs_its_streams_each_with_its_heartbeat(redis_server: RedisServer, e2e_weights: Path,
                                                                 tmp_path: Path):
    streams = 2
    r = redis_server.client()
    w = start_worker(redis_server.url, e2e_weights, tmp_path, name="box", S2AMNET_MODELS="det",
                     S2AMNET_TORCH_THREADS="2", S2AMNET_CPU_STREAMS=str(streams))
    try:
        wait_workers(r, [w])
        text = httpx.get(w.url, timeout=10).text
        assert metric(text, "s2amnet_cpu_streams") == streams
        assert f"inference streams: {streams} (requested; 2 torch threads, 1 per forward" in w.log()
        assert live_worker_pids(r) == {w.pid}
        assert sorted(k.decode() for k in r.scan_iter("s2amnet:worker:*")) == ["s2amnet:worker:box",
                                                                              "s2amnet:worker:box-stream2"]
        end = time.monotonic() + 20
        while len(_consumers(r)) < streams and time.monotonic() < end:
            time.sleep(0.05)
        assert sorted(c["name"].decode() for c in _consumers(r)) == ["box", "box-stream2"]
        w.send(signal.SIGTERM)
        assert w.wait(30) == 0, w.log()[-3000:]
        assert _consumers(r) == [] and live_worker_pids(r) == set()
    finally:
        w.stop(signal.SIGKILL, 10)


def test_a_stream_that_fails_stops_the_worker(redis_server: RedisServer, e2e_weights):
    """Not serving on with fewer streams: the failure stops the first stream too, which leaves the group, and
    is raised where the process runs its streams (so the worker exits and is restarted)."""
    det = Predictor.from_folder(e2e_weights / "det")
    gate = StreamGate(ThreadShares(2, 2))
    workers = [Worker(redis_server.url, {"det": det}, consumer=stream_consumer("f", i), stream=i, gate=gate,
                      block_ms=100) for i in range(2)]

    def broken_step() -> None:
        raise ValueError("boom")

    workers[1]._step = broken_step
    raised: list[BaseException] = []

    def run() -> None:
        try:
            run_streams(workers)
        except BaseException as exc:  # noqa: BLE001 - checked below
            raised.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    runner.join(30)
    stopped = not runner.is_alive()
    workers[0].request_stop()  # the first stream would otherwise serve on, alone
    runner.join(30)
    assert stopped and workers[0].stopping
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError)
    assert str(raised[0]) == "an inference stream failed: ValueError: boom"
    assert _consumers(redis_server.client()) == []


def test_the_waiting_check_survives_a_stream_gone(redis_server: RedisServer, e2e_weights):
    """The first stream asks, with its batch's clock and cancel marks, whether jobs wait in each model's stream;
    a stream whose key is gone (Redis came back empty) counts as nothing waiting, and the clock and the
    cancel marks of the batch still count."""
    det = Predictor.from_folder(e2e_weights / "det")
    gate = StreamGate(ThreadShares(2, 2))
    w = Worker(redis_server.url, {"det": det, "cls": det}, consumer="g", stream=0, gate=gate)
    r = redis_server.client()
    for model in ("det", "cls"):
        r.xgroup_create(JOBS.format(model), GROUP, id="0", mkstream=True)
    queued = [job(det, i) for i in range(3)]
    for j in queued:
        r.xadd(JOBS.format("det"), encode_job(j, REPLIES))
    r.delete(JOBS.format("cls"))
    r.set(cancel_key(queued[0].job_id), 1)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode_job(queued[0], REPLIES).items()}
    batch = [JobEntry("det", "1-0", fields, 1)]
    now_ms, cancelled, waiting = w._clock_and_cancelled(batch)
    sec, usec = r.time()
    assert now_ms is not None and abs(now_ms - (sec * 1000 + usec // 1000)) < 5000
    assert cancelled == {queued[0].job_id} and waiting  # three undelivered in det; cls gone
    r.delete(JOBS.format("det"))
    assert w._clock_and_cancelled(batch)[2] is False
