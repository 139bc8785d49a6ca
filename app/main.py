"""The FastAPI application: `create_app(settings)`.

Lifespan: start-up runs in the background, so `/livez` answers at once and `/readyz` says 503 until
every model is loaded (`settings.weights_dir`, filtered by `settings.models`), warmed up and the
dispatcher has started. Shutdown: readiness false, new work refused with 503, the dispatcher drains
(up to `drain_timeout_s`) and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors, metrics
from app.dispatch.base import Dispatcher
from app.errors import PROBLEM_JSON, Problem, problem_body
from app.idempotency import IdempotencyStore, InMemoryIdempotencyStore
from app.routes import router
from app.settings import Settings

log = logging.getLogger("s2amnet.api")

__version__ = "0.1.0"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DRAIN_CAP_BYTES = 64 * 1024 * 1024  # body bytes read and discarded after a 413, so the client sees it


# ---------------------------------------------------------------------------------------------- models
def discover_models(settings: Settings) -> list[tuple[str, Path]]:
    """(name, folder) of every model folder to load, in name order; raises on a missing wanted model."""
    return find_model_folders(Path(settings.weights_dir), settings.models)


def find_model_folders(root: Path, wanted: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(name, folder) of the model folders (those with a manifest.json) in ``root``, in name order, only
    the ``wanted`` ones (by manifest name or folder name) if given; RuntimeError names what is missing."""
    if not root.is_dir():
        raise RuntimeError(f"weights folder {str(root)!r} does not exist")
    found: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
        try:
            name = json.loads((folder / "manifest.json").read_text()).get("name") or folder.name
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{folder}/manifest.json is unreadable: {exc}") from exc
        found[str(name)] = folder
    if wanted:
        missing = [m for m in wanted if m not in found and m not in {f.name for f in found.values()}]
        if missing:
            raise RuntimeError(f"models {missing} not found in {str(root)!r} (found: {sorted(found)})")
        found = {n: f for n, f in found.items() if n in wanted or f.name in wanted}
    if not found:
        raise RuntimeError(f"no model folders (with manifest.json) in {str(root)!r}")
    return sorted(found.items())


def load_predictors(settings: Settings) -> dict[str, Any]:
    from model.predictor import Predictor

    device = settings.resolved_device()
    predictors: dict[str, Any] = {}
    for name, folder in discover_models(settings):
        t0 = time.perf_counter()
        predictor = Predictor.from_folder(folder, device=device)
        seconds = time.perf_counter() - t0
        served = str(getattr(predictor, "name", None) or name)
        predictors[served] = predictor
        variant = str(((predictor.manifest or {}).get("arch") or {}).get("variant", ""))
        metrics.MODEL_LOAD_SECONDS.labels(model=served).set(seconds)
        metrics.MODEL_INFO.labels(
            model=served, task=predictor.task, version=str(predictor.version), variant=variant
        ).set(1)
        log.info(
            "loaded %s (%s, %s) from %s on %s in %.2f s",
            served,
            predictor.task,
            variant,
            folder,
            device,
            seconds,
        )
    return predictors


def _load_beside_the_forwards(settings: Settings) -> dict[str, Any]:
    """`load_predictors` on a thread that will not run the forwards: with one torch thread when the forwards
    run on the CPU (see `one_torch_thread`)."""
    from app.runtime import one_torch_thread

    if settings.resolved_device() == "cpu":
        one_torch_thread()
    return load_predictors(settings)


