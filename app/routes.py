"""HTTP routes. Thin: parse and check the request, decode + preprocess images, hand jobs to the
dispatcher, assemble the answer. No tensor is touched here."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from app import metrics
from app.deps import parse_inspect_body, require_api_key
from app.dispatch.base import DeadlineExceeded, Dispatcher, Unavailable
from app.errors import Problem
from app.idempotency import MAX_KEY_LENGTH, fingerprint, scoped_key
from app.openapi import problem_doc
from app.pipeline import ImageLimits, inspect_images, via_dispatcher
from app.schemas import (
    Health,
    InspectionResult,
    InspectOptions,
    JsonInspectRequest,
    ModelInfo,
    ModelsResponse,
)
from app.state import ServiceState, service_state
from model.checkpoint import CARD_FILE

if TYPE_CHECKING:
    from model.predictor import Predictor

router = APIRouter()

TASKS = ("classify", "detect", "segment")
_IDEMPOTENCY_KEY = re.compile(rf"^[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}$")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_doc("Corrupt or unreadable image, invalid base64, malformed multipart body."),
    401: problem_doc("Missing or wrong API key (when S2AMNET_API_KEYS is set)."),
    404: problem_doc("Unknown model, or no model loaded for this task."),
    413: problem_doc("Body, pixel count or number of images over the limit."),
    415: problem_doc("Unsupported Content-Type or file that is not an image."),
    422: problem_doc("Invalid fields or options."),
    503: problem_doc("Overloaded (queue full) or not ready / shutting down; see Retry-After."),
    504: problem_doc("The request deadline passed before a result was ready."),
}


def _body_doc() -> dict[str, Any]:
    """The inspection routes' body and query parameters for the OpenAPI document. The options are read
    from the query by `parse_inspect_body` (with the body's), not by FastAPI: declared as a query model in
    the endpoint's signature, they would make FastAPI inspect that model's annotations on every request."""
    fields = InspectOptions.model_json_schema()["properties"]
    query = [{"name": name, "in": "query", "required": False, "schema": schema,
              "description": schema.get("description", "")} for name, schema in fields.items()]
    multipart = {
        "type": "object",
        "properties": {
            "file": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "minItems": 1,
                "description": "One or several images (repeat the `file` part); answered in order.",
            },
            **fields,
        },
        "required": ["file"],
    }
    return {
        "parameters": query,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": multipart,
                    "encoding": {"file": {"contentType": "image/*"}},
                },
                "application/json": {"schema": JsonInspectRequest.model_json_schema()},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


def _dispatcher(state: ServiceState) -> Dispatcher:
    if state.dispatcher is None:  # not started yet (`inspect` checks readiness first)
        raise Unavailable("service is not ready", state.settings.retry_after_s)
    return state.dispatcher


def _model_for(request: Request, task: str, name: str | None) -> Predictor:
    state = service_state(request.app)
    predictors = state.predictors or {}
    if name is None:
        default = state.defaults.get(task)
        if default is None:
            raise Problem(404, "unknown_model", f"no {task} model is loaded", title="Unknown model")
        return predictors[default]
    predictor = predictors.get(name)
    if predictor is None:
        known = ", ".join(n for n, p in predictors.items() if p.task == task) or "none"
        raise Problem(
            404,
            "unknown_model",
            f"no model named {name!r} (loaded {task} models: {known})",
            title="Unknown model",
        )
    if predictor.task != task:
        raise Problem(
            404,
            "unknown_model",
            f"model {name!r} is a {predictor.task} model; use POST /{predictor.task}",
            title="Unknown model",
        )
    return predictor


async def _unless_client_gone(request: Request, work: Any, poll_s: float = 0.25) -> Any:
    """Await `work` (a coroutine), cancelling it when the client disconnects: its jobs then leave their
    queues without being computed (the server never cancels a handler by itself), and ClientDisconnect
    ends the request (answered 499 in the logs and metrics; nobody is there to read it)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnect()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _compute(request: Request, task: str, body: bytes, deadline: float) -> Any:
    state = service_state(request.app)
    settings = state.settings
    parsed = await parse_inspect_body(request, body, settings.max_images)
    predictor = _model_for(request, task, parsed.options.model)
    options = parsed.options
    decision = state.recipes.decide(options.recipe_id, predictor, options.on_timeout) if state.recipes else None
    results = await inspect_images(
        predictor, parsed.images, options, via_dispatcher(_dispatcher(state)),
        limits=ImageLimits(settings.max_pixels, settings.min_image_side), deadline=deadline,
        request_id=request.state.request_id, started=request.state.start_time, decoder=state.decoder,
        decision=decision, outlets=state.outlets,
    )
    return results[0] if parsed.single else results


async def inspect(
    request: Request, task: str, timeout_s: float | None, idempotency_key: str | None
) -> Response:
    state = service_state(request.app)
    settings = state.settings
    if not state.ready or state.draining:
        raise Unavailable(
            "service is not ready" if not state.ready else "service is shutting down", settings.retry_after_s
        )
    timeout = settings.request_timeout_s if timeout_s is None else min(settings.request_timeout_s, timeout_s)
    deadline = request.state.start_time + timeout

    state.inflight += 1
    metrics.INFLIGHT.inc()
    try:
        body = await request.body()  # bounded by the body-limit middleware while it is read
        if not idempotency_key:
            return JSONResponse(await _unless_client_gone(request, _compute(request, task, body, deadline)))

        if not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise Problem(
                422,
                "invalid_request",
                "Idempotency-Key must be 1-255 printable ASCII characters",
                title="Invalid request",
            )
        store = state.idempotency
        key = scoped_key(idempotency_key, getattr(request.state, "principal", None), task)
        fp = fingerprint(
            request.method, request.url.path, request.url.query, request.headers.get("content-type", ""), body
        )
        async with contextlib.AsyncExitStack() as held:
            try:  # an earlier request with this key may still run: wait for it, but not past our deadline
                async with asyncio.timeout(max(0.0, deadline - time.time())):
                    await held.enter_async_context(store.lock(key))
            except TimeoutError:
                raise DeadlineExceeded("the request deadline passed while an earlier request with the same "
                                       "Idempotency-Key was still running") from None
            entry = await store.get(key)
            if entry is not None:
                if entry["fingerprint"] != fp:
                    raise Problem(
                        422,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used for a different request",
                        title="Idempotency-Key reused",
                    )
                return JSONResponse(
                    entry["body"],
                    status_code=entry.get("status", 200),
                    headers={"Idempotent-Replayed": "true"},
                )
            answer = await _unless_client_gone(request, _compute(request, task, body, deadline))
            await store.put(
                key, {"fingerprint": fp, "status": 200, "body": answer}, settings.idempotency_ttl_s
            )
            return JSONResponse(answer)
    finally:
        state.inflight -= 1
        metrics.INFLIGHT.dec()


def _add_inspect_route(task: str) -> None:
    descriptions = {
        "classify": "Classify each image: `verdict`, the failing label (if any) in `defects`, and `top_k`.",
        "detect": "Detect defects: label, score, box and area in original image pixels.",
        "segment": "Segment defects: one entry per connected defect region with box, area and mask.",
    }

    async def endpoint(
        request: Request,
        _key: Annotated[str | None, Depends(require_api_key)],
        x_request_timeout: Annotated[
            float | None,
            Header(gt=0, le=3600, description="Deadline in seconds; lowers S2AMNET_REQUEST_TIMEOUT_S."),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=MAX_KEY_LENGTH,
                description="Repeat a request with the same key to get the stored answer.",
            ),
        ] = None,
    ) -> Any:
        return await inspect(request, task, x_request_timeout, idempotency_key)

    endpoint.__name__ = task
    router.add_api_route(
        f"/{task}",
        endpoint,
        methods=["POST"],
        response_model=InspectionResult | list[InspectionResult],
        summary=f"{task.capitalize()} images",
        description=descriptions[task]
        + (
            "\n\nOne image (`file` sent once, JSON `image`, or a raw image body) is answered with one "
            "result object; several images (`file` repeated, or JSON `images`) with a list of results in "
            "request order. All images of a request use the same model and options; if any image is "
            "rejected, the whole request is."
        ),
        responses=ERROR_RESPONSES,
        openapi_extra=_body_doc(),
        tags=["inspection"],
        operation_id=task,
    )


