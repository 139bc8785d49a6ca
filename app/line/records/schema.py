"""The tables of the inspection records and their versioned migrations.

``records`` holds one row per answered result: the whole result (JSON) plus the columns that queries filter
and sort on. ``schema_version`` lists the migrations applied. `migrate` applies the missing ones at start in
one transaction that holds the database's write lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE),
so replicas starting at the same time apply each migration exactly once and wait for each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("s2amnet.records")

metadata = sa.MetaData()

ID = sa.Text()  # no length limit: a long identifier never fails a whole batch

records = sa.Table(
    "records",
    metadata,
    sa.Column("result_id", sa.Text(), primary_key=True),
    sa.Column("request_id", sa.Text()),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("station_id", ID),
    sa.Column("part_id", ID),
    sa.Column("meas_id", ID),
    sa.Column("recipe_id", ID),
    sa.Column("recipe_version", ID),
    sa.Column("model", sa.Text(), nullable=False),
    sa.Column("model_version", sa.Text()),
    sa.Column("task", sa.Text()),
    sa.Column("verdict", sa.Text(), nullable=False),
    sa.Column("decided_by", sa.Text()),
    sa.Column("defect_count", sa.Integer, nullable=False),
    sa.Column("image_path", sa.Text()),  # relative to the images folder; NULL: no image kept
    sa.Column("image_type", sa.Text()),
    sa.Column("image_bytes", sa.BigInteger),
    sa.Column("result", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

# The newest-first listing, and the filters of GET /results, each with the time order (attached to the table:
# created with it by migration 1).
INDEXES = [
    sa.Index("ix_records_time", records.c.recorded_at, records.c.result_id),
    sa.Index("ix_records_part", records.c.part_id, records.c.recorded_at),
    sa.Index("ix_records_station", records.c.station_id, records.c.recorded_at),
    sa.Index("ix_records_recipe", records.c.recipe_id, records.c.recorded_at),
    sa.Index("ix_records_model", records.c.model, records.c.recorded_at),
    sa.Index("ix_records_verdict", records.c.verdict, records.c.recorded_at),
]

ADVISORY_LOCK_KEY = 0x5_2A_3D_EC  # pg_advisory_xact_lock key of the migrations (any constant of this service)


def _v1_records(conn: Connection) -> None:
    records.create(conn)  # with INDEXES


# version -> migration; append new ones, never edit an applied one. Migration 1 creates `records` as declared
# above: a later version that declares a new column or index there adds a migration that creates it where it
# is missing (sa.inspect(conn)), so that old and fresh databases end up alike.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_records}
LATEST = max(MIGRATIONS)


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})


def migrate(engine: Engine) -> int:
    """Apply the missing migrations; the schema version now in force. Safe to call from several processes
    at once (they queue on the lock; the first applies, the others find nothing left to do)."""
    with engine.connect().execution_options(begin_immediate=True) as conn, conn.begin():
        _lock(conn)
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
        if current > LATEST:
            raise RuntimeError(f"the records database has schema version {current}, newer than this service "
                               f"knows ({LATEST}): upgrade the service")
        for version in sorted(v for v in MIGRATIONS if v > current):
            MIGRATIONS[version](conn)
            conn.execute(schema_version.insert().values(version=version, applied_at=datetime.now(UTC)))
            log.info("records schema migrated to version %d", version)
        return max(current, LATEST)
