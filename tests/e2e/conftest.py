"""Fixtures of the Redis-mode end-to-end tests: tiny random-weight models and a real redis-server.

Processes, models, images and reference answers: tests/support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.harness import RedisServer
from support.weights import SMALLEST_INPUT_SIZE, make_weights


@pytest.fixture(scope="session")
def e2e_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_weights(tmp_path_factory.mktemp("e2e-weights"), SMALLEST_INPUT_SIZE, names=["cls", "det"])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
