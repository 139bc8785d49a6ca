"""Classification head (docs/ARCHITECTURE.md, "Heads"): avg-pool -> flatten -> LayerNorm -> Linear."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ClassifyHead"]


class ClassifyHead(nn.Module):
    """Global average pool -> flatten -> LayerNorm(in_ch, eps 1e-6) -> Linear(in_ch -> num_classes).

    Accepts a B x C x H x W tensor or the backbone's list of stage outputs (uses the last one).
    ``num_classes == 0`` keeps the norm and replaces the classifier by an identity (pooled features).
    Parameters: 2*in_ch + (in_ch + 1) * num_classes.
    """

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.in_ch, self.num_classes = in_ch, num_classes
        self.norm = nn.LayerNorm(in_ch, eps=1e-6)
        self.classifier = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.classifier.weight, std=0.02)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            x = x[-1]
        x = x.mean(dim=(2, 3))
        return self.classifier(self.norm(x))
