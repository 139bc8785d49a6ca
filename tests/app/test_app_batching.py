"""Dynamic batching, backpressure (503 + Retry-After), deadlines (504, job not computed), readiness."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from support.harness import API_KEY, MAIN_SERVER_ENV, MODES, Server, start_server, wait_ready
from support.images import png
from support.metrics import histogram_buckets, metric, metric_delta
from support.problems import assert_problem


def files(data: bytes):
    return [("file", ("a.png", data, "image/png"))]


def test_concurrent_requests_are_batched(server: Server):
    """16 clients at once: fewer forward passes than requests, some batch > 1, every answer its own."""
    n = 16
    sizes = [(40 + 3 * i, 60 - i) for i in range(n)]
    before = server.metrics()

    async def go():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(
            base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60, limits=limits
        ) as c:
            bodies = [png(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
            return await asyncio.gather(*(c.post("/detect", files=files(b)) for b in bodies))

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * n
    # each answer belongs to its own request (batching never mixes them up)
    assert [(r.json()["image"]["width"], r.json()["image"]["height"]) for r in responses] == sizes
    after = server.metrics()
    buckets_before = histogram_buckets(before, "s2amnet_batch_size", model="det")
    buckets_after = histogram_buckets(after, "s2amnet_batch_size", model="det")
    batches = buckets_after[float("inf")] - buckets_before.get(float("inf"), 0)
    singles = buckets_after[1.0] - buckets_before.get(1.0, 0)
    images = metric(after, "s2amnet_batch_size_sum", model="det") - metric(
        before, "s2amnet_batch_size_sum", model="det"
    )
    assert images == n
    assert batches < n and batches - singles >= 1, (batches, singles)
    delta = metric_delta(before, after)
    assert delta("s2amnet_batches_total", model="det") == batches


# ------------------------------------------------------------------------------------------------------
DELAY = 1.5  # every forward of the slow server sleeps this long first


@pytest.fixture(scope="module", params=MODES)
def slow_server(request, weights_dir, tmp_path_factory) -> Iterator[Server]:
    """One detector whose forwards take >= DELAY s, batches of 1, a queue of 1; multiprocess metrics."""
    mp_dir = tmp_path_factory.mktemp("prom")
    server = start_server(
        request.param,
        weights_dir,
        wait_ready=False,
        S2AMNET_MODELS="det",
        S2AMNET_TEST_INFER_DELAY_S=str(DELAY),
        S2AMNET_MAX_QUEUE="1",
        S2AMNET_MAX_BATCH_SIZE="1",
        S2AMNET_MAX_DELAY_MS="0",
        S2AMNET_RETRY_AFTER_S="3",
        S2AMNET_RECIPES=MAIN_SERVER_ENV["S2AMNET_RECIPES"],  # `lenient` answers a passed deadline with a fail
        PROMETHEUS_MULTIPROC_DIR=str(mp_dir),
        redis_workers=1,  # one inference engine, as in embedded mode: the queue semantics below need it
    )
    server.mp_dir = mp_dir
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Background:
    """A request running in a thread."""

    def __init__(self, url: str, **kw):
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def run():
            try:
                self.response = httpx.post(url, timeout=60, **kw)
            except BaseException as exc:  # noqa: BLE001
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 60) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "request hung"
        if self.error:
            raise self.error
        assert self.response is not None
        return self.response


def gauges(server: Server) -> tuple[float, float]:
    text = server.metrics()
    return metric(text, "s2amnet_inflight_requests"), metric(text, "s2amnet_queue_depth", model="det")


def test_readiness_while_starting(slow_server: Server):
    """/livez answers at once; /readyz and the inspection routes say 503 until warm-up has finished."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(slow_server.url + "/livez", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    ready = httpx.get(slow_server.url + "/readyz")
    if ready.status_code == 200:
        pytest.skip("the server finished its start-up before the first check (machine too slow to see it)")
    body = assert_problem(ready, 503, "unavailable")
    assert "ready" in body["detail"]
    assert int(ready.headers["retry-after"]) == 3
    early = httpx.post(slow_server.url + "/detect", files=files(png()))
    if early.status_code == 200 and httpx.get(slow_server.url + "/readyz").status_code == 200:
        pytest.skip("the start-up ended between the two checks (a loaded machine: the window is ~2 s)")
    assert_problem(early, 503, "unavailable")
    assert early.headers["retry-after"] == "3"
    wait_ready(slow_server)
    assert httpx.get(slow_server.url + "/readyz").json()["status"] == "ready"


