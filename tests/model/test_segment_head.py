"""MF-LiteSeg decoder: exact parameter formula, shapes for odd / tiny inputs, attention layout, batching."""

import math

import pytest
import torch

from model.backbone import VARIANTS
from model.heads.segment import MFLiteSegDecoder, MHSA2d

# stage widths of each backbone variant
VARIANT_CHANNELS = {name: tuple(cfg["widths"]) for name, cfg in VARIANTS.items()}


def formula(ch, nc):
    c0, c1, c2, c3 = ch
    return (
        64 * c3 + 64 + 42_880 + 57 * (c2 + 64) + 96 + 41 * (c1 + 64) + 64 + 41 * (c0 + 144) + 64 + 33 * nc
    )


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def feats_for(h, w, ch, batch=1, seed=0):
    """Random stage features with the backbone's ceil rounding (strides 4, 8, 16, 32)."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    hh, ww = math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)
    for _ in range(4):
        sizes.append((hh, ww))
        hh, ww = math.ceil(hh / 2), math.ceil(ww / 2)
    return [torch.randn(batch, c, *s, generator=g) for c, s in zip(ch, sizes, strict=True)]


@pytest.mark.parametrize("variant", list(VARIANT_CHANNELS))
@pytest.mark.parametrize("nc", [2, 6])
def test_param_count_matches_formula(variant, nc):
    ch = VARIANT_CHANNELS[variant]
    assert n_params(MFLiteSegDecoder(ch, nc)) == formula(ch, nc)


def test_param_count_design_table():
    expected = {"tiny": 83_026, "small": 96_834, "base": 110_642, "large": 138_258}
    for v, n in expected.items():
        assert n_params(MFLiteSegDecoder(VARIANT_CHANNELS[v], 2)) == n
    # each class adds 33 parameters; the direct-resize variant has the same parameters
    ch = VARIANT_CHANNELS["tiny"]
    assert n_params(MFLiteSegDecoder(ch, 3)) - n_params(MFLiteSegDecoder(ch, 2)) == 33
    assert n_params(MFLiteSegDecoder(ch, 2, direct_resize=True)) == 83_026


@pytest.mark.parametrize("hw", [(64, 64), (97, 61), (32, 32), (33, 45), (224, 32)])
def test_output_shape_odd_and_tiny_inputs(hw):
    ch = VARIANT_CHANNELS["tiny"]
    dec = MFLiteSegDecoder(ch, 3).eval()
    feats = feats_for(*hw, ch, batch=2)
    if hw == (32, 32):
        assert feats[3].shape[-2:] == (1, 1)  # single-token attention must work
    with torch.no_grad():
        out = dec(feats, hw)
    assert out.shape == (2, 3, *hw)
    assert torch.isfinite(out).all()


def test_batch_independence_eval():
    ch = VARIANT_CHANNELS["tiny"]
    torch.manual_seed(0)
    dec = MFLiteSegDecoder(ch, 2).eval()
    feats = feats_for(40, 56, ch, batch=3, seed=1)
    with torch.no_grad():
        full = dec(feats, (40, 56))
        one = dec([f[1:2] for f in feats], (40, 56))
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], full[1])  # the samples really differ


def test_reference_round_trip_vs_direct_resize():
    ch = VARIANT_CHANNELS["tiny"]
    torch.manual_seed(0)
    ref = MFLiteSegDecoder(ch, 2).eval()
    direct = MFLiteSegDecoder(ch, 2, direct_resize=True).eval()
    direct.load_state_dict(ref.state_dict())
    feats = feats_for(128, 128, ch, seed=2)
    with torch.no_grad():
        a, b = ref(feats, (128, 128)), direct(feats, (128, 128))
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-4)  # the round trip is genuinely different...
    assert (a - b).abs().max() < 0.5 * a.abs().max()  # ...but only by a resampling error


def test_mhsa_head_layout_matches_manual_attention():
    torch.manual_seed(0)
    att = MHSA2d(64, 8)
    x = torch.randn(2, 64, 3, 5)
    out = att(x)
    qkv = att.qkv(x).flatten(2)  # B×192×N
    q, k, v = qkv[:, :64], qkv[:, 64:128], qkv[:, 128:]
    heads = []
    for h in range(8):
        sl = slice(8 * h, 8 * h + 8)  # head h owns channels 8h..8h+7 of each third
        a = torch.softmax((q[:, sl].transpose(1, 2) * 8**-0.5) @ k[:, sl], dim=-1)  # B×N×N
        heads.append((a @ v[:, sl].transpose(1, 2)).transpose(1, 2))
    manual = att.proj(torch.cat(heads, 1).reshape(2, 64, 3, 5))
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    ch = VARIANT_CHANNELS["tiny"]
    dec = MFLiteSegDecoder(ch, 2).train()
    feats = feats_for(64, 48, ch, batch=2, seed=3)
    dec(feats, (64, 48)).square().mean().backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


REF_SEG_TOTAL = {"tiny": 718_778, "small": 1_484_658, "base": 2_540_074, "large": 5_519_514}


@pytest.mark.parametrize("variant", list(VARIANT_CHANNELS))
def test_full_segmenter_param_totals(variant):
    backbone_mod = pytest.importorskip("model.backbone")
    bb = backbone_mod.SSAMNet(variant, **backbone_mod.task_settings(variant, "segment"))
    assert n_params(bb) + n_params(MFLiteSegDecoder(bb.channels, 2)) == REF_SEG_TOTAL[variant]


def test_backbone_features_through_decoder_small_input():
    backbone_mod = pytest.importorskip("model.backbone")
    bb = backbone_mod.SSAMNet("tiny").eval()
    dec = MFLiteSegDecoder(bb.channels, 2).eval()
    with torch.no_grad():
        out = dec(bb(torch.randn(1, 3, 32, 45)), (32, 45))
    assert out.shape == (1, 2, 32, 45) and torch.isfinite(out).all()
