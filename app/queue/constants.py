"""Redis key names of the Redis mode (also read by the deployment's KEDA scaler) and stream bounds."""

from __future__ import annotations

PREFIX = "s2amnet"
GROUP = "workers"  # the consumer group of every job stream

# Bounds shared by the API and the workers.
DEFAULT_REPLY_MAXLEN = 10_000  # entries per reply stream (MAXLEN ~)
DEFAULT_REPLY_TTL_S = 600  # a reply stream nobody reads expires
DEFAULT_DEAD_MAXLEN = 1_000  # entries per dead-letter stream (MAXLEN ~)


def job_stream(model: str) -> str:
    """The jobs of one model, read by the workers through the group `GROUP`."""
    return f"{PREFIX}:jobs:{model}"


def dead_stream(model: str) -> str:
    """Jobs of one model that failed or were delivered too often (without their image bytes)."""
    return f"{PREFIX}:dead:{model}"


def reply_stream(instance: str) -> str:
    """The replies for one API instance."""
    return f"{PREFIX}:replies:{instance}"


def worker_key(consumer: str) -> str:
    """A worker's heartbeat (JSON, with a TTL)."""
    return f"{PREFIX}:worker:{consumer}"


def cancel_key(job_id: str) -> str:
    """Set by the API when the request of a queued job went away; the worker that reads the job acks it
    without computing it. Expires a minute after the job's deadline."""
    return f"{PREFIX}:cancelled:{job_id}"


def idempotency_key(key: str) -> str:
    """A stored answer for an Idempotency-Key (Redis idempotency store)."""
    return f"{PREFIX}:idem:{key}"


def idempotency_lock_key(key: str) -> str:
    """The lock held while the first request with an Idempotency-Key runs."""
    return f"{PREFIX}:idem-lock:{key}"
