"""app.inference: the batch pipeline (run_batch) and mask encoding. Real tiny models, no mocks of the model."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from support.metrics import metric_delta
from support.predictors import Recording, job

from app import metrics
from app.dispatch.base import DeadlineExceeded, JobFailed
from app.inference import raise_for_result, run_batch

ROOT = Path(__file__).resolve().parents[2]


def registry_text() -> str:
    return metrics.render()[0].decode()


def test_run_batch_drops_expired_jobs_without_computing_them(det):
    rec = Recording(det)
    jobs = [job(det, 0), job(det, 1, deadline_in=-1), job(det, 2)]
    before = registry_text()
    results = run_batch(rec, jobs)
    assert rec.calls == [(threading.current_thread().name, 2)]  # one forward, the two live jobs only
    assert results[1]["error"] == "expired"
    for i in (0, 2):
        assert results[i]["image"] == {"width": 60 + i, "height": 40} and results[i]["task"] == "detect"
        assert set(results[i]["timing_ms"]) == {"queue", "inference"}
    after = registry_text()
    delta = metric_delta(before, after)
    assert delta("s2amnet_jobs_expired_total", model="det") == 1
    assert delta("s2amnet_batch_size_sum", model="det") == 2
    assert delta("s2amnet_images_total", model="det", task="detect") == 2
    with pytest.raises(DeadlineExceeded):
        raise_for_result(results[1])
    assert raise_for_result(results[0]) is results[0]


def test_run_batch_results_equal_one_by_one(det):
    jobs = [job(det, i) for i in range(3)]
    together = run_batch(det, jobs)
    alone = [run_batch(det, [j])[0] for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert a["defects"] == b["defects"] and a["verdict"] == b["verdict"]


def test_run_batch_all_expired_and_failures(det):
    rec = Recording(det)
    assert [r["error"] for r in run_batch(rec, [job(det, deadline_in=-1)] * 2)] == ["expired"] * 2
    assert rec.calls == []
    rec.fail = True
    results = run_batch(rec, [job(det), job(det, 1)])
    assert [r["error"] for r in results] == ["failed", "failed"] and "boom" in results[0]["detail"]
    with pytest.raises(JobFailed):
        raise_for_result(results[0])


def _plain_json(value) -> bool:
    """Whether ``value`` is made only of the types JSON has (no numpy or torch scalars, no tuples)."""
    if isinstance(value, dict):
        return all(type(k) is str and _plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


@pytest.mark.parametrize("fmt", ["rle", "polygon", "png"])
def test_results_are_plain_json(weights_dir: Path, fmt: str):
    """Every task's result is built of plain JSON types as it is formatted: what the API and the Redis
    wire format send as they are."""
    from model.predictor import Predictor

    seen = set()
    for name in ("cls", "det", "seg"):
        predictor = Predictor.from_folder(weights_dir / name)
        for result in run_batch(predictor, [job(predictor, seed, mask_format=fmt) for seed in range(3)]):
            assert _plain_json(result), result
            seen.update(k for d in result["defects"] for k in d)
    assert {"box", "area", "mask"} <= seen  # boxes, areas and masks were among what was checked


@pytest.mark.parametrize("fmt", ["rle", "polygon", "png"])
def test_a_mask_cropped_to_its_box_encodes_like_the_full_mask(fmt):
    from app.inference import encode_mask

    full = np.zeros((40, 60), bool)
    full[7:19, 30:52] = np.random.default_rng(0).random((12, 22)) > 0.4
    full[7, 30] = full[18, 51] = True  # the box is tight
    assert encode_mask(full[7:19, 30:52], fmt, (30.0, 7.0), (40, 60)) == encode_mask(full, fmt)
