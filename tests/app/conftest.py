"""Fixtures of the API suite: tiny models, the shared server (tests/support/harness.py), clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.harness import API_KEY, MAIN_SERVER_ENV, MODES, Server, running_server
from support.weights import make_weights


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight classify (cls), detect (det) and segment (seg) models at 64x64."""
    return make_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def det(weights_dir: Path):
    """The tiny detect model, loaded in this process."""
    from model.predictor import Predictor

    return Predictor.from_folder(weights_dir / "det")


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
