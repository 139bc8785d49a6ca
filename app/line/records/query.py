"""What the read API asks of the records: filters, the opaque cursor of newest-first pages, and the shapes a
record is answered in (the stored result plus ``recorded_at`` and ``image_url``; one flat CSV row)."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from app.line.records.schema import records

CSV_COLUMNS = ("result_id", "recorded_at", "station_id", "part_id", "meas_id", "recipe_id", "recipe_version",
               "model", "model_version", "verdict", "decided_by", "defect_count", "defect_labels", "image")


class BadCursor(ValueError):
    """A cursor this service did not hand out."""


def utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive datetime is taken as UTC (SQLite hands timestamps back naive)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class Filters:
    station_id: str | None = None
    part_id: str | None = None
    verdict: str | None = None
    model: str | None = None
    recipe_id: str | None = None
    since: datetime | None = None  # recorded at or after
    until: datetime | None = None  # recorded before

    def where(self) -> list[sa.ColumnElement[bool]]:
        c = records.c
        out: list[sa.ColumnElement[bool]] = []
        for name in ("station_id", "part_id", "verdict", "model", "recipe_id"):
            value = getattr(self, name)
            if value is not None:
                out.append(c[name] == value)
        if self.since is not None:
            out.append(c.recorded_at >= utc(self.since))
        if self.until is not None:
            out.append(c.recorded_at < utc(self.until))
        return out


@dataclass(frozen=True)
class Cursor:
    """The position after the last record of a page: newest first, ties broken by result_id."""

    recorded_at: datetime
    result_id: str

    def encode(self) -> str:
        raw = json.dumps([utc(self.recorded_at).isoformat(), self.result_id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            when, result_id = json.loads(raw)
            if not isinstance(result_id, str):
                raise TypeError("result_id")
            return cls(utc(datetime.fromisoformat(when)), result_id)
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
            raise BadCursor("invalid cursor: pass next_cursor of a previous page unchanged") from exc

    def after(self) -> sa.ColumnElement[bool]:
        c = records.c
        at = utc(self.recorded_at)
        return sa.or_(c.recorded_at < at, sa.and_(c.recorded_at == at, c.result_id < self.result_id))


def _result(row: Any) -> dict[str, Any]:
    value = row.result
    return json.loads(value) if isinstance(value, str | bytes) else dict(value)


def answer(row: Any) -> dict[str, Any]:
    """One record as the API answers it: the stored result, ``recorded_at`` and ``image_url`` (when kept)."""
    out = _result(row)
    out["recorded_at"] = utc(row.recorded_at).isoformat()
    if row.image_path:
        out["image_url"] = f"/results/{row.result_id}/image"
    return out


def csv_row(row: Any) -> list[Any]:
    result = _result(row)
    labels = [str(d.get("label", "")) for d in result.get("defects") or []]
    return [row.result_id, utc(row.recorded_at).isoformat(), row.station_id, row.part_id, row.meas_id,
            row.recipe_id, row.recipe_version, row.model, row.model_version, row.verdict, row.decided_by,
            row.defect_count, ";".join(labels), f"/results/{row.result_id}/image" if row.image_path else ""]


def csv_lines(rows: list[Any], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(csv_row(row))
    return buf.getvalue()


def jsonl_lines(rows: list[Any]) -> str:
    return "".join(json.dumps(answer(row), separators=(",", ":")) + "\n" for row in rows)
