"""Building blocks of the S2-AMNet / SSAMNet backbone (DESIGN-model.md §1.4, §1.6, §1.7).

Conventions: channels-first tensors (B x C x H x W); "DW" = depthwise conv; BN = BatchNorm2d defaults.

Fixes of the reference defects (DESIGN-model.md §5) implemented here:

* D1  DAConv works on 1-pixel-wide maps: offsets are 0 when H*W == 1 (no GroupNorm call), and taps
      are sampled by index arithmetic on clamped pixel coordinates (no division by size - 1).
* D2  ADSCDConv applies its per-sample kernels batch-agnostically (unfold + batched matmul), so a
      ``torch.jit.trace`` made at one batch size runs at any other.
* D3  Sampling coordinates are always built in float32 (exact pixel positions even when the features
      are bf16/fp16); only the interpolation weights are cast to the feature dtype. AFMM runs the FFT
      and the complex MLP in float32 with float32 weights (autocast disabled) and returns the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerNormCF",
    "DropPath",
    "ConvStem",
    "MPConv",
    "MPBlock",
    "ConvBNAct",
    "PConv",
    "DAConv",
    "ADSCDConv",
    "SAMM",
    "AFMM",
    "SSAMBlock",
    "cumulative_offsets",
    "fuse_conv_bn",
    "fuse_conv_bn_attrs",
    "fold_batchnorm_",
]


def _tracing() -> bool:
    """Inside a trace, script, torch.compile or torch.export (ONNX export): tensors made there must not be
    kept in a process-wide cache, where a later eager forward would find a placeholder tensor."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


# --------------------------------------------------------------------------------------------------
# inference-time BatchNorm folding
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to ``bn(conv(x))`` in eval mode (running statistics)."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    fused.train(conv.training)
    return fused


def fuse_conv_bn_attrs(module: nn.Module, conv_name: str, bn_name: str) -> None:
    """Replace ``module.<conv_name>`` by its fold with ``module.<bn_name>`` and the BN by an identity (no-op
    once folded). Names may be a Sequential's indices ("1", "2")."""
    bn = getattr(module, bn_name)
    if isinstance(bn, nn.BatchNorm2d):
        setattr(module, conv_name, fuse_conv_bn(getattr(module, conv_name), bn))
        setattr(module, bn_name, nn.Identity())


@torch.no_grad()
def fold_batchnorm_(module: nn.Module) -> nn.Module:
    """Call ``fuse_bn_()`` on every submodule that has one (in place; returns `module`)."""
    for m in list(module.modules()):
        fuse = getattr(m, "fuse_bn_", None)
        if fuse is not None:
            fuse()
    return module


# --------------------------------------------------------------------------------------------------
# generic pieces
# --------------------------------------------------------------------------------------------------


class LayerNormCF(nn.Module):
    """LayerNorm over the channel axis of a channels-first tensor (eps 1e-6, per-channel affine)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm normalises the last axis: run it on a channels-last view.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (self.num_channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Per-sample stochastic depth with 1/keep_prob rescaling; identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ConvStem(nn.Module):
    """3x3/s2 conv (in -> C/2) -> BN -> GELU -> 3x3/s2 conv (C/2 -> C) -> BN. No final activation."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        mid = out_chans // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_chans, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))

    def fuse_bn_(self) -> None:
        fuse_conv_bn_attrs(self, "conv1", "bn1")
        fuse_conv_bn_attrs(self, "conv2", "bn2")


# --------------------------------------------------------------------------------------------------
# MPBlock (stages 1-2)
# --------------------------------------------------------------------------------------------------


