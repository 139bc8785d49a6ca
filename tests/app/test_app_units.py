"""In-process tests of the parts behind the routes: run_batch, LocalDispatcher, settings, metrics,
idempotency store. Real tiny models, no mocks of the model."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from apitest_helpers import metric, pattern

from app import metrics
from app.dispatch.base import DeadlineExceeded, Job, JobFailed, QueueFull, Unavailable, UnknownModel
from app.dispatch.local import LocalDispatcher
from app.idempotency import InMemoryIdempotencyStore, fingerprint
from app.inference import raise_for_result, run_batch
from app.settings import Settings, settings_from_args

ROOT = Path(__file__).resolve().parents[2]


class Recording:
    """Wraps a real Predictor: records the thread and batch size of every infer call; can be held."""

    def __init__(self, predictor):
        self.p = predictor
        self.calls: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def __getattr__(self, name):
        return getattr(self.p, name)

    def infer(self, arrays):
        self.calls.append((threading.current_thread().name, len(arrays)))
        self.gate.wait(30)
        if self.fail:
            raise RuntimeError("boom")
        return self.p.infer(arrays)


@pytest.fixture(scope="module")
def det(weights_dir):
    from model.predictor import Predictor

    return Predictor.from_folder(weights_dir / "det")


def job(predictor, seed: int = 0, deadline_in: float = 30.0, **options) -> Job:
    s = predictor.preprocess(pattern(60 + seed, 40, seed))
    opts = {"conf": 0.0, "iou": 0.7, "max_det": 5, "top_k": 5, "mask_format": "rle", **options}
    return Job(
        model=predictor.name, array=s.array, meta=s.meta, options=opts, deadline=time.time() + deadline_in
    )


def registry_text() -> str:
    return metrics.render()[0].decode()


# ------------------------------------------------------------------------------------------- run_batch
def test_run_batch_drops_expired_jobs_without_computing_them(det):
    rec = Recording(det)
    jobs = [job(det, 0), job(det, 1, deadline_in=-1), job(det, 2)]
    before = registry_text()
    results = run_batch(rec, jobs)
    assert rec.calls == [(threading.current_thread().name, 2)]  # one forward, the two live jobs only
    assert results[1]["error"] == "expired"
    for i in (0, 2):
        assert results[i]["image"] == {"width": 60 + i, "height": 40} and results[i]["task"] == "detect"
        assert set(results[i]["timing_ms"]) == {"queue", "inference"}
    after = registry_text()
    assert (
        metric(after, "s2amnet_jobs_expired_total", model="det")
        - metric(before, "s2amnet_jobs_expired_total", model="det")
        == 1
    )
    assert (
        metric(after, "s2amnet_batch_size_sum", model="det")
        - metric(before, "s2amnet_batch_size_sum", model="det")
        == 2
    )
    assert (
        metric(after, "s2amnet_images_total", model="det", task="detect")
        - metric(before, "s2amnet_images_total", model="det", task="detect")
        == 2
    )
    with pytest.raises(DeadlineExceeded):
        raise_for_result(results[1])
    assert raise_for_result(results[0]) is results[0]


def test_run_batch_results_equal_one_by_one(det):
    jobs = [job(det, i) for i in range(3)]
    together = run_batch(det, jobs)
    alone = [run_batch(det, [j])[0] for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert a["defects"] == b["defects"] and a["verdict"] == b["verdict"]


def test_run_batch_all_expired_and_failures(det):
    rec = Recording(det)
    assert [r["error"] for r in run_batch(rec, [job(det, deadline_in=-1)] * 2)] == ["expired"] * 2
    assert rec.calls == []
    rec.fail = True
    results = run_batch(rec, [job(det), job(det, 1)])
    assert [r["error"] for r in results] == ["failed", "failed"] and "boom" in results[0]["detail"]
    with pytest.raises(JobFailed):
        raise_for_result(results[0])


# ------------------------------------------------------------------------------------------- dispatcher
def model_sample(name: str, model: str, default: float | None = None) -> float | None:
    """The value of metric sample ``name{model=...}`` in this process's registry (``default`` if absent)."""
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, {"model": model})
    return default if value is None else value


def dispatcher_settings(**kw) -> Settings:
    base = {"max_batch_size": 4, "max_delay_ms": 100, "max_queue": 8, "warmup": True}
    base.update(kw)
    return Settings(**base)


