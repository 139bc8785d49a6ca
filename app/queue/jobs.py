"""Wire format of the Redis mode: a job is one stream entry, a reply one entry of a reply stream.

Job fields: ``job_id``, ``reply_to`` (the asking instance's reply stream), ``deadline`` (epoch seconds on
the API host), ``ttl_ms`` (time left at XADD: workers judge expiry on Redis's clock from the entry ID),
``enqueued_at``, ``options`` and ``meta`` (JSON), ``dtype``, ``shape`` and ``array`` (the preprocessed
image's raw bytes), ``attempts`` (failed tries so far, raised when a worker requeues the job).

Reply fields: ``job_id``, ``status`` (one of the statuses below), ``result`` (JSON, for ``ok``),
``detail`` (for the others).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from app.dispatch.base import Job

# Reply statuses written by workers.
OK, EXPIRED, DEAD, ERROR = "ok", "expired", "dead", "error"


def text(value: bytes | str) -> str:
    """A field or key as str (redis-py answers bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def encode_job(job: Job, reply_to: str) -> dict[str, bytes | str]:
    array = np.ascontiguousarray(job.array)
    return {
        "job_id": job.job_id,
        "reply_to": reply_to,
        "deadline": repr(float(job.deadline)),
        # time left, judged by workers on Redis's clock from the entry ID (immune to host clock skew)
        "ttl_ms": str(int((float(job.deadline) - time.time()) * 1000)),
        "enqueued_at": repr(float(job.enqueued_at)),
        "options": json.dumps(job.options, separators=(",", ":")),
        "meta": json.dumps(job.meta, separators=(",", ":")),
        "dtype": array.dtype.str,
        "shape": ",".join(str(int(s)) for s in array.shape),
        "array": array.tobytes(),
        "attempts": "0",
    }


def decode_job(model: str, fields: dict[bytes, bytes]) -> Job:
    """Rebuild a Job from stream fields; raises ValueError/KeyError on a malformed entry."""
    f = {text(k): v for k, v in fields.items()}
    shape = tuple(int(s) for s in text(f["shape"]).split(",") if s)
    dtype = np.dtype(text(f["dtype"]))
    raw = f["array"]
    if not isinstance(raw, bytes | bytearray):
        raise ValueError("array field is not bytes")
    array = np.frombuffer(raw, dtype=dtype)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"array of {array.size} elements does not match shape {shape}")
    return Job(
        model=model,
        array=array.reshape(shape),
        meta=json.loads(f["meta"]),
        options=json.loads(f["options"]),
        deadline=float(text(f["deadline"])),
        job_id=text(f["job_id"]),
        enqueued_at=float(text(f.get("enqueued_at", b"0"))),
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode_reply(job_id: str, status: str, result: dict | None = None, detail: str = "") -> dict[str, str]:
    out: dict[str, str] = {"job_id": job_id, "status": status}
    if result is not None:
        out["result"] = json.dumps(result, default=_json_default, separators=(",", ":"))
    if detail:
        out["detail"] = detail
    return out


def decode_reply(fields: dict[bytes, bytes] | dict[str, str]) -> dict[str, str]:
    """A reply entry's fields as str; ``result`` stays JSON text (see `reply_result`)."""
    return {text(k): text(v) for k, v in fields.items()}


def reply_result(reply: dict[str, str]) -> dict[str, Any]:
    """The result of an ``ok`` reply; raises KeyError/ValueError when it is missing or malformed."""
    return json.loads(reply["result"])


@dataclass
class JobEntry:
    """A job stream entry a worker holds (it is in that consumer's pending list)."""

    model: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int  # how often Redis delivered it + how often it was requeued after a failure
    arrived: float = field(default_factory=time.monotonic)

    @property
    def job_id(self) -> str:
        return text(self.fields.get(b"job_id", b"?"))

    @property
    def reply_to(self) -> str | None:
        v = self.fields.get(b"reply_to")
        return text(v) if v else None

    @property
    def deadline(self) -> float | None:
        try:
            return float(text(self.fields[b"deadline"]))
        except (KeyError, ValueError):
            return None

    def _on_redis_clock(self, redis_now_ms: int | None) -> tuple[int, int] | None:
        """(ms since it was queued, ms left) on Redis's clock — the entry ID holds Redis's milliseconds at
        XADD, ``ttl_ms`` the time left then; None for a job without ``ttl_ms`` or when Redis's time is
        unknown."""
        ttl = self.fields.get(b"ttl_ms")
        if ttl is None or redis_now_ms is None:
            return None
        try:
            queued_ms = int(self.entry_id.split("-", 1)[0])
            return redis_now_ms - queued_ms, queued_ms + int(text(ttl)) - redis_now_ms
        except ValueError:
            return None

    def expired(self, redis_now_ms: int | None) -> bool:
        """On Redis's clock where the job carries ``ttl_ms``; else by the API host's absolute ``deadline``."""
        times = self._on_redis_clock(redis_now_ms)
        if times is not None:
            return times[1] <= 0
        deadline = self.deadline
        return deadline is not None and deadline <= time.time()

    def decode(self, redis_now_ms: int | None) -> Job:
        """The job, with its deadline and queueing time moved onto this host's clock (run_batch and the
        queue-wait metric use them), measured on Redis's clock where the job carries ``ttl_ms``; raises
        ValueError/KeyError on a malformed entry."""
        job = decode_job(self.model, self.fields)
        times = self._on_redis_clock(redis_now_ms)
        if times is None:
            return job
        age_ms, left_ms = times
        now = time.time()
        return replace(job, deadline=now + left_ms / 1000.0, enqueued_at=now - age_ms / 1000.0)

    def dead_letter(self, reason: str, consumer: str) -> dict[bytes, Any]:
        """The fields of its dead-letter entry: the job's own without the image bytes, plus why, after how
        many deliveries, by which consumer and when."""
        fields: dict[bytes, Any] = {k: v for k, v in self.fields.items() if k != b"array"}
        fields.update({b"model": self.model, b"error": reason, b"deliveries": str(self.deliveries),
                       b"consumer": consumer, b"dead_at": repr(time.time()), b"entry_id": self.entry_id})
        return fields

    def requeued(self) -> dict[bytes, Any]:
        """The fields of a fresh entry for another try, carrying its tries so far."""
        fields: dict[bytes, Any] = dict(self.fields)
        fields[b"attempts"] = str(self.deliveries)
        return fields
