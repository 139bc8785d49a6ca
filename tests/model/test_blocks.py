"""Blocks of SSAMNet (DESIGN-model.md §1.4-§1.7, §5 D1-D3, §6.3 checks 5-6).

Several tests compare against independent reference formulations written here (grid_sample for
DAConv, per-sample grouped conv for ADSCDConv, real-arithmetic complex MLP for AFMM).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model.blocks import (
    AFMM,
    SAMM,
    ADSCDConv,
    ConvStem,
    DAConv,
    DropPath,
    LayerNormCF,
    MPBlock,
    MPConv,
    PConv,
    SSAMBlock,
    cumulative_offsets,
    irfft2_real,
    rfft2_real,
    use_real_valued_fft,
)

torch.set_num_threads(1)


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def randomize_bn(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m


# ---------------------------------------------------------------------------------------------
# closed-form parameter counts (§1.3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [32, 48, 96])
def test_param_counts_stem_mpblock(c):
    assert nparams(ConvStem(3, c)) == 4.5 * c * c + 16.5 * c
    assert nparams(MPBlock(c, expansion=4)) == 8 * c * c + 54 * c


@pytest.mark.parametrize("c", [128, 192, 256])
def test_param_counts_ssam(c):
    d = c // 4
    assert nparams(PConv(d)) == d * d + 14 * d
    assert nparams(DAConv(d, "x")) == 27 * d + 18
    assert nparams(DAConv(d, "y")) == 27 * d + 18
    assert nparams(ADSCDConv(d)) == 1.75 * d * d + 36.5 * d
    assert nparams(SAMM(c)) == c * c + c + 2.75 * d * d + 104.5 * d + 36
    assert nparams(AFMM(c)) == c * c + 4 * c
    assert nparams(SSAMBlock(c)) == 2.171875 * c * c + 35.125 * c + 36
    assert nparams(SSAMBlock(c, layer_scale=1e-5)) == 2.171875 * c * c + 35.125 * c + 36 + 2 * c


# ---------------------------------------------------------------------------------------------
# generic layers
# ---------------------------------------------------------------------------------------------


def test_layernorm_cf_matches_manual():
    ln = LayerNormCF(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 3, 5) * 3 + 1
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-6) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    y = ln(x)
    assert y.shape == x.shape
    assert torch.allclose(y, ref, atol=1e-5)
    assert ln.eps == 1e-6
    # eps matters for a constant pixel: (0)/sqrt(eps) stays 0 and the output is the bias
    assert torch.allclose(ln(torch.ones(1, 6, 1, 1)).flatten(), ln.bias, atol=1e-6)


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 2, 2)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    per_sample = y.flatten(1)
    # each sample is either dropped (0) or kept and rescaled by 1 / keep_prob = 2, as a whole
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert 0.2 < kept < 0.8


def test_convstem_no_final_activation_and_shape():
    m = randomize_bn(ConvStem(3, 16)).eval()
    y = m(torch.randn(2, 3, 33, 30))
    assert y.shape == (2, 16, 9, 8)
    assert (y < 0).any()  # ends with BN, not GELU/ReLU-like clipping to >= -0.17
    assert y.min() < -0.5


def test_mpconv_hierarchy_matches_manual():
    torch.manual_seed(0)
    m = randomize_bn(MPConv(16)).eval()
    x = torch.randn(2, 16, 5, 6)
    xs = x.chunk(4, 1)
    ys = []
    prev = None
    for i in range(4):
        inp = xs[i] if i == 0 else prev + xs[i]
        prev = m.bns[i](F.conv2d(inp, m.convs[i].weight, padding=1, groups=4))
        ys.append(prev)
    ref = F.gelu(torch.cat(ys, 1))
    assert torch.allclose(m(x), ref, atol=1e-6)


def test_mpblock_residual_and_droppath():
    m = MPBlock(8, drop_path=0.0)
    with torch.no_grad():
        m.bn2.weight.zero_()  # branch output = BN bias = 0 -> identity
    m.eval()
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(m(x), x)
    m2 = MPBlock(8, drop_path=0.3)
    assert isinstance(m2.drop_path, DropPath) and m2.drop_path.drop_prob == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# PConv
# ---------------------------------------------------------------------------------------------


def pconv_literal(m, x):
    """The spec formulation: four asymmetric zero paddings, each conv unit applied twice."""
    units = [m.conv_h, m.conv_h, m.conv_v, m.conv_v]
    pads = [(3, 0, 1, 0), (0, 3, 0, 1), (0, 1, 3, 0), (1, 0, 0, 3)]
    y = torch.cat([u(F.pad(x, p)) for u, p in zip(units, pads, strict=True)], 1)
    return m.proj(m.cat(y))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (2, 9)])
def test_pconv_matches_literal_padding(train, hw):
    import copy

    torch.manual_seed(0)
    d = 16
    m = randomize_bn(PConv(d)).train(train)
    ref_m = copy.deepcopy(m)
    x = torch.randn(2, d, *hw)
    out = m(x)
    ref = pconv_literal(ref_m, x)
    assert out.shape == (2, d, *hw)
    assert torch.allclose(out, ref, atol=1e-5)
    # training BatchNorm: each unit is used twice -> running stats updated twice, like the reference
    for a, b in zip(m.buffers(), ref_m.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    if train:
        assert not torch.allclose(m.conv_h.bn.running_mean, torch.zeros(d // 4))
        assert m.conv_h.bn.num_batches_tracked.item() == 2


# ---------------------------------------------------------------------------------------------
# DAConv
# ---------------------------------------------------------------------------------------------


def test_cumulative_offsets():
    o = torch.randn(2, 9, 3, 4, requires_grad=True)
    d = cumulative_offsets(o)
    ref = torch.zeros_like(o)
    for j in range(1, 5):
        ref[:, 4 + j] = ref[:, 4 + j - 1] + o[:, 4 + j]
        ref[:, 4 - j] = ref[:, 4 - j + 1] + o[:, 4 - j]
    assert torch.allclose(d, ref, atol=1e-6)
    assert torch.all(d[:, 4] == 0)
    d.sum().backward()
    assert o.grad[:, 4].abs().sum() == 0 and o.grad[:, 0].abs().min() > 0


def daconv_reference(x, delta, weight, axis):
    """Reference sampler: F.grid_sample (bilinear, align_corners=True) on clamped coordinates."""
    B, C, H, W = x.shape
    hh = torch.arange(H, dtype=x.dtype).view(1, H, 1).expand(B, H, W)
    ww = torch.arange(W, dtype=x.dtype).view(1, 1, W).expand(B, H, W)
    out = torch.zeros_like(x)
    for k in range(9):
        if axis == "x":
            row, col = hh + delta[:, k], ww + (k - 4)
        else:
            row, col = hh + (k - 4), ww + delta[:, k]
        row = row.clamp(0, H - 1)
        col = col.clamp(0, W - 1)
        grid = torch.stack([2 * col / max(W - 1, 1) - 1, 2 * row / max(H - 1, 1) - 1], -1)
        s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out + weight[:, k].view(1, C, 1, 1) * s
    return out


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("hw", [(6, 7), (1, 5), (5, 1), (3, 3)])
def test_daconv_matches_grid_sample_reference(axis, hw):
    torch.manual_seed(1)
    d = 4
    m = randomize_bn(DAConv(d, axis)).double().eval()
    with torch.no_grad():
        m.offset_pw.weight.normal_(0, 1.0)  # large offsets: taps move by several pixels, hit borders
    x = torch.randn(2, d, *hw, dtype=torch.float64)
    delta = m.offsets(x).double()
    if hw[0] * hw[1] > 1:
        assert delta.abs().max() > 1.0
    weight = m.conv.weight.reshape(d, 9)
    ref = daconv_reference(x, delta, weight, axis)
    out = m(x)
    assert out.shape == x.shape
    assert torch.allclose(out, ref, atol=1e-10)


@pytest.mark.parametrize("axis,kshape", [("x", (1, 9)), ("y", (9, 1))])
def test_daconv_zero_offsets_is_replicate_padded_depthwise_conv(axis, kshape):
    """§6.3 check 5: zero offset predictor -> plain DW conv with replicate padding, tap k <-> k - 4."""
    torch.manual_seed(0)
    d = 6
    m = DAConv(d, axis).eval()
    assert m.conv.weight.shape == ((d, 1, 9, 1) if axis == "x" else (d, 1, 1, 9))
    with torch.no_grad():
        m.offset_pw.weight.zero_()
        m.conv.weight.normal_()
    x = torch.randn(2, d, 7, 11)
    pad = (4, 4, 0, 0) if axis == "x" else (0, 0, 4, 4)
    ref = F.conv2d(F.pad(x, pad, mode="replicate"), m.conv.weight.reshape(d, 1, *kshape), groups=d)
    assert torch.allclose(m(x), ref, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (6, 1), (2, 2)])
def test_daconv_tiny_maps_d1(train, hw):
    for axis in ("x", "y"):
        m = DAConv(8, axis).train(train)
        x = torch.randn(1, 8, *hw)
        y = m(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    # 1x1 map: every tap samples the only pixel -> y = x * sum_k w_k
    m = DAConv(8, "x").train(train)
    x = torch.randn(3, 8, 1, 1)
    assert torch.allclose(m(x), x * m.conv.weight.reshape(8, 9).sum(1).view(1, 8, 1, 1), atol=1e-6)


def test_daconv_gradients_reach_offset_predictor():
    torch.manual_seed(0)
    for axis in ("x", "y"):
        m = DAConv(8, axis).train()
        x = torch.randn(2, 8, 9, 9, requires_grad=True)
        (m(x) ** 2).sum().backward()
        for p in (m.offset_dw.weight, m.offset_pw.weight, m.offset_norm.weight, m.conv.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert x.grad.abs().sum() > 0


def test_daconv_low_precision_coordinates():
    """Pure bf16 features: sampling positions stay exact (computed in float32)."""
    torch.manual_seed(0)
    m = DAConv(4, "x").eval()
    with torch.no_grad():
        m.offset_pw.weight.zero_()
        m.conv.weight.normal_()
    x = torch.randn(1, 4, 300, 3)
    ref = m(x)
    mb = DAConv(4, "x").eval()
    mb.load_state_dict(m.state_dict())
    mb = mb.to(torch.bfloat16)
    y = mb(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # a wrong row (bf16 cannot represent 257 + 0) would give O(1) errors
    assert (y.float() - ref).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------
# ADSCDConv
# ---------------------------------------------------------------------------------------------


def adscd_reference_kernel(m, u):
    """K (B x d x 3 x 3) and theta (B x d) straight from the spec formulas."""
    B, d = u.shape[:2]
    p = F.adaptive_avg_pool2d(u, 3)
    a = m.attn_conv2(F.relu(m.attn_bn(m.attn_conv1(p))))
    a = torch.softmax(a.view(B, 4, d, 3, 3), dim=1)
    K = (a * m.weight.unsqueeze(0)).sum(1)

    def mlp(v):
        return m.ca_fc2(F.relu(m.ca_fc1(v)))

    theta = torch.sigmoid(mlp(u.mean((2, 3), keepdim=True)) + mlp(u.amax((2, 3), keepdim=True)))
    return K, theta.view(B, d)


def test_adscd_matches_per_sample_conv():
    torch.manual_seed(0)
    d = 8
    m = randomize_bn(ADSCDConv(d)).eval()
    with torch.no_grad():
        m.weight.normal_()
    u = torch.randn(3, d, 6, 5)
    K, theta = adscd_reference_kernel(m, u)
    Kp = K.clone()
    Kp[:, :, 1, 1] = K[:, :, 1, 1] - K.sum((2, 3)) + theta * K[:, :, 1, 1]
    ref = torch.cat([F.conv2d(u[b : b + 1], Kp[b].unsqueeze(1), padding=1, groups=d) for b in range(3)])
    assert torch.allclose(m(u), ref, atol=1e-5)


def test_adscd_constant_input():
    """§6.3 check 5: constant input c -> theta * K_c * c at interior pixels."""
    torch.manual_seed(0)
    d = 8
    m = randomize_bn(ADSCDConv(d)).eval()
    with torch.no_grad():
        m.weight.normal_()
    c = torch.tensor([0.7, -1.3]).view(2, 1, 1, 1)
    u = c.expand(2, d, 6, 6).clone()
    K, theta = adscd_reference_kernel(m, u)
    expect = theta * K[:, :, 1, 1] * c.view(2, 1)
    z = m(u)
    interior = z[:, :, 1:-1, 1:-1]
    assert torch.allclose(interior, expect.view(2, d, 1, 1).expand_as(interior), atol=1e-6)
    # border pixels see zero padding, so they differ
    assert not torch.allclose(z[:, :, 0, 0], expect, atol=1e-4)


def test_adscd_trace_is_batch_agnostic_d2():
    m = ADSCDConv(8).eval()
    tr = torch.jit.trace(m, torch.randn(2, 8, 6, 6), check_trace=False)
    for shape in [(3, 8, 6, 6), (1, 8, 5, 7)]:
        x = torch.randn(*shape)
        with torch.jit.optimized_execution(False):
            assert torch.allclose(tr(x), m(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# AFMM
# ---------------------------------------------------------------------------------------------


def afmm_reference(m, v):
    """Explicit real arithmetic of §1.7.5 in float64."""
    B, C, H, W = v.shape
    G = m.groups
    D = C // G
    X = torch.fft.rfft2(v.double(), norm="ortho")
    Xr, Xi = X.real, X.imag  # B x C x H x Wf
    Wf = X.shape[-1]

    def lin(zr, zi, w, b):
        zr = zr.reshape(B, G, D, H, Wf)
        zi = zi.reshape(B, G, D, H, Wf)
        wr, wi = w[0].double(), w[1].double()  # G x Din x Dout
        re = torch.einsum("bgdhw,gde->bgehw", zr, wr) - torch.einsum("bgdhw,gde->bgehw", zi, wi)
        im = torch.einsum("bgdhw,gde->bgehw", zi, wr) + torch.einsum("bgdhw,gde->bgehw", zr, wi)
        re = re + b[0].double().view(1, G, D, 1, 1)
        im = im + b[1].double().view(1, G, D, 1, 1)
        return re.reshape(B, C, H, Wf), im.reshape(B, C, H, Wf)

    r, i = lin(Xr, Xi, m.w1, m.b1)
    r, i = F.relu(r), F.relu(i)
    r, i = lin(r, i, m.w2, m.b2)
    Y = torch.complex(r, i) * X
    return torch.fft.irfft2(Y, s=(H, W), norm="ortho")


@pytest.mark.parametrize("real_valued", [False, True])
@pytest.mark.parametrize("hw", [(6, 8), (5, 7), (1, 1), (1, 4), (2, 3), (24, 24)])
def test_afmm_matches_reference(hw, real_valued):
    torch.manual_seed(0)
    m = AFMM(16)
    m.real_valued = real_valued  # the DFT-matrix formulation that exporters take
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    v = torch.randn(2, 16, *hw)
    assert torch.allclose(m(v).double(), afmm_reference(m, v), atol=1e-4)


@pytest.mark.parametrize("hw", [(1, 1), (1, 2), (2, 3), (7, 4), (12, 12), (13, 9), (32, 32)])
def test_real_valued_ffts_match_torch_fft(hw):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *hw)
    ref = torch.fft.rfft2(x, norm="ortho")
    re, im = rfft2_real(x)
    assert torch.allclose(re, ref.real, atol=2e-6) and torch.allclose(im, ref.imag, atol=2e-6)
    y = torch.complex(torch.randn(2, 3, hw[0], hw[1] // 2 + 1), torch.randn(2, 3, hw[0], hw[1] // 2 + 1))
    assert torch.allclose(irfft2_real(y.real, y.imag, hw), torch.fft.irfft2(y, s=hw, norm="ortho"), atol=5e-6)


def test_use_real_valued_fft_switches_every_afmm_and_back():
    torch.manual_seed(2)
    block = SSAMBlock(32).eval()
    v = torch.randn(2, 32, 9, 10)
    with torch.no_grad():
        ref = block(v)
        assert use_real_valued_fft(block) is block and block.afmm.real_valued and "real_valued" in repr(block)
        assert (block(v) - ref).abs().max() < 1e-5
        use_real_valued_fft(block, False)
        assert not block.afmm.real_valued and torch.equal(block(v), ref)


def test_afmm_identity_filter():
    """§6.3 check 6: W2 = 0, b2 = 1 + 0i, any W1 -> output equals input."""
    torch.manual_seed(0)
    m = AFMM(32)
    with torch.no_grad():
        m.w1.normal_()
        m.w2.zero_()
        m.b2[0].fill_(1.0)
        m.b2[1].zero_()
    v = torch.randn(2, 32, 7, 6)
    assert torch.allclose(m(v), v, atol=1e-5)


def test_afmm_dtypes_d3():
    m = AFMM(16)
    v = torch.randn(1, 16, 5, 6)
    ref = m(v)
    assert ref.dtype == torch.float32
    mb = AFMM(16)
    mb.load_state_dict(m.state_dict())
    mb = mb.to(torch.bfloat16)
    y = mb(v.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m(v)
        yb = m(v.to(torch.bfloat16))
    assert ya.dtype == torch.float32 and yb.dtype == torch.bfloat16
    assert torch.allclose(ya, ref, atol=1e-6)  # autocast does not touch the fp32 FFT / complex MLP


# ---------------------------------------------------------------------------------------------
# SAMM / SSAM block
# ---------------------------------------------------------------------------------------------


def test_samm_modulates_normalised_input():
    torch.manual_seed(0)
    m = SAMM(32).eval()
    u = torch.randn(2, 32, 5, 5)
    y = m(u)
    assert y.shape == u.shape
    # SAMM(u) = GELU(proj(...)) * u: zero channels of u stay zero, scaling the proj bias up -> ~u
    u0 = u.clone()
    u0[:, 3] = 0
    assert torch.all(m(u0)[:, 3] == 0)
    with torch.no_grad():
        m.proj.weight.zero_()
        m.proj.bias.fill_(1.0)
    assert torch.allclose(m(u), F.gelu(torch.tensor(1.0)) * u, atol=1e-6)
    with pytest.raises(ValueError):
        SAMM(40)


def test_ssam_block_layer_scale_and_residual():
    torch.manual_seed(0)
    blk = SSAMBlock(32, layer_scale=1e-5)
    assert blk.gamma1.shape == (32, 1, 1) and torch.all(blk.gamma1 == 1e-5)
    no_ls = SSAMBlock(32)
    assert no_ls.gamma1 is None and no_ls.gamma2 is None
    assert not any("gamma" in k for k in no_ls.state_dict())
    blk.eval()
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        blk.gamma1.zero_()
        blk.gamma2.zero_()
    assert torch.allclose(blk(x), x)
    with torch.no_grad():
        blk.gamma1.fill_(1.0)
    y = blk(x)
    ref = x + blk.samm(blk.norm1(x))
    assert torch.allclose(y, ref, atol=1e-6)


def test_ssam_block_drop_path_train_only():
    blk = SSAMBlock(32, drop_path=1.0 - 1e-9)
    x = torch.randn(4, 32, 5, 5)
    blk.train()
    torch.manual_seed(0)
    assert torch.allclose(blk(x), x)  # both branches dropped
    blk.eval()
    assert not torch.allclose(blk(x), x)


def test_ssam_block_shapes_and_dtypes():
    torch.manual_seed(0)
    blk = SSAMBlock(32).eval()
    for hw in [(1, 1), (1, 3), (4, 1), (5, 6)]:
        x = torch.randn(2, 32, *hw)
        assert blk(x).shape == x.shape
    x = torch.randn(2, 32, 5, 6)
    ref = blk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = blk(x)
    assert torch.isfinite(ya.float()).all() and (ya.float() - ref).abs().max() < 0.1
    bb = SSAMBlock(32).eval()
    bb.load_state_dict(blk.state_dict())
    bb = bb.to(torch.bfloat16)
    yb = bb(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - ref).abs().max() < 0.15
    assert math.isfinite(yb.float().sum().item())
