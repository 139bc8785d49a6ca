"""Box ops: hand-computed IoU / CIoU, greedy NMS semantics, anchors and the shared box coder."""

import math

import pytest
import torch

from model.boxes import (
    batched_nms,
    bbox2dist,
    bbox_iou,
    box_iou,
    dfl_decode,
    dist2bbox,
    make_anchors,
    nms,
)


def test_box_iou_known_pairs():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [2, 2, 4, 4], [0, 0, 1, 1]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    # overlap 1, union 4+4-1 = 7 | identical | touching corner | contained 1/4
    expected0 = torch.tensor([1 / 7, 1.0, 0.0, 0.25])
    # [0,0,4,2] vs: inter 2x1 = 2 (x 1..3, y 1..2), union 8+4-2 = 10 | 4/8 | 0 (touching edge) | 1/8
    expected1 = torch.tensor([0.2, 0.5, 0.0, 0.125])
    torch.testing.assert_close(iou[0], expected0, atol=1e-6, rtol=0)
    torch.testing.assert_close(iou[1], expected1, atol=1e-6, rtol=0)


def test_bbox_iou_elementwise_iou_and_ciou():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [0, 0, 4, 2]])
    iou = bbox_iou(a, b, ciou=False)
    torch.testing.assert_close(iou, torch.tensor([1 / 7, 1.0, 0.5]), atol=1e-6, rtol=0)
    ciou = bbox_iou(a, b, ciou=True)
    # same aspect ratio -> v = 0; centres (1,1),(2,2): rho^2 = 2; enclosing 3x3: c^2 = 18
    assert ciou[0].item() == pytest.approx(1 / 7 - 2 / 18, abs=1e-6)
    assert ciou[1].item() == pytest.approx(1.0, abs=1e-6)
    # 2x2 vs 4x2: IoU 1/2, rho^2 = 1, c^2 = 4^2 + 2^2 = 20, v = 4/pi^2 (atan 2 - atan 1)^2
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    alpha = v / (v - 0.5 + 1)
    assert ciou[2].item() == pytest.approx(0.5 - 1 / 20 - alpha * v, abs=1e-5)


def test_ciou_has_gradient_towards_target():
    target = torch.tensor([[10.0, 10, 20, 30]])
    pred = torch.tensor([[12.0, 8, 25, 27]], requires_grad=True)
    (1 - bbox_iou(pred, target)).sum().backward()
    g = pred.grad[0]
    assert torch.isfinite(g).all()
    # gradient descent must move every coordinate towards the target
    step = -g
    assert (torch.sign(step) == torch.sign(target[0] - pred.detach()[0])).all()


def test_nms_threshold_and_order():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU(0, 1) = 81 / 119 = 0.68
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    # order follows score, not input position
    assert nms(boxes, torch.tensor([0.1, 0.8, 0.95]), 0.5).tolist() == [2, 1]


def test_nms_is_greedy_suppressed_boxes_do_not_suppress():
    # A-B IoU 70/130 = 0.54, B-C 0.54, A-C 40/160 = 0.25: greedy keeps A and C
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]


def _reference_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(box_iou(boxes[i : i + 1], boxes[j : j + 1]).item() <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_long_chain_uses_exact_fallback():
    n = 80  # suppression chain longer than the vectorised rounds -> sequential fallback
    x = torch.arange(n, dtype=torch.float32) * 3
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    scores = torch.linspace(1.0, 0.1, n)
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == list(range(0, n, 2))
    assert keep.tolist() == _reference_nms(boxes, scores, 0.5)


def test_nms_random_matches_reference():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    wh = torch.rand(60, 2, generator=g) * 30 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=g)
    for thr in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == _reference_nms(boxes, scores, thr)


def test_batched_nms_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    classes = torch.tensor([0, 0, 0, 1])
    # box 3 (class 1) is identical to box 0 but must not suppress it; box 1 dies by box 0
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [3, 0, 2]
    # with box 1 in another class it survives too
    assert batched_nms(boxes, scores, torch.tensor([0, 2, 0, 1]), 0.5).tolist() == [3, 0, 1, 2]
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_make_anchors_points_and_strides():
    pts, strides = make_anchors([(2, 3), (1, 2)], [8, 16])
    expected = torch.tensor(
        [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5], [1.5, 0.5]]
    )
    torch.testing.assert_close(pts, expected)
    assert strides.squeeze(1).tolist() == [8.0] * 6 + [16.0] * 2
    # same from feature maps; offset 0 gives the cell corners
    pts2, _ = make_anchors([torch.zeros(1, 4, 2, 3)], [8], offset=0.0)
    assert pts2[4].tolist() == [1.0, 1.0]


def test_box_coder_round_trip_and_clamp():
    anchor = torch.tensor([[5.0, 5.0]])
    box = torch.tensor([[2.0, 3.0, 9.0, 10.0]])
    d = bbox2dist(anchor, box, reg_max=16)
    torch.testing.assert_close(d, torch.tensor([[3.0, 2.0, 4.0, 5.0]]))
    torch.testing.assert_close(dist2bbox(d, anchor), box)
    # distances beyond the DFL range are clamped just below the last bin (reg_max - 1)
    d2 = bbox2dist(anchor, torch.tensor([[-20.0, 3.0, 9.0, 6.0]]), reg_max=4)
    torch.testing.assert_close(d2, torch.tensor([[2.99, 2.0, 2.99, 1.0]]))
    # random round trip with broadcast anchors
    g = torch.Generator().manual_seed(1)
    anchors = torch.rand(7, 2, generator=g) * 10
    dist = torch.rand(3, 7, 4, generator=g) * 14
    torch.testing.assert_close(bbox2dist(anchors, dist2bbox(dist, anchors), 16), dist)


def test_dfl_decode_expectation():
    r = 16
    onehot = torch.full((1, 4 * r), -1e4)
    for side, b in enumerate([3, 0, 15, 7]):
        onehot[0, side * r + b] = 10.0
    torch.testing.assert_close(dfl_decode(onehot, r), torch.tensor([[3.0, 0.0, 15.0, 7.0]]))
    # uniform -> mean of 0..15
    torch.testing.assert_close(dfl_decode(torch.zeros(2, 5, 4 * r), r), torch.full((2, 5, 4), 7.5))
    # two equal bins 2 and 3 -> 2.5
    two = torch.full((4 * r,), -1e4)
    two[[2, 3, r + 2, r + 3, 2 * r + 2, 2 * r + 3, 3 * r + 2, 3 * r + 3]] = 0.0
    torch.testing.assert_close(dfl_decode(two, r), torch.full((4,), 2.5))
