"""app.dispatch.local: the embedded dispatcher (inference threads, batching, queue bounds, deadlines,
shutdown). Real tiny models, no mocks of the model."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support.predictors import Recording, job

from app.dispatch.base import DeadlineExceeded, Job, QueueFull, Unavailable, UnknownModel
from app.dispatch.local import LocalDispatcher
from app.inference import run_batch
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def model_sample(name: str, model: str, default: float | None = None) -> float | None:
    """The value of metric sample ``name{model=...}`` in this process's registry (``default`` if absent)."""
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, {"model": model})
    return default if value is None else value


def dispatcher_settings(**kw) -> Settings:
    # eager: the forwards these tests count are the batches' alone (no backend's parity check at start-up)
    # one stream unless a test asks for more: these tests follow the batches of one inference thread
    base = {"max_batch_size": 4, "max_delay_ms": 100, "max_queue": 8, "warmup": True, "backend": "eager",
            "cpu_streams": 1}
    base.update(kw)
    return Settings(**base)


def test_dispatcher_batches_on_one_long_lived_thread(det):
    rec = Recording(det)

    async def go():
        d = LocalDispatcher({"det": rec}, dispatcher_settings(forward_batch=4))  # batches of up to 4: one forward
        await d.start()
        assert d.ready()
        jobs = [job(det, i) for i in range(6)]
        results = await asyncio.gather(*(d.submit(j) for j in jobs))
        await d.stop()
        assert not d.ready()
        return jobs, results

    jobs, results = asyncio.run(go())
    threads = {name for name, _ in rec.calls}
    assert threads == {"s2amnet-inference"}  # the warm-up too: one torch thread team, one thread
    sizes = [n for _, n in rec.calls[1:]]  # after the warm-up
    assert sum(sizes) == 6 and max(sizes) == 4 and len(sizes) < 6
    expected = [run_batch(det, [j])[0] for j in jobs]
    assert [r["image"] for r in results] == [e["image"] for e in expected]
    assert [r["defects"] for r in results] == [e["defects"] for e in expected]


def test_dispatcher_caps_the_batch_of_one_model_only(det):
    """S2AMNET_MODEL_MAX_BATCH_SIZE: a per-model cap below max_batch_size; the other model still batches,
    and a cap naming a model that is not served stops the start-up (a typo would change nothing)."""
    slow, fast = Recording(det), Recording(det)

    async def go():
        d = LocalDispatcher({"seg": slow, "det": fast}, dispatcher_settings(model_max_batch_size="seg=2",
                                                                           forward_batch=4))
        await d.start()
        slow.gate.clear()
        fast.gate.clear()  # hold the forwards until every job is queued
        tasks = [asyncio.create_task(d.submit(job(det, i))) for i in range(6)]
        tasks += [asyncio.create_task(d.submit(replace(job(det, i), model="seg", job_id=f"seg-{i}")))
                  for i in range(6)]
        await asyncio.sleep(0.3)
        slow.gate.set()
        fast.gate.set()
        results = await asyncio.gather(*tasks)
        await d.stop()
        return results

    results = asyncio.run(go())
    assert len(results) == 12 and all("defects" in r for r in results)
    seg_sizes = [n for _, n in slow.calls[1:]]  # after the warm-up
    det_sizes = [n for _, n in fast.calls[1:]]
    assert sum(seg_sizes) == 6 and max(seg_sizes) == 2
    assert sum(det_sizes) == 6 and max(det_sizes) == 4  # max_batch_size of the other model
    with pytest.raises(RuntimeError, match="names sge, which is not a loaded model"):
        LocalDispatcher({"seg": slow}, dispatcher_settings(model_max_batch_size="sge=2"))