class MPConv(nn.Module):
    """Res2Net-style hierarchical depthwise path on 4 channel chunks, then one GELU.

    y0 = U0(x0); y_i = U_i(y_{i-1} + x_i); out = GELU(cat(y0..y3)); U_i = DW3x3 (no bias) -> BN.
    """

    def __init__(self, channels: int, splits: int = 4):
        super().__init__()
        if channels % splits:
            raise ValueError(f"MPConv channels {channels} not divisible by {splits}")
        q = channels // splits
        self.splits = splits
        self.convs = nn.ModuleList(nn.Conv2d(q, q, 3, 1, 1, groups=q, bias=False) for _ in range(splits))
        self.bns = nn.ModuleList(nn.BatchNorm2d(q) for _ in range(splits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.chunk(self.splits, dim=1)
        ys = []
        y = None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            y = bn(conv(xs[i] if i == 0 else y + xs[i]))
            ys.append(y)
        return F.gelu(torch.cat(ys, dim=1))

    @torch.no_grad()
    def fuse_bn_(self) -> None:
        for i, bn in enumerate(self.bns):
            if isinstance(bn, nn.BatchNorm2d):
                self.convs[i] = fuse_conv_bn(self.convs[i], bn)
                self.bns[i] = nn.Identity()


class MPBlock(nn.Module):
    """x + DropPath(BN(1x1(h->C)(MPConv(GELU(BN(1x1(C->h)(x))))))), h = expansion * C; 8C^2 + 54C params."""

    def __init__(self, dim: int, expansion: int = 4, drop_path: float = 0.0):
        super().__init__()
        hidden = dim * expansion
        self.pw1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.mpconv = MPConv(hidden)
        self.pw2 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.bn1(self.pw1(x)))
        y = self.bn2(self.pw2(self.mpconv(y)))
        return x + self.drop_path(y)

    def fuse_bn_(self) -> None:
        fuse_conv_bn_attrs(self, "pw1", "bn1")
        fuse_conv_bn_attrs(self, "pw2", "bn2")


# --------------------------------------------------------------------------------------------------
# SAMM branches
# --------------------------------------------------------------------------------------------------


class ConvBNAct(nn.Module):
    """conv (no bias) -> BN -> activation."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, groups=1, act: str = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = {"silu": nn.SiLU(), "gelu": nn.GELU(), "relu": nn.ReLU(), "none": nn.Identity()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse_bn_(self) -> None:
        fuse_conv_bn_attrs(self, "conv", "bn")


class PConv(nn.Module):
    """Pinwheel-shaped partial conv, d -> d, k = 3 (§1.7.2); d^2 + 14d parameters.

    Two conv units (grouped 1x3 and 3x1, d -> d/4, groups d/4, each used twice with shared weights)
    on four differently zero-padded copies -> (H+1)x(W+1) maps -> concat -> DW 2x2 -> BN -> SiLU
    -> 1x1 conv with bias.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"PConv dim {dim} not divisible by 4")
        m = dim // 4
        self.conv_h = ConvBNAct(dim, m, (1, 3), groups=m)
        self.conv_v = ConvBNAct(dim, m, (3, 1), groups=m)
        self.cat = ConvBNAct(dim, dim, 2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each shared unit runs once on a symmetrically padded copy; the two asymmetric paddings
        # (left, right, top, bottom) are then two shifted windows of that output (identical values,
        # half the pads/convs):
        # (3,0,1,0) -> rows [0, H+1), cols [0, W+1);  (0,3,0,1) -> rows [1, H+2), cols [3, W+4)
        # (0,1,3,0) -> rows [0, H+1), cols [1, W+2);  (1,0,0,3) -> rows [3, H+4), cols [0, W+1)
        H, W = x.shape[-2:]
        ch, cv = self.conv_h, self.conv_v
        fh = ch.conv(F.pad(x, (3, 3, 1, 1)))  # (H+2) x (W+4)
        fv = cv.conv(F.pad(x, (1, 1, 3, 3)))  # (H+4) x (W+2)
        if self.training:
            # training BatchNorm: statistics per use of the unit, as in the reference
            parts = [
                ch.act(ch.bn(fh[..., : H + 1, : W + 1])),
                ch.act(ch.bn(fh[..., 1:, 3:])),
                cv.act(cv.bn(fv[..., : H + 1, 1:])),
                cv.act(cv.bn(fv[..., 3:, : W + 1])),
            ]
        else:
            fh = ch.act(ch.bn(fh))
            fv = cv.act(cv.bn(fv))
            parts = [fh[..., : H + 1, : W + 1], fh[..., 1:, 3:], fv[..., : H + 1, 1:], fv[..., 3:, : W + 1]]
        return self.proj(self.cat(torch.cat(parts, dim=1)))


def cumulative_offsets(o: torch.Tensor) -> torch.Tensor:
    """Iterative ("snake") offsets from per-tap increments O (B x K x H x W).

    delta_c = 0 for the centre c = K // 2; delta_{c+j} = delta_{c+j-1} + O_{c+j} and
    delta_{c-j} = delta_{c-j+1} + O_{c-j} (O_c is unused). Stays in the dtype of ``o`` and is
    differentiable (plain cumsums, unaffected by autocast).
    """
    c = o.shape[1] // 2
    left = o[:, :c].flip(1).cumsum(1).flip(1)
    right = o[:, c + 1 :].cumsum(1)
    return torch.cat([left, torch.zeros_like(o[:, c : c + 1]), right], dim=1)


def _coord_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sampling coordinates are never computed in less than float32 (D3)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_GRID_CACHE: dict = {}
_GRID_CACHE_MAX = 64


class DAConv(nn.Module):
    """Deformable axial ("snake") depthwise conv, d -> d, K = 9 taps, extend scope 1 (§1.7.3).

    ``axis="x"``: taps laid along W (col = w + k - 4), each tap wiggles vertically
    (row = h + delta_k(h, w)); ``axis="y"``: taps along H, wiggling horizontally.
    Coordinates are clamped to the image (border replication) and sampled bilinearly with
    pixel-exact (align_corners=True) semantics, implemented as an index gather: since one coordinate
    of every tap is an integer, bilinear sampling reduces to a lerp between two neighbouring pixels.
    Parameters: 27d + 18 (offset DW 3x3, offset 1x1 d -> 9, GroupNorm(9, 9), tap weights).
    """

    def __init__(self, dim: int, axis: str = "x", kernel_size: int = 9, extend_scope: float = 1.0):
        super().__init__()
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
        self.dim, self.axis, self.kernel_size, self.extend_scope = dim, axis, kernel_size, extend_scope
        k = kernel_size
        self.offset_dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.offset_pw = nn.Conv2d(dim, k, 1, bias=False)
        self.offset_norm = nn.GroupNorm(k, k)
        # Tap weights, stored with the reference layout: x-variant d x 1 x 9 x 1, y-variant d x 1 x 1 x 9.
        ks, st = ((k, 1), (k, 1)) if axis == "x" else ((1, k), (1, k))
        self.conv = nn.Conv2d(dim, dim, ks, stride=st, groups=dim, bias=False)

    # -- offsets ------------------------------------------------------------------------------------
    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Cumulative offsets delta (B x K x H x W, pixel units, float32 or float64)."""
        B, _, H, W = x.shape
        if H * W == 1:
            # GroupNorm over a single value is undefined (reference crashes, D1): no deformation.
            return x.new_zeros((B, self.kernel_size, H, W), dtype=_coord_dtype(x.dtype))
        o = torch.tanh(self.offset_norm(self.offset_pw(self.offset_dw(x))))
        return cumulative_offsets(o.to(_coord_dtype(x.dtype)))

    # -- sampling -----------------------------------------------------------------------------------
    def _base(self, H: int, W: int, device: torch.device, dtype: torch.dtype):
        """(moving-axis base coordinate broadcastable to BxKxHxW, fixed-axis flat index 1xKx.x.)."""
        key = (self.axis, self.kernel_size, H, W, device, dtype)
        if not _tracing():
            hit = _GRID_CACHE.get(key)
            if hit is not None:
                return hit
        k = self.kernel_size
        taps = torch.arange(k, device=device) - k // 2
        if self.axis == "x":
            base = torch.arange(H, device=device, dtype=dtype).view(1, 1, H, 1)
            fixed = (torch.arange(W, device=device).view(1, 1, 1, W) + taps.view(1, k, 1, 1)).clamp(0, W - 1)
        else:
            base = torch.arange(W, device=device, dtype=dtype).view(1, 1, 1, W)
            fixed = (torch.arange(H, device=device).view(1, 1, H, 1) + taps.view(1, k, 1, 1)).clamp(0, H - 1)
            fixed = fixed * W  # row offset in the flattened H*W index
        out = (base, fixed)
        if not _tracing():
            if len(_GRID_CACHE) >= _GRID_CACHE_MAX:
                _GRID_CACHE.clear()
            _GRID_CACHE[key] = out
        return out

    def sample(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Gather the K taps: B x C x K x (H*W), bilinear along the wiggling axis."""
        B, C, H, W = x.shape
        k = self.kernel_size
        base, fixed = self._base(H, W, x.device, delta.dtype)
        if self.axis == "x":
            size, stride = H, W
        else:
            size, stride = W, 1
        pos = (base + self.extend_scope * delta).clamp(0, size - 1)  # BxKxHxW
        p0 = pos.floor()
        frac = (pos - p0).to(x.dtype)
        i0 = p0.long()
        i1 = (i0 + 1).clamp(max=size - 1)
        idx = torch.cat([i0 * stride + fixed, i1 * stride + fixed], dim=1)  # B x 2K x H x W
        g = torch.gather(x.reshape(B, C, H * W), 2, idx.view(B, 1, -1).expand(B, C, -1))
        g = g.view(B, C, 2, k, H * W)
        return torch.lerp(g[:, :, 0], g[:, :, 1], frac.view(B, 1, k, H * W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        taps = self.sample(x, self.offsets(x))  # B x C x K x HW
        w = self.conv.weight.view(C, 1, self.kernel_size).to(taps.dtype)
        return torch.matmul(w, taps).view(B, C, H, W)  # (C x 1 x K) @ (B x C x K x HW)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, axis={self.axis}, kernel_size={self.kernel_size}"


class ADSCDConv(nn.Module):
    """Adaptive dynamic salient central-difference depthwise 3x3 conv, d -> d (§1.7.4).

    Per-sample kernel K_b = sum_g softmax_g(A_b) * W_g (4 candidates, softmax per channel and tap),
    centre tap replaced by K_c - sum(K) + theta * K_c with a CBAM channel gate theta, applied as a
    per-sample depthwise conv (zero padding 1) via unfold + batched matmul (batch-agnostic, D2).
    Parameters: 1.75 d^2 + 36.5 d.
    """

    def __init__(self, dim: int, kernel_size: int = 3, num_kernels: int = 4, reduction: int = 4):
        super().__init__()
        if dim % reduction:
            raise ValueError(f"ADSCDConv dim {dim} not divisible by {reduction}")
        r = dim // reduction
        self.dim, self.kernel_size, self.num_kernels = dim, kernel_size, num_kernels
        # dynamic kernel attention
        self.attn_conv1 = nn.Conv2d(dim, r, 1, bias=False)
        self.attn_bn = nn.BatchNorm2d(r)
        self.attn_conv2 = nn.Conv2d(r, num_kernels * dim, 1, bias=False)
        self.weight = nn.Parameter(torch.empty(num_kernels, dim, kernel_size, kernel_size))
        nn.init.trunc_normal_(self.weight, std=0.02)
        # channel gate theta (shared MLP for avg and max pooled vectors)
        self.ca_fc1 = nn.Conv2d(dim, r, 1, bias=False)
        self.ca_fc2 = nn.Conv2d(r, dim, 1, bias=False)

    def dynamic_kernel(self, u: torch.Tensor) -> torch.Tensor:
        """K' (B x d x k*k): dynamic kernel with the salient central-difference centre tap."""
        B, d = u.shape[:2]
        k2 = self.kernel_size * self.kernel_size
        a = F.adaptive_avg_pool2d(u, self.kernel_size)
        a = self.attn_conv2(F.relu(self.attn_bn(self.attn_conv1(a))))
        a = a.view(B, self.num_kernels, d, k2).softmax(dim=1)
        kern = (a * self.weight.view(1, self.num_kernels, d, k2).to(a.dtype)).sum(1)  # B x d x k2
        s = torch.cat([u.mean((2, 3), keepdim=True), u.amax((2, 3), keepdim=True)], dim=3)  # B x d x 1 x 2
        theta = torch.sigmoid(self.ca_fc2(F.relu(self.ca_fc1(s))).sum(3)).view(B, d)
        c = k2 // 2
        kc = kern[:, :, c]
        centre = kc - kern.sum(2) + theta.to(kern.dtype) * kc
        return torch.cat([kern[:, :, :c], centre.unsqueeze(2), kern[:, :, c + 1 :]], dim=2)

    def fuse_bn_(self) -> None:
        fuse_conv_bn_attrs(self, "attn_conv1", "attn_bn")

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        B, d, H, W = u.shape
        k = self.kernel_size
        kern = self.dynamic_kernel(u)
        cols = F.unfold(u, k, padding=k // 2).view(B, d, k * k, H * W)
        return torch.matmul(kern.unsqueeze(2).to(cols.dtype), cols).view(B, d, H, W)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, num_kernels={self.num_kernels}"


class SAMM(nn.Module):
    """Spatial-adaptive modulation: GELU(proj(cat(PConv, DAConv-x, DAConv-y, ADSCD on 4 chunks))) * u."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 16:
            raise ValueError(f"SAMM dim {dim} must be divisible by 16")
        d = dim // 4
        self.pconv = PConv(d)
        self.daconv_x = DAConv(d, "x")
        self.daconv_y = DAConv(d, "y")
        self.adscd = ADSCDConv(d)
        self.proj = nn.Conv2d(dim, dim, 1, bias=True)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u0, u1, u2, u3 = u.chunk(4, dim=1)
        z = torch.cat([self.pconv(u0), self.daconv_x(u1), self.daconv_y(u2), self.adscd(u3)], dim=1)
        return F.gelu(self.proj(z)) * u


def _dft_mats(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2·pi·k·j/n (n × n, float32), computed in float64 and exact at the symmetric points."""
    k = torch.arange(n, dtype=torch.float64)
    ang = 2.0 * math.pi * torch.outer(k, k).remainder(n) / n
    return torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)


def rfft2_real(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.fft.rfft2(x, norm="ortho")`` as (real, imaginary) float32 tensors, by matrix products with the
    DFT's cosine and sine tables: only real-valued ops, so ONNX / OpenVINO exporters and runtimes take it."""
    h, w = x.shape[-2:]
    wf = w // 2 + 1
    cw, sw = _dft_mats(w, x.device)
    ch, sh = _dft_mats(h, x.device)
    scale = 1.0 / math.sqrt(h * w)
    ar = torch.matmul(x, cw[:, :wf]) * scale  # along W: real input, bins 0..W/2
    ai = -torch.matmul(x, sw[:, :wf]) * scale
    # along H (complex): (cos - i sin) (ar + i ai)
    return torch.matmul(ch, ar) + torch.matmul(sh, ai), torch.matmul(ch, ai) - torch.matmul(sh, ar)


def irfft2_real(yr: torch.Tensor, yi: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``torch.fft.irfft2(torch.complex(yr, yi), s=size, norm="ortho")`` with real-valued ops only (the
    imaginary parts of the W bins 0 and W/2 are ignored, as irfft does)."""
    h, w = size
    wf = yr.shape[-1]
    cw, sw = _dft_mats(w, yr.device)
    ch, sh = _dft_mats(h, yr.device)
    # along H (complex, inverse): (cos + i sin) (yr + i yi)
    br = torch.matmul(ch, yr) - torch.matmul(sh, yi)
    bi = torch.matmul(ch, yi) + torch.matmul(sh, yr)
    # along W, from the one-sided spectrum: bins 1 .. ceil(W/2)-1 count twice (their mirror images)
    weight = torch.full((wf, 1), 2.0, device=yr.device)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    out = torch.matmul(br, cw[:wf] * weight) - torch.matmul(bi, sw[:wf] * weight)
    return out / math.sqrt(h * w)


class AFMM(nn.Module):
    """Adaptive frequency mixing (§1.7.5): spectrum * complexMLP(spectrum), per channel group.

    rfft2 (ortho) -> per group complex linear -> ReLU on real and imaginary parts -> complex linear
    -> multiply by the original spectrum -> irfft2 (ortho, size H x W). Everything inside runs in
    float32 (autocast disabled, weights cast to float32); the result has the input dtype (D3).
    Parameters: w1, w2 (2 x G x D x D, [real/imag, group, in, out]), b1, b2 (2 x G x D); C^2 + 4C.

    ``real_valued`` (set by `use_real_valued_fft`): the same computation with real and imaginary parts as
    separate tensors and the FFTs as DFT matrix products (`rfft2_real`, `irfft2_real`): outputs agree with
    the FFT path to float32 rounding, and every op is one that ONNX and OpenVINO export.
    """

    def __init__(self, dim: int, groups: int = 4):
        super().__init__()
        if dim % groups:
            raise ValueError(f"AFMM dim {dim} not divisible by {groups}")
        self.dim, self.groups = dim, groups
        self.real_valued = False
        dg = dim // groups
        self.w1 = nn.Parameter(0.02 * torch.randn(2, groups, dg, dg))
        self.b1 = nn.Parameter(0.02 * torch.randn(2, groups, dg))
        self.w2 = nn.Parameter(0.02 * torch.randn(2, groups, dg, dg))
        self.b2 = nn.Parameter(0.02 * torch.randn(2, groups, dg))

    @staticmethod
    def _complex_linear(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # z: B x G x Din x N (complex64); w: 2 x G x Din x Dout; b: 2 x G x Dout
        wc = torch.complex(w[0].float(), w[1].float()).transpose(1, 2)  # G x Dout x Din
        bc = torch.complex(b[0].float(), b[1].float()).unsqueeze(-1)  # G x Dout x 1
        return torch.matmul(wc, z) + bc

    @staticmethod
    def _real_linear(zr, zi, w, b):
        # (wr + i wi)(zr + i zi) + (br + i bi), on separate real and imaginary parts
        wr, wi = w[0].float().transpose(1, 2), w[1].float().transpose(1, 2)  # G x Dout x Din
        br, bi = b[0].float().unsqueeze(-1), b[1].float().unsqueeze(-1)
        return (torch.matmul(wr, zr) - torch.matmul(wi, zi) + br,
                torch.matmul(wr, zi) + torch.matmul(wi, zr) + bi)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        B, C, H, W = v.shape
        with torch.autocast(device_type=v.device.type, enabled=False):
            if self.real_valued:
                return self._forward_real(v.float(), B, C, H, W).to(v.dtype)
            spec = torch.fft.rfft2(v.float(), norm="ortho")  # B x C x H x (W//2+1)
            wf = spec.shape[-1]
            spec = spec.reshape(B, self.groups, C // self.groups, H * wf)
            z = self._complex_linear(spec, self.w1, self.b1)
            z = torch.view_as_complex(F.relu(torch.view_as_real(z)))
            z = self._complex_linear(z, self.w2, self.b2)
            y = (z * spec).reshape(B, C, H, wf)
            out = torch.fft.irfft2(y, s=(H, W), norm="ortho")
        return out.to(v.dtype)

    def _forward_real(self, v: torch.Tensor, B: int, C: int, H: int, W: int) -> torch.Tensor:
        sr, si = rfft2_real(v)
        wf = sr.shape[-1]
        sr = sr.reshape(B, self.groups, C // self.groups, H * wf)
        si = si.reshape(B, self.groups, C // self.groups, H * wf)
        zr, zi = self._real_linear(sr, si, self.w1, self.b1)
        zr, zi = self._real_linear(F.relu(zr), F.relu(zi), self.w2, self.b2)
        yr = (zr * sr - zi * si).reshape(B, C, H, wf)
        yi = (zr * si + zi * sr).reshape(B, C, H, wf)
        return irfft2_real(yr, yi, (H, W))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}" + (", real_valued" if self.real_valued else "")


def use_real_valued_fft(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch every AFMM of ``model`` to the real-valued formulation (for export), or back. In place."""
    for m in model.modules():
        if isinstance(m, AFMM):
            m.real_valued = bool(on)
    return model


class SSAMBlock(nn.Module):
    """x += DropPath(g1 * SAMM(LN1(x))); x += DropPath(g2 * AFMM(LN2(x))). No FFN.

    ``layer_scale``: None/0 -> no gamma parameters (multiplication skipped); a float -> per-channel
    gamma1/gamma2 (C x 1 x 1) initialised to that value (+2C parameters).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.norm1 = LayerNormCF(dim)
        self.samm = SAMM(dim)
        self.norm2 = LayerNormCF(dim)
        self.afmm = AFMM(dim)
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))
        else:
            self.gamma1 = None
            self.gamma2 = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.samm(self.norm1(x))
        if self.gamma1 is not None:
            y = self.gamma1 * y
        x = x + self.drop_path(y)
        y = self.afmm(self.norm2(x))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y)
