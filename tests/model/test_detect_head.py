"""Detection neck + head: exact parameter totals, shapes for divisible and odd sizes, decoding, NMS
post-processing, bias init and batch independence."""

import math

import pytest
import torch

from model.backbone import VARIANTS
from model.boxes import dfl_decode
from model.heads.detect import (
    C2PSA,
    DetectHead,
    DetectNeck,
    PSAttention,
    decode_raw,
    postprocess_detections,
)

# stage widths of each backbone variant
VARIANT_CHANNELS = {name: tuple(cfg["widths"]) for name, cfg in VARIANTS.items()}
# neck + head at nc = 5 of the published reference configuration
REF_NECK_HEAD = {"tiny": 1_635_583, "small": 1_752_447, "base": 1_885_695, "large": 2_201_343}


def n_params(*mods):
    return sum(p.numel() for m in mods for p in m.parameters())


def stage_sizes(h, w):
    """Backbone stride 8/16/32 map sizes with ceil rounding at each stride-2 step."""
    hh, ww = math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)
    out = []
    for _ in range(3):
        hh, ww = math.ceil(hh / 2), math.ceil(ww / 2)
        out.append((hh, ww))
    return out


def feats(h, w, ch, batch=1, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, *s, generator=g).to(device)
        for c, s in zip(ch[-3:], stage_sizes(h, w), strict=True)
    ]


@pytest.mark.parametrize("variant", list(VARIANT_CHANNELS))
def test_param_count_matches_design(variant):
    neck, head = DetectNeck(VARIANT_CHANNELS[variant]), DetectHead(5)
    assert n_params(neck, head) == REF_NECK_HEAD[variant]
    # the only non-trainable parameters are the 16 fixed DFL bins
    frozen = [n for n, p in head.named_parameters() if not p.requires_grad]
    assert frozen == ["dfl.weight"]
    assert head.dfl.weight.tolist() == list(range(16))


def test_each_class_adds_195_params():
    counts = [n_params(DetectHead(nc)) for nc in (1, 5, 6, 20)]
    assert counts[1] - counts[0] == 4 * 195
    assert counts[2] - counts[1] == 195
    assert counts[3] - counts[2] == 14 * 195


def test_bias_init():
    head = DetectHead(5)
    for box, cls, s in zip(head.box, head.cls, (8, 16, 32), strict=True):
        assert torch.all(box[-1].bias == 1.0)
        torch.testing.assert_close(cls[-1].bias, torch.full((5,), math.log(5 / 5 / (640 / s) ** 2)))
    assert head.cls[0][-1].bias[0].item() == pytest.approx(-math.log(6400), abs=1e-5)


def test_shapes_512_anchor_count():
    # shape-only check on the meta device (no compute): 64² + 32² + 16² = 5376 anchors
    ch = VARIANT_CHANNELS["small"]
    neck, head = DetectNeck(ch).to("meta").eval(), DetectHead(5).to("meta").eval()
    raw = head(neck(feats(512, 512, ch, batch=2, device="meta")))
    assert [tuple(r.shape) for r in raw] == [(2, 69, 64, 64), (2, 69, 32, 32), (2, 69, 16, 16)]
    assert sum(r.shape[2] * r.shape[3] for r in raw) == 5376


@pytest.mark.parametrize("hw", [(100, 130), (200, 200), (64, 96), (32, 32)])
def test_non_divisible_sizes_run(hw):
    ch = VARIANT_CHANNELS["tiny"]
    neck, head = DetectNeck(ch).eval(), DetectHead(3).eval()
    with torch.no_grad():
        raw = head(neck(feats(*hw, ch, batch=2)))
    sizes = stage_sizes(*hw)
    assert [tuple(r.shape[2:]) for r in raw] == sizes
    assert all(r.shape[:2] == (2, 64 + 3) for r in raw)
    boxes, scores = decode_raw(raw, (8, 16, 32), 16)
    n = sum(h * w for h, w in sizes)
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n, 3)
    assert torch.isfinite(boxes).all() and (scores > 0).all() and (scores < 1).all()
    assert (boxes[..., 2:] >= boxes[..., :2]).all()


def test_batch_independence_eval():
    ch = VARIANT_CHANNELS["tiny"]
    torch.manual_seed(0)
    neck, head = DetectNeck(ch).eval(), DetectHead(2).eval()
    f = feats(96, 64, ch, batch=3, seed=4)
    with torch.no_grad():
        full = head(neck(f))
        one = head(neck([x[2:3] for x in f]))
    for a, b in zip(full, one, strict=True):
        torch.testing.assert_close(a[2:3], b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full[0][0], full[0][2])


