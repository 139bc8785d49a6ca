"""SSAMNet backbone + classify head (docs/ARCHITECTURE.md: "Backbone", "Differences from the published
reference")."""

import warnings

import pytest
import torch

from model.backbone import TASK_SETTINGS, VARIANTS, SSAMNet, resolve_variant, task_settings
from model.blocks import DAConv, DropPath, MPBlock, SSAMBlock
from model.heads.classify import ClassifyHead
from model.wavelet import HaarDown

torch.set_num_threads(1)


def nparams(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def tiny_eval():
    torch.manual_seed(0)
    m = SSAMNet("tiny").eval()
    # non-trivial BN statistics so that eval-mode checks are not degenerate
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m


# ---------------------------------------------------------------------------------------------
# variants, parameter counts (§1.2, §1.3)
# ---------------------------------------------------------------------------------------------

BACKBONE_PARAMS = {  # (variant, layer_scale) -> backbone w/o head
    ("tiny", None): 635_752,
    ("small", None): 1_387_824,
    ("base", 1e-5): 2_433_528,
    ("base", None): 2_429_432,
    ("large", 1e-5): 5_387_400,
    ("large", None): 5_381_256,  # seg copy of large (§2)
}
CLS_PARAMS_NC10 = {"tiny": 638_834, "small": 1_392_442, "base": 2_439_682, "large": 5_396_626}
CLS_PARAMS_NC1000 = {"tiny": 893_264, "small": 1_773_592, "base": 2_947_552, "large": 6_157_936}


@pytest.mark.parametrize("variant,ls", list(BACKBONE_PARAMS))
def test_backbone_param_counts(variant, ls):
    assert nparams(SSAMNet(variant, layer_scale=ls)) == BACKBONE_PARAMS[(variant, ls)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_classification_param_counts(variant):
    cfg = task_settings(variant, "classify")
    bb = SSAMNet(variant, **cfg)
    c3 = bb.channels[-1]
    head = ClassifyHead(c3, 10)
    assert nparams(head) == 2 * c3 + (c3 + 1) * 10
    assert nparams(bb) + nparams(head) == CLS_PARAMS_NC10[variant]
    assert nparams(bb) + nparams(ClassifyHead(c3, 1000)) == CLS_PARAMS_NC1000[variant]


def test_per_stage_split_tiny():
    m = SSAMNet("tiny")
    split = [nparams(m.stem)] + [nparams(s) for s in m.stages]
    assert split == [5_136, 19_840, 145_280, 161_232, 304_264]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_closed_form_total(variant):
    c0, c1, c2, c3 = VARIANTS[variant]["widths"]
    ls = VARIANTS[variant]["layer_scale"]

    def ssam(c):
        return 2.171875 * c * c + 35.125 * c + 36 + (2 * c if ls else 0)

    def mp(c):
        return 8 * c * c + 54 * c

    total = (4.5 * c0 * c0 + 16.5 * c0) + 2 * mp(c0) + 6 * c1 + 4 * mp(c1) + 6 * c2 + 4 * ssam(c2)
    total += 6 * c3 + 2 * ssam(c3)
    assert nparams(SSAMNet(variant, layer_scale=ls)) == total


def test_variant_table_and_aliases():
    assert VARIANTS["tiny"]["widths"] == (32, 64, 128, 256)
    assert VARIANTS["small"]["widths"] == (48, 96, 192, 384)
    assert VARIANTS["base"]["widths"] == (64, 128, 256, 512)
    assert VARIANTS["large"]["widths"] == (96, 192, 384, 768)
    assert all(v["depths"] == (2, 4, 4, 2) for v in VARIANTS.values())
    assert (VARIANTS["base"]["layer_scale"], VARIANTS["base"]["drop_path"]) == (1e-5, 0.0)
    assert (VARIANTS["large"]["layer_scale"], VARIANTS["large"]["drop_path"]) == (1e-5, 0.1)
    assert VARIANTS["tiny"]["layer_scale"] is None and VARIANTS["small"]["layer_scale"] is None
    for alias, name in [
        ("t", "tiny"),
        ("T", "tiny"),
        ("tiny", "tiny"),
        ("Tiny", "tiny"),
        ("s", "small"),
        ("S", "small"),
        ("b", "base"),
        ("B", "base"),
        ("l", "large"),
        ("L", "large"),
        ("large", "large"),
    ]:
        assert resolve_variant(alias) == name
    with pytest.raises(ValueError):
        resolve_variant("xl")
    assert SSAMNet("S").channels == (48, 96, 192, 384)
    assert task_settings("L", "segment") == {"layer_scale": None, "drop_path": 0.0}
    assert task_settings("large", "detect") == {"layer_scale": 1e-5, "drop_path": 0.1}
    assert task_settings("base", "detect") == {"layer_scale": None, "drop_path": 0.0}
    assert set(TASK_SETTINGS) == {"classify", "segment", "detect"}


# ---------------------------------------------------------------------------------------------
# structure, names, init
# ---------------------------------------------------------------------------------------------


def test_structure_and_feature_info():
    m = SSAMNet("tiny")
    assert m.channels == (32, 64, 128, 256)
    assert m.feature_info == [
        {"num_chs": 32, "reduction": 4, "module": "stages.0"},
        {"num_chs": 64, "reduction": 8, "module": "stages.1"},
        {"num_chs": 128, "reduction": 16, "module": "stages.2"},
        {"num_chs": 256, "reduction": 32, "module": "stages.3"},
    ]
    mods = dict(m.named_modules())
    assert isinstance(mods["stages.0.downsample"], torch.nn.Identity)
    for i in (1, 2, 3):
        assert isinstance(mods[f"stages.{i}.downsample"], HaarDown)
    for i, depth in enumerate((2, 4, 4, 2)):
        kind = MPBlock if i < 2 else SSAMBlock
        assert [isinstance(mods[f"stages.{i}.blocks.{j}"], kind) for j in range(depth)] == [True] * depth
        assert f"stages.{i}.blocks.{depth}" not in mods
    keys = list(m.state_dict())
    assert all(k.startswith(("stem.", "stages.")) for k in keys)
    assert not any("filters" in k for k in keys)


def test_drop_path_ramp_and_layer_scale():
    m = SSAMNet("large", layer_scale=1e-5, drop_path=0.1)
    rates = []
    for s in m.stages:
        for b in s.blocks:
            rates.append(b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0)
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    gammas = [p for n, p in m.named_parameters() if "gamma" in n]
    assert len(gammas) == 12 and all(torch.all(g == 1e-5) for g in gammas)
    assert not any("gamma" in n for n, _ in SSAMNet("large").named_parameters())


def test_init():
    torch.manual_seed(0)
    m = SSAMNet("tiny")
    w = m.stages[1].blocks[0].pw1.weight
    assert 0.015 < w.std().item() < 0.025 and w.abs().max() <= 2.0
    assert torch.all(m.stages[2].blocks[0].samm.proj.bias == 0)
    bn = m.stages[0].blocks[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    ln = m.stages[3].blocks[1].norm1
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    af = m.stages[3].blocks[1].afmm.w1
    assert 0.015 < af.std().item() < 0.025
    ad = m.stages[2].blocks[0].samm.adscd.weight
    assert 0.01 < ad.std().item() < 0.03


# ---------------------------------------------------------------------------------------------
# shapes (§6.3 check 2) and D1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,expect",
    [
        (224, [(32, 56, 56), (64, 28, 28), (128, 14, 14), (256, 7, 7)]),
        (225, [(32, 57, 57), (64, 29, 29), (128, 15, 15), (256, 8, 8)]),
        (100, [(32, 25, 25), (64, 13, 13), (128, 7, 7), (256, 4, 4)]),
    ],
)
def test_stage_shapes(tiny_eval, size, expect):
    with torch.no_grad():
        outs = tiny_eval(torch.randn(1, 3, size, size))
    assert [tuple(o.shape[1:]) for o in outs] == expect


@pytest.mark.parametrize("hw", [(32, 32), (33, 33), (64, 64), (224, 32), (32, 224), (17, 40), (16, 16)])
def test_small_and_thin_inputs_d1(tiny_eval, hw):
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        outs = tiny_eval(x)
    assert all(torch.isfinite(o).all() for o in outs)
    m = SSAMNet("tiny").train()
    # training BatchNorm needs > 1 value per channel: batch 1 works unless the stage-4 map is 1x1
    b = 2 if (hw[0] + 31) // 32 * ((hw[1] + 31) // 32) == 1 else 1
    outs = m(torch.randn(b, 3, *hw))
    loss = sum(o.float().mean() for o in outs)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in outs)


# ---------------------------------------------------------------------------------------------
# D2: batch-dynamic trace, D3: dtypes
# ---------------------------------------------------------------------------------------------


def test_trace_batch_and_size_dynamic_d2(tiny_eval):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = torch.jit.trace(tiny_eval, torch.randn(2, 3, 64, 64), check_trace=False)
    for shape in [(3, 3, 64, 64), (1, 3, 96, 80)]:
        x = torch.randn(*shape)
        # the graph itself must be batch/size-generic; skip the JIT optimiser passes to keep it fast
        with torch.no_grad(), torch.jit.optimized_execution(False):
            ref = tiny_eval(x)
            out = tr(x)
        assert len(out) == 4
        for a, b in zip(out, ref, strict=True):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-4)


