"""The record store: SQLite (WAL, the embedded default) or PostgreSQL (several replicas), by SQLAlchemy Core.

Every method here blocks (database and file I/O): the writer thread of `RecordOutlet` calls the writing ones,
the read API calls the others on worker threads.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Engine, Row, make_url

from app.line.records.images import ImageFolder, StoredImage
from app.line.records.query import Cursor, Filters, utc
from app.line.records.schema import migrate, records

log = logging.getLogger("s2amnet.records")

SQLITE_FILE = "records.sqlite3"
IMAGES_FOLDER = "images"
CHUNK = 500  # rows per retention step


def store_url(records_url: str | None, records_dir: Path) -> URL:
    """The SQLAlchemy URL of the store: SQLite in ``records_dir`` when ``records_url`` is unset; plain
    ``postgresql://`` (or ``postgres://``) runs on psycopg 3. ValueError for any other database."""
    if not records_url:
        return URL.create("sqlite", database=str(Path(records_dir).resolve() / SQLITE_FILE))
    url = make_url(records_url)
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and not driver:
        return url
    raise ValueError(f"records_url: unsupported database {url.drivername!r}; use postgresql://user:pass@host/db "
                     "or sqlite:///path.sqlite3")


def _pragma(cur: Any, pragma: str, patience_s: float = 30.0) -> None:
    """Run a PRAGMA, retrying while another connection holds the lock it needs: switching a new database to
    WAL takes an exclusive lock, and SQLite answers "database is locked" at once there, without waiting out
    the busy timeout (replicas that open the same new database together)."""
    import sqlite3
    import time

    deadline = time.monotonic() + patience_s
    while True:
        try:
            cur.execute(f"PRAGMA {pragma}")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_engine(url: URL) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver leaves transactions to us: BEGIN below
        cur = dbapi_conn.cursor()
        for pragma in ("busy_timeout=30000", "journal_mode=WAL", "synchronous=NORMAL"):
            _pragma(cur, pragma)
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # writers take the write lock at once (a deferred transaction that upgrades can fail as busy)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("begin_immediate") else "BEGIN")

    return engine


def _postgres_engine(url: URL) -> Engine:
    return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4,
                            connect_args={"connect_timeout": 5})


@dataclass
class Pending:
    """One answered result waiting to be recorded."""

    result: dict[str, Any]
    image: bytes | None
    recorded_at: datetime


def columns(item: Pending, image: StoredImage | None) -> dict[str, Any]:
    """The row of one result: its indexed columns and the whole result."""
    r = item.result
    model = r.get("model") or {}
    recipe = r.get("recipe") or {}
    return {
        "result_id": str(r["result_id"]), "request_id": r.get("request_id"), "recorded_at": utc(item.recorded_at),
        "station_id": r.get("station_id"), "part_id": r.get("part_id"), "meas_id": r.get("meas_id"),
        "recipe_id": r.get("recipe_id") or recipe.get("id"), "recipe_version": recipe.get("version"),
        "model": str(model.get("name", "")), "model_version": model.get("version"), "task": r.get("task"),
        "verdict": r.get("verdict", ""), "decided_by": r.get("decided_by"),
        "defect_count": len(r.get("defects") or []),
        "image_path": image.path if image else None, "image_type": image.content_type if image else None,
        "image_bytes": image.size if image else None, "result": r,
    }


