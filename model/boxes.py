"""Box operations shared by the detection head, its loss and post-processing.

Conventions (used everywhere in this module):

* Boxes are ``xyxy`` (x1, y1, x2, y2) with x2 >= x1, y2 >= y1.
* ``reg_max`` is the **number of DFL bins** per box side (16 for YOLO11). A side distance is the
  expectation of a softmax over the bins with support ``0, 1, ..., reg_max - 1`` (in units of the
  level's stride), so the largest encodable distance is ``reg_max - 1``.
* Anchor points from :func:`make_anchors` are in **grid units** (cell index + offset); multiply by the
  per-anchor stride to get input pixels.  :func:`dist2bbox` / :func:`bbox2dist` are the single box coder
  used by decoding (head -> boxes) and by the loss (boxes -> DFL targets); both work in whatever unit
  the anchor points and boxes share (the loss and the decoder both use grid units).

Everything is pure torch (no torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_iou",
    "bbox_iou",
    "nms",
    "batched_nms",
    "make_anchors",
    "dist2bbox",
    "bbox2dist",
    "dfl_decode",
]


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes (degenerate boxes give 0)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise IoU of ``a`` (N×4) and ``b`` (M×4) xyxy boxes -> N×M."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / (union + eps)


def bbox_iou(a: Tensor, b: Tensor, ciou: bool = True, eps: float = 1e-7) -> Tensor:
    """Element-wise IoU (or Complete-IoU) of broadcastable ``(..., 4)`` xyxy boxes -> ``(...)``.

    CIoU = IoU - rho^2 / c^2 - alpha * v, where rho is the distance of the box centres, c the diagonal
    of the smallest enclosing box, v = 4/pi^2 * (atan(w_b/h_b) - atan(w_a/h_a))^2 the aspect-ratio
    term and alpha = v / (1 - IoU + v) its trade-off weight (treated as a constant, no gradient, as in
    the CIoU paper).
    """
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    wa, ha = (ax2 - ax1), (ay2 - ay1) + eps
    wb, hb = (bx2 - bx1), (by2 - by1) + eps
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0) * (
        torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    ).clamp(min=0)
    union = wa * ha + wb * hb - inter + eps
    iou = inter / union
    if not ciou:
        return iou
    cw = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    ch = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(wb / hb) - torch.atan(wa / ha)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def nms(boxes: Tensor, scores: Tensor, iou_thr: float) -> Tensor:
    """Greedy single-class NMS. Returns kept indices sorted by decreasing score.

    A box is dropped when its IoU with a higher-scoring *kept* box is strictly above ``iou_thr``.
    Exact greedy result, computed as the fixed point of ``keep[j] = not any(keep[i] and iou[i, j] > thr
    for i ranked before j)`` (vectorised; converges in as many rounds as the longest suppression chain),
    with a sequential fallback for pathological chains.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order].float()
    k = b.shape[0]
    # over[i, j]: i is ranked before j and overlaps it above the threshold
    over = (box_iou(b, b) > iou_thr).triu_(diagonal=1)
    keep = torch.ones(k, dtype=torch.bool, device=b.device)
    for _ in range(32):
        new = ~(over & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    else:  # long chain: finish with the plain sequential algorithm on CPU
        over_c = over.cpu()
        suppressed = torch.zeros(k, dtype=torch.bool)
        for i in range(k):
            if not suppressed[i]:
                suppressed |= over_c[i]
        keep = (~suppressed).to(b.device)
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_thr: float) -> Tensor:
    """Per-class greedy NMS (boxes of different classes never suppress each other).

    ``boxes`` K×4 xyxy, ``scores`` K, ``classes`` K (int). Returns kept indices into the inputs,
    sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    b = boxes.float()
    # shift each class into its own disjoint region of the plane
    span = (b.max() - b.min()).clamp(min=0) + 1.0
    shifted = b - b.min() + (classes.to(b.dtype) * (span + 1.0))[:, None]
    return nms(shifted, scores, iou_thr)


def make_anchors(
    feats: Sequence[Tensor] | Sequence[tuple[int, int]],
    strides: Sequence[int | float],
    offset: float = 0.5,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Anchor points at cell centres for each level, concatenated level by level (row-major).

    ``feats`` is a list of feature maps (B×C×h×w; only h, w are read) or of ``(h, w)`` pairs.
    Returns ``(points N×2 (x, y) in grid units, stride N×1)``; ``points * stride`` is in input pixels.
    Anchors are float32 unless ``dtype`` is given (also for half-precision features: bf16 cannot
    represent e.g. 128.5).
    """
    dtype = torch.float32 if dtype is None else dtype
    pts, strd = [], []
    for f, s in zip(feats, strides, strict=True):
        if isinstance(f, Tensor):
            h, w = f.shape[-2:]
            device = f.device if device is None else device
        else:
            h, w = f
        sx = torch.arange(w, device=device, dtype=dtype) + offset
        sy = torch.arange(h, device=device, dtype=dtype) + offset
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        pts.append(torch.stack((xx, yy), -1).reshape(-1, 2))
        strd.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(pts), torch.cat(strd)


def dist2bbox(distances: Tensor, anchor_points: Tensor) -> Tensor:
    """(left, top, right, bottom) distances ``(..., 4)`` around ``anchor_points`` ``(..., 2)`` -> xyxy."""
    lt, rb = distances.chunk(2, -1)
    return torch.cat((anchor_points - lt, anchor_points + rb), -1)


def bbox2dist(anchor_points: Tensor, boxes: Tensor, reg_max: int) -> Tensor:
    """Inverse of :func:`dist2bbox`: xyxy boxes -> ltrb distances, clamped to ``[0, reg_max - 1 - 0.01]``
    (the range a ``reg_max``-bin DFL can represent, kept strictly below the last bin so the
    two-bin DFL target is well defined)."""
    lt = anchor_points - boxes[..., :2]
    rb = boxes[..., 2:] - anchor_points
    return torch.cat((lt, rb), -1).clamp(0, reg_max - 1 - 0.01)


def dfl_decode(logits: Tensor, reg_max: int) -> Tensor:
    """DFL integral: ``(..., 4*reg_max)`` logits (side-major: 4 sides × reg_max bins) -> ``(..., 4)``
    expected distances = sum_i softmax(logits)_i * i, i = 0..reg_max-1."""
    shape = logits.shape[:-1]
    p = logits.reshape(*shape, 4, reg_max).softmax(-1)
    bins = torch.arange(reg_max, device=logits.device, dtype=p.dtype)
    return (p * bins).sum(-1)
