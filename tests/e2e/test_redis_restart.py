"""Restart test of the Redis mode: redis-server stops and comes back (AOF on a temp dir) during a run.

While it is down the API answers 503 + Retry-After at once and /readyz is 503; when it is back, API and
workers reconnect by themselves (no process is restarted) and requests succeed again; no request hangs
past its deadline meanwhile."""

from __future__ import annotations

import threading
import time

import httpx
from support.harness import group_pending, live_worker_pids, redis_stack
from support.images import png

TIMEOUT_S = 5.0


def post(client: httpx.Client, seed: int) -> tuple[int, float, httpx.Response]:
    t0 = time.monotonic()
    resp = client.post("/classify", files=[("file", ("x.png", png(48, 40, seed=seed), "image/png"))])
    return resp.status_code, time.monotonic() - t0, resp


def wait_status(url: str, status: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url, timeout=2).status_code == status:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{url} never answered {status} within {timeout} s")


def test_redis_stop_and_start_during_a_run(tmp_path, e2e_weights):
    with redis_stack(tmp_path, e2e_weights, workers=2, models="cls",
                     S2AMNET_REQUEST_TIMEOUT_S=str(TIMEOUT_S)) as stack:
        api, workers = stack.api, stack.workers
        pids = {p.name: p.pid for p in [api, *workers]}
        readyz = api.url + "/readyz"

        # background traffic all along: nothing may hang past its deadline, whatever the phase
        background: list[tuple[int, float]] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=api.url, timeout=30) as c:
                seed = 1000
                while not stop.is_set():
                    code, took, _ = post(c, seed)
                    background.append((code, took))
                    seed += 1

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()

        with httpx.Client(base_url=api.url, timeout=30) as c:
            before = [post(c, i) for i in range(10)]
            assert [code for code, _, _ in before] == [200] * 10

            stack.redis.stop()  # SIGTERM: AOF flushed, port closed
            took_unready = wait_status(readyz, 503, 5)
            during = [post(c, 100 + i) for i in range(10)]
            for code, took, resp in during:
                assert code == 503, resp.text
                assert resp.headers["content-type"].startswith("application/problem+json")
                assert "retry-after" in resp.headers
                assert took < 1.0, took  # refused at once, not after a timeout
            assert httpx.get(readyz, timeout=5).status_code == 503

            stack.redis.start()  # same port, same data dir
            took_ready = wait_status(readyz, 200, 15)
            after = [post(c, 200 + i) for i in range(20)]
            assert [code for code, _, _ in after] == [200] * 20, \
                [r.text for _, _, r in after if r.status_code != 200]

        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        # no process was restarted: the same processes are alive and the same workers beat
        assert all(p.alive() for p in [api, *workers]), stack.logs()
        assert {p.name: p.pid for p in [api, *workers]} == pids
        assert live_worker_pids(stack.r()) == {w.pid for w in workers}
        assert stack.redis.starts == 2
        # background requests: answered, refused or timed out -- never hung
        codes = {code for code, _ in background}
        assert codes <= {200, 503, 504}, codes
        assert max(took for _, took in background) < TIMEOUT_S + 2.0
        assert background[-1][0] == 200
        assert group_pending(stack.r(), "cls") == 0
        # and they still shut down cleanly (SIGTERM: drain, finish the batch in hand, exit 0)
        assert set(stack.stop().values()) == {0}, stack.logs()
        print(f"\nrestart test: readyz 503 {took_unready:.2f} s after the stop, 10/10 requests refused in "
              f"<= {max(t for _, t, _ in during) * 1000:.0f} ms, readyz 200 {took_ready:.2f} s after the "
              "start; "
              f"background: {len(background)} requests, statuses {sorted(codes)}, slowest "
              f"{max(t for _, t in background):.2f} s")
