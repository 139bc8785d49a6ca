"""app.idempotency: the in-memory Idempotency-Key store and request fingerprints."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.idempotency import InMemoryIdempotencyStore, fingerprint

ROOT = Path(__file__).resolve().parents[2]


def test_in_memory_idempotency_store_ttl_bound_and_lock():
    async def go():
        store = InMemoryIdempotencyStore(max_entries=3)
        await store.put("a", {"v": 1}, ttl_s=0.05)
        assert (await store.get("a")) == {"v": 1}
        await asyncio.sleep(0.08)
        assert await store.get("a") is None
        for k in "bcde":
            await store.put(k, {"v": k}, ttl_s=60)
        assert len(store) == 3 and await store.get("b") is None and await store.get("e") == {"v": "e"}

        order = []

        async def worker(i):
            async with store.lock("same"):
                order.append(("in", i))
                await asyncio.sleep(0.01)
                order.append(("out", i))

        await asyncio.gather(*(worker(i) for i in range(3)))
        assert all(order[j][0] == "in" and order[j + 1][0] == "out" for j in range(0, 6, 2))
        assert store._locks == {}

    asyncio.run(go())


def test_in_memory_idempotency_store_is_bounded_by_bytes():
    """Big answers (16 images of masks) are evicted by size, oldest first, whatever the entry bound."""

    async def go():
        store = InMemoryIdempotencyStore(max_entries=10_000, max_bytes=10_000)
        big = {"status": 200, "body": [{"mask": "x" * 3000}]}
        for k in "abcd":
            await store.put(k, big, ttl_s=60)
        assert len(store) == 3 and store.bytes <= 10_000
        assert await store.get("a") is None and await store.get("d") == big  # a JSON round trip
        await store.put("huge", {"body": "y" * 20_000}, ttl_s=60)  # larger than the bound: not kept
        assert await store.get("huge") is None and store.bytes <= 10_000
        await store.put("d", {"v": 1}, ttl_s=60)
        await store.put("d", {"v": 22}, ttl_s=60)  # replacing an entry frees its bytes
        assert len(store) == 1 and store.bytes == len(b'{"v":22}')

    asyncio.run(go())


def test_fingerprint_ignores_the_multipart_boundary():
    a = fingerprint("POST", "/detect", "", "multipart/form-data; boundary=AAA", b"--AAA\r\nx\r\n--AAA--")
    b = fingerprint("POST", "/detect", "", "multipart/form-data; boundary=BBB", b"--BBB\r\nx\r\n--BBB--")
    c = fingerprint("POST", "/detect", "", "multipart/form-data; boundary=BBB", b"--BBB\r\ny\r\n--BBB--")
    assert a == b != c
    d = fingerprint("POST", "/detect", "", 'multipart/form-data; boundary="CCC"; charset=utf-8',
                    b"--CCC\r\nx\r\n--CCC--")  # quoted, with a parameter after it
    assert d == a