def test_dtypes_d3(tiny_eval):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tiny_eval(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = tiny_eval(x)
    assert all(torch.isfinite(o.float()).all() for o in auto)
    m16 = SSAMNet("tiny").eval()
    m16.load_state_dict(tiny_eval.state_dict())
    m16 = m16.to(torch.bfloat16)
    with torch.no_grad():
        pure = m16(x.to(torch.bfloat16))
    assert all(o.dtype == torch.bfloat16 for o in pure)
    for r, a, p in zip(ref, auto, pure, strict=True):
        scale = r.abs().max().item()
        assert torch.isfinite(p.float()).all()
        assert (a.float() - r).abs().max().item() < 0.1 * scale
        assert (p.float() - r).abs().max().item() < 0.2 * scale
    with torch.no_grad():
        half = m16.to(torch.float16)(x.to(torch.float16))
    for r, h in zip(ref, half, strict=True):
        assert h.dtype == torch.float16
        assert (h.float() - r).abs().max().item() < 0.05 * r.abs().max().item()


def test_batch_independence_eval(tiny_eval):
    torch.manual_seed(3)
    x = torch.randn(3, 3, 48, 56)
    with torch.no_grad():
        batch = tiny_eval(x)
        for i in range(3):
            alone = tiny_eval(x[i : i + 1])
            for a, b in zip(alone, batch, strict=True):
                assert torch.allclose(a[0], b[i], atol=1e-5)


def test_gradients_reach_offset_predictors():
    torch.manual_seed(0)
    m = SSAMNet("tiny").train()
    outs = m(torch.randn(2, 3, 64, 64))
    (outs[2].pow(2).mean() + outs[3].pow(2).mean()).backward()
    daconvs = [mod for mod in m.modules() if isinstance(mod, DAConv)]
    assert len(daconvs) == 12
    for mod in daconvs:
        assert mod.offset_pw.weight.grad is not None and mod.offset_pw.weight.grad.abs().sum() > 0
        assert mod.offset_dw.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())