def test_dispatcher_forward_batch_setting(det):
    """S2AMNET_FORWARD_BATCH: N → no forward sees more than N images, and no batch is larger than one forward
    (each job is answered when its own forward ends, not after the forwards of a whole larger batch); auto on
    a CPU → measured at warm-up (a size up to the batch cap); auto without warm-up → whole batches. Each
    exported as s2amnet_forward_batch_size{model}."""
    from model.predictor import Predictor

    def gauge(name):
        return model_sample("s2amnet_forward_batch_size", name)

    def batches(name):
        return model_sample("s2amnet_batches_total", name, 0.0)

    async def serve(name, predictor, n_jobs, **settings):
        d = LocalDispatcher({name: predictor}, dispatcher_settings(**settings))
        await d.start()
        results = await asyncio.gather(*(d.submit(replace(job(det, i), model=name, job_id=f"{name}-{i}"))
                                         for i in range(n_jobs)))
        await d.stop()
        return results

    p = Predictor(det.model, det.manifest)  # its own instance: the setting is per predictor
    sizes = []
    hook = p.model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        before = batches(p.name)  # run_forward counts under the model's own name
        results = asyncio.run(serve("fb2", p, 6, forward_batch="2", warmup=False))
        forwards = list(sizes)
    finally:
        hook.remove()
    assert all("defects" in r for r in results)
    assert p.forward_batch == 2 and gauge("fb2") == 2
    assert sum(forwards) == 6 and max(forwards) == 2
    assert batches(p.name) - before == len(forwards) == 3  # one forward per batch
    expected = [run_batch(det, [replace(job(det, i), model="fb2")])[0] for i in range(6)]
    assert [r["defects"] for r in results] == [e["defects"] for e in expected]

    q = Predictor(det.model, det.manifest)
    asyncio.run(serve("fbauto", q, 1, warmup=True))  # default: auto
    assert q.forward_batch in (1, 2, 4) and gauge("fbauto") == q.forward_batch  # max_batch_size 4
    r = Predictor(det.model, det.manifest)
    asyncio.run(serve("fbcold", r, 1, warmup=False))
    assert r.forward_batch is None and gauge("fbcold") == 4


class SlowPostprocess(Recording):
    """Its postprocess blocks (as a very large image's full-size masks would) until `release` is set."""

    def __init__(self, predictor):
        super().__init__(predictor)
        self.release = threading.Event()
        self.post_threads: list[str] = []

    def postprocess(self, raw, meta, **kw):
        self.post_threads.append(threading.current_thread().name)
        if len(self.post_threads) > 1:  # not the warm-up
            self.release.wait(30)
        return self.p.postprocess(raw, meta, **kw)


def test_a_slow_postprocess_does_not_hold_up_other_models(det):
    """One request's postprocessing runs off the inference thread: while it is stuck, another model's
    request is batched, computed and answered (on one shared inference thread it would wait, then 504)."""
    big, other = SlowPostprocess(det), Recording(det)

    async def go():
        d = LocalDispatcher({"seg": big, "det": other}, dispatcher_settings(max_delay_ms=0))
        await d.start()
        stuck = asyncio.create_task(d.submit(replace(job(det, 0), model="seg", job_id="big")))
        while len(big.post_threads) < 2:
            await asyncio.sleep(0.01)
        answered = await d.submit(job(det, 1, deadline_in=10.0))
        assert not stuck.done()
        big.release.set()
        late = await stuck
        # its deadline passed while it was postprocessed: 504, and the thread is not waited for
        big.release.clear()
        expiring = asyncio.create_task(d.submit(replace(job(det, 2, deadline_in=0.5), model="seg", job_id="b2")))
        with pytest.raises(DeadlineExceeded, match="while its result was postprocessed"):
            await expiring
        big.release.set()
        await d.stop()
        return answered, late

    answered, late = asyncio.run(go())
    assert "defects" in answered and "defects" in late
    assert big.post_threads[0] == "s2amnet-inference"  # the warm-up
    assert "s2amnet-inference" not in big.post_threads[1:]
    assert late["timing_ms"]["inference"] >= 0 and answered["timing_ms"]["queue"] >= 0


