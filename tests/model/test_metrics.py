"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.metrics import ClassifyMetrics, DetectMetrics, SegmentMetrics, coco_map, confusion_matrix

# ----------------------------------------------------------------------------------------------------
# classify


def test_confusion_matrix_known():
    target = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    pred = [0, 0, 1, 1, 1, 2, 2, 0, 2, 1]
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 3]]


def test_classify_metrics_known():
    m = ClassifyMetrics(3, ["a", "b", "c"])
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2, 1])
    m.update(pred[:4], target[:4])  # streaming
    m.update(torch.nn.functional.one_hot(pred[4:], 3).float() * 5, target[4:])  # logits accepted
    r = m.compute()
    assert r["top1"] == pytest.approx(7 / 10)
    assert r["recall_per_class"] == pytest.approx([2 / 3, 1.0, 3 / 5])
    assert r["macro_recall"] == pytest.approx((2 / 3 + 1 + 3 / 5) / 3)
    assert r["precision_per_class"] == pytest.approx([2 / 3, 2 / 4, 1.0])
    assert r["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 1, 3]]
    assert r["classes"] == ["a", "b", "c"] and r["num_samples"] == 10


def test_classify_perfect_and_absent_class():
    m = ClassifyMetrics(4)
    y = np.array([0, 1, 2, 1])
    m.update(y, y)
    r = m.compute()
    assert r["top1"] == 1.0 and r["macro_recall"] == 1.0  # class 3 has no samples: not averaged
    assert r["recall_per_class"][3] is None


# ----------------------------------------------------------------------------------------------------
# segment


def test_segment_perfect():
    t = torch.randint(0, 3, (2, 16, 16))
    m = SegmentMetrics(3)
    m.update(t.clone(), t)
    r = m.compute()
    assert r["miou"] == 1.0 and r["f1"] == 1.0 and r["pixel_acc"] == 1.0


def test_segment_known_with_ignore_and_streaming():
    target = np.array([[0, 0, 0, 0],
                       [0, 1, 1, 255],
                       [0, 1, 1, 255]])
    pred = np.array([[0, 0, 0, 1],
                     [0, 1, 0, 1],
                     [0, 1, 1, 1]])
    # counted pixels: bg 6 (5 correct, 1 → crack), crack 4 (3 correct, 1 → bg); ignore 2 pixels
    # IoU bg = 5/(5+1+1) = 5/7, IoU crack = 3/(3+1+1) = 3/5, F1 crack = 6/(6+1+1) = 3/4
    m = SegmentMetrics(2, class_names=["background", "crack"])
    m.update(pred[:1], target[:1])
    m.update(torch.from_numpy(pred[1:]), torch.from_numpy(target[1:]))
    r = m.compute()
    assert r["confusion"] == [[5, 1], [1, 3]]
    assert r["iou_per_class"] == pytest.approx([5 / 7, 3 / 5])
    assert r["miou"] == pytest.approx((5 / 7 + 3 / 5) / 2)
    assert r["f1"] == pytest.approx(3 / 4)
    # logits (B, C, H, W) give the same result
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 2).permute(2, 0, 1)[None].float()
    m2 = SegmentMetrics(2)
    m2.update(logits, torch.from_numpy(target)[None])
    assert m2.compute()["confusion"] == r["confusion"]


def test_segment_absent_class_excluded():
    t = np.zeros((4, 4), np.int64)
    t[0, 0] = 1
    m = SegmentMetrics(3)  # class 2 absent in both: left out of miou
    m.update(t, t)
    r = m.compute()
    assert r["iou_per_class"][2] is None and r["miou"] == 1.0
    with pytest.raises(ValueError):
        m.update(np.zeros((2, 2)), np.zeros((3, 3)))


# ----------------------------------------------------------------------------------------------------
# detect


def _gt(boxes, classes, **kw):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "classes": np.array(classes), **kw}


def _pred(boxes, scores, classes):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores),
            "classes": np.array(classes)}


