"""Inspection records (traceability): every answered result, stored once, queryable by `GET /results`.

- `RecordOutlet` (an `app.line.Outlet`): takes each result off the request path and records it from a writer
  thread, with the input image when ``record_images`` says so; applies the retention.
- `RecordStore`: the database (SQLite in WAL mode by default, PostgreSQL for several replicas; SQLAlchemy
  Core) and the images folder; migrations in `app.line.records.schema`.
- `Filters`, `Cursor`: what the read API asks (`app.line.records.query`).
"""

from app.line.records.outlet import RecordOutlet
from app.line.records.query import BadCursor, Cursor, Filters
from app.line.records.store import RecordStore

__all__ = ["BadCursor", "Cursor", "Filters", "RecordOutlet", "RecordStore"]
