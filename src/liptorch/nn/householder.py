"""Householder activations (soc.md §B4): learnable, piecewise-orthogonal 2-D maps.

Channels are paired by halves: channel ``i`` of the first half with channel ``i`` of
the second half, giving a point z = (a, b) ∈ R² per pair (and per pixel).  The output
has the input's layout: the first output half holds the new ``a``, the second the new
``b``.

Both orders are continuous maps that are orthogonal on each of finitely many closed
angular sectors.  Along any segment the map is an isometry on each sub-segment that
stays inside one sector, so by the triangle inequality it is 1-Lipschitz; where it is
differentiable its Jacobian is orthogonal, i.e. the layer is gradient-norm preserving.
Hence ``lipschitz_bound()`` is exactly 1 and needs no computation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import check_positive_int
from .simple import OneLipschitz

__all__ = ["HouseholderActivation"]

_TWO_PI = 2.0 * math.pi


def check_paired_input(module: nn.Module, x: torch.Tensor, channels: int) -> None:
    """Input validation shared by the channel-pair layers: (N, C, *spatial), C = channels."""
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} expects an input of shape (N, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} expects {channels} channels in dimension 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point input, got dtype {x.dtype}")


def check_even_channels(module_name: str, channels) -> int:
    channels = check_positive_int("channels", channels, 2)
    if channels % 2:
        raise ValueError(
            f"{module_name} pairs channel i with channel i + C/2, so channels must be even, got {channels}"
        )
    return channels


def _angles_like(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-pair angle vector of length C/2 against one half of ``x``."""
    return theta.to(dtype=x.dtype, device=x.device).reshape((1, -1) + (1,) * (x.dim() - 2))


def _reflect(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Refl(α)(a, b) = (a cos α + b sin α, a sin α − b cos α): polar angle ψ ↦ α − ψ."""
    c, s = torch.cos(alpha), torch.sin(alpha)
    return a * c + b * s, a * s - b * c


class HouseholderActivation(OneLipschitz):
    """Householder activation of order 1 (HH1) or 2 (HH2) on channel pairs (i, i + C/2).

    **Order 1.** One angle θ per pair (parameter ``theta``, shape ``(C/2,)``, init π/2).
    With v = (sin(θ/2), −cos(θ/2)) and the Householder reflection
    H = I − 2vvᵀ = [[cos θ, sin θ], [sin θ, −cos θ]], the output is z when vᵀz ≤ 0 and Hz
    otherwise.  H fixes the line vᵀz = 0, so the two pieces agree there.

    At θ = π/2, v ∝ (1, −1) and H swaps the coordinates, so the output is
    (min(a, b), max(a, b)); i.e. ``HH1(x) = roll(MaxMin(x), C/2, dim=1)`` — the two
    output halves of :class:`liptorch.nn.MaxMin` (which gives cat(max, min)) swapped.

    **Order 2.** Three angles θ₀, θ₁, θ₂ per pair (parameter ``theta``, shape ``(3, C/2)``,
    init U[0, π)), clamped to [0, 2π] in every forward.  With ψ = atan2(b, a) and
    φ = (ψ − θ₀/2) mod 2π the map is

    ========================================  ==================
    sector of φ                               map
    ========================================  ==================
    [0, θ₁/2)                                 identity
    [θ₁/2, (θ₁+θ₂)/2)                         Refl(θ₀ + θ₁)
    [(θ₁+θ₂)/2, π + θ₂/2)                     Rot(−θ₂)
    [π + θ₂/2, 2π)                            Refl(θ₀)
    ========================================  ==================

    where Refl(α) maps polar angle ψ to α − ψ and Rot(β) rotates by β.  For θ's in
    [0, 2π] the sectors are ordered and neighbouring maps agree on their common ray.

    **Guarantee.** 1-Lipschitz and gradient-norm preserving (factor 1).

    The angles should not be weight-decayed: the class attribute ``no_weight_decay`` is
    True and the parameter is named ``theta``.
    """

    guarantee = "orthogonal"
    no_weight_decay = True

    def __init__(self, channels: int, order: int = 1) -> None:
        super().__init__()
        self.channels = check_even_channels("HouseholderActivation", channels)
        if isinstance(order, bool) or order not in (1, 2):
            raise ValueError(f"HouseholderActivation order must be 1 or 2, got {order!r}")
        self.order = order
        half = channels // 2
        if order == 1:
            self.theta = nn.Parameter(torch.full((half,), math.pi / 2))
        else:
            self.theta = nn.Parameter(torch.rand(3, half) * math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_paired_input(self, x, self.channels)
        a, b = x.chunk(2, dim=1)
        if self.order == 1:
            out_a, out_b = self._order1(a, b)
        else:
            out_a, out_b = self._order2(a, b)
        return torch.cat([out_a, out_b], dim=1)

    def _order1(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _angles_like(self.theta, a)
        reflect_side = a * torch.sin(t / 2) - b * torch.cos(t / 2) > 0
        ha, hb = _reflect(a, b, t)
        return torch.where(reflect_side, ha, a), torch.where(reflect_side, hb, b)

    def _order2(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.theta.clamp(0.0, _TWO_PI)
        t0, t1, t2 = (_angles_like(angles[k], a) for k in range(3))
        phi = torch.remainder(torch.atan2(b, a) - t0 / 2, _TWO_PI)
        in_s1 = phi < t1 / 2
        in_s2 = phi < (t1 + t2) / 2
        in_s3 = phi < math.pi + t2 / 2
        r1a, r1b = _reflect(a, b, t0 + t1)
        c2, s2 = torch.cos(t2), torch.sin(t2)
        rot_a, rot_b = a * c2 + b * s2, b * c2 - a * s2  # Rot(−θ₂)
        r0a, r0b = _reflect(a, b, t0)
        # Nested selection: the first sector whose upper end exceeds φ wins.
        out_a = torch.where(in_s1, a, torch.where(in_s2, r1a, torch.where(in_s3, rot_a, r0a)))
        out_b = torch.where(in_s1, b, torch.where(in_s2, r1b, torch.where(in_s3, rot_b, r0b)))
        return out_a, out_b

    def extra_repr(self) -> str:
        return f"channels={self.channels}, order={self.order}"