def test_dispatcher_queue_full_deadline_and_unknown_model(det):
    rec = Recording(det)

    async def go():
        d = LocalDispatcher({"det": rec}, dispatcher_settings(max_queue=2, max_batch_size=1, max_delay_ms=0))
        await d.start()
        rec.gate.clear()  # hold the next forward
        first = asyncio.create_task(d.submit(job(det, 0)))
        while len(rec.calls) < 2:  # warm-up + first
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(d.submit(job(det, i))) for i in (1, 2)]
        await asyncio.sleep(0.05)
        assert d.queue_depth("det") == 2
        with pytest.raises(QueueFull) as info:
            await d.submit(job(det, 3))
        assert info.value.retry_after == 1
        with pytest.raises(UnknownModel):
            await d.submit(
                Job(model="nope", array=np.zeros(1), meta={}, options={}, deadline=time.time() + 1)
            )
        late = job(det, 4, deadline_in=0.2)
        queued[1].cancel()  # a request that went away: never computed
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded):
            await d.submit(late)  # the queue has room again: it waits, then its deadline passes
        rec.gate.set()
        done = await asyncio.gather(first, queued[0])
        await d.stop()
        return done

    def count(name):
        return model_sample(f"s2amnet_{name}_total", "det", 0.0)

    before = count("jobs_cancelled"), count("jobs_expired")
    done = asyncio.run(go())
    assert all("defects" in r for r in done)
    sizes = [n for _, n in rec.calls[1:]]
    assert sizes == [1, 1]  # first + queued[0]; the cancelled and the expired jobs were never computed
    assert (count("jobs_cancelled") - before[0], count("jobs_expired") - before[1]) == (1, 1)


def test_dispatcher_stop_drains_queued_work_then_refuses(det):
    rec = Recording(det)

    async def go():
        d = LocalDispatcher({"det": rec}, dispatcher_settings(max_batch_size=1, max_delay_ms=0))
        await d.start()
        rec.gate.clear()
        tasks = [asyncio.create_task(d.submit(job(det, i))) for i in range(3)]
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(d.stop(drain_timeout=30))
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable):
            await d.submit(job(det, 9))
        rec.gate.set()
        await stopping
        return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert len(results) == 3 and all("defects" in r for r in results)


def test_dispatcher_stop_after_drain_timeout_fails_the_rest(det):
    rec = Recording(det)

    async def go():
        d = LocalDispatcher({"det": rec}, dispatcher_settings(max_batch_size=1, max_delay_ms=0))
        await d.start()
        rec.gate.clear()
        tasks = [asyncio.create_task(d.submit(job(det, i))) for i in range(3)]
        await asyncio.sleep(0.1)
        await d.stop(drain_timeout=0.2)
        rec.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(go())
    # the queued jobs and the batch in hand (its forward outlived the drain): 503 at once, not a wait on
    # a forward that a stopping process may never finish
    assert all(isinstance(r, Unavailable) for r in results), results
    assert [n for _, n in rec.calls[1:]] == [1]  # only the first job was ever taken into a forward


def test_only_the_inference_thread_runs_torch_with_several_threads(det):
    """Postprocessing threads use one torch intra-op thread (no OpenMP team of their own, which would make
    libgomp throttle the inference thread's team); the inference thread keeps the default, or the setting."""
    import torch

    from app.runtime import default_torch_threads

    seen = {}

    class Probe(Recording):
        def infer(self, arrays):
            seen["inference"] = torch.get_num_threads()
            return super().infer(arrays)

    async def go(**kw):
        d = LocalDispatcher({"det": Probe(det)}, dispatcher_settings(**kw))
        await d.start()
        await d.submit(job(det))
        seen["post"] = await asyncio.get_running_loop().run_in_executor(d._post_pool, torch.get_num_threads)
        await d.stop()

    asyncio.run(go())
    assert seen == {"inference": default_torch_threads(), "post": 1}
    asyncio.run(go(torch_threads=3))
    assert seen == {"inference": 3, "post": 1}