class RecordStore:
    """The records database (opened and migrated on first use) and the images folder."""

    def __init__(self, records_url: str | None, records_dir: Path):
        self.url = store_url(records_url, records_dir)
        self.kind = "postgresql" if self.url.drivername.startswith("postgresql") else "sqlite"
        self.images = ImageFolder(Path(records_dir) / IMAGES_FOLDER)
        self._engine: Engine | None = None
        self._migrated = False
        self._lock = threading.Lock()

    def engine(self) -> Engine:
        """The engine, the schema migrated (once per process; raises while the database is unreachable)."""
        with self._lock:
            if self._engine is None:
                self._engine = _sqlite_engine(self.url) if self.kind == "sqlite" else _postgres_engine(self.url)
            if not self._migrated:
                migrate(self._engine)
                self._migrated = True
            return self._engine

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _writer(self) -> sa.Connection:
        return self.engine().connect().execution_options(begin_immediate=True)

    # ----------------------------------------------------------------------------------------- writing
    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` in one transaction; a result_id already stored is left as it is (a retried batch
        records nothing twice)."""
        if not rows:
            return
        dialect = pg_dialect if self.kind == "postgresql" else sqlite_dialect
        stmt = dialect.insert(records).on_conflict_do_nothing(index_elements=["result_id"])
        with self._writer() as conn, conn.begin():
            conn.execute(stmt, rows)

    def expire(self, cutoff: datetime) -> int:
        """Remove the records (and their images) recorded before ``cutoff``, oldest first; how many."""
        c = records.c
        removed = 0
        while True:
            with self._writer() as conn, conn.begin():
                rows = conn.execute(sa.select(c.result_id, c.image_path).where(c.recorded_at < utc(cutoff))
                                    .order_by(c.recorded_at, c.result_id).limit(CHUNK)).all()
                if rows:
                    conn.execute(sa.delete(records).where(c.result_id.in_([r.result_id for r in rows])))
            for row in rows:
                if row.image_path:
                    self.images.remove(row.image_path)
            removed += len(rows)
            if len(rows) < CHUNK:
                return removed

    def image_total(self) -> int:
        c = records.c
        with self.engine().connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(c.image_bytes), 0))
                                    .where(c.image_path.is_not(None))).scalar() or 0)

    def trim_images(self, max_bytes: int) -> int:
        """Remove the oldest images (their records stay, without image) until they take at most
        ``max_bytes``; how many were removed."""
        c = records.c
        excess = self.image_total() - max_bytes
        removed = 0
        while excess > 0:
            with self._writer() as conn, conn.begin():
                rows = conn.execute(sa.select(c.result_id, c.image_path, c.image_bytes)
                                    .where(c.image_path.is_not(None))
                                    .order_by(c.recorded_at, c.result_id).limit(CHUNK)).all()
                taken = []
                for row in rows:
                    if excess <= 0:
                        break
                    taken.append(row)
                    excess -= row.image_bytes or 0
                conn.execute(sa.update(records).where(c.result_id.in_([r.result_id for r in taken]))
                             .values(image_path=None, image_type=None, image_bytes=None))
            for row in taken:
                self.images.remove(row.image_path)
            removed += len(taken)
            if len(rows) < CHUNK:
                break
        return removed

    def apply_retention(self, now: datetime, days: float, max_image_bytes: int) -> tuple[int, int]:
        """Age, then disk budget: (records removed, images removed)."""
        return self.expire(now - timedelta(days=days)), self.trim_images(max_image_bytes)

    # ----------------------------------------------------------------------------------------- reading
    def get(self, result_id: str) -> Row | None:
        with self.engine().connect() as conn:
            return conn.execute(sa.select(records).where(records.c.result_id == result_id)).first()

    def page(self, filters: Filters, limit: int, cursor: Cursor | None = None) -> tuple[list[Row], Cursor | None]:
        """At most ``limit`` records matching ``filters``, newest first, after ``cursor``; and the cursor of the
        next page (None on the last one)."""
        c = records.c
        query = sa.select(records).where(*filters.where())
        if cursor is not None:
            query = query.where(cursor.after())
        query = query.order_by(c.recorded_at.desc(), c.result_id.desc()).limit(limit + 1)
        with self.engine().connect() as conn:
            rows = list(conn.execute(query).all())
        if len(rows) <= limit:
            return rows, None
        rows = rows[:limit]
        return rows, Cursor(utc(rows[-1].recorded_at), rows[-1].result_id)

    def image(self, result_id: str) -> tuple[bytes, str] | None:
        """The stored image of a result and its content type; None when none is kept."""
        row = self.get(result_id)
        if row is None or not row.image_path:
            return None
        data = self.images.read(row.image_path)
        return None if data is None else (data, row.image_type or "application/octet-stream")
