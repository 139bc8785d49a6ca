"""Detection loss (TAL assigner, BCE, CIoU, DFL) and segmentation loss (ignore index, Dice, BCE mode)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.boxes import bbox2dist, box_iou, make_anchors
from model.heads.detect import DetectHead
from model.losses import DetectionLoss, SegmentationLoss, TaskAlignedAssigner, dfl_loss

# ----------------------------------------------------------------------------- assigner


def _grid_setup():
    """Stride-8 4×4 grid on a 32×32 image: anchor n at pixel centre (4 + 8·(n % 4), 4 + 8·(n // 4))."""
    pts, strides = make_anchors([(4, 4)], [8])
    anc = pts * strides  # pixels
    # every anchor predicts an 8×8 box around itself...
    pd = torch.cat([anc - 4, anc + 4], 1)
    # ...except anchor 0 (exactly GT0) and anchor 5 ([0,0,14,14], IoU 196/256 with GT0)
    pd[0] = torch.tensor([0.0, 0, 16, 16])
    pd[5] = torch.tensor([0.0, 0, 14, 14])
    # GT1's best predictions: anchor 10 exactly GT1, anchor 15 IoU 400/576; the other 8×8 ones 64/576
    pd[10] = torch.tensor([8.0, 8, 32, 32])
    pd[15] = torch.tensor([12.0, 12, 32, 32])
    scores = torch.full((16, 2), 0.5)
    scores[1, 0] = 0.99  # confident but badly localised: must lose against IoU^6
    gt = torch.tensor([[0.0, 0, 16, 16], [8, 8, 32, 32], [0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 0])
    mask = torch.tensor([True, True, False])  # third GT is padding
    return anc, pd, scores, gt, labels, mask


def test_assigner_hand_made_case():
    anc, pd, scores, gt, labels, mask = _grid_setup()
    assigner = TaskAlignedAssigner(num_classes=2, topk=2)
    # GT0 candidates 0,1,4,5 -> top-2 by alignment = {0, 5}; GT1 candidates 5,6,7,9,10,11,13,14,15
    t_labels, t_boxes, t_scores, fg, gt_idx = TaskAlignedAssigner(num_classes=2, topk=10)(
        scores[None], pd[None], anc, labels[None], gt[None], mask[None]
    )
    gt0 = {0, 1, 4, 5}
    gt1 = {6, 7, 9, 10, 11, 13, 14, 15}  # 5 is claimed by both; its prediction overlaps GT0 far more
    assert set(fg[0].nonzero().flatten().tolist()) == gt0 | gt1
    assert set((fg[0] & (gt_idx[0] == 0)).nonzero().flatten().tolist()) == gt0
    assert set((fg[0] & (gt_idx[0] == 1)).nonzero().flatten().tolist()) == gt1
    # same with the GT order reversed (so "first GT wins" would give anchor 5 to GT1)
    out = TaskAlignedAssigner(num_classes=2, topk=10)(
        scores[None], pd[None], anc, labels[[1, 0, 2]][None], gt[[1, 0, 2]][None], mask[None]
    )
    assert out[4][0, 5].item() == 1 and out[0][0, 5].item() == 0
    torch.testing.assert_close(out[1][0, 5], gt[0])

    # top-k 2 keeps the two best aligned anchors of GT0 (IoU 1 and 0.766 beat the 0.99-score anchor)
    t_labels, t_boxes, t_scores, fg, gt_idx = assigner(scores[None], pd[None], anc, labels[None], gt[None],
                                                       mask[None])
    pos = fg[0].nonzero().flatten().tolist()
    assert pos == [0, 5, 10, 15]
    assert t_labels[0, pos].tolist() == [0, 0, 1, 1]
    assert gt_idx[0, pos].tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(t_boxes[0, 0], gt[0])
    torch.testing.assert_close(t_boxes[0, 15], gt[1])
    assert not fg[0, 1] and t_scores[0, 1].sum() == 0 and t_boxes[0, 1].abs().sum() == 0
    # soft targets: anchor 0 has the best alignment of GT0 -> max IoU over its positives (1.0);
    # anchor 5: (IoU5 / IoU0)^6 (same score) × 1.0; likewise anchor 15 vs anchor 10 for GT1
    assert t_scores[0, 0].tolist() == pytest.approx([1.0, 0.0], abs=1e-5)
    assert t_scores[0, 5].tolist() == pytest.approx([(196 / 256) ** 6, 0.0], rel=1e-4)
    assert t_scores[0, 10].tolist() == pytest.approx([0.0, 1.0], abs=1e-5)
    assert t_scores[0, 15].tolist() == pytest.approx([0.0, (400 / 576) ** 6], rel=1e-4)


def test_assigner_padding_and_empty_images():
    anc, pd, scores, gt, labels, mask = _grid_setup()
    out = TaskAlignedAssigner(2)(
        scores[None].repeat(2, 1, 1), pd[None].repeat(2, 1, 1), anc,
        labels[None].repeat(2, 1), gt[None].repeat(2, 1, 1), torch.stack([mask, torch.zeros(3, dtype=bool)]),
    )
    fg = out[3]
    assert fg[0].any() and not fg[1].any()  # image 2 has only padding GTs
    assert out[2][1].sum() == 0
    # no GT slots at all
    out = TaskAlignedAssigner(2)(scores[None], pd[None], anc, torch.zeros(1, 0, dtype=torch.long),
                                 torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool))
    assert not out[3].any() and out[2].shape == (1, 16, 2)


# ----------------------------------------------------------------------------- detection loss


def test_dfl_loss_two_bin_target():
    logits = torch.zeros(1, 16)
    logits[0, 3], logits[0, 4] = math.log(0.25), math.log(0.75)
    logits[0, [i for i in range(16) if i not in (3, 4)]] = -30.0
    # target 3.75 -> weights 0.25 / 0.75 on bins 3 / 4: loss = entropy of (0.25, 0.75)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert dfl_loss(logits, torch.tensor([3.75])).item() == pytest.approx(expected, abs=1e-5)
    assert dfl_loss(logits, torch.tensor([7.0])).item() > 5  # far from the predicted bins


def _encode_raw(gt_grid, reg_max=16, nc=1, hw=(4, 4), shift=0):
    """Raw single-level output whose DFL distributions encode exactly bbox2dist(anchor, gt)."""
    pts, _ = make_anchors([hw], [8])
    d = bbox2dist(pts, gt_grid.expand(len(pts), 4), reg_max) + shift  # N×4 bins
    d = d.clamp(0, reg_max - 1.01)
    lo = d.floor().long()
    wl = (lo + 1) - d
    logits = torch.full((len(pts), 4, reg_max), -30.0)
    for n in range(len(pts)):
        for s in range(4):
            logits[n, s, lo[n, s]] = torch.log(wl[n, s].clamp(min=1e-12))
            logits[n, s, lo[n, s] + 1] = torch.log((1 - wl[n, s]).clamp(min=1e-12))
    box = logits.reshape(len(pts), 4 * reg_max)
    cls = torch.zeros(len(pts), nc)
    return torch.cat([box, cls], 1).T.reshape(1, 4 * reg_max + nc, *hw)


def test_loss_uses_same_coder_as_decoding():
    gt_px = torch.tensor([[8.0, 0.0, 32.0, 24.0]])  # grid [1, 0, 4, 3]; anchors inside sit at k + 0.5
    crit = DetectionLoss(1, strides=(8,))
    raw = _encode_raw(gt_px / 8)
    _, parts = crit([raw], [(gt_px, torch.tensor([0]))])
    assert parts["box"].item() < 1e-5  # decoded boxes of the positives are exactly the GT
    # every side distance is an integer + 0.5 -> DFL = entropy(0.5, 0.5) = ln 2
    assert parts["dfl"].item() == pytest.approx(math.log(2), abs=1e-4)
    # shifting the encoded distributions by one bin makes both losses worse
    _, worse = crit([_encode_raw(gt_px / 8, shift=1.0)], [(gt_px, torch.tensor([0]))])
    assert worse["box"] > 0.05 and worse["dfl"] > parts["dfl"] + 0.5


def test_zero_boxes_finite_and_backward():
    torch.manual_seed(0)
    head = DetectHead(3, in_chs=(16, 32, 64))
    feats = [torch.randn(2, c, s, s) for c, s in ((16, 8), (32, 4), (64, 2))]
    crit = DetectionLoss(3)
    raw = head(feats)
    loss, parts = crit(raw, [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))] * 2)
    assert torch.isfinite(loss) and loss > 0
    assert parts["box"] == 0 and parts["dfl"] == 0 and parts["cls"] > 0
    loss.backward()
    assert head.cls[0][-1].weight.grad.abs().sum() > 0  # pushes class scores down
    # mixed batch: one image with a box (dict format), one without
    raw = head(feats)
    loss2, parts2 = crit(raw, [{"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([2])},
                               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert torch.isfinite(loss2) and parts2["box"] > 0 and parts2["dfl"] > 0


def test_bad_targets_raise():
    crit = DetectionLoss(2, strides=(8,))
    raw = [torch.zeros(1, 66, 4, 4)]
    with pytest.raises(ValueError, match="labels"):
        crit(raw, [(torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([2]))])
    with pytest.raises(ValueError, match="batch"):
        crit(raw, [])


def test_overfit_single_image_single_box():
    torch.manual_seed(0)
    head = DetectHead(2, in_chs=(16, 32, 64))
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, c, s, s, generator=g) for c, s in ((16, 8), (32, 4), (64, 2))]  # 64×64 input
    gt = torch.tensor([[16.0, 12.0, 48.0, 44.0]])
    targets = [(gt, torch.tensor([1]))]
    crit = DetectionLoss(2)
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        loss, _ = crit(head(feats), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.4 * losses[0]
    with torch.no_grad():
        boxes, scores = head.decode(head(feats))
    best = scores[0, :, 1].argmax()
    assert scores[0, best, 1] > scores[0, best, 0]
    assert box_iou(boxes[0, best][None], gt).item() > 0.6


# ----------------------------------------------------------------------------- segmentation loss


def test_seg_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6))
    target[0, :2] = 255
    target[1, :, 4:] = 255
    crit = SegmentationLoss(3)
    loss = crit(logits, target)
    valid = target != 255
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert logits.grad.permute(0, 2, 3, 1)[~valid].abs().sum() == 0
    assert logits.grad.permute(0, 2, 3, 1)[valid].abs().sum() > 0
    # whatever the logits are at ignored pixels, the loss does not change
    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[~valid] = 100.0
    torch.testing.assert_close(crit(other, target), loss.detach())


