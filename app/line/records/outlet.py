"""`RecordOutlet`: every answered result into the record store, off the request path.

`offer` (event loop) stamps the result with the time, keeps its image when the settings say so and puts it in
a bounded queue; one writer thread drains the queue in batches (a batch waits up to `linger_s` for more
results), one transaction per batch, and runs the retention every few minutes (and once at start). What
cannot be recorded is counted in ``s2amnet_records_dropped_total{reason}`` and logged; the answer never waits
for the store and never fails because of it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from app import metrics
from app.line import Outlet
from app.line.records.images import StoredImage
from app.line.records.store import Pending, RecordStore, columns

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("s2amnet.records")

_STOP = object()  # wakes the writer at shutdown
DROP_REASONS = ("queue_full", "store_error", "image_error")


class RecordOutlet(Outlet):
    """Records every result it is offered (`app.line.Outlet`)."""

    name = "records"
    batch_size = 256  # most results per transaction
    linger_s = 0.25  # how long a batch waits for more results: one transaction per part costs CPU the forwards need
    retention_interval_s = 300.0
    retry_delays_s = (0.2, 0.5, 1.0)  # between the tries of a batch while the store fails

    def __init__(self, store: RecordStore, *, record_images: str = "fail", pass_sample: float = 0.0,
                 retention_days: float = 90.0, max_image_mb: float = 2048.0, queue_size: int = 10_000):
        if record_images not in ("fail", "all", "none"):
            raise ValueError(f"record_images must be fail, all or none, not {record_images!r}")
        self.store = store
        self.record_images = record_images
        self.pass_sample = pass_sample
        self.retention_days = retention_days
        self.max_image_bytes = int(max_image_mb * 1024 * 1024)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._retention_lock = threading.Lock()
        self._rng = random.Random()
        self._counts = threading.Lock()
        self._written = 0
        self._dropped = 0
        self._up = True
        self._last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RecordOutlet:
        return cls(RecordStore(settings.records_url, settings.records_dir), record_images=settings.record_images,
                   pass_sample=settings.record_pass_sample, retention_days=settings.records_retention_days,
                   max_image_mb=settings.records_max_image_mb, queue_size=settings.records_queue)

    # ------------------------------------------------------------------------------------- the Outlet
    def wants_image(self) -> bool:
        return self.record_images != "none"

    def keeps_image(self, result: dict[str, Any]) -> bool:
        """Whether the image of ``result`` is stored: every one ('all'), none ('none'), or failed parts plus
        a random ``pass_sample`` of the passed ones ('fail')."""
        if self.record_images != "fail":
            return self.record_images == "all"
        return result.get("verdict") == "fail" or (self.pass_sample > 0 and self._rng.random() < self.pass_sample)

    async def start(self) -> None:
        metrics.RECORDS_WRITTEN.labels(store=self.store.kind)
        for reason in DROP_REASONS:
            metrics.RECORDS_DROPPED.labels(reason=reason)
        metrics.RECORD_STORE_UP.labels(store=self.store.kind).set(1)
        self._thread = threading.Thread(target=self._run, name="s2amnet-records", daemon=True)
        self._thread.start()

    def offer(self, result: dict[str, Any], image: bytes | None) -> None:
        kept = image if image is not None and self.keeps_image(result) else None
        try:
            self._queue.put_nowait(Pending(result, kept, datetime.now(UTC)))
        except queue.Full:
            self._drop("queue_full", 1)

    async def stop(self, timeout: float) -> None:
        """Record what is queued (for at most ``timeout`` seconds), then close the store."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            try:
                self._queue.put_nowait(_STOP)
            except queue.Full:
                pass  # the writer is busy and sees the stop after this batch
            await asyncio.to_thread(thread.join, timeout)
            if thread.is_alive():
                log.warning("records: %d result(s) still queued after %.1f s at shutdown: not recorded",
                            self._queue.qsize(), timeout)
                return
        await asyncio.to_thread(self.store.close)

    def health(self) -> dict[str, Any]:
        return {"ok": self._up, "store": self.store.kind, "queued": self._queue.qsize(),
                "written": self._written, "dropped": self._dropped, "last_error": self._last_error}

    # ------------------------------------------------------------------------------------- the writer
    def _run(self) -> None:
        next_retention = 0.0
        while True:
            if time.monotonic() >= next_retention:
                self.run_retention()
                next_retention = time.monotonic() + self.retention_interval_s
            try:
                first = self._queue.get(timeout=max(0.01, next_retention - time.monotonic()))
            except queue.Empty:
                continue
            batch = self._take(first)
            if batch:
                self._write(batch)
            if self._stopping.is_set() and self._queue.empty():
                return

    def _take(self, first: Any) -> list[Pending]:
        """``first`` and what else comes within `linger_s`, up to `batch_size` results (at once when stopping).
        A line sending one part at a time then costs one transaction per few parts, not one per part."""
        batch = [first] if first is not _STOP else []
        due = time.monotonic() + self.linger_s
        while len(batch) < self.batch_size:
            left = due - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 and not self._stopping.is_set() \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                due = 0.0  # take what is queued, then write it and stop
            else:
                batch.append(item)
        return batch

    def _write(self, batch: list[Pending]) -> None:
        """Record ``batch`` in one transaction, tried again briefly while the store fails; then dropped."""
        images = [self._store_image(item) for item in batch]
        rows = [columns(item, image) for item, image in zip(batch, images, strict=True)]
        for attempt in range(len(self.retry_delays_s) + 1):
            try:
                self.store.insert(rows)
            except Exception as exc:  # noqa: BLE001 - whatever the store raises, the writer goes on
                self._set_up(False, f"{type(exc).__name__}: {exc}")
                if attempt < len(self.retry_delays_s):
                    time.sleep(self.retry_delays_s[attempt])
                    continue
                log.error("records: %d result(s) not recorded, the store failed: %s", len(batch), self._last_error)
                self._drop("store_error", len(batch))
                for image in images:
                    if image is not None:
                        self.store.images.remove(image.path)
                return
            with self._counts:
                self._written += len(rows)
            metrics.RECORDS_WRITTEN.labels(store=self.store.kind).inc(len(rows))
            self._set_up(True)
            return

    def _store_image(self, item: Pending) -> StoredImage | None:
        if item.image is None:
            return None
        try:
            return self.store.images.write(str(item.result["result_id"]), item.recorded_at, item.image)
        except OSError as exc:
            log.error("records: the image of %s was not stored: %s", item.result.get("result_id"), exc)
            metrics.RECORDS_DROPPED.labels(reason="image_error").inc()
            self._last_error = f"image: {type(exc).__name__}: {exc}"
            return None
        finally:
            item.image = None  # the bytes are on disk (or lost): free them

    def _set_up(self, up: bool, error: str | None = None) -> None:
        if error is not None:
            self._last_error = error
        if up != self._up:
            log.log(logging.INFO if up else logging.WARNING, "records: the %s store is %s", self.store.kind,
                    "reachable again" if up else f"failing: {error}")
        self._up = up
        metrics.RECORD_STORE_UP.labels(store=self.store.kind).set(1 if up else 0)

    def _drop(self, reason: str, n: int) -> None:
        with self._counts:
            self._dropped += n
        metrics.RECORDS_DROPPED.labels(reason=reason).inc(n)

    # ------------------------------------------------------------------------------------- retention
    def run_retention(self, now: datetime | None = None) -> tuple[int, int]:
        """Apply the retention now (the writer does every `retention_interval_s`): records older than
        ``records_retention_days`` go, then the oldest images until they fit ``records_max_image_mb``.
        (records removed, images removed); (0, 0) when the store cannot be reached (logged)."""
        with self._retention_lock:
            try:
                expired, trimmed = self.store.apply_retention(now or datetime.now(UTC), self.retention_days,
                                                              self.max_image_bytes)
            except Exception as exc:  # noqa: BLE001
                log.warning("records: retention not applied: %s: %s", type(exc).__name__, exc)
                if isinstance(exc, SQLAlchemyError | RuntimeError):  # the database, not a file: the store is down
                    self._set_up(False, f"{type(exc).__name__}: {exc}")
                return 0, 0
        self._set_up(True)
        if expired or trimmed:
            log.info("records: retention removed %d record(s) and %d image(s)", expired, trimmed)
        return expired, trimmed
