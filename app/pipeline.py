"""The inspection pipeline: image bytes -> decoded, preprocessed jobs -> results -> the API's answer.

`inspect_images` is what `POST /classify|/detect|/segment` does once the request is parsed and its model
chosen, and what `s2amnet predict` does with image files; the two differ only in how jobs are submitted
(the service's dispatcher, or `run_batch` in the calling process).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app import metrics
from app.codec import decode_image, upright_size
from app.dispatch.base import DeadlineExceeded, Dispatcher, Job, QueueFull, Unavailable
from app.inference import raise_for_result, run_batch
from app.recipes import Decision
from app.schemas import InspectOptions

if TYPE_CHECKING:
    import numpy as np

    from app.line import Outlets
    from model.predictor import Predictor

SubmitAll = Callable[[list[Job]], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    min_side: int


def prepare(predictor: Predictor, data: bytes, index: int, limits: ImageLimits) -> tuple[np.ndarray, dict]:
    """Decode one image (limits, EXIF, mode) and preprocess it for ``predictor``: (array, meta)."""
    image = decode_image(data, max_pixels=limits.max_pixels, min_side=limits.min_side, index=index)
    sample = predictor.preprocess(image)
    return sample.array, sample.meta


def via_dispatcher(dispatcher: Dispatcher) -> SubmitAll:
    """Submit every job at once (so they can share batches); the first failure cancels the rest. Its
    ``accepts_encoded`` is the dispatcher's: whether the jobs should carry their uploaded bytes."""

    async def submit_all(jobs: list[Job]) -> list[dict[str, Any]]:
        if len(jobs) == 1:
            return [await dispatcher.submit(jobs[0])]
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(dispatcher.submit(job)) for job in jobs]
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return [t.result() for t in tasks]

    submit_all.accepts_encoded = dispatcher.accepts_encoded  # type: ignore[attr-defined]
    return submit_all


def in_process(predictor: Predictor, batch_size: int) -> SubmitAll:
    """Compute the jobs here, ``batch_size`` per forward, with the service's batch pipeline."""

    async def submit_all(jobs: list[Job]) -> list[dict[str, Any]]:
        results = []
        for b in range(0, len(jobs), batch_size):
            results.extend(raise_for_result(out) for out in run_batch(predictor, jobs[b : b + batch_size]))
        return results

    return submit_all


def assemble_result(
    out: dict[str, Any], request_id: str, total_ms: float, mes: dict[str, Any], recipe: dict[str, str] | None = None
) -> dict[str, Any]:
    """A computed result + request context -> one InspectionResult dict (the API's answer per image)."""
    result: dict[str, Any] = {
        "result_id": str(uuid.uuid4()),
        "request_id": request_id,
        "model": out["model"],
        "task": out["task"],
        "image": out["image"],
        "verdict": out["verdict"],
        "decided_by": out.get("decided_by", "model"),
        "recipe": recipe,
        "defects": out["defects"],
    }
    if "top_k" in out:
        result["top_k"] = out["top_k"]
    timing = out.get("timing_ms", {})
    result["timing_ms"] = {
        "queue": timing.get("queue", 0.0),
        "inference": timing.get("inference", 0.0),
        "total": round(total_ms, 3),
    }
    result.update(mes)
    return result


