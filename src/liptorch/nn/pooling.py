"""1-Lipschitz channel-pair pooling (soc.md §C4): C channels → C/2 channels.

Channel ``i`` of the first half is paired with channel ``i`` of the second half, giving a
point (a, b) ∈ R² per pair and pixel, which is mapped to one output channel ``i``.
Both layers are 1-Lipschitz by a proof needing no computation (factor 1,
certification.md §3.1), so ``lipschitz_bound()`` returns 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .householder import _angles_like, check_even_channels, check_paired_input
from .simple import OneLipschitz

__all__ = ["ManifoldPool", "PairMaxPool"]

_TWO_PI = 2.0 * math.pi


class PairMaxPool(OneLipschitz):
    """(a, b) ↦ max(a, b) on channel pairs (i, i + C/2): C → C/2.

    max is 1-Lipschitz from (R², ℓ2) to R (its gradient is a unit coordinate vector
    wherever it exists), and distinct pairs act on disjoint coordinates.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = check_even_channels("PairMaxPool", channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_paired_input(self, x, self.channels)
        a, b = x.chunk(2, dim=1)
        return torch.maximum(a, b)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class ManifoldPool(OneLipschitz):
    """LipPool: signed ℓ2 distance of each pair (a, b) to the boundary of a 2-D cone.

    Per pair there is one angle θ (parameter ``theta``, shape ``(C/2,)``), clamped to
    [0, π] in every forward; the cone is {r(cos φ, sin φ): |φ| ≤ θ/2}, whose boundary is
    the two rays from the origin at angles ±θ/2.  With r = ‖(a, b)‖, φ = atan2(b, a) mod 2π,
    s = sin(θ/2) and c = cos(θ/2), the output is

    * −a·s + b·c  when φ < (θ + π)/2           (orthogonal distance to the upper ray),
    * r           when (θ+π)/2 ≤ φ < (3π−θ)/2  (the apex is the nearest boundary point),
    * −a·s − b·c  otherwise                     (orthogonal distance to the lower ray),

    which is negative exactly inside the cone.  The three pieces agree on the region
    boundaries.  A signed distance to the boundary of a closed set is 1-Lipschitz (a
    segment joining an inside and an outside point crosses the boundary), so the layer is
    1-Lipschitz.  Special cases: θ = π gives −a; θ = 0 gives the distance to the ray
    along +a.

    ``init`` is None for θ ~ U[0, π) or a constant in [0, π].  The angles should not be
    weight-decayed (class attribute ``no_weight_decay``, parameter name ``theta``).
    """

    no_weight_decay = True

    def __init__(self, channels: int, init: float | None = None) -> None:
        super().__init__()
        self.channels = check_even_channels("ManifoldPool", channels)
        half = channels // 2
        if init is None:
            theta = torch.rand(half) * math.pi
        else:
            value = float(init)
            if not (0.0 <= value <= math.pi):
                raise ValueError(f"ManifoldPool init angle must lie in [0, π], got {init!r}")
            theta = torch.full((half,), value)
        self.theta = nn.Parameter(theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_paired_input(self, x, self.channels)
        a, b = x.chunk(2, dim=1)
        t = _angles_like(self.theta.clamp(0.0, math.pi), a)
        s, c = torch.sin(t / 2), torch.cos(t / 2)
        phi = torch.remainder(torch.atan2(b, a), _TWO_PI)
        upper = phi < (t + math.pi) / 2
        lower = phi >= (3 * math.pi - t) / 2
        # The origin (where every formula gives 0; atan2 of signed zeros may put it in any
        # region) is kept out of the apex branch so hypot is differentiable wherever it is
        # selected; elsewhere hypot is fed (1, 0) to keep its unused gradient finite.
        apex = ~(upper | lower) & ((a != 0) | (b != 0))
        upper = upper | ~(apex | lower)
        r = torch.hypot(torch.where(apex, a, torch.ones_like(a)), torch.where(apex, b, torch.zeros_like(b)))
        return torch.where(upper, b * c - a * s, torch.where(apex, r, -a * s - b * c))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
