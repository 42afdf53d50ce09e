"""FFT helpers for circular convolutions (Sedghi, Gupta & Long, ICLR 2019).

Convention (sandwich.md §3.2): for a cross-correlation kernel K ∈ R^{q×p×k×k} with
integer centre offset c = ⌊(k−1)/2⌋ applied with circular padding,

    ŷ[:, f] = K̂[f] x̂[:, f],   K̂[f] = ω^{−c(f₁+f₂)} conj(DFT_n(K)[f]),

where x̂ = rfft2(x) (unnormalised).  Equivalently, K̂ is the conjugate DFT of the kernel
whose tap (a, b) has been placed at ((a−c) mod n, (b−c) mod n) — which also handles
n < k by accumulating wrapped taps.
"""
from __future__ import annotations

import torch

from .linalg import round_up

__all__ = ["center_offset", "circular_kernel_spectrum", "circular_conv_norm", "as_size"]


def as_size(size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"spatial size must be a positive int or a pair of positive ints, got {size}")
    return size  # type: ignore[return-value]


def center_offset(k: int) -> int:
    """Integer centre offset c = ⌊(k−1)/2⌋ (the padding before, for circular 'same' conv)."""
    return (k - 1) // 2


def circular_kernel_spectrum(kernel: torch.Tensor, size, offset: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-frequency matrices K̂[f] of a circular cross-correlation, shape (H, W//2+1, q, p).

    ``kernel`` has shape (q, p, kh, kw); ``offset`` is the centre offset (defaults to
    ⌊(k−1)/2⌋ per axis, matching ``F.pad(x, ..., mode='circular')`` with that many
    pixels before).  Differentiable; complex dtype follows the kernel's dtype.
    """
    h, w = as_size(size)
    q, p, kh, kw = kernel.shape
    ch, cw = offset if offset is not None else (center_offset(kh), center_offset(kw))
    if kh <= h and kw <= w and ch == center_offset(kh) and cw == center_offset(kw):
        canvas = kernel.new_zeros(q, p, h, w)
        canvas = canvas.clone()
        canvas[:, :, :kh, :kw] = kernel
        canvas = torch.roll(canvas, shifts=(-ch, -cw), dims=(2, 3))
    else:
        rows = torch.tensor([(a - ch) % h for a in range(kh)], device=kernel.device)
        cols = torch.tensor([(b - cw) % w for b in range(kw)], device=kernel.device)
        flat_idx = (rows[:, None] * w + cols[None, :]).reshape(-1)
        canvas = kernel.new_zeros(q, p, h * w)
        canvas = canvas.index_add(2, flat_idx, kernel.reshape(q, p, kh * kw))
        canvas = canvas.reshape(q, p, h, w)
    spec = torch.fft.rfft2(canvas).conj()  # (q, p, H, W//2+1)
    return spec.permute(2, 3, 0, 1)


def circular_conv_norm(kernel: torch.Tensor, size) -> float:
    """Exact ℓ2 operator norm of the circular convolution with ``kernel`` at ``size``.

    max over frequencies of σ_max(K̂[f]), computed in complex128 (only the rfft half is
    needed since K̂[−f] = conj(K̂[f])).  Rounded up by a few ulps.
    """
    spec = circular_kernel_spectrum(kernel.detach().to(torch.float64), size)
    s = torch.linalg.matrix_norm(spec, ord=2)
    return round_up(float(s.max()))
