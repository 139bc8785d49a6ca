"""ASGI middlewares of the API: request context (request id, request metrics) and the body-size limit."""

from __future__ import annotations

import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import PROBLEM_JSON, Problem, problem_body

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DRAIN_CAP_BYTES = 64 * 1024 * 1024  # body bytes read and discarded after a 413, so the client sees it


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
