"""What a job carries through Redis: the uploaded image when it is smaller than the preprocessed array
(the worker decodes it again by the API's rule), else the array. Real redis-server, API and worker
processes; the answers are compared with an embedded (in-process) API on the same weights."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from support.harness import JOBS, Proc, Stack, redis_stack, start_api, wait_ready
from support.images import encode, exif_rotated, jpeg, pattern, png
from support.weights import SMALLEST_INPUT_SIZE as INPUT_SIZE

from app.dispatch.base import Job, JobFailed
from app.dispatch.redis_streams import RedisDispatcher

ARRAY_BYTES = 3 * INPUT_SIZE * INPUT_SIZE  # what a job carries as the preprocessed array


def noisy_png(w: int, h: int, seed: int = 0) -> bytes:
    """A PNG that does not compress: larger than the array, so it travels as the array."""
    return encode(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "PNG")


def uploads() -> dict[str, bytes]:
    rgb = pattern(40, 34, seed=5)
    gray16 = pattern(36, 30, seed=6)[..., 0].astype(np.uint16) * 257
    out = {
        "jpeg": jpeg(44, 36, seed=1),
        "png": png(50, 38, seed=2),
        "jpeg-exif-rotated": exif_rotated(rgb, "JPEG"),
        "jpeg-grayscale": encode(Image.fromarray(rgb[..., 1]), "JPEG", quality=90),
        "png-16-bit": encode(Image.fromarray(gray16), "PNG"),
        "noisy-png": noisy_png(64, 48),
    }
    for name, data in out.items():  # the last goes as the array, the others as the image
        assert (len(data) < ARRAY_BYTES) == (name != "noisy-png"), (name, len(data))
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, e2e_weights: Path) -> Iterator[tuple[Stack, Proc]]:
    """A Redis-mode API serving cls and det with ONE worker, serving det only (cls jobs stay queued, to be
    looked at), and an embedded API on the same weights."""
    tmp = tmp_path_factory.mktemp("payload")
    (tmp / "embedded").mkdir()
    embedded = start_api(e2e_weights, tmp / "embedded", wait=False, mode="embedded", S2AMNET_MODELS="cls,det")
    try:
        with redis_stack(tmp, e2e_weights, workers=1, models="cls,det",
                         worker_env={"S2AMNET_MODELS": "det"}) as stack:
            wait_ready(embedded)
            yield stack, embedded
    finally:
        embedded.stop()


def test_the_worker_answers_an_image_payload_as_the_embedded_service_does(servers):
    stack, embedded = servers
    with httpx.Client(timeout=60) as client:
        for name, data in uploads().items():
            answers = []
            for url in (stack.api.url, embedded.url):
                resp = client.post(url + "/detect", files={"file": (name, data, "application/octet-stream")},
                                   params={"conf": 0.0, "max_det": 5})
                assert resp.status_code == 200, (name, resp.text)
                answers.append(resp.json())
            got, want = answers
            assert got["image"] == want["image"] and got["verdict"] == want["verdict"], name
            assert got["defects"], "random weights at conf=0 always give some boxes"
            assert [(d["label"], d["score"], d["box"]) for d in got["defects"]] == \
                [(d["label"], d["score"], d["box"]) for d in want["defects"]], name


def _entry_bytes(fields: dict[bytes, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


def test_a_small_upload_is_queued_as_its_bytes_a_large_one_as_the_array(servers):
    """cls has no worker here: the jobs stay in its stream, where their fields can be read."""
    stack, _ = servers
    small, large = jpeg(56, 42, seed=7), noisy_png(64, 48, seed=8)
    assert len(small) < ARRAY_BYTES < len(large)
    r = stack.r()
    before = r.xlen(JOBS.format("cls"))
    with httpx.Client(timeout=30) as client:
        for data in (small, large):
            resp = client.post(stack.api.url + "/classify", files={"file": ("x", data, "image/png")},
                               headers={"X-Request-Timeout": "0.3"})
            assert resp.status_code == 504, resp.text
    entries = r.xrange(JOBS.format("cls"))[before:]
    assert len(entries) == 2
    image_job, array_job = (fields for _, fields in entries)
    assert image_job[b"payload"] == b"image" and image_job[b"image"] == small and b"array" not in image_job
    assert array_job[b"payload"] == b"array" and len(array_job[b"array"]) == ARRAY_BYTES
    assert b"image" not in array_job
    # the rest of a job (ids, deadline, options, meta) is a few hundred bytes either way
    assert _entry_bytes(image_job) < len(small) + 1000 < ARRAY_BYTES < _entry_bytes(array_job)
    r.xtrim(JOBS.format("cls"), maxlen=0)


def test_an_image_the_worker_cannot_decode_is_answered_failed_and_dead_lettered(servers):
    stack, _ = servers
    garbage = b"\xff\xd8\xff\xe0" + bytes(200)  # starts like a JPEG, is none

    async def go() -> BaseException | dict:
        d = RedisDispatcher(["det"], redis_url=stack.redis.url)
        await d.start()
        try:
            job = Job(model="det", array=None, meta={"orig_w": 8, "orig_h": 8}, options={},
                      deadline=time.time() + 20, image=garbage)
            t0 = time.monotonic()
            try:
                return await d.submit(job)
            except JobFailed as exc:
                assert time.monotonic() - t0 < 10  # at once, not after retries or visibility timeouts
                return exc
        finally:
            await d.stop(1)

    result = asyncio.run(go())
    assert isinstance(result, JobFailed), result
    assert "undecodable image" in result.detail
    r = stack.r()
    dead = r.xrange("s2amnet:dead:det")
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"payload"] == b"image" and b"image" not in fields and b"undecodable image" in fields[b"error"]
    r.delete("s2amnet:dead:det")
