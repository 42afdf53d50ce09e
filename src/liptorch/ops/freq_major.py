"""Real 2-D FFTs that hand activations to per-frequency GEMMs in a frequency-major layout.

A circular convolution acts independently at each frequency: ŷ[f] = K̂[f] x̂[f].  On a
batch that is one batched GEMM over the frequencies, which wants the spectrum laid out
as (F, N, C) — frequency first, then batch, then channel — whereas ``torch.fft.rfft2``
of an NCHW tensor returns (N, C, H, W//2+1).  The two functions here do the transform
and the layout change together, with hand-written backward passes:

* :func:`rfft2_freq_major` — x (N, C, H, W) real  →  x̂ (F, N, C) complex, F = H·(W//2+1),
  frequency index f = f₁·(W//2+1) + f₂.  Forward DFT, unnormalised (spec convention).
* :func:`irfft2_freq_major` — ŷ (F, N, C) complex  →  y (N, C, H, W) real, equal to
  ``torch.fft.irfft2`` of the spectrum (divides by H·W) on every Hermitian-consistent
  spectrum — the spectrum of a real signal, also after a per-frequency operator with
  conjugate symmetry, which is all a circular convolution produces in exact arithmetic.
  (For odd W it equals ``irfft2`` on every input; for even W it reads the self-paired
  columns differently on inconsistent inputs, and its backward is the exact adjoint
  of what it computes.)

Why not ``torch.fft.irfft2``?  On CPU its complex-to-real path is several times slower
than a complex-to-complex transform.  For even W the inverse here is a complex FFT of
half the width: with W = 2M the output rows satisfy y[·, 2m] + i·y[·, 2m+1] = z[·, m],
z = ifft2(Z) over (H, M), and Z is one ``lerp`` of the spectrum with its mirrored
conjugate (see :func:`_irfft2_lean`); the result is a contiguous real tensor and the
transposition back to NCHW is folded into that ``lerp``.  Odd W falls back to the
Hermitian extension and a full complex inverse.

Adjoints used by the backward passes (real loss, PyTorch's complex-gradient
convention g = ∂L/∂Re + i ∂L/∂Im):

* y = irfft2(Ŷ), odd W:  ∂L/∂Ŷ[f] = w(f₂)/(H·W) · rfft2(∂L/∂y)[f], with w = 2 on the
  interior columns (they occur twice in the Hermitian extension) and 1 on column 0;
  even W: the adjoint of the lean inverse, again a half-width complex FFT and one
  ``lerp`` (:func:`_irfft2_lean_adjoint`).
* x̂ = rfft2(x):   ∂L/∂x = Re(H·W · ifft2(zero-pad of ∂L/∂x̂ to the full W axis))
  = H·W · irfft2(∂L/∂x̂ with its interior columns halved).
"""
from __future__ import annotations

import math

import torch

__all__ = ["rfft2_freq_major", "irfft2_freq_major", "freq_count", "tap_phase_matrix", "tap_gram_weights"]


