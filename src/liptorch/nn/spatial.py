"""Spatial zero padding to a target size: an isometric embedding (factor 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import check_positive_int
from .simple import OneLipschitz

__all__ = ["SpatialPad"]


class SpatialPad(OneLipschitz):
    """Zero-pad (N, C, H, W) images symmetrically to ``size`` × ``size``.

    Embedding into a larger zero canvas preserves every distance, so the map is an
    isometry (Lipschitz constant exactly 1).  Used to run 32×32 architectures on
    28×28 or 8×8 data.
    """

    guarantee = "orthogonal"

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = check_positive_int("size", size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"SpatialPad expects a 4-D input (N, C, H, W), got {getattr(x, 'shape', x)}")
        h, w = x.shape[-2:]
        if h > self.size or w > self.size:
            raise ValueError(f"SpatialPad({self.size}) got a larger {h}x{w} input")
        top, left = (self.size - h) // 2, (self.size - w) // 2
        return F.pad(x, (left, self.size - w - left, top, self.size - h - top))

    def extra_repr(self) -> str:
        return f"size={self.size}"