def default_models(predictors: dict[str, Any]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for name in sorted(predictors):
        defaults.setdefault(predictors[name].task, name)
    return defaults


def create_dispatcher(predictors: dict[str, Any], settings: Settings) -> Dispatcher:
    if settings.redis_url:
        from app.dispatch.redis_streams import RedisDispatcher

        return RedisDispatcher(predictors, settings)
    from app.dispatch.local import LocalDispatcher

    return LocalDispatcher(predictors, settings)


def create_idempotency_store(settings: Settings) -> IdempotencyStore:
    if settings.redis_url:
        from app.idempotency_redis import RedisIdempotencyStore

        return RedisIdempotencyStore(settings)
    return InMemoryIdempotencyStore(settings.idempotency_max_entries, int(settings.idempotency_max_mb * 1024 * 1024))


# ---------------------------------------------------------------------------------------------- middleware
def _documented_path(scope: Scope) -> bool:
    """Whether the request's path is one of the API's own (every route path is literal, no parameters)."""
    try:
        return scope.get("path") in scope["app"].openapi()["paths"]
    except Exception:  # noqa: BLE001 - labels must never fail a request
        return False


class RequestContextMiddleware:
    """Request id (X-Request-ID in and out), start time, and the request count / latency metrics."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.time()
        t0 = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["start_time"] = start
        status = 500
        observed = False

        def endpoint() -> str:
            path = getattr(scope.get("route"), "path", None)
            if path is None and _documented_path(scope):  # answered before routing: e.g. an early 413
                path = scope["path"]
            return path or "other"

        async def send_wrapper(message: Message) -> None:
            nonlocal status, observed
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-ID", request_id)
                metrics.REQUEST_DURATION.labels(endpoint=endpoint()).observe(time.perf_counter() - t0)
                observed = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not observed:
                metrics.REQUEST_DURATION.labels(endpoint=endpoint()).observe(time.perf_counter() - t0)
            metrics.REQUESTS.labels(endpoint=endpoint(), status=str(status)).inc()


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 while reading them, never buffering more than the limit.

    A declared Content-Length over the limit is refused before the body is read; a chunked body is counted
    as it arrives and refused as soon as it passes the limit. Up to DRAIN_CAP_BYTES more are read and
    discarded so that an HTTP/1.1 client still sending gets to see the 413 instead of a reset connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _problem(self, scope: Scope) -> JSONResponse:
        request_id = scope.get("state", {}).get("request_id")
        metrics.record_rejection("body_too_large")
        body = problem_body(
            413,
            "body_too_large",
            "Content too large",
            f"request body exceeds the limit of {self.max_bytes} bytes",
            scope.get("path"),
            request_id,
        )
        return JSONResponse(body, status_code=413, media_type=PROBLEM_JSON, headers={"Connection": "close"})

    @staticmethod
    async def _drain(receive: Receive, more: bool) -> None:
        drained = 0
        while more and drained < DRAIN_CAP_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            expect = Headers(scope=scope).get("expect", "").lower()
            if int(declared) <= self.max_bytes + DRAIN_CAP_BYTES and expect != "100-continue":
                await self._drain(receive, True)
            await self._problem(scope)(scope, receive, send)
            return

        received = 0
        limit = self.max_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    await self._drain(receive, message.get("more_body", False))
                    raise Problem(
                        413,
                        "body_too_large",
                        f"request body exceeds the limit of {limit} bytes",
                        title="Content too large",
                        headers={"Connection": "close"},
                    )
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------------- app
async def _startup(app: FastAPI) -> None:
    state = app.state
    settings: Settings = state.settings
    try:
        t0 = time.perf_counter()
        predictors = await asyncio.to_thread(_load_beside_the_forwards, settings)
        state.predictors = predictors
        state.defaults = default_models(predictors)
        dispatcher = create_dispatcher(predictors, settings)
        state.dispatcher = dispatcher
        await dispatcher.start()  # the embedded dispatcher warms every model up on its inference thread
        state.ready = True
        log.info(
            "ready: %d model(s) %s, defaults %s, in %.2f s",
            len(predictors),
            sorted(predictors),
            state.defaults,
            time.perf_counter() - t0,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.startup_error = f"{type(exc).__name__}: {exc}"
        log.error("start-up failed: %s", state.startup_error, exc_info=not isinstance(exc, RuntimeError))
        callback: Callable[[str], None] | None = getattr(state, "on_startup_failure", None)
        if callback is not None:
            callback(state.startup_error)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    settings: Settings = state.settings
    state.decode_limiter = anyio.CapacityLimiter(settings.decode_threads)
    if not settings.api_keys:
        log.warning("S2AMNET_API_KEYS is not set: the API is open to anyone who can reach it")
    if settings.max_queue < settings.max_images:
        log.warning("S2AMNET_MAX_QUEUE (%d) is below S2AMNET_MAX_IMAGES (%d): a request of more images than "
                    "the queue holds may get 503 even on an idle service", settings.max_queue, settings.max_images)
    state.startup_task = asyncio.create_task(_startup(app), name="s2amnet-startup")
    try:
        yield
    finally:
        state.ready = False
        state.draining = True
        task = state.startup_task
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if state.dispatcher is not None:
            await state.dispatcher.stop(settings.drain_timeout_s)
        await state.idempotency.close()
        log.info("stopped")


def _custom_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        problem_ref = {"$ref": "#/components/schemas/ProblemDetails"}
        for path_item in schema.get("paths", {}).values():
            for op in path_item.values():
                for status, response in op.get("responses", {}).items():
                    if not str(status).isdigit() or int(status) < 400:
                        continue
                    content = response.setdefault("content", {})
                    content.pop("application/json", None)
                    content[PROBLEM_JSON] = {"schema": problem_ref}
                    if int(status) == 503:
                        response["headers"] = {
                            "Retry-After": {
                                "description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer"},
                            }
                        }
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        if "ProblemDetails" not in components:
            components["ProblemDetails"] = errors_problem_schema()
        app.openapi_schema = schema
        return schema

    return openapi


def errors_problem_schema() -> dict[str, Any]:
    from app.schemas import ProblemDetails

    return ProblemDetails.model_json_schema()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Swagger UI's scripts and styles are served by this process (/docs-static), not fetched from a CDN
    app = FastAPIOffline(
        title="S2-AMNet defect inspection",
        version=__version__,
        description=(
            "Classify, detect and segment surface defects. Errors are RFC 9457 `application/problem+json`. "
            "When S2AMNET_API_KEYS is set, send `X-API-Key` or `Authorization: Bearer`."
        ),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs-static",
    )
    state = app.state
    state.settings = settings
    state.predictors = None
    state.defaults = {}
    state.dispatcher = None
    state.ready = False
    state.draining = False
    state.startup_error = None
    state.inflight = 0
    state.idempotency = create_idempotency_store(settings)

    errors.install(app, retry_after=settings.retry_after_s)
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)  # outermost: sees every answer, 413s included
    app.openapi = _custom_openapi(app)  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` / several worker processes: settings from S2AMNET_*."""
    return create_app(Settings())