def freq_count(size: tuple[int, int]) -> int:
    """Number of stored (rfft half-plane) frequencies H·(W//2+1)."""
    h, w = size
    return h * (w // 2 + 1)


def _rfft2_fm(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    wf = w // 2 + 1
    xh = torch.fft.rfft2(x)  # (N, C, H, Wf), contiguous
    out = torch.empty((h, wf, n, c), dtype=xh.dtype, device=xh.device)
    out.copy_(xh.permute(2, 3, 0, 1))
    return out.view(h * wf, n, c)


def _rfft2_fm_adjoint(g: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`_rfft2_fm`: H·W·irfft2(g with interior columns halved)."""
    h, w = size
    wf = w // 2 + 1
    _, n, c = g.shape
    if w % 2 == 0:
        return _rfft2_adjoint_even(g.view(h, wf, n, c), h, w)
    full = torch.empty((n, c, h, w), dtype=g.dtype, device=g.device)
    full[..., :wf].copy_(g.view(h, wf, n, c).permute(2, 3, 0, 1))
    if w > wf:
        full[..., wf:].zero_()
    torch.fft.ifft2(full, norm="forward", out=full)
    return full.real


def _mirror_index(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w // 2 + 1
    rows = (-torch.arange(h, device=device)) % h
    cols = w - torch.arange(wf, w, device=device)  # W−f₂ for the missing columns f₂ = Wf … W−1
    return rows, cols


_CONST_MEMO: dict = {}


def _half_length_constants(h: int, w: int, dtype: torch.dtype, device) -> tuple:
    """Row/mirror gather indices and lerp weights of the even-W real inverse (memoised)."""
    key = (h, w, dtype, str(device))
    hit = _CONST_MEMO.get(key)
    if hit is not None:
        return hit
    m = w // 2
    wf = m + 1
    rows = (-torch.arange(h, device=device)) % h
    k = torch.arange(1, m, device=device)
    idx = (rows.view(h, 1) * wf + (m - k).view(1, -1)).reshape(-1)
    theta = 2.0 * math.pi * k.to(torch.float64) / w
    om = torch.polar(torch.ones_like(theta), theta)
    cb = (0.5 * (1 - 1j * om)).to(dtype).view(1, -1, 1, 1)  # and 1 − cb = ½(1 + iωᵏ)
    if len(_CONST_MEMO) > 64:
        _CONST_MEMO.clear()
    _CONST_MEMO[key] = (rows, idx, cb)
    return _CONST_MEMO[key]


def _lean_constants(h: int, w: int, dtype: torch.dtype, device) -> tuple:
    """Indices and lerp weights of the lean even-W inverse and of its adjoint (memoised)."""
    key = ("lean", h, w, dtype, str(device))
    hit = _CONST_MEMO.get(key)
    if hit is not None:
        return hit
    m = w // 2
    wf = m + 1
    rows = (-torch.arange(h, device=device)) % h
    k = torch.arange(m, device=device)
    # forward: Ŷ[−f₁, M−k] for k = 0 … M−1, as rows of the (F, N·C) spectrum
    idx_fwd = (rows.view(h, 1) * wf + (m - k).view(1, -1)).reshape(-1)
    # adjoint: Z[−f₁, M−k] for k = 1 … M, as elements of the (H·M) plane of an NCHW tensor
    idx_adj = (rows.view(h, 1) * m + (m - 1 - k).view(1, -1)).reshape(-1)
    j = torch.arange(m + 1, dtype=torch.float64, device=device)
    cb = 0.5 * (1 - 1j * torch.polar(torch.ones_like(j), 2.0 * math.pi * j / w))  # cb_j = ½(1 − iωʲ), j = 0 … M
    cb_fwd = cb[:m].to(dtype).view(1, m, 1, 1)
    beta = cb.flip(0).to(dtype).view(1, m + 1, 1, 1)  # β_k = cb_{M−k}, k = 0 … M
    if len(_CONST_MEMO) > 64:
        _CONST_MEMO.clear()
    _CONST_MEMO[key] = (idx_fwd, idx_adj, cb_fwd, beta)
    return _CONST_MEMO[key]


def _irfft2_lean(yv: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """y = L(Ŷ): z = ifft2(Z) over (H, M) with, for k = 0 … M−1,

        Z[f₁, k] = (1 − c_k) Ŷ[f₁, k] + c_k conj(Ŷ[−f₁, M−k]),   c_k = ½(1 − iωᵏ),

    and y[·, 2m] + i·y[·, 2m+1] = z[·, m]: one gather, one ``lerp`` (which also does the
    transposition to NCHW) and one half-width complex FFT.  L equals ``irfft2`` on every
    Hermitian-consistent spectrum (the spectrum of a real signal, or such a spectrum
    times a conjugate-symmetric per-frequency operator); on other inputs it differs
    from ``irfft2`` in how the self-paired columns are read, and its backward is the
    exact adjoint of L itself (:func:`_irfft2_lean_adjoint`).
    """
    _, wf, n, c = yv.shape
    m = w // 2
    idx_fwd, _, cb_fwd, _ = _lean_constants(h, w, yv.dtype, yv.device)
    zbuf = torch.empty((n, c, h, m), dtype=yv.dtype, device=yv.device)
    mirrored = yv.reshape(h * wf, n, c).index_select(0, idx_fwd).conj_physical_().view(h, m, n, c)
    torch.lerp(yv[:, :m], mirrored, cb_fwd, out=zbuf.permute(2, 3, 0, 1))
    torch.fft.ifft2(zbuf, out=zbuf)
    return torch.view_as_real(zbuf).view(n, c, h, w)


def _irfft2_lean_adjoint(g: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Exact adjoint of :func:`_irfft2_lean`: (N, C, H, W) real → (H·Wf, N, C) complex.

    With g_Z = fft2(g as complex pairs)/(H·M) and β_k = c_{M−k} (note (1 − c_k)* + c_{M−k} = 1):
    out[:, k] = lerp(g_Z[:, k], conj(g_Z[−f₁, M−k]), β_k) for 0 < k < M,
    out[:, 0] = (1 − β₀) g_Z[:, 0],  out[:, M] = β_M conj(g_Z[−f₁, 0]).
    """
    n, c = g.shape[:2]
    m = w // 2
    wf = m + 1
    _, idx_adj, _, beta = _lean_constants(h, w, torch.complex128 if g.dtype == torch.float64 else torch.complex64, g.device)
    gz = torch.view_as_complex(g.contiguous().view(n, c, h, m, 2))
    gzf = torch.fft.fft2(gz, norm="forward")  # (N, C, H, M)
    mirrored = gzf.view(n * c, h * m).index_select(1, idx_adj).conj_physical_().view(n, c, h, m)
    gv = gzf.permute(2, 3, 0, 1)  # (H, M, N, C) views
    mv = mirrored.permute(2, 3, 0, 1)  # mv[:, k−1] = conj(g_Z[−f₁, M−k]), k = 1 … M
    out = torch.empty((h, wf, n, c), dtype=gzf.dtype, device=gzf.device)
    torch.mul(gv[:, 0], 1 - beta[:, 0], out=out[:, 0])
    torch.mul(mv[:, m - 1], beta[:, m], out=out[:, m])
    if m > 1:
        torch.lerp(gv[:, 1:m], mv[:, : m - 1], beta[:, 1:m], out=out[:, 1:m])
    return out.view(h * wf, n, c)


def _irfft2_fm(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    wf = w // 2 + 1
    f, n, c = y.shape
    if f != h * wf:
        raise ValueError(f"irfft2_freq_major: expected {h * wf} frequencies for size {size}, got {f}")
    yv = y.view(h, wf, n, c)
    if w % 2 == 0:
        return _irfft2_lean(yv, h, w)
    full = torch.empty((n, c, h, w), dtype=y.dtype, device=y.device)
    full[..., :wf].copy_(yv.permute(2, 3, 0, 1))
    if w > wf:
        rows, cols = _mirror_index(h, w, y.device)
        mirrored = yv[rows[:, None], cols[None, :]]  # (H, W−Wf, N, C): Ŷ[−f₁, W−f₂]
        full[..., wf:].copy_(mirrored.permute(2, 3, 0, 1).conj())
    torch.fft.ifft2(full, out=full)
    return full.real


def _rfft2_adjoint_even(gv: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Adjoint of ``rfft2`` for even W = 2M: H·W·irfft2(ĝ with interior columns halved),
    through a complex FFT of half the width (exactly, for every complex ĝ).

    The output rows are y[u, 2m] + i·y[u, 2m+1] = z[u, m], z = H·M·ifft2(Z), where
    Z[f₁, k] = ½(1 + iωᵏ) ĝ[f₁, k] + ½(1 − iωᵏ) conj(ĝ[−f₁, M−k]) for 0 < k < M (one
    ``lerp``, ω = e^{2πi/W}), and Z[f₁, 0] = (1+i)/2·Ĉ₀ + (1−i)/2·Ĉ_M with Ĉ₀, Ĉ_M the
    self-paired columns made Hermitian along f₁ (doubled: Ĉ = c + conj(c[−f₁])).
    """
    _, wf, n, c = gv.shape
    m = w // 2
    rows, idx, cb = _half_length_constants(h, w, gv.dtype, gv.device)
    zbuf = torch.empty((n, c, h, m), dtype=gv.dtype, device=gv.device)
    zv = zbuf.permute(2, 3, 0, 1)  # (H, M, N, C) view of the NCHW buffer
    # columns 0 and M together: Ĉ = c + conj(c[−f₁]) for both, one gather
    pair_idx = (rows.view(h, 1) * wf + torch.tensor([0, m], device=gv.device).view(1, 2)).reshape(-1)
    sym = gv[:, ::m] + gv.reshape(h * wf, n, c).index_select(0, pair_idx).conj_physical_().view(h, 2, n, c)
    torch.lerp(sym[:, 0], sym[:, 1], torch.tensor(0.5 - 0.5j, dtype=gv.dtype, device=gv.device), out=zv[:, 0])
    if m > 1:
        mirrored = gv.reshape(h * wf, n, c).index_select(0, idx).conj_physical_().view(h, m - 1, n, c)
        torch.lerp(gv[:, 1:m], mirrored, cb, out=zv[:, 1:])
    torch.fft.ifft2(zbuf, norm="forward", out=zbuf)
    return torch.view_as_real(zbuf).view(n, c, h, w)


def _irfft2_fm_adjoint(g: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    wf = w // 2 + 1
    n, c = g.shape[:2]
    gh = torch.fft.rfft2(g)  # (N, C, H, Wf)
    weight = torch.full((wf,), 2.0 / (h * w), dtype=g.dtype, device=g.device)
    weight[0] = 1.0 / (h * w)
    if w % 2 == 0:
        weight[-1] = 1.0 / (h * w)
    out = torch.empty((h, wf, n, c), dtype=gh.dtype, device=gh.device)
    torch.mul(gh.permute(2, 3, 0, 1), weight.view(1, wf, 1, 1), out=out)
    return out.view(h * wf, n, c)


class _RFFT2FreqMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.size = (x.shape[-2], x.shape[-1])
        return _rfft2_fm(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return _rfft2_fm_adjoint(g.contiguous(), ctx.size)


class _IRFFT2FreqMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, size):
        ctx.size = size
        return _irfft2_fm(y.contiguous(), size)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        h, w = ctx.size
        if w % 2 == 0:
            return _irfft2_lean_adjoint(g, h, w), None
        return _irfft2_fm_adjoint(g, ctx.size), None


def rfft2_freq_major(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised real 2-D DFT of ``x`` (N, C, H, W), returned as (H·(W//2+1), N, C).

    Entry [f₁·(W//2+1) + f₂, n, c] = Σ_{u,v} x[n, c, u, v] e^{−2πi(f₁u/H + f₂v/W)}.
    Differentiable (hand-written backward, see the module docstring).
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"rfft2_freq_major expects a real 4-D tensor (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    if torch.is_grad_enabled() and x.requires_grad:
        return _RFFT2FreqMajor.apply(x)
    return _rfft2_fm(x)


def irfft2_freq_major(y: torch.Tensor, size) -> torch.Tensor:
    """Inverse of :func:`rfft2_freq_major`: (H·(W//2+1), N, C) complex → (N, C, H, W) real.

    Equal to ``torch.fft.irfft2(Ŷ, s=size)`` with Ŷ the spectrum in (N, C, H, W//2+1)
    layout whenever Ŷ is Hermitian-consistent (see the module docstring).  Contiguous
    for even W, the real part of a complex buffer (a strided view) for odd W.
    Differentiable (hand-written backward, the exact adjoint of the forward).
    """
    size = (int(size[0]), int(size[1]))
    if y.dim() != 3 or not y.is_complex():
        raise ValueError(f"irfft2_freq_major expects a complex 3-D tensor (F, N, C), got {tuple(y.shape)} {y.dtype}")
    if torch.is_grad_enabled() and y.requires_grad:
        return _IRFFT2FreqMajor.apply(y, size)
    return _irfft2_fm(y.contiguous(), size)


def _unit_roots(n: int) -> torch.Tensor:
    """e^{2πi m/n}, m = 0 … n−1, in complex128, with entry n−m exactly conj(entry m)."""
    m = torch.arange(n, dtype=torch.float64)
    roots = torch.polar(torch.ones_like(m), 2.0 * math.pi * m / n)
    half = (n - 1) // 2
    if half > 0:
        idx = torch.arange(1, half + 1)
        roots[n - idx] = roots[idx].conj()
    roots[0] = 1.0
    if n % 2 == 0:
        roots[n // 2] = -1.0
    return roots


def tap_phase_matrix(kernel_size, size, offset=None) -> torch.Tensor:
    """Phase matrix Φ ∈ C^{F×(kh·kw)} mapping kernel taps to the rfft half-plane spectrum.

    For a cross-correlation kernel K (q, p, kh, kw) with integer centre offset
    c = (⌊(kh−1)/2⌋, ⌊(kw−1)/2⌋) applied circularly at spatial size (H, W),

        K̂[f] = ω_H^{−c_h f₁} ω_W^{−c_w f₂} conj(DFT(K)[f]) = Σ_{a,b} Φ[f, a·kw + b] K[:, :, a, b],
        Φ[f, (a, b)] = exp(2πi (f₁(a − c_h)/H + f₂(b − c_w)/W)),

    f = f₁·(W//2+1) + f₂ (sandwich.md §3.2).  Taps beyond the image wrap (n < k is
    fine).  Computed in complex128 from exact integer phase indices, so the rows of
    f and −f are exact conjugates.
    """
    kh, kw = kernel_size
    h, w = size
    ch, cw = offset if offset is not None else ((kh - 1) // 2, (kw - 1) // 2)
    wf = w // 2 + 1
    f1 = torch.arange(h).view(h, 1, 1, 1)
    f2 = torch.arange(wf).view(1, wf, 1, 1)
    a = torch.arange(kh).view(1, 1, kh, 1) - ch
    b = torch.arange(kw).view(1, 1, 1, kw) - cw
    ph = _unit_roots(h)[(f1 * a) % h] * _unit_roots(w)[(f2 * b) % w]
    return ph.reshape(h * wf, kh * kw)


def tap_gram_weights(phases: torch.Tensor) -> torch.Tensor:
    """Re(Φᵀ conj(Φ)) (float64): ‖K̂‖_F² over the stored frequencies = Σ_{t,t'} Q[t,t'] ⟨K_t, K_t'⟩."""
    return (phases.mT @ phases.conj()).real.to(torch.float64)