def test_full_queue_answers_503_with_retry_after(slow_server: Server):
    wait_ready(slow_server)
    url = slow_server.url + "/detect"
    before = slow_server.metrics()
    first = Background(url, files=files(png(seed=1)))
    wait_for(lambda: gauges(slow_server) == (1, 0), what="first job in its forward pass")
    second = Background(url, files=files(png(seed=2)))
    wait_for(lambda: gauges(slow_server) == (2, 1), what="second job queued")
    third = httpx.post(url, files=files(png(seed=3)))
    body = assert_problem(third, 503, "queue_full")
    assert third.headers["retry-after"] == "3"
    assert "full" in body["detail"]
    assert first.result().status_code == 200
    assert second.result().status_code == 200
    after = slow_server.metrics()
    delta = metric_delta(before, after)
    assert delta("s2amnet_rejected_total", reason="queue_full") == 1
    assert delta("s2amnet_images_total", model="det") == 2


def test_deadline_passes_in_the_queue_504_and_job_is_not_computed(slow_server: Server):
    wait_ready(slow_server)
    url = slow_server.url + "/detect"
    before = slow_server.metrics()
    busy = Background(url, files=files(png(seed=4)))
    wait_for(lambda: gauges(slow_server) == (1, 0), what="a forward in progress")
    t0 = time.monotonic()
    late = httpx.post(url, files=files(png(seed=5)), headers={"X-Request-Timeout": "0.3"})
    elapsed = time.monotonic() - t0
    body = assert_problem(late, 504, "timeout")
    assert "deadline" in body["detail"]
    assert elapsed < DELAY  # answered at its deadline, not when the busy forward ended
    assert busy.result().status_code == 200

    def expired() -> float:
        return metric(slow_server.metrics(), "s2amnet_jobs_expired_total", model="det") - metric(
            before, "s2amnet_jobs_expired_total", model="det"
        )

    wait_for(lambda: expired() == 1, what="the late job to be dropped")
    after = slow_server.metrics()
    delta = metric_delta(before, after)
    assert delta("s2amnet_images_total", model="det") == 1  # only the busy one was computed
    assert delta("s2amnet_batches_total", model="det") == 1
    assert delta("s2amnet_rejected_total", reason="timeout") == 1


def test_deadline_during_the_forward_504_without_waiting_for_it(slow_server: Server):
    wait_ready(slow_server)
    wait_for(lambda: gauges(slow_server) == (0, 0), what="an idle server")
    t0 = time.monotonic()
    resp = httpx.post(
        slow_server.url + "/detect", files=files(png(seed=6)), headers={"X-Request-Timeout": "0.4"}
    )
    assert_problem(resp, 504, "timeout")
    assert time.monotonic() - t0 < DELAY
    wait_for(lambda: gauges(slow_server) == (0, 0), what="the forward to finish")


def test_on_timeout_fail_answers_a_fail_at_the_deadline(slow_server: Server):
    """A line that must never let a part through unseen: with on_timeout=fail a passed deadline is a 200 with
    verdict fail, decided_by timeout and no defects, at the deadline, counted in s2amnet_fail_safe_answers."""
    wait_ready(slow_server)
    wait_for(lambda: gauges(slow_server) == (0, 0), what="an idle server")
    before = slow_server.metrics()
    t0 = time.monotonic()
    resp = httpx.post(slow_server.url + "/detect?on_timeout=fail", files=files(png(w=80, h=48, seed=7)),
                      data={"part_id": "4711"}, headers={"X-Request-Timeout": "0.4"})
    assert time.monotonic() - t0 < DELAY
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["verdict"], body["decided_by"], body["defects"]) == ("fail", "timeout", [])
    assert body["image"] == {"width": 80, "height": 48} and body["part_id"] == "4711"
    assert body["model"]["name"] == "det"
    after = slow_server.metrics()
    assert metric(after, "s2amnet_fail_safe_answers_total", model="det", reason="timeout") - metric(
        before, "s2amnet_fail_safe_answers_total", model="det", reason="timeout") == 1
    wait_for(lambda: gauges(slow_server) == (0, 0), what="the forward to finish")
    ok = httpx.post(slow_server.url + "/detect?on_timeout=fail", files=files(png(seed=8)), timeout=60).json()
    assert ok["decided_by"] == "model"  # inspected: the model decided


