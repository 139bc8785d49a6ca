"""Fixtures of the Redis-mode end-to-end tests: tiny random-weight models and a real redis-server.

Process helpers live in redis_harness.py, models/images/reference answers in e2e_helpers.py (unique
module names: tests/app has its own conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import make_weights
from redis_harness import RedisServer


@pytest.fixture(scope="session")
def e2e_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_weights(tmp_path_factory.mktemp("e2e-weights"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