for _task in TASKS:
    _add_inspect_route(_task)


@router.get(
    "/models",
    response_model=ModelsResponse,
    tags=["service"],
    responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]},
)
async def models(request: Request, _key: Annotated[str | None, Depends(require_api_key)]) -> Any:
    """The loaded models: task, classes, input size, version, and the metrics from their manifest."""
    state = service_state(request.app)
    if state.predictors is None:
        raise Unavailable("models are still loading", state.settings.retry_after_s)
    out = []
    for name, p in state.predictors.items():
        manifest = p.manifest or {}
        arch = manifest.get("arch", {}) or {}
        out.append(
            ModelInfo(
                name=name,
                task=p.task,
                version=str(p.version),
                variant=arch.get("variant"),
                classes=list(p.classes),
                input_size=[int(v) for v in p.input_size],
                tta=list(p.tta),
                default=state.defaults.get(p.task) == name,
                nms_iou=p.nms_iou if p.task == "detect" else None,
                verdict=manifest.get("verdict"),
                metrics=manifest.get("metrics"),
                trained_on=manifest.get("trained_on"),
                card=f"/models/{name}/card" if _card_path(p) else None,
            )
        )
    return ModelsResponse(models=out)


def _card_path(predictor: Predictor) -> Path | None:
    path = predictor.folder / CARD_FILE if predictor.folder is not None else None
    return path if path is not None and path.is_file() else None


