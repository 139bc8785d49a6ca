"""The served models: which folders of the weights folder to load, loading them, and the default
model of each task."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app import metrics
from app.settings import Settings
from model.checkpoint import MANIFEST_FILE, find_weights

if TYPE_CHECKING:
    from model.predictor import Predictor

log = logging.getLogger("s2amnet.api")


def find_model_folders(root: Path, wanted: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(name, folder) of the model folders (those with a manifest.json) in ``root``, in name order, only
    the ``wanted`` ones (by manifest name or folder name) if given; RuntimeError names what is missing."""
    if not root.is_dir():
        raise RuntimeError(f"weights folder {str(root)!r} does not exist")
    found: dict[str, Path] = {}
    for folder in find_weights(root):
        try:
            name = json.loads((folder / MANIFEST_FILE).read_text()).get("name") or folder.name
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{folder}/{MANIFEST_FILE} is unreadable: {exc}") from exc
        found[str(name)] = folder
    if wanted:
        missing = [m for m in wanted if m not in found and m not in {f.name for f in found.values()}]
        if missing:
            raise RuntimeError(f"models {missing} not found in {str(root)!r} (found: {sorted(found)})")
        found = {n: f for n, f in found.items() if n in wanted or f.name in wanted}
    if not found:
        raise RuntimeError(f"no model folders (with manifest.json) in {str(root)!r}")
    return sorted(found.items())


def discover_models(settings: Settings) -> list[tuple[str, Path]]:
    """(name, folder) of every model folder to load, in name order; raises on a missing wanted model."""
    return find_model_folders(Path(settings.weights_dir), settings.models)


def load_predictors(settings: Settings) -> dict[str, Predictor]:
    """Load every model to serve onto the settings' device; records the load time and model-info metrics."""
    from model.predictor import Predictor  # noqa: PLC0415 - torch-heavy

    device = settings.resolved_device()
    predictors: dict[str, Predictor] = {}
    for name, folder in discover_models(settings):
        t0 = time.perf_counter()
        predictor = Predictor.from_folder(folder, device=device)
        seconds = time.perf_counter() - t0
        served = str(predictor.name or name)
        predictors[served] = predictor
        variant = str(((predictor.manifest or {}).get("arch") or {}).get("variant", ""))
        metrics.MODEL_LOAD_SECONDS.labels(model=served).set(seconds)
        metrics.MODEL_INFO.labels(
            model=served, task=predictor.task, version=str(predictor.version), variant=variant
        ).set(1)
        log.info("loaded %s (%s, %s) from %s on %s in %.2f s", served, predictor.task, variant, folder, device,
                 seconds)
    return predictors


def load_beside_the_forwards(settings: Settings) -> dict[str, Predictor]:
    """`load_predictors` on a thread that will not run the forwards: with one torch thread when the forwards
    run on the CPU (see `app.runtime.one_torch_thread`)."""
    from app.runtime import one_torch_thread  # noqa: PLC0415

    if settings.resolved_device() == "cpu":
        one_torch_thread()
    return load_predictors(settings)


def default_models(predictors: Mapping[str, Predictor]) -> dict[str, str]:
    """The default model of each task: the first of that task by name."""
    defaults: dict[str, str] = {}
    for name in sorted(predictors):
        defaults.setdefault(predictors[name].task, name)
    return defaults
