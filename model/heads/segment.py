"""MF-LiteSeg segmentation decoder (docs/ARCHITECTURE.md, "Heads").

Input: the four backbone stage outputs x1..x4 (channels C0..C3, strides 4/8/16/32).
Output: logits B×num_classes×H×W at the requested output size.

Structure (decoder widths fixed to 32 / 48 / 64; all resizes bilinear, align_corners=True):

1. context: 1×1 conv C3→64 (bias) → AttBlock(64) (pre-norm MHSA, 8 heads of width 8; pre-norm ConvGLU)
   = x4', resized to x1's size (1/4);
2. Fuse1: x4' resized to x3's size, concat [x3, x4'] → DSC 3×3 → 48 → resize to 1/4;
3. Fuse2: x4' resized to x2's size, concat [x2, x4'] → DSC 3×3 → 32 → resize to 1/4;
4. concat (x1, fuse2, fuse1, x4') → DSC 3×3 → 32 → 1×1 conv → num_classes → resize to out_hw.

Resize choice (documented deviation switch): by default (``direct_resize=False``) we keep the reference
round trip — Fuse1/Fuse2 take x4' *after* it was upsampled to 1/4 and resize it back down to 1/16 and
1/8 — so the decoder computes exactly what the reference computes. ``direct_resize=True`` resizes the
1/32 map straight to 1/16 and 1/8 instead (slightly cheaper, numerically different by a few percent of
the signal range; no parameters change).

Parameter count (verified in tests): 64·C3 + 64 + 42,880 + 57·(C2+64) + 96 + 41·(C1+64) + 64
+ 41·(C0+144) + 64 + 33·num_classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks import fuse_conv_bn_attrs

__all__ = ["LayerNormCF", "DSC", "AttBlock", "ConvGLU", "MFLiteSegDecoder"]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class LayerNormCF(nn.Module):
    """LayerNorm over the channel axis of a B×C×H×W tensor (per pixel), eps 1e-6, affine."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class DSC(nn.Sequential):
    """Depthwise-separable unit: DW k×k (no bias) → 1×1 (no bias) → BN → ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__(
            nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def fuse_bn_(self) -> None:
        fuse_conv_bn_attrs(self, "1", "2")  # the 1×1 conv and its BN


class MHSA2d(nn.Module):
    """Multi-head self-attention over all pixels of a B×C×H×W map (qkv 1×1 without bias, proj with bias)."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # channels: [q | k | v], each third split into heads of consecutive channels
        qkv = self.qkv(x).reshape(b, 3, self.num_heads, self.head_dim, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # B×heads×N×hd
        out = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim^-0.5
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj(out)


class ConvGLU(nn.Module):
    """1×1 (dim→2·hidden, bias) split into gate g / value v; 1×1(hidden→dim)(GELU(DW3×3(g)) ⊙ v)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, 2 * hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        g, v = self.fc1(x).chunk(2, 1)
        return self.fc2(self.act(self.dwconv(g)) * v)


class AttBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)); x + ConvGLU(LN(x)) (hidden 2·dim per half)."""

    def __init__(self, dim: int = 64, num_heads: int = 8):
        super().__init__()
        self.norm1 = LayerNormCF(dim)
        self.attn = MHSA2d(dim, num_heads)
        self.norm2 = LayerNormCF(dim)
        self.mlp = ConvGLU(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MFLiteSegDecoder(nn.Module):
    """MF-LiteSeg decoder. ``channels`` = backbone (C0, C1, C2, C3); ``num_classes`` counts background.

    ``forward(features, out_hw)``: ``features`` = [x1, x2, x3, x4] (strides 4/8/16/32),
    ``out_hw`` = (H, W) of the logits (normally the network input size) → B×num_classes×H×W.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, direct_resize: bool = False):
        super().__init__()
        c0, c1, c2, c3 = (int(c) for c in channels)
        self.channels = (c0, c1, c2, c3)
        self.num_classes = int(num_classes)
        self.direct_resize = bool(direct_resize)
        self.context_proj = nn.Conv2d(c3, 64, 1)
        self.context = AttBlock(64)
        self.fuse1 = DSC(c2 + 64, 48)
        self.fuse2 = DSC(c1 + 64, 32)
        self.seg_conv = DSC(c0 + 144, 32)
        self.cls = nn.Conv2d(32, self.num_classes, 1)
        self._init_seg_head()

    def _init_seg_head(self) -> None:
        for m in (*self.seg_conv.modules(), self.cls):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor], out_hw: Sequence[int]) -> Tensor:
        x1, x2, x3, x4 = features[-4:]
        size1 = x1.shape[-2:]
        ctx = self.context(self.context_proj(x4))  # x4', 64 ch at 1/32
        ctx_up = _resize(ctx, size1)
        src = ctx if self.direct_resize else ctx_up  # reference: resize the 1/4 map back down
        f1 = self.fuse1(torch.cat([x3, _resize(src, x3.shape[-2:])], 1))
        f2 = self.fuse2(torch.cat([x2, _resize(src, x2.shape[-2:])], 1))
        y = torch.cat([x1, _resize(f2, size1), _resize(f1, size1), ctx_up], 1)
        y = self.cls(self.seg_conv(y))
        return _resize(y, out_hw)
