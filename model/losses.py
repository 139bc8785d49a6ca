"""Training losses: YOLO-style detection loss (TAL assigner + BCE + CIoU + DFL) and segmentation loss.

Detection
---------
``DetectionLoss(num_classes, reg_max=16, strides=(8, 16, 32))(raw, targets) -> (loss, parts)``

* ``raw``: the head's list of per-level tensors B×(4·reg_max + nc)×h×w (see model/heads/detect.py).
* ``targets``: one entry per image, either ``(boxes, labels)`` or ``{"boxes": ..., "labels": ...}`` with
  ``boxes`` M×4 xyxy in **input pixels** (the network input, after letterbox/resize) and ``labels`` M
  class indices in [0, nc). M may be 0.
* ``loss`` = box_gain·L_box + cls_gain·L_cls + dfl_gain·L_dfl (scalar, normalised by the sum of the
  target scores of the whole batch; *not* multiplied by the batch size). ``parts`` = detached
  ``{"box", "cls", "dfl"}`` scalars (unweighted).

Assignment is the Task-Aligned assigner: candidates are anchors whose centre lies strictly inside a GT
box; alignment metric t = s^alpha · IoU^beta (s = predicted score of the GT's class, IoU between the
predicted and the GT box, both detached); each GT takes its top-k candidates; an anchor chosen by several
GTs goes to the one whose box its prediction overlaps most. Class targets are soft: for a positive anchor
of GT g, t / max_t(g) · max_IoU(g) on the GT's class (0 elsewhere).

Box regression and DFL targets use the same coder as decoding (:func:`model.boxes.bbox2dist` /
:func:`model.boxes.dist2bbox` in grid units, :func:`model.boxes.dfl_decode` for the integral).

Segmentation
------------
``SegmentationLoss(num_classes, ignore_index=255, dice_weight=0.0, mode="ce")(logits, target)``: CE
(or the reference's one-hot BCE with ``mode="bce"``) averaged over non-ignored pixels, optional soft
Dice on the same pixels. Pixels equal to ``ignore_index`` (the random-crop padding) never contribute
(fix for defect D8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.boxes import bbox2dist, bbox_iou, dfl_decode, dist2bbox, make_anchors

__all__ = ["TaskAlignedAssigner", "DetectionLoss", "SegmentationLoss", "dfl_loss"]


class TaskAlignedAssigner(nn.Module):
    """Task-aligned label assignment (TOOD). All boxes and anchor points in one common unit (pixels)."""

    def __init__(self, num_classes: int, topk: int = 10, alpha: float = 0.5, beta: float = 6.0,
                 eps: float = 1e-9):
        super().__init__()
        self.num_classes = num_classes
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def forward(
        self,
        pd_scores: Tensor,  # B×N×C probabilities
        pd_bboxes: Tensor,  # B×N×4 xyxy
        anc_points: Tensor,  # N×2
        gt_labels: Tensor,  # B×M long
        gt_bboxes: Tensor,  # B×M×4 xyxy
        mask_gt: Tensor,  # B×M bool (False = padding)
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(target_labels B×N, target_bboxes B×N×4, target_scores B×N×C, fg_mask B×N,
        target_gt_idx B×N)``. Background anchors have label 0, box 0 and all-zero scores."""
        b, n, c = pd_scores.shape
        m = gt_bboxes.shape[1]
        dev = pd_scores.device
        if m == 0:
            return (
                torch.zeros(b, n, dtype=torch.long, device=dev),
                torch.zeros(b, n, 4, device=dev),
                torch.zeros(b, n, c, device=dev),
                torch.zeros(b, n, dtype=torch.bool, device=dev),
                torch.zeros(b, n, dtype=torch.long, device=dev),
            )
        pd_scores, pd_bboxes, gt_bboxes = pd_scores.float(), pd_bboxes.float(), gt_bboxes.float()

        # candidates: anchor centre strictly inside the (real) GT box -> B×M×N
        lt = anc_points[None, None] - gt_bboxes[:, :, None, :2]
        rb = gt_bboxes[:, :, None, 2:] - anc_points[None, None]
        cand = (torch.cat([lt, rb], -1).amin(-1) > self.eps) & mask_gt[:, :, None].bool()

        overlaps = bbox_iou(gt_bboxes[:, :, None, :], pd_bboxes[:, None, :, :], ciou=False).clamp_(min=0)
        overlaps = overlaps * cand
        labels = gt_labels.long().clamp(0, c - 1)
        cls_scores = pd_scores.transpose(1, 2).gather(1, labels[:, :, None].expand(-1, -1, n))  # B×M×N
        align = cls_scores.pow(self.alpha) * overlaps.pow(self.beta) * cand

        # top-k candidates per GT (non-candidates ranked below every candidate, then masked out)
        k = min(self.topk, n)
        topk_idx = torch.where(cand, align, torch.full_like(align, -1.0)).topk(k, dim=-1).indices
        mask_pos = torch.zeros_like(cand).scatter_(-1, topk_idx, True) & cand

        # an anchor claimed by several GTs goes to the GT its predicted box overlaps most
        multi = mask_pos.sum(1) > 1  # B×N
        if multi.any():
            best = torch.where(mask_pos, overlaps, torch.full_like(overlaps, -1.0)).argmax(1)  # B×N
            is_best = F.one_hot(best, m).transpose(1, 2).bool()  # B×M×N
            mask_pos = torch.where(multi[:, None], is_best & mask_pos, mask_pos)

        fg = mask_pos.any(1)  # B×N
        gt_idx = mask_pos.float().argmax(1)  # B×N
        t_labels = labels.gather(1, gt_idx)
        t_bboxes = gt_bboxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))
        t_scores = F.one_hot(t_labels, c).float() * fg[..., None]

        # soft targets: alignment normalised per GT, scaled to the GT's best IoU
        align = align * mask_pos
        max_align = align.amax(-1, keepdim=True)
        max_iou = (overlaps * mask_pos).amax(-1, keepdim=True)
        norm = (align * max_iou / (max_align + self.eps)).amax(1)  # B×N
        t_scores = t_scores * norm[..., None]
        t_labels = t_labels * fg
        t_bboxes = t_bboxes * fg[..., None]
        return t_labels, t_bboxes, t_scores, fg, gt_idx


