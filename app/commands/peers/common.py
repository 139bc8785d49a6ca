"""What every peer server does per image, the same as `s2amnet serve`: decode (`app.codec.decode_image`
with the service's default limits), `Predictor.preprocess`, `Predictor.infer` (eager PyTorch),
`Predictor.postprocess` and the service's JSON form of the result (`app.inference.format_result`)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from app.dispatch.base import Job
from app.inference import format_result
from app.pipeline import ImageLimits
from app.pipeline import prepare as decode_and_preprocess
from app.settings import Settings
from model.predictor import Predictor, Sample

LIMITS = ImageLimits(max_pixels=Settings.model_fields["max_pixels"].default,
                     min_side=Settings.model_fields["min_image_side"].default)


def parse_args(description: str, argv: list[str] | None = None, **extra: Any) -> argparse.Namespace:
    """--weights, --port, --device, --threads and the server's own `extra` options ({flag: default})."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--weights", required=True, help="one model's weights folder")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (torch's default when unset)")
    for flag, default in extra.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=type(default), default=default)
    return p.parse_args(argv)


def load(folder: str, device: str, threads: int | None) -> Predictor:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return Predictor.from_folder(folder, device=device)


def prepare(predictor: Predictor, data: bytes) -> Sample:
    """Image bytes → the model's input, as the service decodes and preprocesses them."""
    array, meta = decode_and_preprocess(predictor, data, 0, LIMITS)
    return Sample(array, meta)


def answer(predictor: Predictor, raw: dict, meta: dict) -> dict[str, Any]:
    """One image's forward output → the service's JSON result (model, task, image, verdict, defects[, top_k])."""
    out = predictor.postprocess(raw, meta)
    job = Job(model=predictor.name, array=None, meta=meta, options={}, deadline=math.inf)  # type: ignore[arg-type]
    return format_result(predictor, job, out)
