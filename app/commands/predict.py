"""`s2amnet predict IMAGE... --task detect [--model NAME] [--url URL]`: print the JSON result.

Without --url the model is loaded from --weights-dir and run in this process, through the service's
inspection pipeline (app.pipeline: decode + limits, preprocess, app.inference.run_batch) on the service's
backend (`app.runtime.set_backend`: S2AMNET_BACKEND, unset the device's default); with --url
the images are sent to a running server (app.client). Either way the output has the API's format: one
image -> one JSON object, several -> a JSON list in argument order. Errors go to stderr as problem+json,
with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="inspect image files and print the JSON result (locally or via a server)",
        description="Inspect images with a local model (default) or a running server (--url).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--task", required=True, choices=["classify", "detect", "segment"])
    p.add_argument("--model", help="model name (default: the task's default model)")
    p.add_argument("--url", help="server base URL, e.g. http://localhost:8000 (default: run locally)")
    p.add_argument("--api-key", help="API key for --url (default: $S2AMNET_API_KEY)")
    p.add_argument(
        "--weights-dir", help="local: folder of model folders (default: S2AMNET_WEIGHTS_DIR or weights)"
    )
    p.add_argument("--device", help="local: cpu, cuda, cuda:N")
    p.add_argument("--recipes", help="local: recipe file deciding --recipe-id (default: S2AMNET_RECIPES)")
    p.add_argument("--conf", type=float)
    p.add_argument("--iou", type=float)
    p.add_argument("--max-det", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--mask-format", choices=["rle", "polygon", "png"])
    for name in ("station_id", "part_id", "meas_id", "recipe_id"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name)
    p.add_argument("--indent", type=int, default=2, help="JSON indent (0: one line)")
    p.set_defaults(func=run)


OPTION_NAMES = (
    "model",
    "conf",
    "iou",
    "max_det",
    "top_k",
    "mask_format",
    "station_id",
    "part_id",
    "meas_id",
    "recipe_id",
)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k, None) is not None}


def run(args: argparse.Namespace) -> int:
    import os

    from pydantic import ValidationError

    from app.errors import Problem
    from app.schemas import InspectOptions

    try:
        options = InspectOptions.model_validate(_options(args))
    except ValidationError as exc:
        return _fail({"status": 422, "title": "Invalid request", "detail": str(exc)})
    try:
        if args.url:
            answer = _remote(args, options, args.api_key or os.environ.get("S2AMNET_API_KEY"))
        else:
            answer = _local(args, options)
    except Problem as p:
        return _fail(
            {
                "type": "urn:s2amnet:problem:" + p.code,
                "title": p.title,
                "status": p.status,
                "detail": p.detail,
            }
        )
    except OSError as exc:
        return _fail({"status": 400, "title": "Cannot read input", "detail": str(exc)})
    except Exception as exc:
        from app.client import S2AMNetError
        from app.dispatch.base import DispatchError

        if isinstance(exc, S2AMNetError):
            return _fail(exc.problem or {"status": exc.status, "detail": exc.detail})
        if isinstance(exc, DispatchError):
            return _fail({"status": exc.status, "title": exc.reason, "detail": exc.detail})
        if type(exc).__name__ in ("CheckpointError", "RuntimeError"):
            return _fail({"status": 500, "title": "Cannot load model", "detail": str(exc)})
        raise
    print(json.dumps(answer, indent=args.indent or None))
    return 0


def _fail(problem: dict[str, Any]) -> int:
    print(json.dumps(problem), file=sys.stderr)
    return 1


def _remote(args: argparse.Namespace, options: Any, api_key: str | None) -> Any:
    from app.client import S2AMNetClient

    sent = options.model_dump(exclude_defaults=True)
    with S2AMNetClient(args.url, api_key=api_key, retries=2) as client:
        if len(args.images) == 1:
            return client.inspect(args.task, args.images[0], **sent).model_dump(exclude_unset=True)
        return [r.model_dump(exclude_unset=True) for r in client.inspect_many(args.task, args.images, **sent)]


def _local(args: argparse.Namespace, options: Any) -> Any:
    """Load the one model needed (the named one, or the task's default: its first by name) and run the
    service's inspection pipeline on the image files in this process."""
    import asyncio

    from app.errors import Problem
    from app.models import discover_models
    from app.pipeline import ImageLimits, in_process, inspect_images
    from app.recipes import RecipeBook, RecipeError
    from app.runtime import set_backend
    from app.settings import Settings
    from model.predictor import Predictor

    overrides: dict[str, Any] = {}
    if args.weights_dir:
        overrides["weights_dir"] = args.weights_dir
    if args.device:
        overrides["device"] = args.device
    if getattr(args, "recipes", None):
        overrides["recipes"] = args.recipes
    settings = Settings(**overrides)
    start = time.time()

    chosen = None
    for name, folder in discover_models(settings):
        task = json.loads((folder / "manifest.json").read_text()).get("task")
        if (options.model and name == options.model) or (not options.model and task == args.task):
            chosen = (name, folder, task)
            break
    if chosen is None:
        what = f"model {options.model!r}" if options.model else f"{args.task} model"
        manifest = Path(settings.weights_dir) / str(options.model or "") / "manifest.json"
        broken = f": {manifest} is unreadable" if options.model and manifest.is_file() else ""
        raise Problem(404, "unknown_model", f"no {what} in {str(settings.weights_dir)!r}{broken}")
    if chosen[2] != args.task:
        raise Problem(404, "unknown_model", f"model {chosen[0]!r} is a {chosen[2]} model, not {args.task}")
    predictor = Predictor.from_folder(chosen[1], device=settings.resolved_device())
    book = RecipeBook(settings.recipes, {predictor.name: predictor})
    try:
        book.load()
    except RecipeError as exc:
        raise Problem(422, "invalid_recipes", str(exc), title="Invalid recipe file") from None
    decision = book.decide(options.recipe_id, predictor, options.on_timeout)
    batch_size = settings.batch_sizes([predictor.name], strict=False)[predictor.name]
    set_backend(predictor.name, predictor, settings, batch_size)  # the service's forward: the same answers
    images = [Path(path).read_bytes() for path in args.images]

    async def inspect() -> list[dict[str, Any]]:
        return await inspect_images(
            predictor, images, options, in_process(predictor, batch_size),
            limits=ImageLimits(settings.max_pixels, settings.min_image_side), deadline=float("inf"),
            request_id=uuid.uuid4().hex, started=start, decision=decision,
        )

    answer = asyncio.run(inspect())
    return answer[0] if len(answer) == 1 else answer