def test_map_perfect():
    gts = [_gt([[0, 0, 10, 10], [20, 20, 40, 50]], [0, 1]), _gt([[5, 5, 30, 30]], [1]), _gt([], [])]
    preds = [_pred(g["boxes"], np.ones(len(g["classes"])), g["classes"]) for g in gts]
    r = coco_map(preds, gts, 3, ["a", "b", "c"])
    assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(1.0)
    assert r["ap50_per_class"][:2] == pytest.approx([1.0, 1.0]) and r["ap50_per_class"][2] is None
    assert r["num_images"] == 3 and r["num_gt"] == 3


def test_map_known_half_recall():
    # one TP (0.9), one FP (0.8), one GT missed: precision 1 up to recall 0.5, then nothing.
    # COCO 101-point interpolation: recall thresholds 0.00..0.50 (51 points) have precision 1 → 51/101.
    gts = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    preds = [_pred([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [0, 0])]
    r = coco_map(preds, gts, 1)
    assert r["map50"] == pytest.approx(51 / 101)
    assert r["map50_95"] == pytest.approx(51 / 101)


def test_map_fp_on_image_without_gt_and_iou_thresholds():
    # image 2 has no GT; its detection (score 0.9) ranks first: precision 1/2 at recall 1 → AP 0.5
    gts = [_gt([[0, 0, 10, 10]], [0]), _gt([], [])]
    preds = [_pred([[0, 0, 10, 10]], [0.5], [0]), _pred([[0, 0, 10, 10]], [0.9], [0])]
    assert coco_map(preds, gts, 1)["map50"] == pytest.approx(0.5)
    # IoU 0.62 passes thresholds 0.50, 0.55, 0.60 only → map50 1, map50_95 3/10
    r = coco_map([_pred([[0, 0, 10, 6.2]], [0.9], [0])], [_gt([[0, 0, 10, 10]], [0])], 1)
    assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(0.3)
    # wrong class is no match
    r = coco_map([_pred([[0, 0, 10, 10]], [0.9], [1])], [_gt([[0, 0, 10, 10]], [0])], 2)
    assert r["map50"] == 0.0 and r["ap50_per_class"] == [0.0, None]


def test_map_no_predictions_and_ignore():
    gts = [_gt([[0, 0, 10, 10]], [0])]
    r = coco_map([_pred([], [], [])], gts, 1)
    assert r["map50"] == 0.0 and r["ap50_per_class"] == [0.0] and r["num_pred"] == 0
    # an ignored (difficult) GT: missing it costs nothing, detecting it is not a false positive
    gts = [_gt([[0, 0, 10, 10], [50, 50, 70, 70]], [0, 0], ignore=[False, True])]
    r = coco_map([_pred([[0, 0, 10, 10], [50, 50, 70, 70]], [0.5, 0.9], [0, 0])], gts, 1)
    assert r["map50"] == pytest.approx(1.0) and r["num_gt"] == 1
    r = coco_map([_pred([[0, 0, 10, 10]], [0.5], [0])], gts, 1)
    assert r["map50"] == pytest.approx(1.0)


def test_detect_metrics_streaming_matches_one_shot(capsys):
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for _ in range(6):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(5, 30, (n, 2))
        b = np.concatenate([xy, xy + wh], 1)
        c = rng.integers(0, 3, n)
        gts.append(_gt(b, c))
        jitter = b + rng.normal(0, 2, b.shape)
        preds.append(_pred(jitter, rng.uniform(0.1, 1, n), c))
    m = DetectMetrics(3)
    m.update(preds[:3], gts[:3])
    m.update([{k: torch.as_tensor(v) for k, v in p.items()} for p in preds[3:]], gts[3:])
    a = m.compute()
    b = coco_map(preds, gts, 3)
    assert a["map50"] == pytest.approx(b["map50"]) and a["map50_95"] == pytest.approx(b["map50_95"])
    assert 0.0 < a["map50_95"] <= a["map50"] <= 1.0
    assert capsys.readouterr().out == ""  # pycocotools' printing is suppressed
