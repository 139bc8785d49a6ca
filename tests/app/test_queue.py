"""app.queue: key names and the wire format of the Redis mode (what is stored in Redis must not change)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image
from support.images import encode, exif_rotated, jpeg, pattern, png

from app.dispatch.base import Job
from app.pipeline import ImageLimits, prepare
from app.queue import constants
from app.queue.jobs import (
    OK,
    PAYLOAD_ARRAY,
    PAYLOAD_IMAGE,
    JobEntry,
    choose_payload,
    decode_job,
    decode_reply,
    encode_job,
    encode_reply,
    reply_result,
)
from app.worker import decode_encoded


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
    return {k if isinstance(k, bytes) else k.encode(): v if isinstance(v, bytes) else str(v).encode()
            for k, v in fields.items()}


def test_a_job_survives_the_round_trip_and_its_expiry_is_judged_on_redis_clock():
    array = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    job = Job(model="m", array=array, meta={"orig_w": 5}, options={"conf": 0.5}, deadline=time.time() + 10)
    fields = _as_read(encode_job(job, "s2amnet:replies:i"))
    assert set(fields) == {b"job_id", b"reply_to", b"deadline", b"ttl_ms", b"enqueued_at", b"options", b"meta",
                           b"payload", b"dtype", b"shape", b"array", b"attempts"}
    assert fields[b"payload"] == b"array"
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
    # a retry, queued again 1.5 s later, keeps the deadline of the first queueing, also when requeued again
    retry = JobEntry("m", f"{queued_ms + 1500}-0", _as_read(entry.requeued()), deliveries=2)
    again = JobEntry("m", f"{queued_ms + 2500}-0", _as_read(retry.requeued()), deliveries=3)
    for e in (retry, again):
        assert not e.expired(queued_ms + ttl - 1) and e.expired(queued_ms + ttl)
        assert abs(e.decode(queued_ms + 2000).deadline - local.deadline) < 0.5
    with pytest.raises((KeyError, ValueError)):
        decode_job("m", {**fields, b"shape": b"9,9"})


def test_a_reply_round_trip():
    reply = decode_reply(_as_read(encode_reply("j", OK, {"v": np.float32(0.5)})))
    assert reply["status"] == OK and reply_result(reply) == {"v": 0.5}


def test_a_job_with_smaller_image_bytes_travels_as_the_image():
    array = np.zeros((3, 64, 64), np.uint8)  # 12288 bytes
    data = jpeg(40, 30)
    assert len(data) < array.nbytes
    job = Job(model="m", array=array, meta={"orig_w": 40, "orig_h": 30}, options={}, deadline=time.time() + 10,
              image=data)
    assert choose_payload(job) == PAYLOAD_IMAGE
    fields = _as_read(encode_job(job, "s2amnet:replies:i"))
    assert fields[b"payload"] == b"image" and fields[b"image"] == data
    assert not {b"array", b"dtype", b"shape"} & set(fields)  # the array does not travel beside it
    back = decode_job("m", fields)
    assert back.array is None and back.image == data and back.meta == job.meta and back.job_id == job.job_id

    entry = JobEntry("m", "1-0", fields, deliveries=1)
    assert b"image" not in entry.dead_letter("why", "w") and entry.requeued()[b"image"] == data
    with pytest.raises(ValueError):
        decode_job("m", {**fields, b"image": b""})
    with pytest.raises(ValueError):
        decode_job("m", {**fields, b"payload": b"tensor"})


def test_larger_image_bytes_or_none_travel_as_the_array():
    array = np.zeros((3, 8, 8), np.uint8)  # 192 bytes: any real image file is larger
    big = Job(model="m", array=array, meta={}, options={}, deadline=time.time() + 10, image=png(64, 64))
    plain = Job(model="m", array=array, meta={}, options={}, deadline=time.time() + 10)
    for job in (big, plain):
        assert choose_payload(job) == PAYLOAD_ARRAY
        fields = _as_read(encode_job(job, "r"))
        assert fields[b"payload"] == b"array" and b"image" not in fields
        assert np.array_equal(decode_job("m", fields).array, array)


def test_a_job_written_before_the_payload_field_is_read_as_an_array():
    array = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    job = Job(model="m", array=array, meta={"orig_w": 5}, options={}, deadline=time.time() + 10)
    fields = _as_read(encode_job(job, "r"))
    del fields[b"payload"]
    back = decode_job("m", fields)
    assert back.image is None and np.array_equal(back.array, array)


def _uploads() -> dict[str, bytes]:
    """Uploads in the forms a camera or a client sends: the API decodes each by one rule."""
    rgb = pattern(48, 40, seed=3)
    gray16 = (pattern(48, 40, seed=4)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    return {
        "jpeg": jpeg(48, 40, seed=1),
        "png": png(48, 40, seed=2),
        "jpeg-exif-rotated": exif_rotated(rgb, "JPEG"),
        "png-exif-rotated": exif_rotated(rgb, "PNG"),
        "jpeg-grayscale": encode(Image.fromarray(rgb[..., 1]), "JPEG", quality=90),
        "png-grayscale": encode(Image.fromarray(rgb[..., 2]), "PNG"),
        "png-16-bit": encode(Image.fromarray(gray16), "PNG"),
        "png-palette": encode(Image.fromarray(rgb).quantize(16), "PNG"),
    }


@pytest.mark.parametrize("kind", list(_uploads()))
def test_the_worker_decodes_an_image_payload_to_the_apis_array(det, kind: str):
    """API side: decode + preprocess (meta, validation); the job goes out as the image; worker side: decode
    the fields and the bytes again -> the very same array."""
    data = _uploads()[kind]
    array, meta = prepare(det, data, 0, ImageLimits(max_pixels=10**6, min_side=1))
    job = Job(model=det.name, array=array, meta=meta, options={}, deadline=time.time() + 10, image=data)
    fields = _as_read(encode_job(job, "r"))
    assert fields[b"payload"] == b"image", f"{kind}: {len(data)} bytes vs an array of {array.nbytes}"
    back = JobEntry(det.name, f"{int(time.time() * 1000)}-0", fields, deliveries=1).decode(None)
    assert back.array is None
    again = decode_encoded(det, back)
    assert again.dtype == np.uint8 and again.shape == array.shape
    assert np.array_equal(again, array), kind


def test_the_worker_refuses_an_image_that_decodes_to_another_size(det):
    data = jpeg(48, 40)
    job = Job(model=det.name, array=None, meta={"orig_w": 40, "orig_h": 48}, options={}, deadline=time.time() + 10,
              image=data)
    with pytest.raises(ValueError, match="decoded to 48x40"):
        decode_encoded(det, job)
    with pytest.raises(Exception, match="corrupt|unreadable|not a supported"):
        decode_encoded(det, Job(model=det.name, array=None, meta={"orig_w": 4, "orig_h": 4}, options={},
                                deadline=time.time() + 10, image=b"\xff\xd8\xffnot really a jpeg"))


def test_the_api_client_is_built_for_asyncio_and_fails_fast_while_redis_is_down():
    """The asyncio client gets asyncio retries (a synchronous Retry draws a warning at every start) and,
    against a port nobody listens on, answers a connection error at once instead of hanging."""
    import asyncio
    import warnings

    from support.harness import free_port

    from app.queue.connections import CONNECTION_ERRORS, redis_client

    async def go() -> float:
        r = redis_client(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
        t0 = time.monotonic()
        try:
            with pytest.raises(CONNECTION_ERRORS):
                await r.ping()
        finally:
            await r.aclose()
        return time.monotonic() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        took = asyncio.run(go())
    assert took < 5
