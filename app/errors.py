"""RFC 9457 problem details for every error the API returns (`application/problem+json`).

Body: `type` (a URN naming the problem), `title`, `status`, `detail`, `instance` (the request path), plus
the extension members `code` (short machine-readable reason, also the `reason` label of
`s2amnet_rejected_total`), `request_id`, and `errors` for validation failures.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import metrics
from app.dispatch.base import DispatchError

log = logging.getLogger("s2amnet.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:s2amnet:problem:"


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra or {}


# Convenience constructors for the statuses of the API contract.
def bad_image(detail: str) -> Problem:
    return Problem(400, "bad_image", detail, title="Corrupt or unreadable image")


def unsupported_media(detail: str) -> Problem:
    return Problem(415, "unsupported_media_type", detail, title="Unsupported media type")


def too_large(code: str, detail: str) -> Problem:
    return Problem(413, code, detail, title="Content too large")


def invalid(detail: str, errors: list[dict[str, Any]] | None = None) -> Problem:
    return Problem(422, "invalid_request", detail, title="Invalid request", extra={"errors": errors or []})


def unauthorized(detail: str) -> Problem:
    return Problem(
        401,
        "unauthorized",
        detail,
        title="Unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="s2amnet"'},
    )


def problem_body(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str | None,
    request_id: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body["code"] = code
    if request_id:
        body["request_id"] = request_id
    if extra:
        body.update(extra)
    return body


def problem_response(
    request: Request | None,
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    instance = request.url.path if request is not None else None
    body = problem_body(status, code, title or HTTPStatus(status).phrase, detail, instance, request_id, extra)
    hdrs = dict(headers or {})
    if request_id:
        hdrs.setdefault("X-Request-ID", request_id)
    if status >= 400 and code not in ("not_found", "method_not_allowed"):
        metrics.record_rejection(code)
    return JSONResponse(body, status_code=status, headers=hdrs, media_type=PROBLEM_JSON)


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        out.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


def dispatch_problem(exc: DispatchError, retry_after: int) -> Problem:
    headers = {}
    if exc.status == 503:
        ra = exc.retry_after if exc.retry_after is not None else retry_after
        headers["Retry-After"] = str(max(0, int(round(ra))))
    titles = {
        "queue_full": "Overloaded",
        "unavailable": "Service unavailable",
        "timeout": "Deadline exceeded",
        "unknown_model": "Unknown model",
        "failed": "Inference failed",
    }
    return Problem(exc.status, exc.reason, exc.detail, title=titles.get(exc.reason), headers=headers)


def install(app: FastAPI, retry_after: int = 1) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(
            request, exc.status, exc.code, exc.detail, title=exc.title, headers=exc.headers, extra=exc.extra
        )

    @app.exception_handler(DispatchError)
    async def _dispatch(request: Request, exc: DispatchError):
        p = dispatch_problem(exc, retry_after)
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("job failed: %s", exc.detail)
        return problem_response(request, p.status, p.code, p.detail, title=p.title, headers=p.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = _jsonable_errors(exc.errors())
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return problem_response(
            request, 422, "invalid_request", detail, title="Invalid request", extra={"errors": errors}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
            413: "body_too_large",
            415: "unsupported_media_type",
            400: "bad_request",
        }
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem_response(request, exc.status_code, code, detail, headers=dict(exc.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        # not a server error: nobody reads this answer; 499 (nginx's "client closed request") in the
        # request metrics and the log, reason client_closed
        log.info("client closed the connection on %s before its answer", request.url.path)
        return problem_response(request, 499, "client_closed", "the client closed the connection",
                                title="Client closed request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(request, 500, "internal_error", "internal server error")