@router.get(
    "/models/{name}/card",
    tags=["service"],
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/markdown": {}}}, 401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404],
               503: ERROR_RESPONSES[503]},
)
async def model_card(request: Request, name: str, _key: Annotated[str | None, Depends(require_api_key)]) -> Any:
    """The model card of a loaded model (Markdown): its data and split, recipe, figures and known limits."""
    state = service_state(request.app)
    if state.predictors is None:
        raise Unavailable("models are still loading", state.settings.retry_after_s)
    predictor = state.predictors.get(name)
    path = _card_path(predictor) if predictor is not None else None
    if path is None:
        raise Problem(404, "not_found", f"no model card for {name!r}" if predictor else f"no model named {name!r}")
    return PlainTextResponse(path.read_text(encoding="utf-8"), media_type="text/markdown; charset=utf-8")


@router.api_route("/livez", methods=["GET", "HEAD"], response_model=Health, tags=["service"])
async def livez() -> Any:
    """The process is up and its event loop answers (GET or HEAD, for load balancers that probe so)."""
    return Health(status="alive")


@router.api_route("/readyz", methods=["GET", "HEAD"], response_model=Health, tags=["service"],
                  responses={503: ERROR_RESPONSES[503]})
async def readyz(request: Request) -> Any:
    """200 once every model is loaded and warmed up and the dispatcher is ready; 503 before that, while
    shutting down, or when the backend is unreachable."""
    state = service_state(request.app)
    if state.draining:
        raise Unavailable("shutting down", state.settings.retry_after_s)
    if state.startup_error:
        raise Unavailable(f"startup failed: {state.startup_error}", state.settings.retry_after_s)
    if not state.ready or state.dispatcher is None or not state.dispatcher.ready():
        raise Unavailable("not ready: models loading or backend unreachable", state.settings.retry_after_s)
    return Health(status="ready", models=list(state.predictors or {}),
                  integrations=state.outlets.health() if state.outlets else None)


@router.get(
    "/metrics",
    tags=["service"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics (merged over processes in multiprocess mode)."""
    state = service_state(request.app)
    if state.dispatcher is not None:
        for name in state.predictors or {}:
            metrics.QUEUE_DEPTH.labels(model=name).set(state.dispatcher.queue_depth(name))
    body, content_type = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=content_type)
