"""Fixtures of the API suite (the servers themselves: apiserver.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apiserver import API_KEY, MAIN_SERVER_ENV, MODES, Server, make_weights, running_server


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight classify (cls), detect (det) and segment (seg) models at 64x64."""
    return make_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session", params=MODES)
def server(request: pytest.FixtureRequest, weights_dir: Path) -> Iterator[Server]:
    """The shared server: all three tiny models, API keys on, small limits (MAIN_SERVER_ENV)."""
    with running_server(request.param, weights_dir, **MAIN_SERVER_ENV) as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


@pytest.fixture
def anon(server: Server) -> Iterator[httpx.Client]:
    """A client without API key."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
