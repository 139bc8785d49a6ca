"""app.queue: key names and the wire format of the Redis mode (what is stored in Redis must not change)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.dispatch.base import Job
from app.queue import constants
from app.queue.jobs import OK, JobEntry, decode_job, decode_reply, encode_job, encode_reply, reply_result


def test_key_names():
    assert constants.job_stream("m") == "s2amnet:jobs:m" and constants.GROUP == "workers"
    assert constants.dead_stream("m") == "s2amnet:dead:m"
    assert constants.reply_stream("i") == "s2amnet:replies:i"
    assert constants.worker_key("w") == "s2amnet:worker:w"
    assert constants.cancel_key("j") == "s2amnet:cancelled:j"
    assert constants.idempotency_key("k") == "s2amnet:idem:k"
    assert constants.idempotency_lock_key("k") == "s2amnet:idem-lock:k"


def _as_read(fields: dict) -> dict[bytes, bytes]:
    """Fields as redis-py reads them back: bytes keys and values."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def test_a_job_survives_the_round_trip_and_its_expiry_is_judged_on_redis_clock():
    array = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    job = Job(model="m", array=array, meta={"orig_w": 5}, options={"conf": 0.5}, deadline=time.time() + 10)
    fields = _as_read(encode_job(job, "s2amnet:replies:i"))
    assert set(fields) == {b"job_id", b"reply_to", b"deadline", b"ttl_ms", b"enqueued_at", b"options", b"meta",
                           b"dtype", b"shape", b"array", b"attempts"}
    back = decode_job("m", fields)
    assert np.array_equal(back.array, array) and back.meta == job.meta and back.options == job.options
    assert (back.job_id, back.deadline) == (job.job_id, job.deadline)

    queued_ms = 1_000_000
    entry = JobEntry("m", f"{queued_ms}-0", fields, deliveries=1)
    ttl = int(fields[b"ttl_ms"])
    assert not entry.expired(queued_ms + ttl - 1) and entry.expired(queued_ms + ttl)
    local = entry.decode(queued_ms + 2000)  # 2 s after it was queued, on Redis's clock
    assert abs(local.deadline - (time.time() + (ttl - 2000) / 1000)) < 0.5
    assert b"array" not in entry.dead_letter("why", "w") and entry.requeued()[b"attempts"] == "1"
    with pytest.raises((KeyError, ValueError)):
        decode_job("m", {**fields, b"shape": b"9,9"})


def test_a_reply_round_trip():
    reply = decode_reply(_as_read(encode_reply("j", OK, {"v": np.float32(0.5)})))
    assert reply["status"] == OK and reply_result(reply) == {"v": 0.5}