@pytest.fixture(scope="module")
def slow_decoding_server(weights_dir) -> Iterator[Server]:
    """One detector whose API decodes one image at a time, each taking >= DELAY s."""
    server = start_server("embedded", weights_dir, S2AMNET_MODELS="det", S2AMNET_DECODE_THREADS="1",
                          S2AMNET_TEST_DECODE_DELAY_S=str(DELAY))
    try:
        yield server
    finally:
        server.stop()


def test_the_deadline_holds_while_images_wait_to_be_decoded(slow_decoding_server: Server):
    """A request whose image waits for a decoding thread gets its 504 (or, with on_timeout=fail, its fail with
    the image's size read from the header) at its deadline, not when the decoding thread is free again; the
    image is then never decoded, and the request that holds the thread is answered as usual."""
    url = slow_decoding_server.url + "/detect"
    before = slow_decoding_server.metrics()
    busy = Background(url, files=files(png(seed=12)))
    wait_for(lambda: metric(slow_decoding_server.metrics(), "s2amnet_inflight_requests") == 1,
             what="an image being decoded")
    t0 = time.monotonic()
    late = httpx.post(url, files=files(png(seed=13)), headers={"X-Request-Timeout": "0.3"})
    assert time.monotonic() - t0 < DELAY
    assert "decoded" in assert_problem(late, 504, "timeout")["detail"]
    t0 = time.monotonic()
    safe = httpx.post(url + "?on_timeout=fail", files=files(png(w=80, h=48, seed=14)),
                      headers={"X-Request-Timeout": "0.3"})
    assert time.monotonic() - t0 < DELAY
    assert safe.status_code == 200, safe.text
    body = safe.json()
    assert (body["verdict"], body["decided_by"], body["image"]) == ("fail", "timeout", {"width": 80, "height": 48})
    # input that is no image is refused for what it is, also when the part is out of time
    junk = httpx.post(url + "?on_timeout=fail", files=[("file", ("a.txt", b"no image", "text/plain"))],
                      headers={"X-Request-Timeout": "0.3"})
    assert_problem(junk, 415, "unsupported_media_type")
    assert busy.result().status_code == 200
    t0 = time.monotonic()
    assert httpx.post(url, files=files(png(seed=15)), timeout=30).status_code == 200
    assert time.monotonic() - t0 < 2 * DELAY  # the two late images were dropped, not decoded before it
    delta = metric_delta(before, slow_decoding_server.metrics())
    assert delta("s2amnet_images_total", model="det") == 2
    assert delta("s2amnet_fail_safe_answers_total", model="det", reason="timeout") == 1


def test_a_recipe_can_make_every_deadline_a_fail(slow_server: Server):
    """The recipe's on_timeout applies to requests that do not say; a request's own on_timeout wins."""
    wait_ready(slow_server)
    for asked, status in ((None, 200), ("error", 504)):
        wait_for(lambda: gauges(slow_server) == (0, 0), what="an idle server")
        params = {"recipe_id": "lenient", **({"on_timeout": asked} if asked else {})}
        resp = httpx.post(slow_server.url + "/detect", params=params, files=files(png(seed=9)),
                          headers={"X-Request-Timeout": "0.4"})
        assert resp.status_code == status, resp.text
        if status == 200:
            body = resp.json()
            assert (body["verdict"], body["decided_by"]) == ("fail", "timeout")
            assert body["recipe"] == {"id": "lenient", "version": "2026-12-01"}
    wait_for(lambda: gauges(slow_server) == (0, 0), what="the forward to finish")


def test_deadline_holds_while_waiting_for_the_same_idempotency_key(slow_server: Server):
    """A retry with the key of a request still running waits for it, but not past its own deadline."""
    wait_ready(slow_server)
    wait_for(lambda: gauges(slow_server) == (0, 0), what="an idle server")
    url = slow_server.url + "/detect"
    key = {"Idempotency-Key": f"lock-deadline-{slow_server.mode}"}
    first = Background(url, files=files(png(seed=11)), headers=key)
    wait_for(lambda: gauges(slow_server)[0] == 1, what="the first request in flight")
    time.sleep(0.2)  # it takes the key's lock as soon as its small body is read
    t0 = time.monotonic()
    retry = httpx.post(url, files=files(png(seed=11)), headers={**key, "X-Request-Timeout": "0.3"}, timeout=30)
    elapsed = time.monotonic() - t0
    body = assert_problem(retry, 504, "timeout")
    assert "Idempotency-Key" in body["detail"] and elapsed < DELAY, (body, elapsed)
    assert first.result().status_code == 200
    again = httpx.post(url, files=files(png(seed=11)), headers=key, timeout=30)  # now a replay
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert again.json()["result_id"] == first.result().json()["result_id"]


