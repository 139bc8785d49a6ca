"""Wire format of the Redis mode: a job is one stream entry, a reply one entry of a reply stream.

Job fields: ``job_id``, ``reply_to`` (the asking instance's reply stream), ``deadline`` (epoch seconds on
the API host), ``ttl_ms`` (time left at XADD: workers judge expiry on Redis's clock from the entry ID),
``enqueued_at``, ``options`` and ``meta`` (JSON), ``attempts`` (failed tries so far, raised when a worker
requeues the job), ``queued_ms`` (only on a requeued job: Redis's time of its first queueing, from which its
``ttl_ms`` still counts, so that a retry keeps the job's deadline), ``payload`` and the image in one of two forms:

- ``payload=array``: ``dtype``, ``shape`` and ``array`` (the preprocessed image's raw bytes, 3×H×W at the
  model's input size). A job without ``payload`` (written before the field existed) is read as this;
- ``payload=image``: ``image``, the uploaded file as it came (JPEG, PNG, ...), sent when it is smaller than
  the array (`choose_payload`). The API decoded it already (limits, EXIF, errors, ``meta``); the worker
  decodes it again with the same rule (`app.codec.decode_image`, then `Predictor.preprocess`), which gives
  the same array: the decoded job has ``array`` None and ``image`` set until the worker fills it in.

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

# What a job carries (its ``payload`` field): the preprocessed array, or the uploaded (encoded) image.
PAYLOAD_ARRAY, PAYLOAD_IMAGE = "array", "image"
# The fields that hold the image; a dead letter keeps the job's fields without them.
IMAGE_FIELDS = (b"array", b"image")


def text(value: bytes | str) -> str:
    """A field or key as str (redis-py answers bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def choose_payload(job: Job) -> str:
    """`PAYLOAD_IMAGE` when the job carries its uploaded bytes and they are smaller than its array (or it has
    no array), else `PAYLOAD_ARRAY`."""
    if job.image is not None and (job.array is None or len(job.image) < job.array.nbytes):
        return PAYLOAD_IMAGE
    return PAYLOAD_ARRAY


def encode_job(job: Job, reply_to: str) -> dict[str, bytes | str]:
    """The stream fields of ``job``, with the smaller payload (`choose_payload`)."""
    fields: dict[str, bytes | str] = {
        "job_id": job.job_id,
        "reply_to": reply_to,
        "deadline": repr(float(job.deadline)),
        # time left, judged by workers on Redis's clock from the entry ID (immune to host clock skew)
        "ttl_ms": str(int((float(job.deadline) - time.time()) * 1000)),
        "enqueued_at": repr(float(job.enqueued_at)),
        "options": json.dumps(job.options, separators=(",", ":")),
        "meta": json.dumps(job.meta, separators=(",", ":")),
    }
    if choose_payload(job) == PAYLOAD_IMAGE:
        fields.update({"payload": PAYLOAD_IMAGE, "image": bytes(job.image or b"")})
    else:
        if job.array is None:
            raise ValueError("a job without its image bytes needs its array")
        array = np.ascontiguousarray(job.array)
        fields.update({"payload": PAYLOAD_ARRAY, "dtype": array.dtype.str,
                       "shape": ",".join(str(int(s)) for s in array.shape), "array": array.tobytes()})
    fields["attempts"] = "0"
    return fields


def _decode_array(f: dict[str, Any]) -> np.ndarray:
    shape = tuple(int(s) for s in text(f["shape"]).split(",") if s)
    dtype = np.dtype(text(f["dtype"]))
    raw = f["array"]
    if not isinstance(raw, bytes | bytearray):
        raise ValueError("array field is not bytes")
    array = np.frombuffer(raw, dtype=dtype)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"array of {array.size} elements does not match shape {shape}")
    return array.reshape(shape)


def decode_job(model: str, fields: dict[bytes, bytes]) -> Job:
    """Rebuild a Job from stream fields; raises ValueError/KeyError on a malformed entry. A ``payload=image``
    job comes back with ``array`` None and ``image`` the encoded bytes (the worker decodes them)."""
    f = {text(k): v for k, v in fields.items()}
    payload = text(f.get("payload", PAYLOAD_ARRAY))
    array, image = None, None
    if payload == PAYLOAD_ARRAY:
        array = _decode_array(f)
    elif payload == PAYLOAD_IMAGE:
        image = f["image"]
        if not isinstance(image, bytes | bytearray) or not image:
            raise ValueError("image field is empty or not bytes")
        image = bytes(image)
    else:
        raise ValueError(f"unknown payload {payload!r}")
    return Job(
        model=model,
        array=array,
        meta=json.loads(f["meta"]),
        options=json.loads(f["options"]),
        deadline=float(text(f["deadline"])),
        job_id=text(f["job_id"]),
        enqueued_at=float(text(f.get("enqueued_at", b"0"))),
        image=image,
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
            queued_ms = self._queued_ms()
            return redis_now_ms - queued_ms, queued_ms + int(text(ttl)) - redis_now_ms
        except ValueError:
            return None

    def _queued_ms(self) -> int:
        """Redis's time in ms when the job was first queued: its entry ID's, or a requeued job's ``queued_ms``."""
        first = self.fields.get(b"queued_ms")
        return int(text(first)) if first is not None else int(self.entry_id.split("-", 1)[0])

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
        """The fields of its dead-letter entry: the job's own without the image bytes (array or encoded),
        plus why, after how many deliveries, by which consumer and when."""
        fields: dict[bytes, Any] = {k: v for k, v in self.fields.items() if k not in IMAGE_FIELDS}
        fields.update({b"model": self.model, b"error": reason, b"deliveries": str(self.deliveries),
                       b"consumer": consumer, b"dead_at": repr(time.time()), b"entry_id": self.entry_id})
        return fields

    def requeued(self) -> dict[bytes, Any]:
        """The fields of a fresh entry for another try, carrying its tries so far and the time of its first
        queueing (the new entry's ID is later: the job's deadline stays where it was)."""
        fields: dict[bytes, Any] = dict(self.fields)
        fields[b"attempts"] = str(self.deliveries)
        try:
            fields[b"queued_ms"] = str(self._queued_ms())
        except ValueError:  # not on Redis's clock: its absolute deadline field still holds
            pass
        return fields