@pytest.mark.parametrize("mode,dice", [("ce", 0.0), ("ce", 1.0), ("bce", 0.0), ("bce", 0.5)])
def test_seg_loss_modes_all_ignored_and_perfect(mode, dice):
    crit = SegmentationLoss(2, dice_weight=dice, mode=mode)
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    all_ignored = torch.full((1, 4, 4), 255)
    loss = crit(logits, all_ignored)
    assert loss.item() == 0.0
    loss.backward()
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    target[0, 0, 0] = 255
    perfect = (F.one_hot(target.clamp(max=1), 2).permute(0, 3, 1, 2).float() * 2 - 1) * 30
    wrong = -perfect
    assert crit(perfect, target).item() < 1e-3
    assert crit(wrong, target).item() > 1.0


def test_seg_loss_dice_value_and_bad_labels():
    # uniform probabilities on 2 classes, 4 valid pixels of class 0: Dice_0 = 1 - (2·2+1)/(2+4+1);
    # class 1 is absent from the target and does not count
    crit = SegmentationLoss(2, dice_weight=1.0)
    logits = torch.zeros(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    expected = math.log(2) + (1 - 5 / 7)
    assert crit(logits, target).item() == pytest.approx(expected, abs=1e-6)
    # 3 classes, 1 and 2 present, 3 valid pixels (summed probability 1 per class):
    # Dice_1 = 1 - (2·1/3+1)/(1+1+1), Dice_2 = 1 - (2·2/3+1)/(1+2+1)
    crit3 = SegmentationLoss(3, dice_weight=1.0)
    logits3 = torch.zeros(1, 3, 1, 4)
    target3 = torch.tensor([[[1, 2, 2, 255]]])
    dice = ((1 - (2 / 3 + 1) / 3) + (1 - (4 / 3 + 1) / 4)) / 2
    assert crit3(logits3, target3).item() == pytest.approx(math.log(3) + dice, abs=1e-6)
    with pytest.raises(ValueError, match="outside"):
        crit(logits, torch.tensor([[[0, 1, 2, 0, 0]]]))


def test_detection_loss_under_bf16_autocast():
    torch.manual_seed(0)
    head = DetectHead(2, in_chs=(16, 32, 64))
    feats = [torch.randn(1, c, s, s) for c, s in ((16, 8), (32, 4), (64, 2))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = head(feats)
        assert raw[0].dtype == torch.bfloat16
        loss, parts = DetectionLoss(2)(raw, [(torch.tensor([[4.0, 4, 40, 50]]), torch.tensor([1]))])
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and parts["box"] > 0
    loss.backward()
    assert torch.isfinite(head.box[0][-1].weight.grad).all()
