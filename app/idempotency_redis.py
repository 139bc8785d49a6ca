"""Redis-backed `Idempotency-Key` store (Redis mode): shared by every API instance.

- entry: ``SET s2amnet:idem:<scoped key> <json> PX <ttl>`` — every key expires, nothing grows without
  bound beyond "requests with a new key per TTL";
- lock: ``SET s2amnet:idem-lock:<scoped key> <token> NX PX <lock ttl>``, polled until acquired (bounded),
  released with a compare-and-delete script so that a lock that expired and was taken by another
  request is never released by the first one;
- Redis errors become ``Unavailable`` (503 + Retry-After), like the dispatcher's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from app.dispatch.base import Unavailable
from app.idempotency import IdempotencyStore
from app.queue.connections import CONNECTION_ERRORS, redis_client
from app.queue.constants import idempotency_key, idempotency_lock_key

if TYPE_CHECKING:
    from app.settings import Settings

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisIdempotencyStore(IdempotencyStore):
    """``RedisIdempotencyStore(settings)`` (uses ``redis_url``, ``request_timeout_s``, ``retry_after_s``)
    or ``RedisIdempotencyStore(redis_url=...)``. The client is created on first use, in the running loop."""

    def __init__(self, settings: Settings | None = None, *, redis_url: str | None = None,
                 lock_wait_s: float | None = None, lock_ttl_s: float | None = None,
                 retry_after_s: float | None = None):
        # without settings: the defaults of Settings
        self.redis_url = redis_url or (settings.redis_url if settings is not None else None)
        if not self.redis_url:
            raise ValueError("RedisIdempotencyStore needs a Redis URL")
        timeout = float(settings.request_timeout_s) if settings is not None else 10.0
        self.lock_wait_s = lock_wait_s if lock_wait_s is not None else timeout
        self.lock_ttl_s = lock_ttl_s if lock_ttl_s is not None else timeout + 5.0
        if retry_after_s is None:
            retry_after_s = float(settings.retry_after_s) if settings is not None else 1.0
        self.retry_after_s = retry_after_s
        self._r = None
        self._release = None

    @staticmethod
    def entry_key(key: str) -> str:
        return idempotency_key(key)

    @staticmethod
    def lock_key(key: str) -> str:
        return idempotency_lock_key(key)

    def _client(self):
        if self._r is None:
            self._r = redis_client(self.redis_url, socket_timeout=2.0)
            self._release = self._r.register_script(_RELEASE_LUA)
        return self._r

    def _unavailable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"the idempotency store (Redis) is unreachable: {type(exc).__name__}",
                           retry_after=self.retry_after_s)

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._client().get(self.entry_key(key))
        except (RedisError, *CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc) from None
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    async def put(self, key: str, entry: dict[str, Any], ttl_s: float) -> None:
        data = json.dumps(entry, separators=(",", ":"))
        try:
            await self._client().set(self.entry_key(key), data, px=max(1, int(ttl_s * 1000)))
        except (RedisError, *CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc) from None

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        r = self._client()
        name = self.lock_key(key)
        token = uuid.uuid4().hex
        end = time.monotonic() + self.lock_wait_s
        delay = 0.01
        try:
            while not await r.set(name, token, nx=True, px=max(1, int(self.lock_ttl_s * 1000))):
                if time.monotonic() >= end:
                    raise Unavailable("another request with the same Idempotency-Key is still running",
                                      retry_after=self.retry_after_s)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        except (RedisError, *CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc) from None
        try:
            yield
        finally:
            with contextlib.suppress(RedisError, *CONNECTION_ERRORS):
                await self._release(keys=[name], args=[token])

    async def close(self) -> None:
        if self._r is not None:
            with contextlib.suppress(Exception):
                await self._r.aclose()
            self._r = None
