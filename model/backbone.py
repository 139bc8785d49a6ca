"""SSAMNet (S2-AMNet) backbone: one class for classify / segment / detect (docs/ARCHITECTURE.md, "Backbone").

The backbone is features-only: ``forward(x)`` returns the four stage outputs (strides 4/8/16/32).
Task heads live in ``model/heads``. Submodule names are stable across tasks
(``stem.*``, ``stages.{i}.downsample.*``, ``stages.{i}.blocks.{j}.*``) so that a checkpoint's
backbone weights load into any task model (D6).

Layer scale and drop path are explicit constructor arguments (``layer_scale=None`` means no gamma
parameters). ``VARIANTS[name]`` carries the classification-copy settings of the reference
(§1.2) and ``TASK_SETTINGS`` the seg/det-copy ones (§5 D5); ``task_settings(variant, task)`` returns
the pair to pass for a given task.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.blocks import AFMM, ADSCDConv, ConvStem, LayerNormCF, MPBlock, SSAMBlock, fold_batchnorm_
from model.wavelet import HaarDown

__all__ = ["VARIANTS", "TASK_SETTINGS", "resolve_variant", "task_settings", "SSAMNet", "init_weights"]

DEPTHS = (2, 4, 4, 2)

# Classification-copy settings (§1.2): layer-scale init (None = off) and drop-path rate.
VARIANTS: dict[str, dict] = {
    "tiny": {"widths": (32, 64, 128, 256), "depths": DEPTHS, "expansion": 4, "layer_scale": None, "drop_path": 0.0},
    "small": {"widths": (48, 96, 192, 384), "depths": DEPTHS, "expansion": 4, "layer_scale": None, "drop_path": 0.0},
    "base": {"widths": (64, 128, 256, 512), "depths": DEPTHS, "expansion": 4, "layer_scale": 1e-5, "drop_path": 0.0},
    "large": {"widths": (96, 192, 384, 768), "depths": DEPTHS, "expansion": 4, "layer_scale": 1e-5, "drop_path": 0.1},
}

# (layer_scale, drop_path) used by each task copy of the reference (§5 D5).
TASK_SETTINGS: dict[str, dict[str, tuple]] = {
    "classify": {v: (cfg["layer_scale"], cfg["drop_path"]) for v, cfg in VARIANTS.items()},
    "segment": {v: (None, 0.0) for v in VARIANTS},
    "detect": {"tiny": (None, 0.0), "small": (None, 0.0), "base": (None, 0.0), "large": (1e-5, 0.1)},
}

_ALIASES = {
    **{k: k for k in VARIANTS},
    "t": "tiny",
    "s": "small",
    "b": "base",
    "l": "large",
}


def resolve_variant(name: str) -> str:
    """Canonical variant name for an alias (t/s/b/l, T/S/B/L, tiny/Tiny/...)."""
    if not isinstance(name, str):
        raise TypeError(f"variant must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    for prefix in ("ssamnet_", "ssamnet-", "ssam_", "ssam-"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key not in _ALIASES:
        raise ValueError(f"unknown SSAMNet variant {name!r}; expected one of {sorted(VARIANTS)} or t/s/b/l")
    return _ALIASES[key]


def task_settings(variant: str, task: str) -> dict:
    """``{"layer_scale": ..., "drop_path": ...}`` the reference used for ``task``."""
    if task not in TASK_SETTINGS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_SETTINGS)}")
    ls, dp = TASK_SETTINGS[task][resolve_variant(variant)]
    return {"layer_scale": ls, "drop_path": dp}


def init_weights(module: nn.Module) -> None:
    """§1.8: conv/linear weights trunc-normal(0.02), biases 0; norm layers weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, LayerNormCF)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, ADSCDConv):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, AFMM):
            with torch.no_grad():
                for p in (m.w1, m.b1, m.w2, m.b2):
                    p.normal_(0.0, 1.0).mul_(0.02)


class Stage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SSAMNet(nn.Module):
    """Features-only SSAMNet backbone.

    Args:
        variant: tiny/small/base/large or an alias (t/s/b/l, T/S/B/L).
        layer_scale: None (no layer scale) or the init value of the SSAM gamma vectors.
        drop_path: stochastic-depth rate; linear ramp over all 12 blocks.
        in_chans: input channels.
    forward(x) -> [x1 (C0, /4), x2 (C1, /8), x3 (C2, /16), x4 (C3, /32)]; odd sizes round up.
    """

    def __init__(
        self, variant: str = "tiny", layer_scale: float | None = None, drop_path: float = 0.0, in_chans: int = 3
    ):
        super().__init__()
        self.variant = resolve_variant(variant)
        cfg = VARIANTS[self.variant]
        widths, depths, expansion = cfg["widths"], cfg["depths"], cfg["expansion"]
        self.layer_scale = float(layer_scale) if layer_scale else None
        self.drop_path = float(drop_path)
        self.channels = tuple(widths)

        self.stem = ConvStem(in_chans, widths[0])
        n = sum(depths)
        # plain floats, not torch.linspace: building on the meta device (s2amnet info) must work
        rates = [self.drop_path * i / (n - 1) for i in range(n)] if n > 1 else [self.drop_path] * n
        stages, k = [], 0
        for i, (c, depth) in enumerate(zip(widths, depths, strict=True)):
            down = nn.Identity() if i == 0 else HaarDown(widths[i - 1], c)
            blocks = []
            for _ in range(depth):
                if i < 2:
                    blocks.append(MPBlock(c, expansion=expansion, drop_path=rates[k]))
                else:
                    blocks.append(SSAMBlock(c, drop_path=rates[k], layer_scale=self.layer_scale))
                k += 1
            stages.append(Stage(down, blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_info = [
            {"num_chs": c, "reduction": 2 ** (i + 2), "module": f"stages.{i}"} for i, c in enumerate(widths)
        ]
        init_weights(self)

    @property
    def num_features(self) -> int:
        return self.channels[-1]

    @property
    def is_fused(self) -> bool:
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    @torch.no_grad()
    def fuse(self) -> SSAMNet:
        """Fold every BatchNorm into the preceding conv for inference (in place; returns self).

        Puts the model in eval mode. Outputs equal the unfused eval model up to float rounding, but
        the state dict changes (no ``bn*`` keys, convs gain biases): load checkpoints *before*
        fusing, never save a fused model as a training checkpoint. A fused model cannot train.
        """
        return fold_batchnorm_(self.eval())

    def train(self, mode: bool = True) -> SSAMNet:
        if mode and self.is_fused:
            raise RuntimeError("SSAMNet.fuse() folded BatchNorm into the convs; the model is inference-only")
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def extra_repr(self) -> str:
        return f"variant={self.variant}, layer_scale={self.layer_scale}, drop_path={self.drop_path}"
