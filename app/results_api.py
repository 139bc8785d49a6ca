"""Read API of the inspection records (`app.line.records`): one result by id, its image, newest-first pages
with filters, and a streamed CSV / JSON Lines export. Thin: the queries live in the records package and run on
worker threads, never on the event loop."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import SQLAlchemyError

from app.deps import require_api_key
from app.errors import Problem, invalid
from app.line.records import BadCursor, Cursor, Filters, RecordOutlet, RecordStore
from app.line.records.images import EXTENSIONS
from app.line.records.query import answer, csv_lines, jsonl_lines, utc
from app.openapi import problem_doc
from app.schemas import ID, InspectionResult
from app.state import service_state

log = logging.getLogger("s2amnet.api")

def _one_value_each(request: Request) -> None:
    """Every query parameter of these routes takes one value: a repeated one (``model=a&model=b``) is refused,
    not silently read as its last value."""
    names = [k for k, _ in request.query_params.multi_items()]
    repeated = sorted({k for k in names if names.count(k) > 1})
    if repeated:
        raise invalid(f"query parameter given more than once: {', '.join(repeated)}",
                      [{"loc": ["query", k], "msg": "given more than once", "type": "value_error"} for k in repeated])


router = APIRouter(prefix="/results", tags=["records"],
                   dependencies=[Depends(require_api_key), Depends(_one_value_each)])

EXPORT_PAGE = 500  # records per query of an export
T = TypeVar("T")



class RecordedResult(InspectionResult):
    recorded_at: datetime = Field(..., description="When the result was answered (UTC).")
    image_url: str | None = Field(None, description="The stored input image, when one is kept.")


class ResultsPage(BaseModel):
    results: list[RecordedResult] = Field(..., description="Newest first.")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last one.")


class ResultFilters(BaseModel):
    """Filters of `GET /results` and `GET /results/export` (all optional, combined with AND)."""

    model_config = ConfigDict(extra="ignore")

    station_id: str | None = Field(None, **ID)
    part_id: str | None = Field(None, **ID)
    verdict: Literal["pass", "fail"] | None = None
    model: str | None = Field(None, max_length=128, description="Model name.")
    recipe_id: str | None = Field(None, **ID)
    since: datetime | None = Field(None, description="Recorded at or after (ISO 8601; without offset: UTC).")
    until: datetime | None = Field(None, description="Recorded before (ISO 8601; without offset: UTC).")

    @field_validator("since", "until", mode="before")
    @classmethod
    def _iso_8601(cls, value: Any) -> Any:
        # pydantic would also take a bare number as Unix seconds; the documented form is an ISO 8601 date-time
        if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value):
            raise ValueError("expected an ISO 8601 date-time, e.g. 2026-12-06T08:00:00Z")
        return value

    @field_validator("since", "until")
    @classmethod
    def _in_utc_range(cls, value: datetime | None) -> datetime | None:
        if value is not None:
            try:
                utc(value)
            except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
                raise ValueError("the date-time is out of range once in UTC") from None
        return value

    def filters(self) -> Filters:
        return Filters(**self.model_dump())


ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem_doc("Missing or wrong API key (when S2AMNET_API_KEYS is set)."),
    404: problem_doc("No such result (or no image of it), or the records are disabled."),
    422: problem_doc("Invalid filter, limit or cursor."),
    503: problem_doc("The record store is not reachable, or the service is still starting."),
}


def _store(request: Request) -> RecordStore:
    state = service_state(request.app)
    if not state.settings.records:
        raise Problem(404, "not_found", "inspection records are disabled on this service (S2AMNET_RECORDS=false)")
    for outlet in state.outlets.outlets if state.outlets else []:
        if isinstance(outlet, RecordOutlet):
            return outlet.store
    raise Problem(503, "unavailable", "the record store is not open yet (the service is starting)",
                  headers={"Retry-After": str(state.settings.retry_after_s)})


async def _query(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a worker thread; a failing store answers 503."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except SQLAlchemyError as exc:
        log.warning("records: query failed: %s: %s", type(exc).__name__, exc)
        retry = str(service_state(request.app).settings.retry_after_s)
        raise Problem(503, "unavailable", "the record store is not reachable", headers={"Retry-After": retry}) from None


def _cursor(text: str | None) -> Cursor | None:
    if text is None:
        return None
    try:
        return Cursor.decode(text)
    except BadCursor as exc:
        raise invalid(str(exc), [{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error"}]) from None


@router.get("", response_model=ResultsPage, responses=ERRORS)
async def list_results(
    request: Request,
    query: Annotated[ResultFilters, Query()],
    limit: Annotated[int, Query(ge=1, le=1000, description="Most results in the page.")] = 50,
    cursor: Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page.")] = None,
) -> Any:
    """Recorded results matching the filters, newest first, a page at a time."""
    store = _store(request)
    rows, after = await _query(request, store.page, query.filters(), limit, _cursor(cursor))
    return JSONResponse({"results": [answer(r) for r in rows], "next_cursor": after.encode() if after else None})


EXPORT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


@router.get("/export", response_class=StreamingResponse, responses={
    200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
          "description": "CSV (one row per result, flat columns) or JSON Lines (one recorded result per line)."},
    **ERRORS})
async def export_results(
    request: Request,
    query: Annotated[ResultFilters, Query()],
    format: Annotated[Literal["csv", "jsonl"], Query(description="csv or jsonl.")] = "csv",
) -> Any:
    """Every recorded result matching the filters, newest first, streamed."""
    store = _store(request)
    filters = query.filters()
    first = await _query(request, store.page, filters, EXPORT_PAGE, None)

    async def lines() -> AsyncIterator[str]:
        rows, after = first
        header = True
        while True:
            yield csv_lines(rows, header) if format == "csv" else jsonl_lines(rows)
            header = False
            if after is None:
                return
            try:
                rows, after = await anyio.to_thread.run_sync(store.page, filters, EXPORT_PAGE, after)
            except SQLAlchemyError as exc:
                log.error("records: export cut short, the store failed: %s", exc)
                return

    name = f"results.{format}"
    return StreamingResponse(lines(), media_type=EXPORT_TYPES[format],
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/{result_id}", response_model=RecordedResult, responses=ERRORS)
async def get_result(request: Request, result_id: Annotated[str, Path(max_length=256)]) -> Any:
    """One recorded result: the answer as it was sent, when it was recorded and the URL of its image."""
    store = _store(request)
    row = await _query(request, store.get, result_id)
    if row is None:
        raise Problem(404, "not_found", f"no recorded result {result_id!r}")
    return JSONResponse(answer(row))


@router.get("/{result_id}/image", response_class=Response, responses={
    200: {"content": {t: {} for t in EXTENSIONS}, "description": "The image as it was sent."}, **ERRORS})
async def get_result_image(request: Request, result_id: Annotated[str, Path(max_length=256)]) -> Any:
    """The input image of a recorded result (kept per S2AMNET_RECORD_IMAGES)."""
    store = _store(request)
    found = await _query(request, store.image, result_id)
    if found is None:
        raise Problem(404, "not_found", f"no image is kept for result {result_id!r}")
    data, content_type = found
    return Response(data, media_type=content_type)
