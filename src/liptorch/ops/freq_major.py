"""Real 2-D FFTs that hand activations to per-frequency GEMMs in a frequency-major layout.

A circular convolution acts independently at each frequency: ŷ[f] = K̂[f] x̂[f].  On a
batch that is one batched GEMM over the frequencies, which wants the spectrum laid out
as (F, N, C) — frequency first, then batch, then channel — whereas ``torch.fft.rfft2``
of an NCHW tensor returns (N, C, H, W//2+1).  The two functions here do the transform
and the layout change together, with hand-written backward passes:

* :func:`rfft2_freq_major` — x (N, C, H, W) real  →  x̂ (F, N, C) complex, F = H·(W//2+1),
  frequency index f = f₁·(W//2+1) + f₂.  Forward DFT, unnormalised (spec convention).
* :func:`irfft2_freq_major` — ŷ (F, N, C) complex  →  y (N, C, H, W) real, equal to
  ``torch.fft.irfft2`` of the spectrum (divides by H·W) for every input, including
  spectra that are not exactly Hermitian-consistent.

Why not ``torch.fft.irfft2``?  On CPU its complex-to-real path is several times slower
than a complex-to-complex transform.  For even W the inverse here is a complex FFT of
half the width: with W = 2M the output rows satisfy y[·, 2m] + i·y[·, 2m+1] = z[·, m],
z = ifft2(Z) over (H, M), and Z is one ``lerp`` of the spectrum with its mirrored
conjugate (see :func:`_irfft2_even`); the result is a contiguous real tensor and the
transposition back to NCHW is folded into that ``lerp``.  Odd W falls back to the
Hermitian extension and a full complex inverse.

Adjoints used by the backward passes (real loss, PyTorch's complex-gradient
convention g = ∂L/∂Re + i ∂L/∂Im):

* y = irfft2(Ŷ):  ∂L/∂Ŷ[f] = w(f₂)/(H·W) · rfft2(∂L/∂y)[f], with w = 2 on the interior
  columns 1 … W−(W//2+1) (they occur twice in the Hermitian extension) and 1 on the
  self-paired columns 0 and W/2.
* x̂ = rfft2(x):   ∂L/∂x = Re(H·W · ifft2(zero-pad of ∂L/∂x̂ to the full W axis))
  = H·W · irfft2(∂L/∂x̂ with its interior columns halved).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "rfft2_freq_major",
    "irfft2_freq_major",
    "freq_count",
    "add_dc_bias",
    "hermitian_symmetrize",
    "kernel_spectrum_rows",
    "memo_tap_phases",
    "tap_phase_matrix",
    "tap_gram_weights",
]


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
        return _irfft2_even(g.view(h, wf, n, c), h, w, adjoint=True)
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


def _irfft2_fm(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    wf = w // 2 + 1
    f, n, c = y.shape
    if f != h * wf:
        raise ValueError(f"irfft2_freq_major: expected {h * wf} frequencies for size {size}, got {f}")
    yv = y.view(h, wf, n, c)
    if w % 2 == 0:
        return _irfft2_even(yv, h, w)
    full = torch.empty((n, c, h, w), dtype=y.dtype, device=y.device)
    full[..., :wf].copy_(yv.permute(2, 3, 0, 1))
    if w > wf:
        rows, cols = _mirror_index(h, w, y.device)
        mirrored = yv[rows[:, None], cols[None, :]]  # (H, W−Wf, N, C): Ŷ[−f₁, W−f₂]
        full[..., wf:].copy_(mirrored.permute(2, 3, 0, 1).conj())
    torch.fft.ifft2(full, out=full)
    return full.real


def _irfft2_even(yv: torch.Tensor, h: int, w: int, adjoint: bool = False) -> torch.Tensor:
    """Real inverse for even W = 2M through a complex FFT of half the width, exactly equal
    to ``torch.fft.irfft2`` for every input (contiguous real output).

    The output rows are y[u, 2m] + i·y[u, 2m+1] = z[u, m], z = ifft2(Z) over (H, M), with

        Z[f₁, k] = ½(1 + iωᵏ) Ŷ[f₁, k] + ½(1 − iωᵏ) conj(Ŷ[−f₁, M−k]),   0 < k < M,

    (one ``lerp`` that also transposes to NCHW; ω = e^{2πi/W}) and
    Z[f₁, 0] = ½((1+i)/2·Ĉ₀ + (1−i)/2·Ĉ_M), Ĉ = c + conj(c[−f₁]) for the self-paired
    columns c = Ŷ[:, 0], Ŷ[:, M] (their Hermitian parts along f₁, which is what ``irfft2``
    keeps of them).

    ``adjoint=True`` computes instead the adjoint of the forward ``rfft2``, which is
    H·W·irfft2 of the input with its interior columns halved: the same formula with
    column 0 not halved and no 1/(H·M) normalisation.
    """
    _, wf, n, c = yv.shape
    m = w // 2
    rows, idx, cb = _half_length_constants(h, w, yv.dtype, yv.device)
    zbuf = torch.empty((n, c, h, m), dtype=yv.dtype, device=yv.device)
    zv = zbuf.permute(2, 3, 0, 1)  # (H, M, N, C) view of the NCHW buffer
    # columns 0 and M together: Ĉ = c + conj(c[−f₁]) for both, one gather
    pair_idx = (rows.view(h, 1) * wf + torch.tensor([0, m], device=yv.device).view(1, 2)).reshape(-1)
    sym = yv[:, ::m] + yv.reshape(h * wf, n, c).index_select(0, pair_idx).conj_physical_().view(h, 2, n, c)
    if not adjoint:
        sym.mul_(0.5)  # (on the compact pair, not on the strided output)
    torch.lerp(sym[:, 0], sym[:, 1], torch.tensor(0.5 - 0.5j, dtype=yv.dtype, device=yv.device), out=zv[:, 0])
    if m > 1:
        mirrored = yv.reshape(h * wf, n, c).index_select(0, idx).conj_physical_().view(h, m - 1, n, c)
        torch.lerp(yv[:, 1:m], mirrored, cb, out=zv[:, 1:])
    torch.fft.ifft2(zbuf, norm="forward" if adjoint else "backward", out=zbuf)
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
    layout, for every input.  Contiguous for even W, the real part of a complex buffer
    (a strided view) for odd W.  Differentiable (hand-written backward).
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


def hermitian_symmetrize(k: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Make the self-paired columns f₂ = 0 (and W/2) of a half-plane operator exactly
    Hermitian-consistent: K[−f₁, f₂] = conj(K[f₁, f₂]) bit for bit (self-conjugate bins
    become exactly real).  Then the real map x ↦ irfft2(K x̂) is exactly the circulant
    operator with blocks K[f], whose norm is the max over the stored frequencies."""
    h, w = size
    wf = w // 2 + 1
    kv = k.view(h, wf, *k.shape[1:])
    rows = (-torch.arange(h, device=k.device)) % h
    cols = [0] + ([w // 2] if w % 2 == 0 and w // 2 != 0 else [])
    for j in cols:
        col = kv[:, j]
        kv[:, j] = (col + col[rows].conj()) * 0.5
    return k


def add_dc_bias(yh: torch.Tensor, bias: torch.Tensor | None, size) -> torch.Tensor:
    """Add a per-channel ``bias`` to the spatial map behind the spectrum ``yh`` (F, N, C),
    in place, and return ``yh``.  A constant lives only at frequency 0, where the
    unnormalised DFT holds H·W·b: one tiny op instead of a pass over the spatial tensor."""
    if bias is not None:
        yh[0].add_(bias * float(size[0] * size[1]))
    return yh


def memo_tap_phases(memo: dict, kernel_size, size, offset, device, dtype, slots: int = 8) -> torch.Tensor:
    """:func:`tap_phase_matrix` converted to ``device``/``dtype``, kept in ``memo`` (a
    plain dict owned by the caller, emptied when it holds ``slots`` entries).  Always a
    normal tensor (built outside ``torch.inference_mode``), so that a memo filled under
    inference mode still serves passes that record a graph."""
    key = (tuple(kernel_size), tuple(size), None if offset is None else tuple(offset), str(device), dtype)
    ph = memo.get(key)
    if ph is None:
        if len(memo) >= slots:
            memo.clear()
        with torch.inference_mode(False):
            ph = memo[key] = tap_phase_matrix(kernel_size, size, offset).to(device=device, dtype=dtype)
    return ph


def kernel_spectrum_rows(kernel: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Per-frequency matrices of the cross-correlation ``kernel`` (c_out, c_in, kh, kw) in
    row form: (F, c_in, c_out) with ŷ[f]ᵀ = x̂[f]ᵀ·K[f], from ``phases`` (F, kh·kw) of
    :func:`tap_phase_matrix` (one (F × k²)·(k² × c_in·c_out) GEMM; differentiable)."""
    co, ci = kernel.shape[:2]
    taps = kernel.transpose(0, 1).reshape(ci * co, -1).mT.to(phases.dtype)  # column (i, o)
    return (phases @ taps).view(-1, ci, co)