def test_gradients_reach_every_trainable_parameter():
    ch = VARIANT_CHANNELS["tiny"]
    neck, head = DetectNeck(ch).train(), DetectHead(2).train()
    raw = head(neck(feats(64, 64, ch, batch=2, seed=5)))
    sum(r.square().mean() for r in raw).backward()
    bad = [
        n
        for m in (neck, head)
        for n, p in m.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert bad == []
    assert head.dfl.weight.grad is None


def test_decode_raw_hand_made():
    r, nc = 4, 2
    raw = torch.full((1, 4 * r + nc, 2, 2), -1e4)
    # anchor (0, 0) (centre 0.5, 0.5): distances l=1, t=2, r=3, b=0 bins
    for side, b in enumerate([1, 2, 3, 0]):
        raw[0, side * r + b, 0, 0] = 10.0
    # anchor (row 1, col 0) (centre 0.5, 1.5): all distances 1
    for side in range(4):
        raw[0, side * r + 1, 1, 0] = 10.0
    raw[0, 4 * r :, 0, 0] = torch.tensor([0.0, 2.0])
    boxes, scores = decode_raw([raw], (8,), r)
    assert boxes.shape == (1, 4, 4)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([(0.5 - 1) * 8, (0.5 - 2) * 8, 3.5 * 8, 0.5 * 8]))
    torch.testing.assert_close(boxes[0, 2], torch.tensor([-0.5 * 8, 0.5 * 8, 1.5 * 8, 2.5 * 8]))
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.5, 1 / (1 + math.exp(-2))]))


def test_head_decode_equals_free_function():
    ch = VARIANT_CHANNELS["tiny"]
    neck, head = DetectNeck(ch).eval(), DetectHead(4).eval()
    with torch.no_grad():
        raw = head(neck(feats(64, 96, ch, seed=6)))
    b1, s1 = head.decode(raw)
    b2, s2 = decode_raw(raw, head.strides, head.reg_max)
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(s1, s2)
    # the head's frozen DFL module equals the functional integral
    x = torch.randn(3, 64)
    torch.testing.assert_close(head.dfl(x), dfl_decode(x, 16))


def test_postprocess_conf_nms_and_labels():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]]])
    scores = torch.tensor([[[0.9, 0.0], [0.8, 0.0], [0.1, 0.3], [0.0, 0.6]]])
    (res,) = postprocess_detections(boxes, scores, conf=0.25, iou=0.5)
    # box 1 suppressed by box 0 (same class, IoU .68); box 3 is class 1 and survives; box 2 best class 1
    assert res["scores"].tolist() == pytest.approx([0.9, 0.6, 0.3])
    assert res["labels"].tolist() == [0, 1, 1]
    torch.testing.assert_close(res["boxes"][2], torch.tensor([20.0, 20, 30, 30]))
    (agn,) = postprocess_detections(boxes, scores, conf=0.25, iou=0.5, agnostic=True)
    assert agn["labels"].tolist() == [0, 1]  # box 3 now dies by box 0
    (ml,) = postprocess_detections(boxes, scores, conf=0.05, iou=0.5, multi_label=True)
    pairs = sorted(zip(ml["scores"].tolist(), ml["labels"].tolist(), strict=True))
    assert [p[1] for p in pairs] == [0, 1, 1, 0]
    assert [p[0] for p in pairs] == pytest.approx([0.1, 0.3, 0.6, 0.9])
    (top1,) = postprocess_detections(boxes, scores, conf=0.25, iou=0.5, max_det=1)
    assert top1["labels"].tolist() == [0] and top1["boxes"].shape == (1, 4)
    (none,) = postprocess_detections(boxes, scores, conf=0.95)
    assert none["boxes"].shape == (0, 4) and none["labels"].dtype == torch.long


def test_psa_attention_matches_manual():
    torch.manual_seed(0)
    att = PSAttention(128, 2).eval()
    x = torch.randn(1, 128, 3, 4)
    qkv = att.qkv(x).flatten(2)  # 1×256×N; per head [q 32 | k 32 | v 64]
    outs = []
    for h in range(2):
        base = 128 * h
        q, k, v = qkv[:, base : base + 32], qkv[:, base + 32 : base + 64], qkv[:, base + 64 : base + 128]
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), -1)  # N×N
        outs.append(v @ a.transpose(1, 2))
    vv = torch.cat([qkv[:, 128 * h + 64 : 128 * h + 128] for h in range(2)], 1).reshape(1, 128, 3, 4)
    manual = att.proj(torch.cat(outs, 1).reshape(1, 128, 3, 4) + att.pe(vv))
    torch.testing.assert_close(att(x), manual, atol=1e-5, rtol=1e-5)
    assert len(C2PSA(256).m[0].attn.qkv.conv.weight) == 256  # 2 heads: 128 + 2·2·32


REF_DET_TOTAL = {"tiny": 2_271_335, "small": 3_140_271, "base": 4_315_127, "large": 7_588_743}


@pytest.mark.parametrize("variant", list(VARIANT_CHANNELS))
def test_full_detector_param_totals(variant):
    backbone_mod = pytest.importorskip("model.backbone")
    bb = backbone_mod.SSAMNet(variant, **backbone_mod.task_settings(variant, "detect"))
    neck, head = DetectNeck(bb.channels), DetectHead(5)
    assert n_params(bb, neck, head) == REF_DET_TOTAL[variant]


def test_backbone_features_through_neck_and_head_odd_size():
    backbone_mod = pytest.importorskip("model.backbone")
    bb = backbone_mod.SSAMNet("tiny").eval()
    neck, head = DetectNeck(bb.channels).eval(), DetectHead(5).eval()
    with torch.no_grad():
        raw = head(neck(bb(torch.randn(1, 3, 100, 130))))
    assert [tuple(r.shape[2:]) for r in raw] == stage_sizes(100, 130) == [(13, 17), (7, 9), (4, 5)]
