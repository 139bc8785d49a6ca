"""The FastAPI application, `create_app(settings)`: wiring only. Start-up runs in the background, so `/livez`
answers at once and `/readyz` says 503 until every model is loaded (`app.models`), warmed up and the
dispatcher has started. Shutdown: readiness false, new work refused with 503, the dispatcher drains (up to
`drain_timeout_s`) and stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app import console, errors
from app.dispatch import create_dispatcher
from app.idempotency import create_store
from app.line import create_outlets
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.models import default_models, load_beside_the_forwards
from app.openapi import custom_openapi
from app.recipes import RecipeBook, RecipeError
from app.results_api import router as results_router
from app.routes import router
from app.settings import Settings
from app.state import ServiceState, service_state

log = logging.getLogger("s2amnet.api")

__version__ = "0.1.0"


async def _startup(app: FastAPI) -> None:
    state = service_state(app)
    settings = state.settings
    try:
        t0 = time.perf_counter()
        predictors = await asyncio.to_thread(load_beside_the_forwards, settings)
        state.predictors = predictors
        state.defaults = default_models(predictors)
        recipes = RecipeBook(settings.recipes, predictors)
        recipes.load()  # a bad recipe file stops start-up (a reload keeps the recipes in force instead)
        await recipes.watch()
        state.recipes = recipes
        outlets = create_outlets(settings)
        await outlets.start()
        state.outlets = outlets
        dispatcher = create_dispatcher(predictors, settings)
        state.dispatcher = dispatcher
        await dispatcher.start()  # the embedded dispatcher warms every model up on its inference thread
        if state.on_ready is not None:
            state.on_ready()
        state.ready = True
        log.info("ready: %d model(s) %s, defaults %s, in %.2f s", len(predictors), sorted(predictors),
                 state.defaults, time.perf_counter() - t0)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.startup_error = f"{type(exc).__name__}: {exc}"
        log.error("start-up failed: %s", state.startup_error,
                  exc_info=not isinstance(exc, RuntimeError | RecipeError))
        if state.on_startup_failure is not None:
            state.on_startup_failure(state.startup_error)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    state = service_state(app)
    settings = state.settings
    state.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
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
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if state.dispatcher is not None:
            await state.dispatcher.stop(settings.drain_timeout_s)
        if state.outlets is not None:  # after the drain: the last answers are recorded and published too
            await state.outlets.stop(settings.drain_timeout_s)
        if state.recipes is not None:
            await state.recipes.close()
        await state.idempotency.close()
        state.decoder.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")


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
    app.state.service = ServiceState(settings=settings, idempotency=create_store(settings))

    errors.install(app, retry_after=settings.retry_after_s)
    app.include_router(router)
    app.include_router(results_router)  # the inspection records, GET /results
    app.include_router(console.router)  # the inspection console at /
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)  # outermost: sees every answer, 413s included
    app.openapi = custom_openapi(app)  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` / several worker processes: settings from S2AMNET_*; each process
    freezes its start-up objects once ready (`app.runtime.freeze_startup_objects`), as `s2amnet serve` does."""
    from app.runtime import freeze_startup_objects

    app = create_app(Settings())
    service_state(app).on_ready = freeze_startup_objects
    return app
