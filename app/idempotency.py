"""`Idempotency-Key` support: a repeated request with the same key within the TTL gets the stored answer
(same `result_id`s, nothing computed again).

The store is a tiny async interface so that Redis mode can back it with Redis (`SET key value EX ttl`,
and `SET lock:key NX PX` for `lock`); `InMemoryIdempotencyStore` serves the embedded mode.

Semantics (after the IETF httpapi idempotency-key draft):
- the key is scoped by API key (principal) and endpoint; the stored entry remembers a fingerprint of the
  request (method, path, query, content type, body): the same key with a different request -> 422;
- only successful (2xx) answers are stored, so a retry after a 503/504 is computed;
- concurrent requests with the same key are serialised (`lock`): the second waits and gets the replay.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from python_multipart.multipart import parse_options_header

if TYPE_CHECKING:
    from app.settings import Settings

MAX_KEY_LENGTH = 255


class IdempotencyStore(abc.ABC):
    @abc.abstractmethod
    async def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry `{"fingerprint", "status", "body"}` or None (absent or expired)."""

    @abc.abstractmethod
    async def put(self, key: str, entry: dict[str, Any], ttl_s: float) -> None: ...

    @abc.abstractmethod
    def lock(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Serialise requests that carry the same key."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


class InMemoryIdempotencyStore(IdempotencyStore):
    """Process-local store with TTL expiry, bounded by the number of entries and by their size (oldest
    evicted). Entries are kept as their JSON text: the size bound is the memory they take, and a 16-image
    answer with masks costs its megabyte of JSON rather than several of Python objects."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 256 * 1024 * 1024):
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.bytes = 0

    def _purge(self, now: float) -> None:
        while self._entries:
            key, (expires, data) = next(iter(self._entries.items()))
            if expires > now and len(self._entries) <= self._max_entries and self.bytes <= self._max_bytes:
                break
            self._entries.popitem(last=False)
            self.bytes -= len(data)

    async def get(self, key: str) -> dict[str, Any] | None:
        now = time.monotonic()
        item = self._entries.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._entries[key]
            self.bytes -= len(item[1])
            return None
        return json.loads(item[1])

    async def put(self, key: str, entry: dict[str, Any], ttl_s: float) -> None:
        now = time.monotonic()
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old[1])
        data = json.dumps(entry, separators=(",", ":")).encode()
        self._entries[key] = (now + ttl_s, data)  # insertion order == expiry order (one TTL)
        self.bytes += len(data)
        self._purge(now)  # an entry larger than the whole bound is not kept

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock_, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock_, users - 1)


def scoped_key(key: str, principal: str | None, endpoint: str) -> str:
    who = hashlib.sha256((principal or "").encode()).hexdigest()[:16]
    return f"{who}:{endpoint}:{key}"


def fingerprint(method: str, path: str, query: str, content_type: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method, path, query, content_type.split(";")[0].strip().lower()):
        h.update(part.encode("utf-8", "replace"))
        h.update(b"\x00")
    if content_type.lower().startswith("multipart/"):
        # The multipart boundary is random per request: fingerprint the body without it.
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if boundary:
            body = body.replace(boundary, b"")
    h.update(body)
    return h.hexdigest()


def create_store(settings: Settings) -> IdempotencyStore:
    """The store of the service: in Redis when it runs in Redis mode (shared by every API instance), else
    in this process's memory."""
    if settings.redis_url:
        from app.idempotency_redis import RedisIdempotencyStore  # noqa: PLC0415 - needs redis

        return RedisIdempotencyStore(settings)
    return InMemoryIdempotencyStore(settings.idempotency_max_entries, int(settings.idempotency_max_mb * 1024 * 1024))