def test_a_request_gone_away_during_its_forward_is_not_postprocessed(det):
    """The inference thread hands each computed job to the postprocessing pool itself; a job whose request
    went away while its forward ran is dropped there, and the others of its batch are answered."""
    rec = SlowPostprocess(det)
    rec.release.set()

    async def go():
        d = LocalDispatcher({"det": rec}, dispatcher_settings(max_delay_ms=50))
        await d.start()
        posted = len(rec.post_threads)
        rec.gate.clear()  # hold the forward
        leaving = asyncio.create_task(d.submit(job(det, 0)))
        staying = asyncio.create_task(d.submit(replace(job(det, 1), job_id="stays")))
        while len(rec.calls) < 2:  # the warm-up, then the batch of both, held in its forward
            await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0.05)
        rec.gate.set()
        answered = await staying
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await d.stop()
        return answered, rec.post_threads[posted:], rec.calls[-1]

    answered, posts, batch = asyncio.run(go())
    assert batch[1] == 2  # both were in the forward
    assert "defects" in answered and len(posts) == 1  # only the job still wanted was postprocessed
    assert posts[0].startswith("s2amnet-post")


def test_under_load_two_streams_compute_side_by_side_on_a_share_of_the_threads_each(det):
    """S2AMNET_CPU_STREAMS=2: a part alone gets its forward on the first inference thread with every torch
    thread; with jobs waiting, a second thread computes beside the first, each on half of the threads; the
    answers are those of one forward each."""
    import torch
    from prometheus_client import REGISTRY

    calls: list[tuple[str, int]] = []

    class Probe(Recording):
        def infer(self, arrays):
            calls.append((threading.current_thread().name, torch.get_num_threads()))
            return super().infer(arrays)

    probe = Probe(det)

    async def go():
        d = LocalDispatcher({"det": probe}, dispatcher_settings(cpu_streams=2, torch_threads=2, forward_batch=1,
                                                                max_delay_ms=0))
        await d.start()
        assert d.streams == 2 and REGISTRY.get_sample_value("s2amnet_cpu_streams") == 2
        hand_over = d._hand_over

        def slow_hand_over(*args):  # the next part comes while this thread is still handing answers over
            hand_over(*args)
            time.sleep(0.05)

        d._hand_over = slow_hand_over
        calls.clear()
        alone = await d.submit(job(det, 0))
        for i in range(4):  # one part at a time: each the moment the last answer is back
            await d.submit(job(det, i))
        d._hand_over = hand_over
        lone_calls = sorted(set(calls))
        calls.clear()
        probe.gate.clear()  # hold the forwards: the first two jobs are then in forwards at the same time
        jobs = [job(det, i) for i in range(1, 5)]
        tasks = [asyncio.create_task(d.submit(j)) for j in jobs]
        for _ in range(200):
            await asyncio.sleep(0.02)
            if len(calls) >= 2:
                break
        in_flight = list(calls)
        probe.gate.set()
        results = await asyncio.gather(*tasks)
        await d.stop()
        return alone, lone_calls, in_flight, jobs, results

    alone, lone_calls, in_flight, jobs, results = asyncio.run(go())
    assert lone_calls == [("s2amnet-inference", 2)]
    assert sorted(in_flight) == [("s2amnet-inference", 1), ("s2amnet-inference-2", 1)]
    expected = [run_batch(det, [j])[0] for j in [job(det, 0), *jobs]]
    assert [r["defects"] for r in [alone, *results]] == [e["defects"] for e in expected]


def test_one_stream_when_asked(det):
    async def go():
        d = LocalDispatcher({"det": Recording(det)}, dispatcher_settings(cpu_streams=1, torch_threads=2))
        await d.start()
        threads = [t.name for t in d._threads]
        await d.stop()
        return d.streams, threads

    assert asyncio.run(go()) == (1, ["s2amnet-inference"])
