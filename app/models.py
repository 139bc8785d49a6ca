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


def find_model_folders(
    root: Path, wanted: Sequence[str] = (), *, skip_unreadable: bool = False
) -> list[tuple[str, Path]]:
    """(name, folder) of the model folders (those with a manifest.json) in ``root``, in name order, only
    the ``wanted`` ones (by manifest name or folder name) if given; RuntimeError names what is missing.

    A folder whose manifest cannot be read (not JSON, not a JSON object) stops the search with a
    RuntimeError naming the file when it may be one of the models asked for: every model when none is
    named, or a wanted one by its folder name. Any other such folder (or every one, with
    ``skip_unreadable``) is logged and left out: it is not a model that was asked for, and it must not
    keep those from loading. Should a wanted model then be missing, the error names these folders too."""
    if not root.is_dir():
        raise RuntimeError(f"weights folder {str(root)!r} does not exist")
    found: dict[str, Path] = {}
    unreadable: list[str] = []
    for folder in find_weights(root):
        path = folder / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except (OSError, ValueError) as exc:
            problem = f"{path} is unreadable: {exc}"
            if not skip_unreadable and (not wanted or folder.name in wanted):
                raise RuntimeError(problem) from None
            log.warning("%s; left out", problem)
            unreadable.append(problem)
            continue
        found[str(manifest.get("name") or folder.name)] = folder
    also = f"; left out: {'; '.join(unreadable)}" if unreadable else ""
    if wanted:
        missing = [m for m in wanted if m not in found and m not in {f.name for f in found.values()}]
        if missing:
            raise RuntimeError(f"models {missing} not found in {str(root)!r} (found: {sorted(found)}){also}")
        found = {n: f for n, f in found.items() if n in wanted or f.name in wanted}
    if not found:
        raise RuntimeError(f"no model folders (with manifest.json) in {str(root)!r}{also}")
    return sorted(found.items())


def discover_models(settings: Settings, *, skip_unreadable: bool = True) -> list[tuple[str, Path]]:
    """(name, folder) of the model folders to choose from, in name order; raises on a missing wanted model.

    A folder whose manifest cannot be read is logged and left out, so that a broken folder beside them does
    not keep the others from being chosen; ``skip_unreadable=False`` stops on it instead, as when every
    model is loaded (see `find_model_folders`)."""
    return find_model_folders(Path(settings.weights_dir), settings.models, skip_unreadable=skip_unreadable)


def load_predictors(settings: Settings) -> dict[str, Predictor]:
    """Load every model to serve onto the settings' device; records the load time and model-info metrics."""
    from model.predictor import Predictor  # noqa: PLC0415 - torch-heavy

    device = settings.resolved_device()
    predictors: dict[str, Predictor] = {}
    for name, folder in discover_models(settings, skip_unreadable=False):
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