def test_dispatcher_batches_on_one_long_lived_thread(det):
    rec = Recording(det)

    async def go():
        d = LocalDispatcher({"det": rec}, dispatcher_settings())
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
        d = LocalDispatcher({"seg": slow, "det": fast}, dispatcher_settings(model_max_batch_size="seg=2"))
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
    """S2AMNET_FORWARD_BATCH: N → batches still fill up to max_batch_size, but no forward sees more than N
    images; auto on a CPU → measured at warm-up (a size up to the batch cap); auto without warm-up → whole
    batches. Each exported as s2amnet_forward_batch_size{model}."""
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
        before = batches("fb2")
        results = asyncio.run(serve("fb2", p, 6, forward_batch="2", warmup=False))
        forwards = list(sizes)
    finally:
        hook.remove()
    assert all("defects" in r for r in results)
    assert p.forward_batch == 2 and gauge("fb2") == 2
    assert sum(forwards) == 6 and max(forwards) == 2
    assert batches("fb2") - before < len(forwards)  # a batch of more than 2 images ran as several forwards
    expected = [run_batch(det, [replace(job(det, i), model="fb2")])[0] for i in range(6)]
    assert [r["defects"] for r in results] == [e["defects"] for e in expected]

    q = Predictor(det.model, det.manifest)
    asyncio.run(serve("fbauto", q, 1, warmup=True))  # default: auto
    assert q.forward_batch in (1, 2, 4) and gauge("fbauto") == q.forward_batch  # max_batch_size 4
    r = Predictor(det.model, det.manifest)
    asyncio.run(serve("fbcold", r, 1, warmup=False))
    assert r.forward_batch is None and gauge("fbcold") == 4


@pytest.mark.parametrize("fmt", ["rle", "polygon", "png"])
def test_a_mask_cropped_to_its_box_encodes_like_the_full_mask(fmt):
    from app.inference import encode_mask

    full = np.zeros((40, 60), bool)
    full[7:19, 30:52] = np.random.default_rng(0).random((12, 22)) > 0.4
    full[7, 30] = full[18, 51] = True  # the box is tight
    assert encode_mask(full[7:19, 30:52], fmt, (30.0, 7.0), (40, 60)) == encode_mask(full, fmt)


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