def test_fuse_for_inference(tiny_eval):
    import copy

    fused = copy.deepcopy(tiny_eval).fuse()
    assert fused.is_fused and not tiny_eval.is_fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 72, 64)
    with torch.no_grad():
        ref = tiny_eval(x)
        out = fused(x)
    for a, b in zip(out, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError):
        fused.train()
    fused.eval()  # eval stays allowed
    with torch.no_grad():
        pure = copy.deepcopy(fused).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() for p in pure)


# ---------------------------------------------------------------------------------------------
# classify head
# ---------------------------------------------------------------------------------------------


def test_classify_head():
    torch.manual_seed(0)
    head = ClassifyHead(16, 5)
    assert head.norm.eps == 1e-6
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 16, 3, 4)]
    y = head(feats)
    assert y.shape == (2, 5)
    pooled = feats[-1].mean((2, 3))
    ref = torch.nn.functional.layer_norm(pooled, (16,), eps=1e-6) @ head.classifier.weight.T
    assert torch.allclose(y, ref + head.classifier.bias, atol=1e-6)
    assert torch.allclose(head(feats[-1]), y)
    assert head(feats).shape == (2, 5)
    assert ClassifyHead(16, 0)(feats).shape == (2, 16)


def test_backbone_plus_head_logits(tiny_eval):
    head = ClassifyHead(256, 10).eval()
    with torch.no_grad():
        y = head(tiny_eval(torch.randn(2, 3, 64, 64)))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
