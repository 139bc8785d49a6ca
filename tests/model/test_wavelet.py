"""HaarDown / haar_dwt (DESIGN-model.md §1.5, §6.3 check 3, defect D4)."""

import numpy as np
import pytest
import pywt
import torch

from model.wavelet import HaarDown, haar_dwt, haar_filters

torch.set_num_threads(1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 2, 7, 9), (1, 1, 5, 4), (1, 1, 1, 1), (1, 2, 3, 6)])
def test_haar_dwt_matches_pywt_zero_mode(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = haar_dwt(x)
    H, W = shape[-2:]
    assert y.shape == (shape[0], shape[1], 4, (H + 1) // 2, (W + 1) // 2)
    cA, (cH, cV, cD) = pywt.dwt2(x.numpy(), "haar", mode="zero", axes=(-2, -1))
    ref = np.stack([cA, cH, cV, cD], axis=2)
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-12)


def test_haar_dwt_default_mode_differs_on_odd_sizes():
    # guards the padding choice: symmetric (pywt default) would replicate, we zero-pad bottom/right
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    cA_sym = pywt.dwt2(x.numpy(), "haar", axes=(-2, -1))[0]
    cA = haar_dwt(x)[:, :, 0].numpy()
    assert not np.allclose(cA, cA_sym)
    # bottom-right output sees only x[2,2] = 9 plus three zeros: (9 + 0 + 0 + 0) / 2
    assert cA[0, 0, 1, 1] == pytest.approx(4.5)


def test_haar_check_value():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = haar_dwt(x).flatten()
    assert torch.allclose(y, torch.tensor([5.0, -2.0, -1.0, 0.0]), atol=1e-6)


def test_filters_values():
    f = haar_filters(torch.float64)
    expect = 0.5 * torch.tensor(
        [[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]], [[1, -1], [-1, 1]]], dtype=torch.float64
    )
    assert torch.allclose(f, expect, atol=1e-12)


def test_haardown_params_buffer_and_shapes():
    m = HaarDown(8, 16)
    assert sum(p.numel() for p in m.parameters()) == 6 * 16
    assert m.conv.groups == 8 and m.conv.bias is None and m.conv.weight.shape == (16, 4, 1, 1)
    # filters are a non-persistent buffer: not in the checkpoint
    assert "filters" in dict(m.named_buffers())
    assert not any("filters" in k for k in m.state_dict())
    m.eval()
    y = m(torch.randn(2, 8, 9, 12))
    assert y.shape == (2, 16, 5, 6)
    with pytest.raises(ValueError):
        HaarDown(8, 12)


def test_haardown_interleave_order():
    # Route each subband of each input channel to one output channel with a one-hot 1x1 conv:
    # groups=cin means output channel o (group o // 2) sees [cA, cH, cV, cD] of input channel o // 2.
    cin = 3
    m = HaarDown(cin, 2 * cin).eval()
    with torch.no_grad():
        m.conv.weight.zero_()
        for o in range(2 * cin):
            m.conv.weight[o, (o * 3) % 4, 0, 0] = 1.0  # subbands 0 and 3, then 2 and 1, ...
    x = torch.randn(1, cin, 6, 6)
    dwt = haar_dwt(x)  # 1 x cin x 4 x 3 x 3
    y = m.conv(m.dwt(x))
    for o in range(2 * cin):
        assert torch.allclose(y[0, o], dwt[0, o // 2, (o * 3) % 4], atol=1e-6)
    assert torch.allclose(m.dwt(x), dwt.flatten(1, 2))


def haardown_two_step(m, x):
    """The literal two-step path: Haar DWT with the subbands interleaved per channel, then the grouped 1x1
    conv and BN of ``m``."""
    return m.bn(m.conv(haar_dwt(x).flatten(1, 2)))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 5)])
def test_haardown_fused_equals_two_step(train, hw):
    torch.manual_seed(0)
    m = HaarDown(4, 8)
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
    m.train(train)
    x = torch.randn(2, 4, *hw)
    state = {k: v.clone() for k, v in m.bn.state_dict().items()}
    y = m(x)
    m.bn.load_state_dict(state)
    ref = haardown_two_step(m, x)
    assert torch.allclose(y, ref, atol=1e-5)


def test_haardown_does_not_query_pywt_in_forward(monkeypatch):
    m = HaarDown(4, 8).eval()

    def boom(*a, **k):
        raise AssertionError("pywt used in forward")

    monkeypatch.setattr(pywt, "Wavelet", boom)
    monkeypatch.setattr(pywt, "dwt2", boom)
    m(torch.randn(1, 4, 6, 6))


def test_haardown_low_precision():
    m = HaarDown(4, 8).eval().to(torch.bfloat16)
    y = m(torch.randn(1, 4, 7, 7, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (1, 8, 4, 4)
    m32 = HaarDown(4, 8).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m32(torch.randn(1, 4, 7, 7))
    assert torch.isfinite(y.float()).all()


def test_haardown_fuse_bn():
    torch.manual_seed(0)
    m = HaarDown(4, 8)
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
        m.bn.bias.uniform_(-1, 1)
    m.eval()
    x = torch.randn(2, 4, 7, 10)
    ref = m(x)
    m.fuse_bn_()
    assert isinstance(m.bn, torch.nn.Identity) and m.conv.bias is not None
    assert torch.allclose(m(x), ref, atol=1e-5)
    assert torch.allclose(haardown_two_step(m, x), ref, atol=1e-5)