def test_a_client_that_hangs_up_is_499_and_its_queued_job_is_not_computed(slow_server: Server):
    """A client that gives up (its own timeout) while its job waits: logged and counted as 499
    client_closed, never as a server error; in embedded mode its job leaves the queue uncomputed."""
    wait_ready(slow_server)
    url = slow_server.url + "/detect"
    assert httpx.post(url, files=files(png(seed=9)), timeout=30).status_code == 200  # the engine is free
    before = slow_server.metrics()
    busy = Background(url, files=files(png(seed=7)))
    wait_for(lambda: gauges(slow_server) == (1, 0), what="a forward in progress")
    for _ in range(50):
        try:
            r = httpx.post(url, files=files(png(seed=8)), timeout=httpx.Timeout(10, read=0.3))
        except httpx.ReadTimeout:  # what the test wants: the client gave up while its job waited
            break
        # Redis mode: the queue-depth gauge is polled, so the busy job may still wait for the worker
        assert r.status_code == 503, r.text
        time.sleep(0.05)
    else:
        pytest.fail("the second request was never queued")
    assert busy.result().status_code == 200

    delta = metric_delta(before, slow_server.metrics)

    wait_for(lambda: delta("s2amnet_requests_total", endpoint="/detect", status="499") == 1,
             what="the hang-up to be counted")
    assert delta("s2amnet_rejected_total", reason="client_closed") == 1
    assert delta("s2amnet_requests_total", endpoint="/detect", status="500") == 0
    assert "unhandled error" not in slow_server.log()
    if slow_server.mode == "embedded":  # Redis mode: the worker's side is tested in tests/e2e
        time.sleep(DELAY + 0.5)  # long enough for its forward, had it been kept
        assert delta("s2amnet_images_total", model="det") == 1  # only the busy request's image
        assert delta("s2amnet_jobs_cancelled_total", model="det") == 1
        assert gauges(slow_server) == (0, 0)


def test_a_client_that_hangs_up_during_its_upload_is_499(slow_server: Server):
    import socket
    from urllib.parse import urlsplit

    wait_ready(slow_server)
    before = slow_server.metrics()
    host = urlsplit(slow_server.url)
    with socket.create_connection((host.hostname, host.port), timeout=5) as sock:
        sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + png(seed=3)[:500])
        time.sleep(0.3)  # the server is reading the body when the client goes

    delta = metric_delta(before, slow_server.metrics)

    wait_for(lambda: delta("s2amnet_requests_total", endpoint="/detect", status="499") == 1,
             what="the hang-up to be counted")
    assert delta("s2amnet_requests_total", endpoint="/detect", status="500") == 0
    assert "unhandled error" not in slow_server.log() and "Exception in ASGI" not in slow_server.log()


def test_metrics_in_multiprocess_mode(slow_server: Server):
    """PROMETHEUS_MULTIPROC_DIR set: values live in mmap files and /metrics merges them."""
    wait_ready(slow_server)
    files_written = sorted(p.name for p in slow_server.mp_dir.iterdir())
    assert any(name.startswith("counter_") for name in files_written), files_written
    assert any(name.startswith("histogram_") for name in files_written), files_written
    assert any(name.startswith("gauge_livesum_") for name in files_written), files_written
    text = slow_server.metrics()
    assert metric(text, "s2amnet_requests_total", endpoint="/readyz", status="200") >= 1
    assert metric(text, "s2amnet_model_info", model="det", task="detect", version="1", variant="tiny") == 1


def test_a_queue_smaller_than_a_request_is_warned_about(slow_server: Server):
    wait_ready(slow_server)  # S2AMNET_MAX_QUEUE=1 with the default 16 images per request
    assert "S2AMNET_MAX_QUEUE (1) is below S2AMNET_MAX_IMAGES (16)" in slow_server.log()
