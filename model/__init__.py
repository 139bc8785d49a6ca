"""S2-AMNet model package: pure PyTorch, never imports `app/`.

The public entry points are loaded lazily so that `import model` stays cheap (no torch import until a
model is actually built or loaded)::

    from model import build_model, load_model, save_model, Predictor
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_model", "load_model", "save_model", "Predictor", "CheckpointError"]

_LAZY = {
    "build_model": "model.registry",
    "load_model": "model.checkpoint",
    "save_model": "model.checkpoint",
    "CheckpointError": "model.checkpoint",
    "Predictor": "model.predictor",
}

if TYPE_CHECKING:  # pragma: no cover
    from model.checkpoint import CheckpointError, load_model, save_model
    from model.predictor import Predictor
    from model.registry import build_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
