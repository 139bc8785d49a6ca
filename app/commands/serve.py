"""`s2amnet serve`: run the HTTP API (embedded batching, or Redis mode when a Redis URL is set).

Graceful shutdown on SIGTERM/SIGINT: readiness turns false at once and new inspection requests get 503
(+ Retry-After); in-flight requests complete (up to `drain_timeout_s`, and at least `shutdown_delay_s`
passes so load balancers notice); then the listener closes, the dispatcher drains and the process exits
with status 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from app.settings import Settings

log = logging.getLogger("s2amnet.serve")

# (flag, settings field, type, help)
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "interface to bind (S2AMNET_HOST, default 0.0.0.0)"),
    ("--port", "port", int, "port (S2AMNET_PORT, default 8000)"),
    ("--weights-dir", "weights_dir", str, "folder of model folders (S2AMNET_WEIGHTS_DIR, default weights)"),
    ("--models", "models", str, "comma-separated model names to load (S2AMNET_MODELS, default all)"),
    ("--device", "device", str, "cpu, cuda, cuda:N (S2AMNET_DEVICE, default cuda if available)"),
    ("--max-batch-size", "max_batch_size", int, "most images per forward (default 16)"),
    ("--model-max-batch-size", "model_max_batch_size", str,
     "per-model caps below --max-batch-size, name=N,name=N (S2AMNET_MODEL_MAX_BATCH_SIZE)"),
    ("--forward-batch", "forward_batch", str,
     "most images per forward within a batch: N, or auto (measured per model at warm-up on a CPU; "
     "S2AMNET_FORWARD_BATCH, default auto)"),
    ("--max-delay-ms", "max_delay_ms", float, "longest wait for a batch to fill (default 5)"),
    ("--max-queue", "max_queue", int, "backlog per model before 503 (default 256)"),
    ("--request-timeout-s", "request_timeout_s", float, "default request deadline (default 10)"),
    ("--redis-url", "redis_url", str, "Redis URL: Redis Streams mode (default: embedded batching)"),
    ("--api-keys", "api_keys", str, "comma-separated API keys (default: no auth)"),
    ("--torch-threads", "torch_threads", int, "torch intra-op threads (default: torch's choice)"),
    ("--drain-timeout-s", "drain_timeout_s", float, "longest drain on SIGTERM (default 30)"),
    ("--log-level", "log_level", str, "debug, info, warning, error (default info)"),
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP inspection API",
        description="Serve /classify, /detect, /segment, /models, /livez, /readyz, /metrics and /docs. "
        "Every flag overrides the S2AMNET_* environment variable of the same name.",
    )
    for flag, dest, typ, help_ in FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (default 1). With more than one, metrics use prometheus-client "
        "multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a temp folder if unset); mainly "
        "for Redis mode, since each process of embedded mode loads its own models.",
    )
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace) -> Settings:
    from app.settings import settings_from_args

    return settings_from_args(args, [dest for _, dest, _, _ in FLAGS])


class DrainingServer:
    """Factory for a uvicorn.Server subclass (imported lazily so `s2amnet --help` stays fast)."""

    @staticmethod
    def create(config: uvicorn.Config, app: FastAPI, settings: Settings) -> uvicorn.Server:
        import uvicorn

        from app.state import service_state

        state = service_state(app)

        class _Server(uvicorn.Server):
            def __init__(self) -> None:
                super().__init__(config)
                self.exit_code = 0
                self._loop: asyncio.AbstractEventLoop | None = None
                self._draining = False

            async def serve(self, sockets: Any = None) -> None:
                self._loop = asyncio.get_running_loop()
                await super().serve(sockets)

            def startup_failed(self, error: str) -> None:
                log.error("exiting: %s", error)
                self.exit_code = 1
                self.should_exit = True

            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                # Not recorded in _captured_signals: after a clean drain the process exits with 0.
                if self._draining:
                    log.warning("second signal %s: stopping now; requests still in flight get 503",
                                signal.Signals(sig).name)
                    self.exit_code = 1  # not a clean drain
                    if self._loop is None or self._loop.is_closed():
                        self.should_exit = self.force_exit = True
                    else:
                        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._abort()))
                    return
                self._draining = True
                state.draining = True  # /readyz -> 503, new inspection requests -> 503
                log.info("%s: draining (%d in flight)", signal.Signals(sig).name, state.inflight)
                if self._loop is None or self._loop.is_closed():
                    self.should_exit = True
                    return
                self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

            async def _abort(self) -> None:
                """Second signal: every request still waiting for its result is answered 503 (its
                client may retry elsewhere), then the server stops without waiting any longer."""
                dispatcher = state.dispatcher
                if dispatcher is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(dispatcher.stop(drain_timeout=0), 5)
                t0 = time.monotonic()
                while state.inflight > 0 and time.monotonic() - t0 < 2:  # the 503s being written
                    await asyncio.sleep(0.02)
                self.should_exit = True
                self.force_exit = state.inflight > 0  # else a normal stop (lifespan shutdown runs)

            async def _drain(self) -> None:
                t0 = time.monotonic()
                while time.monotonic() - t0 < settings.drain_timeout_s:
                    if state.inflight <= 0 and time.monotonic() - t0 >= settings.shutdown_delay_s:
                        break
                    await asyncio.sleep(0.02)
                if state.inflight > 0:
                    log.warning("drain timeout: %d request(s) still in flight", state.inflight)
                self.should_exit = True

        return _Server()


def run(args: argparse.Namespace) -> int:
    import uvicorn

    settings = build_settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.workers and args.workers > 1:
        return _run_multiprocess(args, settings)

    from app.main import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        timeout_keep_alive=settings.keep_alive_s,
        lifespan="on",
    )
    server = DrainingServer.create(config, app, settings)
    from app.state import service_state

    service_state(app).on_startup_failure = server.startup_failed
    server.run()
    return server.exit_code


def _run_multiprocess(args: argparse.Namespace, settings: Settings) -> int:
    """Several uvicorn worker processes; settings travel as S2AMNET_* variables."""
    import uvicorn

    for _, dest, _, _ in FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            os.environ[f"S2AMNET_{dest.upper()}"] = str(value)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="s2amnet-metrics-")
    uvicorn.run(
        "app.main:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        timeout_keep_alive=settings.keep_alive_s,
    )
    return 0
