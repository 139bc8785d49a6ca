"""Dispatchers: how a preprocessed sample reaches a model and its result comes back.

One interface (`base.Dispatcher`), two implementations: `local.LocalDispatcher` (embedded, in-process
batching; the default) and `redis_streams.RedisDispatcher` (Redis Streams + `s2amnet worker`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.dispatch.base import Dispatcher
    from app.settings import Settings
    from model.predictor import Predictor


def create_dispatcher(predictors: Mapping[str, Predictor], settings: Settings) -> Dispatcher:
    """The Redis dispatcher when a Redis URL is set, else the embedded one."""
    if settings.redis_url:
        from app.dispatch.redis_streams import RedisDispatcher  # noqa: PLC0415 - needs redis

        return RedisDispatcher(predictors, settings)
    from app.dispatch.local import LocalDispatcher  # noqa: PLC0415

    return LocalDispatcher(predictors, settings)
