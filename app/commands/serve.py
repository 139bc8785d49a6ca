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

from app.commands import add_service_flags, positive_int

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from app.settings import Settings

log = logging.getLogger("s2amnet.serve")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP inspection API",
        description="Serve /classify, /detect, /segment, /models, /livez, /readyz, /metrics and /docs. "
        "Every flag overrides the S2AMNET_* environment variable of the same name.",
    )
    add_service_flags(p, "serve")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="API processes (default 1). With more than one, metrics use prometheus-client "
        "multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a temp folder if unset); mainly "
        "for Redis mode, since each process of embedded mode loads its own models.",
    )
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace) -> Settings:
    from app.settings import SERVE_FLAGS, settings_from_args  # noqa: PLC0415

    return settings_from_args(args, SERVE_FLAGS)


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
    from app.runtime import freeze_startup_objects
    from app.state import service_state

    service_state(app).on_startup_failure = server.startup_failed
    service_state(app).on_ready = freeze_startup_objects
    server.run()
    return server.exit_code


def _run_multiprocess(args: argparse.Namespace, settings: Settings) -> int:
    """Several uvicorn worker processes; settings travel as S2AMNET_* variables."""
    import uvicorn

    from app.settings import SERVE_FLAGS  # noqa: PLC0415

    for dest in SERVE_FLAGS:
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
