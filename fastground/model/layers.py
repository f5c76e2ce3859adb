"""Layers the encoders share."""
from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2, the ViT feed-forward of EVA and ImageBind (same key names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def init_linear_and_norm(module: nn.Module, std: float = 0.02, truncated: bool = True) -> None:
    """Linear weights normal(0, std) (truncated, as ViTs do; plain, as BERT does), zero
    biases, unit LayerNorms."""
    draw = nn.init.trunc_normal_ if truncated else nn.init.normal_
    for m in module.modules():
        if isinstance(m, nn.Linear):
            draw(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
