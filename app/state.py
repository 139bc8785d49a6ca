"""The state of a running service, one typed object (`app.state.service`): set up by `app.main`, read
by the routes, and by `s2amnet serve` while it drains."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette

    from app.dispatch.base import Dispatcher
    from app.idempotency import IdempotencyStore
    from app.line import Outlets
    from app.recipes import RecipeBook
    from app.settings import Settings
    from model.predictor import Predictor


@dataclass(eq=False)
class ServiceState:
    settings: Settings
    idempotency: IdempotencyStore
    predictors: dict[str, Predictor] | None = None  # None until every model is loaded
    defaults: dict[str, str] = field(default_factory=dict)  # task -> its default model
    dispatcher: Dispatcher | None = None
    ready: bool = False
    draining: bool = False  # shutting down: new inspection requests get 503
    startup_error: str | None = None
    on_startup_failure: Callable[[str], None] | None = None  # `s2amnet serve`: exit when start-up fails
    on_ready: Callable[[], object] | None = None  # `s2amnet serve`: once ready, `runtime.freeze_startup_objects`
    inflight: int = 0  # inspection requests being answered
    decoder: ThreadPoolExecutor | None = None  # the threads that decode images (their number: at once)
    startup_task: asyncio.Task | None = None
    recipes: RecipeBook | None = None  # set once the models are loaded (recipes are checked against them)
    outlets: Outlets | None = None  # records, plant bus (app.line)


def service_state(app: Starlette) -> ServiceState:
    """The state of the service ``app`` runs (see `app.main.create_app`)."""
    return app.state.service
