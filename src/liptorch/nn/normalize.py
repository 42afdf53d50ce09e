"""Input normalisation and fixed scaling, inside the model so radii stay in pixel units."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops.linalg import round_up

__all__ = ["Normalize", "Scale"]


class Normalize(nn.Module):
    """x ↦ (x − μ_c) / σ_c per channel.  Lipschitz bound 1 / min_c σ_c (mean costs nothing)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float] | float = 1.0) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if std_t.numel() == 1:
            std_t = std_t.expand_as(mean_t).clone()
        if std_t.shape != mean_t.shape:
            raise ValueError(f"Normalize: mean has {mean_t.numel()} entries but std has {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: every std must be > 0, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.mean.numel():
            raise ValueError(f"Normalize expects {self.mean.numel()} channels in dim 1, got shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def lipschitz_bound(self, input_size=None) -> float:
        return round_up(1.0 / float(self.std.double().min()))


class Scale(nn.Module):
    """x ↦ s·x for a fixed s > 0 (e.g. √γ in LBDN).  Lipschitz bound s."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        factor = float(factor)
        if not factor > 0:
            raise ValueError(f"Scale factor must be > 0, got {factor}")
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def lipschitz_bound(self, input_size=None) -> float:
        return round_up(self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
