"""YOLO11-style detection neck (SPPF, C2PSA, PAN-FPN) and anchor-free decoupled head (docs/ARCHITECTURE.md, "Heads").

Written from the architecture description only. The neck takes the backbone stage outputs x2, x3, x4
(strides 8/16/32, any channel widths) and produces P3/P4/P5 with the fixed YOLO11-"n" widths
64/128/256. The head returns **raw** per-level tensors B×(4·reg_max + nc)×h×w (box-distribution logits
first, side-major: 4 sides × reg_max bins, then class logits), in train and eval mode alike;
:func:`decode_raw` turns them into boxes (xyxy, input pixels) and sigmoid class scores, and
:func:`postprocess_detections` applies confidence filtering + per-class NMS.

Non-divisible input sizes: every top-down upsample is done to the explicit size of the lateral map
(nearest), and a bottom-up stride-2 conv output that does not match its lateral map is resized to it,
so any input size works (e.g. 100×130 → levels 13×17, 7×9, 4×5 with the backbone's ceil rounding).

"Conv" = Conv2d (no bias, padding k//2) → BatchNorm2d (eps 1e-3, momentum 0.03, the usual YOLO BN
settings) → SiLU.

Parameter count (neck + head, nc = 5; the published reference's count, reproduced exactly — it counts
the 16 frozen DFL-integral weights held by the head): tiny channels 1,635,583; small 1,752,447; base 1,885,695;
large 2,201,343. Each class adds 195 (for nc ≤ 64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.blocks import fuse_conv_bn_attrs
from model.boxes import batched_nms, dfl_decode, dist2bbox, make_anchors

__all__ = [
    "Conv",
    "Bottleneck",
    "C3k",
    "C3k2",
    "SPPF",
    "PSAttention",
    "PSABlock",
    "C2PSA",
    "DetectNeck",
    "DFLIntegral",
    "DetectHead",
    "decode_raw",
    "flip_raw",
    "postprocess_detections",
]


class Conv(nn.Module):
    """Conv2d (no bias) → BN → SiLU (or identity when ``act=False``)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse_bn_(self) -> None:
        fuse_conv_bn_attrs(self, "conv", "bn")