async def inspect_images(
    predictor: Predictor,
    images: list[bytes],
    options: InspectOptions,
    submit_all: SubmitAll,
    *,
    limits: ImageLimits,
    deadline: float,
    request_id: str,
    started: float,
    decoder: Executor | None = None,
    decision: Decision | None = None,
    outlets: Outlets | None = None,
) -> list[dict[str, Any]]:
    """Decode and preprocess ``images`` on the threads of ``decoder`` (the service's decoding pool, whose size
    bounds the images decoded at once; None: the event loop's default executor), at most until ``deadline``
    (the list is emptied once they are decoded, freeing the bytes, unless an outlet wants them or
    ``submit_all`` has ``accepts_encoded`` set: then a job keeps its image's bytes when they are smaller than
    its array, and the Redis dispatcher sends the bytes instead of the array), submit one job per image,
    and return one InspectionResult dict per image, in order, each offered to ``outlets`` (records, plant bus).
    ``decision``: the recipe's rule and on_timeout (`app.recipes.RecipeBook.decide`; default the model's own
    rule and the request's on_timeout). ``started``: the request's start (epoch seconds), for
    ``timing_ms.total``. Raises the decoder's Problem or the submitter's DispatchError."""
    decision = decision or Decision(on_timeout=options.on_timeout or "error")
    kept = list(images) if outlets and outlets.wants_images() else [None] * len(images)
    try:
        prepared = await _prepare_all(predictor, images, limits, deadline, decoder)
    except DeadlineExceeded:
        if decision.on_timeout != "fail":
            raise
        # a part out of time fails; input that is no image is still refused for what it is (4xx)
        sizes = [upright_size(data, max_pixels=limits.max_pixels, min_side=limits.min_side, index=i)
                 for i, data in enumerate(images)]
        metrics.FAIL_SAFE.labels(model=predictor.name, reason="timeout").inc(len(images))
        outputs = [fail_safe_output(predictor, {"orig_w": w, "orig_h": h}, "timeout") for w, h in sizes]
        return _answer(outputs, kept, options, decision, request_id, started, outlets)
    encoded: list[bytes | None] = [None] * len(images)
    if getattr(submit_all, "accepts_encoded", False):
        encoded = [data if len(data) < arr.nbytes else None for data, (arr, _) in zip(images, prepared, strict=True)]
    images.clear()

    inference = options.inference_options()
    if decision.rule is not None:
        inference["rule"] = decision.rule
    jobs = [Job(model=predictor.name, array=arr, meta=meta, options=dict(inference), deadline=deadline, image=data)
            for (arr, meta), data in zip(prepared, encoded, strict=True)]
    try:
        outputs = await submit_all(jobs)
    except (DeadlineExceeded, QueueFull, Unavailable) as exc:
        if decision.on_timeout != "fail":
            raise
        reason = "timeout" if isinstance(exc, DeadlineExceeded) else "unavailable"
        metrics.FAIL_SAFE.labels(model=predictor.name, reason=reason).inc(len(jobs))
        outputs = [fail_safe_output(predictor, meta, reason) for _, meta in prepared]
    return _answer(outputs, kept, options, decision, request_id, started, outlets)


async def _prepare_all(predictor: Predictor, images: list[bytes], limits: ImageLimits, deadline: float,
                       decoder: Executor | None) -> list[tuple[Any, Any]]:
    """(array, meta) of every image, decoded on ``decoder``'s threads; DeadlineExceeded once ``deadline``
    passes. A request out of time stops waiting at once: its images still queued for a thread are dropped,
    one being decoded finishes on its thread, which stays taken until then (the pool's size stays the bound)."""
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(decoder, contextvars.copy_context().run, prepare, predictor, data, i, limits)
               for i, data in enumerate(images)]
    left = deadline - time.time()
    try:
        async with asyncio.timeout(max(0.0, left) if math.isfinite(left) else None):
            return list(await asyncio.gather(*futures))
    except TimeoutError:
        raise DeadlineExceeded(f"the request deadline passed while its {len(images)} image(s) were decoded") from None
    finally:
        for f in futures:
            f.cancel()


def _answer(outputs: list[dict[str, Any]], images: list[bytes | None], options: InspectOptions, decision: Decision,
            request_id: str, started: float, outlets: Outlets | None) -> list[dict[str, Any]]:
    """The InspectionResult dicts of ``outputs``, each offered to ``outlets`` with its image (or None)."""
    total_ms = (time.time() - started) * 1000.0
    mes = options.mes()
    results = [assemble_result(out, request_id, total_ms, mes, decision.recipe) for out in outputs]
    if outlets:
        for result, image in zip(results, images, strict=True):
            outlets.offer(result, image)
    return results


def fail_safe_output(predictor: Predictor, meta: dict, reason: str) -> dict[str, Any]:
    """The answer for a part that could not be inspected, when the request asks for ``on_timeout=fail``:
    verdict fail, no defects, ``decided_by`` the reason."""
    return {"model": {"name": predictor.name, "version": predictor.version}, "task": predictor.task,
            "image": {"width": int(meta["orig_w"]), "height": int(meta["orig_h"])}, "verdict": "fail",
            "decided_by": reason, "defects": []}