def dfl_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss. ``logits`` K×reg_max, ``target`` K continuous bin positions in
    [0, reg_max - 1). Cross-entropy to the two neighbouring bins weighted by linear interpolation."""
    tl = target.long()
    tr = tl + 1
    wl = tr.to(target.dtype) - target
    wr = 1 - wl
    ce_l = F.cross_entropy(logits, tl, reduction="none")
    ce_r = F.cross_entropy(logits, tr, reduction="none")
    return ce_l * wl + ce_r * wr


def _unpack_target(t) -> tuple[Tensor, Tensor]:
    if isinstance(t, Mapping):
        return t["boxes"], t["labels"]
    boxes, labels = t
    return boxes, labels


class DetectionLoss(nn.Module):
    """YOLO11-style detection loss on raw head outputs. See the module docstring for the formats."""

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 16,
        strides: Sequence[int] = (8, 16, 32),
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.reg_max = int(reg_max)
        self.strides = tuple(strides)
        self.box_gain, self.cls_gain, self.dfl_gain = box_gain, cls_gain, dfl_gain
        self.assigner = TaskAlignedAssigner(self.num_classes, topk, alpha, beta)

    def _pad_targets(self, targets, batch: int, device) -> tuple[Tensor, Tensor, Tensor]:
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} target entries for a batch of {batch}")
        items = [_unpack_target(t) for t in targets]
        m = max((int(torch.as_tensor(bx).reshape(-1, 4).shape[0]) for bx, _ in items), default=0)
        gt_boxes = torch.zeros(batch, m, 4, device=device)
        gt_labels = torch.zeros(batch, m, dtype=torch.long, device=device)
        mask = torch.zeros(batch, m, dtype=torch.bool, device=device)
        for i, (bx, lb) in enumerate(items):
            bx = torch.as_tensor(bx, dtype=torch.float32, device=device).reshape(-1, 4)
            lb = torch.as_tensor(lb, device=device).reshape(-1).long()
            if bx.shape[0] != lb.shape[0]:
                raise ValueError(f"image {i}: {bx.shape[0]} boxes but {lb.shape[0]} labels")
            if lb.numel() and (lb.min() < 0 or lb.max() >= self.num_classes):
                raise ValueError(f"image {i}: labels must be in [0, {self.num_classes}), got {lb.tolist()}")
            k = bx.shape[0]
            gt_boxes[i, :k], gt_labels[i, :k], mask[i, :k] = bx, lb, True
        return gt_boxes, gt_labels, mask

    def forward(self, raw: Sequence[Tensor], targets) -> tuple[Tensor, dict[str, Tensor]]:
        r, nc = self.reg_max, self.num_classes
        bsz = raw[0].shape[0]
        device = raw[0].device
        x = torch.cat([f.float().flatten(2) for f in raw], 2).transpose(1, 2)  # B×N×(4R+nc)
        if x.shape[-1] != 4 * r + nc:
            raise ValueError(f"raw outputs have {x.shape[-1]} channels, expected 4*{r}+{nc}")
        box_logits, cls_logits = x.split([4 * r, nc], -1)
        anchors, stride_t = make_anchors(raw, self.strides, device=device)  # grid units, N×1

        pred_boxes = dist2bbox(dfl_decode(box_logits, r), anchors)  # B×N×4, grid units
        gt_boxes, gt_labels, mask_gt = self._pad_targets(targets, bsz, device)

        _, t_boxes, t_scores, fg, _ = self.assigner(
            cls_logits.detach().sigmoid(),
            pred_boxes.detach() * stride_t,
            anchors * stride_t,
            gt_labels,
            gt_boxes,
            mask_gt,
        )
        t_boxes = t_boxes / stride_t
        tss = t_scores.sum().clamp(min=1.0)

        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, t_scores, reduction="sum") / tss
        if fg.any():
            weight = t_scores.sum(-1)[fg]  # K
            iou = bbox_iou(pred_boxes[fg], t_boxes[fg], ciou=True)
            loss_box = ((1.0 - iou) * weight).sum() / tss
            anc = anchors[None].expand(bsz, -1, -1)[fg]
            t_dist = bbox2dist(anc, t_boxes[fg], r)  # K×4, same coder as decoding
            dfl = dfl_loss(box_logits[fg].reshape(-1, r), t_dist.reshape(-1)).reshape(-1, 4).mean(-1)
            loss_dfl = (dfl * weight).sum() / tss
        else:  # keep the graph connected so backward() works on batches without boxes
            loss_box = box_logits.sum() * 0.0
            loss_dfl = box_logits.sum() * 0.0

        loss = self.box_gain * loss_box + self.cls_gain * loss_cls + self.dfl_gain * loss_dfl
        parts = {"box": loss_box.detach(), "cls": loss_cls.detach(), "dfl": loss_dfl.detach()}
        return loss, parts


class SegmentationLoss(nn.Module):
    """Pixel loss that ignores ``ignore_index`` pixels.

    ``mode="ce"``: softmax cross-entropy averaged over valid pixels. ``mode="bce"``: the reference's
    one-hot BCE-with-logits over all channels, averaged over valid pixels × channels.
    ``dice_weight > 0`` adds ``dice_weight ×`` soft multi-class Dice loss (softmax probabilities, valid
    pixels only, mean over the classes present in the batch's target). ``logits`` B×C×H×W, ``target``
    B×H×W integer class map (values in [0, C) or ``ignore_index``). An all-ignored batch gives a zero loss (not NaN).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, dice_weight: float = 0.0,
                 mode: str = "ce", smooth: float = 1.0):
        super().__init__()
        if mode not in ("ce", "bce"):
            raise ValueError(f"mode must be 'ce' or 'bce', got {mode!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.dice_weight = float(dice_weight)
        self.mode = mode
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, expected {self.num_classes}")
        if logits.shape[-2:] != target.shape[-2:] or logits.shape[0] != target.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
        target = target.long()
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"target has labels outside [0, {self.num_classes}) other than ignore_index "
                f"{self.ignore_index}: {torch.unique(target[bad]).tolist()[:10]}"
            )
        logits = logits.float()
        n_valid = valid.sum()
        if n_valid == 0:
            return logits.sum() * 0.0
        safe = torch.where(valid, target, torch.zeros_like(target))
        vmask = valid[:, None].float()  # B×1×H×W
        if self.mode == "ce":
            loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum") / n_valid
        else:
            onehot = F.one_hot(safe, self.num_classes).permute(0, 3, 1, 2).float()
            bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * vmask
            loss = bce.sum() / (n_valid * self.num_classes)
        if self.dice_weight > 0:
            prob = logits.softmax(1) * vmask
            onehot = F.one_hot(safe, self.num_classes).permute(0, 3, 1, 2).float() * vmask
            inter = (prob * onehot).sum((0, 2, 3))
            denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
            dice = 1.0 - (2 * inter + self.smooth) / (denom + self.smooth)
            # mean over the classes present in the batch: an absent class scores ~1 whatever the network
            # does (its summed probability over a whole batch is never ~0), which would drown the signal
            # of small defect classes in a constant (magnetic-tile: 5 defect classes, ~0.1 % of pixels)
            present = onehot.sum((0, 2, 3)) > 0
            loss = loss + self.dice_weight * dice[present].mean()
        return loss
