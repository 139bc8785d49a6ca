"""Redis clients of the Redis mode, the errors that mean "Redis is unreachable", and consumer groups.

Both factories fail fast while Redis is down and reconnect by themselves afterwards: one retry without
backoff, so a pooled connection broken by a Redis restart is replaced at once, while a Redis that is
really down answers ``ConnectionError`` in milliseconds (connection refused) or after the connect
timeout (unreachable host).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from app.queue.constants import GROUP, job_stream

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def _client_options(socket_timeout: float | None, connect_timeout: float, retries: int,
                    retry: type[Retry] | type[AsyncRetry] = Retry) -> dict[str, Any]:
    return dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=retry(NoBackoff(), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def redis_client(url: str, *, socket_timeout: float | None, connect_timeout: float = 1.0,
                 retries: int = 1, max_connections: int | None = None,
                 pool_timeout: float = 2.0) -> aioredis.Redis:
    """An asyncio client (the API side); with ``max_connections``, a pool that waits up to
    ``pool_timeout`` for a free connection instead of opening more."""
    options = _client_options(socket_timeout, connect_timeout, retries, AsyncRetry)
    if max_connections:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **options
        )
        return aioredis.Redis(connection_pool=pool)
    return aioredis.Redis.from_url(url, **options)


def blocking_redis_client(url: str, *, socket_timeout: float | None, connect_timeout: float = 2.0,
                          retries: int = 1) -> redis.Redis:
    """A synchronous client (the worker)."""
    return redis.Redis.from_url(url, **_client_options(socket_timeout, connect_timeout, retries))


def _group_exists(exc: ResponseError) -> bool:
    return "BUSYGROUP" in str(exc)


# Id 0: jobs added before the group existed (e.g. right after a Redis restart without persistence) are
# still delivered.
_GROUP_START = "0"


async def ensure_group(r: aioredis.Redis, model: str) -> None:
    """Create the model's job stream and consumer group if missing (asyncio client)."""
    try:
        await r.xgroup_create(job_stream(model), GROUP, id=_GROUP_START, mkstream=True)
    except ResponseError as exc:
        if not _group_exists(exc):
            raise


def ensure_group_blocking(r: redis.Redis, model: str) -> None:
    """Create the model's job stream and consumer group if missing (synchronous client)."""
    try:
        r.xgroup_create(job_stream(model), GROUP, id=_GROUP_START, mkstream=True)
    except ResponseError as exc:
        if not _group_exists(exc):
            raise