class Bottleneck(nn.Module):
    """3×3 Conv c→hidden, 3×3 Conv hidden→c, residual add."""

    def __init__(self, c: int, hidden: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c, hidden, 3)
        self.cv2 = Conv(hidden, c, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3k(nn.Module):
    """CSP block with two parallel 1×1 Convs to c/2; n residual 3×3-3×3 bottlenecks (width c/2) on one
    path; concat; 1×1 Conv → c."""

    def __init__(self, c: int, n: int = 2):
        super().__init__()
        h = c // 2
        self.cv1 = Conv(c, h, 1)
        self.cv2 = Conv(c, h, 1)
        self.m = nn.Sequential(*(Bottleneck(h, h) for _ in range(n)))
        self.cv3 = Conv(2 * h, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class C3k2(nn.Module):
    """CSP block: 1×1 Conv → 2c (c = cout/2), split, n inner blocks chained on the second half
    (Bottleneck c→c/2→c, or C3k when ``c3k``), concat all (2+n)·c, 1×1 Conv → cout."""

    def __init__(self, cin: int, cout: int, n: int = 1, c3k: bool = False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.m = nn.ModuleList(C3k(self.c, 2) if c3k else Bottleneck(self.c, self.c // 2) for _ in range(n))
        self.cv2 = Conv((2 + n) * self.c, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        ys = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class SPPF(nn.Module):
    """1×1 Conv cin→cin/2, three chained k×k max-pools (stride 1), concat the four, 1×1 Conv → cout."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        h = cin // 2
        self.cv1 = Conv(cin, h, 1)
        self.cv2 = Conv(4 * h, cout, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        ys = [self.cv1(x)]
        for _ in range(3):
            ys.append(self.pool(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class PSAttention(nn.Module):
    """Multi-head self-attention with key dim = attn_ratio·head dim, a 3×3 DW positional conv on v and a
    1×1 projection (all convs are Conv+BN without activation)."""

    def __init__(self, dim: int, num_heads: int, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, g=dim, act=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        kd, hd = self.key_dim, self.head_dim
        # per head, channels are [q (kd) | k (kd) | v (hd)]
        q, k, v = self.qkv(x).reshape(b, self.num_heads, 2 * kd + hd, h * w).split([kd, kd, hd], 2)
        attn = ((q.transpose(-1, -2) @ k) * self.scale).softmax(-1)  # B×heads×N×N (query, key)
        out = (v @ attn.transpose(-1, -2)).reshape(b, c, h, w)
        return self.proj(out + self.pe(v.reshape(b, c, h, w)))


class PSABlock(nn.Module):
    """x + attn(x); x + FFN(x) with FFN = Conv(c→2c) → Conv(2c→c, no activation)."""

    def __init__(self, c: int, num_heads: int, attn_ratio: float = 0.5):
        super().__init__()
        self.attn = PSAttention(c, num_heads, attn_ratio)
        self.ffn = nn.Sequential(Conv(c, 2 * c, 1), Conv(2 * c, c, 1, act=False))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class C2PSA(nn.Module):
    """1×1 Conv c→2·(c/2), split; PSA blocks on the second half (heads = (c/2)/64); concat; 1×1 Conv → c."""

    def __init__(self, c: int, n: int = 1):
        super().__init__()
        self.c = c // 2
        self.cv1 = Conv(c, 2 * self.c, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, max(1, self.c // 64)) for _ in range(n)))
        self.cv2 = Conv(2 * self.c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, self.m(b)], 1))


def _resize_to(x: Tensor, ref: Tensor) -> Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=tuple(ref.shape[-2:]), mode="nearest")


class DetectNeck(nn.Module):
    """SPPF + C2PSA on x4, then PAN-FPN over (x2, x3, x4) → [P3, P4, P5] with widths 64/128/256.

    ``channels``: the backbone's (C0, C1, C2, C3) or just (C1, C2, C3); ``forward`` accepts the 4 stage
    outputs (x1 is ignored) or the last three.
    """

    def __init__(self, channels: Sequence[int], widths: Sequence[int] = (64, 128, 256)):
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels[-3:])
        w3, w4, w5 = (int(w) for w in widths)
        self.out_channels = (w3, w4, w5)
        self.sppf = SPPF(c3, w5, 5)
        self.c2psa = C2PSA(w5, 1)
        self.td4 = C3k2(w5 + c2, w4)  # top-down at stride 16 (N4)
        self.td3 = C3k2(w4 + c1, w3)  # top-down at stride 8 (P3 out)
        self.down3 = Conv(w3, w3, 3, 2)
        self.bu4 = C3k2(w3 + w4, w4)  # bottom-up at stride 16 (P4 out)
        self.down4 = Conv(w4, w4, 3, 2)
        self.bu5 = C3k2(w4 + w5, w5, c3k=True)  # bottom-up at stride 32 (P5 out)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        x2, x3, x4 = features[-3:]
        p5 = self.c2psa(self.sppf(x4))
        n4 = self.td4(torch.cat([_resize_to(p5, x3), x3], 1))
        p3 = self.td3(torch.cat([_resize_to(n4, x2), x2], 1))
        p4 = self.bu4(torch.cat([_resize_to(self.down3(p3), n4), n4], 1))
        p5 = self.bu5(torch.cat([_resize_to(self.down4(p4), p5), p5], 1))
        return [p3, p4, p5]


class DFLIntegral(nn.Module):
    """Fixed DFL integral (softmax over bins, expectation with weights 0..reg_max-1).

    The bin values are held as a frozen parameter (``requires_grad=False``), like the reference's fixed
    1×1 conv, so parameter totals match the reference exactly; they are never trained.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.weight = nn.Parameter(torch.arange(reg_max, dtype=torch.float32), requires_grad=False)

    def forward(self, logits: Tensor) -> Tensor:
        """``(..., 4·reg_max)`` logits → ``(..., 4)`` distances (bins)."""
        p = logits.reshape(*logits.shape[:-1], 4, self.reg_max).softmax(-1)
        return (p * self.weight.to(p.dtype)).sum(-1)


class DetectHead(nn.Module):
    """Anchor-free decoupled head over P3/P4/P5.

    Box branch per level: Conv3×3 → Conv3×3 (width c2 = max(16, in_chs[0]/4, 4·reg_max)) → 1×1 conv to
    4·reg_max. Class branch: (DW Conv3×3 → Conv1×1) ×2 (width c3 = max(in_chs[0], min(nc, 100))) → 1×1
    conv to nc. Bias init: box 1.0, class log(5 / nc / (bias_img_size / stride)²).

    ``forward(feats) -> list[Tensor]``: per level B×(4·reg_max + nc)×h×w raw logits (train and eval).
    ``decode(raw)`` = :func:`decode_raw` with this head's strides / reg_max.
    """

    def __init__(
        self,
        num_classes: int,
        in_chs: Sequence[int] = (64, 128, 256),
        reg_max: int = 16,
        strides: Sequence[int] = (8, 16, 32),
        bias_img_size: int = 640,
    ):
        super().__init__()
        assert len(in_chs) == len(strides)
        self.num_classes = nc = int(num_classes)
        self.reg_max = int(reg_max)
        self.strides = tuple(int(s) for s in strides)
        self.no = 4 * self.reg_max + nc
        c2 = max(16, in_chs[0] // 4, 4 * self.reg_max)
        c3 = max(in_chs[0], min(nc, 100))
        self.box = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for c in in_chs
        )
        self.cls = nn.ModuleList(
            nn.Sequential(
                nn.Sequential(Conv(c, c, 3, g=c), Conv(c, c3, 1)),
                nn.Sequential(Conv(c3, c3, 3, g=c3), Conv(c3, c3, 1)),
                nn.Conv2d(c3, nc, 1),
            )
            for c in in_chs
        )
        self.dfl = DFLIntegral(self.reg_max)
        self.reset_bias(bias_img_size)

    @torch.no_grad()
    def reset_bias(self, img_size: int = 640) -> None:
        for box, cls, s in zip(self.box, self.cls, self.strides, strict=True):
            box[-1].bias.fill_(1.0)
            cls[-1].bias.fill_(math.log(5 / self.num_classes / (img_size / s) ** 2))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [torch.cat([b(x), c(x)], 1) for x, b, c in zip(feats, self.box, self.cls, strict=True)]

    def decode(self, raw: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return decode_raw(raw, self.strides, self.reg_max, dfl=self.dfl)

    def flip_raw(self, raw: Sequence[Tensor], dims: Sequence[int]) -> list[Tensor]:
        return flip_raw(raw, dims, self.reg_max)


def decode_raw(
    raw: Sequence[Tensor], strides: Sequence[int], reg_max: int = 16, dfl: nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    """Raw head outputs → ``(boxes B×N×4 xyxy in input pixels, scores B×N×nc sigmoid)`` (float32).

    N = Σ h·w over levels, ordered level by level, row-major (the order of :func:`make_anchors`).
    """
    anchors, stride_t = make_anchors(raw, strides, device=raw[0].device)
    x = torch.cat([r.float().flatten(2) for r in raw], 2).transpose(1, 2)  # B×N×C
    box_logits, cls_logits = x.split([4 * reg_max, x.shape[-1] - 4 * reg_max], -1)
    dist = dfl(box_logits) if dfl is not None else dfl_decode(box_logits, reg_max)
    boxes = dist2bbox(dist.float(), anchors) * stride_t
    return boxes, cls_logits.sigmoid()


def flip_raw(raw: Sequence[Tensor], dims: Sequence[int], reg_max: int = 16) -> list[Tensor]:
    """Raw head outputs of a flipped image → the outputs in the unflipped image's frame (and back: it is
    its own inverse). ``dims``: 3 = horizontal, 2 = vertical flip of the B×C×H×W input. Each level's map is
    flipped the same way and the DFL distance groups (left, top, right, bottom) swap left↔right and/or
    top↔bottom. Exact when the input side is a multiple of the largest stride (anchor centres mirror).
    """
    out = []
    for r in raw:
        r = r.flip(tuple(dims))
        left, top, right, bottom, cls = r.split([reg_max] * 4 + [r.shape[1] - 4 * reg_max], 1)
        if 3 in dims:
            left, right = right, left
        if 2 in dims:
            top, bottom = bottom, top
        out.append(torch.cat([left, top, right, bottom, cls], 1))
    return out


@torch.no_grad()
def postprocess_detections(
    boxes: Tensor,
    scores: Tensor,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    max_nms: int = 3000,
    multi_label: bool = False,
    agnostic: bool = False,
) -> list[dict[str, Tensor]]:
    """Confidence filter + per-class NMS for decoded outputs (B×N×4 boxes, B×N×nc scores).

    ``multi_label``: one candidate per (anchor, class) with score > conf (use for mAP evaluation);
    otherwise only each anchor's best class. At most ``max_nms`` highest-scoring candidates enter NMS.
    Returns one dict per image: ``boxes`` K×4 (xyxy input pixels), ``scores`` K, ``labels`` K (long),
    sorted by decreasing score, K ≤ max_det.
    """
    out = []
    for bx, sc in zip(boxes, scores, strict=True):
        if multi_label:
            idx, lab = (sc > conf).nonzero(as_tuple=True)
            s = sc[idx, lab]
        else:
            s, lab = sc.max(-1)
            idx = (s > conf).nonzero(as_tuple=True)[0]
            s, lab = s[idx], lab[idx]
        if s.numel() > max_nms:
            top = s.topk(max_nms).indices
            idx, lab, s = idx[top], lab[top], s[top]
        b = bx[idx]
        keep = batched_nms(b, s, torch.zeros_like(lab) if agnostic else lab, iou)[:max_det]
        out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    return out