# ------------------------------------------------------------------------------------------- settings
def test_settings_env_csv_and_cli_override(monkeypatch):
    monkeypatch.setenv("S2AMNET_MODELS", "a, b,,c")
    monkeypatch.setenv("S2AMNET_API_KEYS", "k1,k2")
    monkeypatch.setenv("S2AMNET_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("S2AMNET_PORT", "9000")
    s = Settings()
    assert s.models == ["a", "b", "c"] and s.api_keys == ["k1", "k2"] and s.max_batch_size == 32
    assert s.max_body_bytes == 20 * 1024 * 1024 and s.max_pixels == 40_000_000 and s.max_images == 16

    class Args:
        port = 8123
        models = "x"
        max_batch_size = None

    s = settings_from_args(Args())
    assert (s.port, s.models, s.max_batch_size) == (8123, ["x"], 32)  # flag > env > default
    monkeypatch.setenv("S2AMNET_MAX_QUEUE", "0")
    with pytest.raises(ValueError):
        Settings()


def test_settings_per_model_batch_caps(monkeypatch):
    monkeypatch.setenv("S2AMNET_MODEL_MAX_BATCH_SIZE", "crack-segment=1, mt-segment = 4")
    s = Settings(max_batch_size=8)
    assert s.model_max_batch_size == {"crack-segment": 1, "mt-segment": 4}
    assert s.batch_sizes(["crack-segment", "mt-segment", "neu-det-detect"]) == {
        "crack-segment": 1, "mt-segment": 4, "neu-det-detect": 8}
    assert Settings(max_batch_size=2).batch_sizes(["mt-segment"], strict=False) == {"mt-segment": 2}  # never above
    with pytest.raises(RuntimeError, match="crack-segment"):
        s.batch_sizes(["mt-segment"])
    for bad in ("crack-segment", "crack-segment=0", "=3", "a=x"):
        monkeypatch.setenv("S2AMNET_MODEL_MAX_BATCH_SIZE", bad)
        with pytest.raises(ValueError):
            Settings()
    monkeypatch.delenv("S2AMNET_MODEL_MAX_BATCH_SIZE")
    assert Settings().model_max_batch_size == {}


def test_settings_defaults_match_the_design():
    s = Settings(_env_file=None)
    assert (
        s.host,
        s.port,
        str(s.weights_dir),
        s.models,
        s.max_batch_size,
        s.max_delay_ms,
        s.max_queue,
        s.request_timeout_s,
        s.redis_url,
        s.api_keys,
        s.max_body_mb,
        s.max_pixels,
        s.max_images,
        s.metrics_port,
    ) == ("0.0.0.0", 8000, "weights", [], 16, 5.0, 256, 10.0, None, [], 20.0, 40_000_000, 16, 9100)


# ------------------------------------------------------------------------------------------- metrics
def test_every_metric_of_the_interface_is_defined_once():
    spec = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = spec.split("## app/metrics.py", 1)[1].split("\n", 1)[1].split("\n## ", 1)[0]
    section = re.sub(r"\(buckets[^)]*\)", "", section)
    section = re.sub(r"\{[^}]*\}", lambda m: m.group(0).replace(",", ";"), section)
    listed = []
    for item in section.replace("\n", " ").split(","):
        m = re.fullmatch(r"\s*([a-z_]+)(?:\{([a-z_;]*)\})?\s*\.?\s*", item)
        assert m, item
        listed.append((m.group(1), [x for x in (m.group(2) or "").split(";") if x]))
    assert len(listed) == 22 and ("inflight_requests", []) in listed
    from prometheus_client.metrics import MetricWrapperBase

    defined = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    by_name = {m._name: m for m in defined}
    assert len(by_name) == len(defined) == 22  # each defined once, nothing else
    for name, labels in listed:
        full = "s2amnet_" + name
        m = by_name.get(full[: -len("_total")] if full.endswith("_total") else full)
        assert m is not None, f"{full} is not defined"
        assert list(m._labelnames) == labels, (full, m._labelnames)
        if full.endswith("_total"):
            assert m._type == "counter", full
        elif name.endswith("_seconds") and "timestamp" not in name and "load" not in name:
            assert m._type == "histogram", full
    assert metrics.BATCH_SIZE._upper_bounds[:-1] == [1, 2, 4, 8, 16, 32, 64]


def test_multiprocess_mode_merges_processes(tmp_path):
    import subprocess
    import sys

    code = (
        "from app import metrics\n"
        "metrics.REQUESTS.labels(endpoint='/detect', status='200').inc()\n"
        "metrics.BATCH_SIZE.labels(model='m').observe(4)\n"
        "metrics.QUEUE_DEPTH.labels(model='m').set(3)\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    pids = []
    for _ in range(2):  # two processes
        proc = subprocess.run(
            [sys.executable, "-c", code + "import os; print(os.getpid())"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        pids.append(int(proc.stdout))

    def render(dead=()) -> str:
        mark = "".join(f"metrics.mark_process_dead({pid})\n" for pid in dead)
        return subprocess.run(
            [sys.executable, "-c", f"from app import metrics\n{mark}print(metrics.render()[0].decode())"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    out = render()
    assert metric(out, "s2amnet_requests_total", endpoint="/detect", status="200") == 2
    assert metric(out, "s2amnet_batch_size_count", model="m") == 2
    assert metric(out, "s2amnet_queue_depth", model="m") == 6  # livesum over the two processes
    out = render(dead=pids)  # what a supervisor does when its children exit
    assert metric(out, "s2amnet_queue_depth", model="m") == 0
    assert metric(out, "s2amnet_requests_total", endpoint="/detect", status="200") == 2  # counters stay


def test_multiprocess_queue_depth_is_the_max_in_redis_mode(tmp_path):
    """Redis mode: every API process polls the same stream backlog, so two processes that each see
    3 waiting jobs mean 3 jobs (max), not 6 (the embedded mode's sum, tested above)."""
    import subprocess
    import sys

    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "S2AMNET_REDIS_URL": "redis://127.0.0.1:1/0"}
    for depth in (3, 2):  # two processes, polled a moment apart
        subprocess.run([sys.executable, "-c", f"from app import metrics\n"
                        f"metrics.QUEUE_DEPTH.labels(model='m').set({depth})\n"],
                       env=env, cwd=ROOT, check=True)
    out = subprocess.run([sys.executable, "-c", "from app import metrics\nprint(metrics.render()[0].decode())"],
                         env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert metric(out, "s2amnet_queue_depth", model="m") == 3


# ------------------------------------------------------------------------------------------- idempotency
def test_in_memory_idempotency_store_ttl_bound_and_lock():
    async def go():
        store = InMemoryIdempotencyStore(max_entries=3)
        await store.put("a", {"v": 1}, ttl_s=0.05)
        assert (await store.get("a")) == {"v": 1}
        await asyncio.sleep(0.08)
        assert await store.get("a") is None
        for k in "bcde":
            await store.put(k, {"v": k}, ttl_s=60)
        assert len(store) == 3 and await store.get("b") is None and await store.get("e") == {"v": "e"}

        order = []

        async def worker(i):
            async with store.lock("same"):
                order.append(("in", i))
                await asyncio.sleep(0.01)
                order.append(("out", i))

        await asyncio.gather(*(worker(i) for i in range(3)))
        assert all(order[j][0] == "in" and order[j + 1][0] == "out" for j in range(0, 6, 2))
        assert store._locks == {}

    asyncio.run(go())


def test_in_memory_idempotency_store_is_bounded_by_bytes():
    """Big answers (16 images of masks) are evicted by size, oldest first, whatever the entry bound."""

    async def go():
        store = InMemoryIdempotencyStore(max_entries=10_000, max_bytes=10_000)
        big = {"status": 200, "body": [{"mask": "x" * 3000}]}
        for k in "abcd":
            await store.put(k, big, ttl_s=60)
        assert len(store) == 3 and store.bytes <= 10_000
        assert await store.get("a") is None and await store.get("d") == big  # a JSON round trip
        await store.put("huge", {"body": "y" * 20_000}, ttl_s=60)  # larger than the bound: not kept
        assert await store.get("huge") is None and store.bytes <= 10_000
        await store.put("d", {"v": 1}, ttl_s=60)
        await store.put("d", {"v": 22}, ttl_s=60)  # replacing an entry frees its bytes
        assert len(store) == 1 and store.bytes == len(b'{"v":22}')

    asyncio.run(go())


def test_fingerprint_ignores_the_multipart_boundary():
    a = fingerprint("POST", "/detect", "", "multipart/form-data; boundary=AAA", b"--AAA\r\nx\r\n--AAA--")
    b = fingerprint("POST", "/detect", "", "multipart/form-data; boundary=BBB", b"--BBB\r\nx\r\n--BBB--")
    c = fingerprint("POST", "/detect", "", "multipart/form-data; boundary=BBB", b"--BBB\r\ny\r\n--BBB--")
    assert a == b != c
    d = fingerprint("POST", "/detect", "", 'multipart/form-data; boundary="CCC"; charset=utf-8',
                    b"--CCC\r\nx\r\n--CCC--")  # quoted, with a parameter after it
    assert d == a


# ------------------------------------------------------------------------------------------- runtime
def test_allocator_tuning_applies_on_glibc_and_yields_to_the_environment(monkeypatch):
    import platform

    from app import runtime

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert runtime.tune_allocator() is (platform.libc_ver()[0] == "glibc")  # mallopt accepted both values
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the operator's own setting wins
    assert runtime.tune_allocator() is False


def test_configure_runtime_follows_the_settings(monkeypatch):
    from app import runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(runtime, "configure_torch_threads", lambda n: calls.append(("threads", n)))
    runtime.configure_runtime(Settings(torch_threads=3))
    runtime.configure_runtime(Settings(allocator_tuning=False))
    assert calls == [("threads", 3), "tuned", ("threads", None)]


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


def test_device_auto_is_cuda_only_when_torch_sees_a_gpu(monkeypatch):
    import torch

    from model.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == Settings().resolved_device() == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        Settings(device="cuda:0").resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings().resolved_device() == "cuda" and Settings(device="cuda:1").resolved_device() == "cuda:1"


def test_serve_and_worker_flags_come_from_the_settings():
    """Each flag of `s2amnet serve` / `s2amnet worker` is a Settings field: its help is the field's
    description, its value is parsed like the environment's."""
    from app.cli import build_parser
    from app.settings import SERVE_FLAGS, WORKER_FLAGS

    parser = build_parser()
    args = parser.parse_args(["serve", "--port", "8123", "--max-delay-ms", "2.5", "--models", "a,b",
                              "--forward-batch", "auto", "--model-max-batch-size", "a=2", "--torch-threads", "2"])
    s = settings_from_args(args, SERVE_FLAGS)
    assert (s.port, s.max_delay_ms, s.models, s.forward_batch, s.model_max_batch_size, s.torch_threads) == (
        8123, 2.5, ["a", "b"], "auto", {"a": 2}, 2)
    args = parser.parse_args(["worker", "--visibility-timeout", "4", "--max-deliveries", "5", "--name", "w1"])
    s = settings_from_args(args, WORKER_FLAGS)
    assert (s.visibility_timeout_s, s.max_deliveries, args.name) == (4.0, 5, "w1")
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command, names in (("serve", SERVE_FLAGS), ("worker", WORKER_FLAGS)):
        helps = {a.dest: a.help for a in sub[command]._actions}
        for name in names:
            assert helps[name].startswith(Settings.model_fields[name].description.replace("%", "%%")), name
