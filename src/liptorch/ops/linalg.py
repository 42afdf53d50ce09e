"""Dense linear-algebra primitives: exact spectral norms, Gram iteration and power
iteration (Björck orthonormalisation lives in :mod:`liptorch.ops.orthogonalize`).

Everything that is used as a *bound* (``spectral_norm``, ``gram_iteration_bound``)
is computed in float64 and can only over-estimate; ``power_iteration`` returns a
*lower* bound and must never be used in a certificate.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "spectral_norm",
    "gram_iteration_bound",
    "power_iteration",
    "round_up",
]


def round_up(value: float, ulps: int = 4) -> float:
    """Round a positive float upward by a few units in the last place.

    Used wherever a bound is stored or printed so that a float64 rounding in the
    last digit can never turn a bound into an under-estimate.
    """
    for _ in range(ulps):
        value = math.nextafter(value, math.inf)
    return value


def _as_float64(w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    if w.is_complex():
        return w.to(torch.complex128)
    return w.to(torch.float64)


def spectral_norm(w: torch.Tensor) -> float:
    """Exact largest singular value of ``w`` (or the max over a batch of matrices).

    Computed from an SVD in float64/complex128; the result is rounded up by a few ulps.
    """
    if w.dim() < 2:
        raise ValueError(f"spectral_norm expects a matrix or a batch of matrices, got shape {tuple(w.shape)}")
    w64 = _as_float64(w)
    if w64.numel() == 0:
        return 0.0
    s = torch.linalg.matrix_norm(w64, ord=2)
    return round_up(float(s.max()))


def gram_iteration_bound(w: torch.Tensor, steps: int = 8) -> float:
    """Guaranteed upper bound on σ_max(w) by Gram iteration (Delattre et al., ICML 2023).

    r₀ = ‖W‖_F, G₀ = W/r₀; P = GᵀG, r_{t+1} = ‖P‖_F, G_{t+1} = P/r_{t+1};
    σ_max(W) ≤ Π_t r_t^{2^{-t}}.  Accumulated in logarithms, in float64.  For a
    batch of matrices the maximum over the batch is returned.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    g = _as_float64(w)
    if g.dim() == 2:
        g = g.unsqueeze(0)
    log_bound = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
    # Work with the smaller Gram side.
    if g.shape[-2] < g.shape[-1]:
        g = g.mH
    for t in range(steps + 1):
        r = torch.linalg.matrix_norm(g, ord="fro").clamp_min(1e-300)
        log_bound = log_bound + torch.log(r) * (2.0 ** (-t))
        g = g / r[:, None, None]
        if t < steps:
            g = g.mH @ g
    return round_up(float(torch.exp(log_bound).max()), ulps=16)


def power_iteration(
    w: torch.Tensor, iters: int = 10, v: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Power iteration on ``w``: returns (estimate, u, v) with estimate = uᵀ w v.

    The estimate is a *lower* bound on σ_max(w): useful for scaling and
    diagnostics, never for certificates.  Runs without gradient for the vectors.
    """
    with torch.no_grad():
        if v is None:
            v = torch.randn(w.shape[-1], dtype=w.dtype, device=w.device)
        v = v / v.norm().clamp_min(1e-12)
        u = w @ v
        for _ in range(max(iters, 1)):
            u = w @ v
            u = u / u.norm().clamp_min(1e-12)
            v = w.mT @ u
            v = v / v.norm().clamp_min(1e-12)
        u = w @ v
        u = u / u.norm().clamp_min(1e-12)
    return u @ w @ v, u, v
