"""Graceful shutdown of a real `s2amnet serve` process on SIGTERM."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from apiserver import MODES, start_server
from apitest_helpers import assert_problem, metric, png

DELAY = 2.0


def files(data: bytes):
    return [("file", ("a.png", data, "image/png"))]


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_drains_then_exits_0(mode, weights_dir):
    server = start_server(
        mode,
        weights_dir,
        S2AMNET_MODELS="det",
        S2AMNET_TEST_INFER_DELAY_S=str(DELAY),
        S2AMNET_DRAIN_TIMEOUT_S="20",
    )
    try:
        result: dict = {}
        inflight = threading.Thread(
            target=lambda: result.setdefault(
                "r", httpx.post(server.url + "/detect", files=files(png()), timeout=60)
            ),
            daemon=True,
        )
        inflight.start()
        deadline = time.monotonic() + 20
        while metric(server.metrics(), "s2amnet_inflight_requests") < 1:
            assert time.monotonic() < deadline, "request never got in flight"
            time.sleep(0.02)

        server.proc.send_signal(signal.SIGTERM)
        # readiness goes false at once, while the request is still being computed
        ready = httpx.get(server.url + "/readyz", timeout=5)
        assert_problem(ready, 503, "unavailable")
        assert "shutting down" in ready.json()["detail"]
        assert "retry-after" in ready.headers
        # new work is refused, with a hint to retry (elsewhere)
        refused = httpx.post(server.url + "/detect", files=files(png(seed=1)), timeout=5)
        assert_problem(refused, 503, "unavailable")
        assert inflight.is_alive(), "the in-flight request must still be running here"

        inflight.join(30)
        assert not inflight.is_alive()
        assert result["r"].status_code == 200, result["r"].text  # the in-flight request completed
        assert server.proc.wait(timeout=30) == 0
        log = server.log()
        assert "SIGTERM: draining (1 in flight)" in log
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/livez", timeout=2)
    finally:
        server.stop(signal.SIGKILL, timeout=5)


@pytest.mark.parametrize("mode", MODES)
def test_startup_failure_exits_non_zero(mode, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"name": "broken", "task": "detect"}')
    server = start_server(mode, tmp_path, wait_ready=False)
    try:
        assert server.proc.wait(timeout=60) == 1
        assert "start-up failed" in server.log()
    finally:
        server.stop(signal.SIGKILL, timeout=5)
