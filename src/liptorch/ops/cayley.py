"""Cayley transform of the sandwich (LBDN) parameterisation and its certified residual.

Notation (sandwich.md §2.2–2.4, §3.3).  The free block is read as X ∈ K^{q×q},
Y ∈ K^{p×q} (K = R, or C per frequency for the convolutional layer), stacked as the
spec's Fᵀ = [X; Y] ((q+p) × q, "rows" form; the column form is P̄ = [U | V] with
U = Xᵀ, V = Yᵀ, plain transposes).  The transform is

    Z = X − Xᴴ + YᴴY,    N = I + Z,    Aᵀ = N⁻¹(I − Z) = (2I − N)N⁻¹,    Bᵀ = −2Y N⁻¹.

Both come from ONE batched inverse G = N⁻¹: Aᵀ = 2G − I, Bhᵀ = Y G (q = output
width).  N is invertible for every X, Y since
Re vᴴNv = ‖v‖² + ‖Yv‖² > 0, and Z + Zᴴ = 2YᴴY gives A Aᴴ + B Bᴴ = I.

The hand-written backward reuses G = N⁻¹ = (Aᵀ + I)/2: five batched GEMMs, no second
inverse.  :func:`fold_sandwich_scales` folds √2, Ψ and the input scale into the two
row-form operators a layer applies, with its own backward.

Certification (certification.md §3.2(g)): a sandwich layer built from *measured* A, B
with residual E = AAᴴ + BBᴴ − I is Lipschitz with constant ≤ √(1 + 4‖E‖(1 + ‖E‖)).
:func:`cayley_residual_norm` measures ‖E‖₂ in float64/complex128 and adds a rigorous
allowance for the rounding of that very computation; :func:`sandwich_residual_bound`
turns it into the layer bound.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .linalg import round_up

__all__ = [
    "accretive_inverse",
    "cayley_rows",
    "cayley_block",
    "cayley_parts",
    "sandwich_cayley",
    "fold_sandwich_scales",
    "cayley_residual_norm",
    "sandwich_residual_bound",
]


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_POOL_LOCK = threading.Lock()


def _per_slice_lapack(fn, *tensors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``fn(*tensors)`` for a batched LAPACK call on CPU, with the batch split across
    ``torch.get_num_threads()`` threads (the caller and pool threads) that each run
    single-threaded BLAS/LAPACK on their slice.

    Torch loops over the batch calling LAPACK once per matrix, and each call opens its
    own OpenMP parallel region: on a shared CPU one descheduled worker then stalls every
    one of the ~F calls at its barrier (measured: a 144 × 64×64 complex solve going from
    11 ms to 2.3 s).  Slices solved independently on plain threads need no barrier and
    keep the same throughput on an idle machine.  The intra-op thread count is set to 1
    for the duration of the call and restored afterwards (a process-wide setting: other
    Python threads running torch at that moment see it too).
    """
    global _POOL, _POOL_PID
    nt = torch.get_num_threads()
    batch = tensors[0].shape[0] if tensors[0].dim() >= 3 else 1
    if tensors[0].device.type != "cpu" or nt <= 1 or batch < 2 or tensors[0].dim() < 3:
        return fn(*tensors) if out is None else fn(*tensors, out=out)
    workers = min(nt, batch)
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers - 1 or _POOL_PID != os.getpid():
            # (a pool inherited through fork has no live threads: make a new one)
            _POOL = ThreadPoolExecutor(max_workers=max(workers - 1, 1), thread_name_prefix="liptorch-lapack")
            _POOL_PID = os.getpid()
        pool = _POOL
        bounds = [round(i * batch / workers) for i in range(workers + 1)]

        def run(i: int):
            sl = slice(bounds[i], bounds[i + 1])
            args = [t[sl] for t in tensors]
            return fn(*args) if out is None else fn(*args, out=out[sl])

        torch.set_num_threads(1)
        try:
            futures = [pool.submit(run, i) for i in range(1, workers)]
            parts = [run(0)] + [f.result() for f in futures]  # the calling thread takes slice 0
        finally:
            torch.set_num_threads(nt)
    return torch.cat(parts, dim=0) if out is None else out


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def _addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """beta·c + alpha·(a @ b) in one BLAS call where possible (2-D or 3-D batches)."""
    if c.dim() == 3:
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
    if c.dim() == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return beta * c + alpha * (a @ b)


def _skew_or_herm(x: torch.Tensor, sign: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x − xᴴ (sign = −1) or x + xᴴ (sign = +1); ``out`` may be a strided view."""
    xh = _adjoint(x, contiguous=True)  # elementwise ops with two equal layouts run fastest
    if out is None:
        return torch.add(x, xh, alpha=sign)
    return torch.add(x, xh, alpha=sign, out=out)


def _adjoint(x: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """xᴴ materialised in a fresh buffer (never a view: callers modify it in place, and a
    lazy conjugate bit would be copied by every batched GEMM using it).  By default the
    buffer keeps the transposed layout of ``x.mT`` (one pass, fine for GEMMs)."""
    if contiguous:
        out = x.mT.clone(memory_format=torch.contiguous_format)
        return out.conj_physical_() if out.is_complex() else out
    return torch.conj_physical(x.mT) if x.is_complex() else x.mT.clone()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b) if a.dim() == 3 else a @ b


_INVERSE_LEAF = 16


def accretive_inverse(n: torch.Tensor, leaf: int = _INVERSE_LEAF) -> torch.Tensor:
    """N⁻¹ for (batched) square N whose Hermitian part is ⪰ I, as the Cayley's
    N = I + X − Xᴴ + YᴴY is, by recursive 2×2 block elimination without pivoting:

        N = [[A, B], [C, D]],  T = A⁻¹B,  S = D − CT,
        N⁻¹ = [[A⁻¹ + T S⁻¹ C A⁻¹, −T S⁻¹], [−S⁻¹ C A⁻¹, S⁻¹]].

    A principal block of N and the Schur complement S both have Hermitian part ⪰ I
    again (Re(N/A) ⪰ Re(N)/Re(A) ⪰ I), so no block is singular or near-singular and
    every inverse taken has norm ≤ 1: no pivoting is needed.  (The rounding error
    grows with the skew part ‖X − Xᴴ‖, which the layers keep O(1); the tests compare
    with LAPACK from float32 to complex128.)  Blocks of size ≤ ``leaf`` go to LAPACK;
    the rest is batched GEMMs, which run several times closer to peak than LAPACK's
    per-matrix inverse on a batch of small matrices (64×64: about 35 % less time).
    """
    m = n.shape[-1]
    if m <= leaf:
        return _per_slice_lapack(torch.linalg.inv, n)
    h = m // 2
    a, b = n[..., :h, :h], n[..., :h, h:]
    c, d = n[..., h:, :h], n[..., h:, h:]
    ai = accretive_inverse(a, leaf)
    t = ai @ b
    si = accretive_inverse(d - c @ t, leaf)
    g = n.new_empty(n.shape)
    g21 = torch.matmul(si, c @ ai, out=g[..., h:, :h]).neg_()  # −S⁻¹CA⁻¹
    torch.matmul(t, si, out=g[..., :h, h:]).neg_()  # −TS⁻¹
    g[..., h:, h:] = si
    g[..., :h, :h] = ai - t @ g21  # A⁻¹ + T S⁻¹ C A⁻¹
    return g


def _cayley_rows_forward(pt: torch.Tensor, q: int):
    """(Aᵀ, Bhᵀ, Yᴴ) for the row-stacked block P = [X; Y] (…, q+p, q).

    N = I + X − Xᴴ + YᴴY,  G = N⁻¹ (one batched inverse),  Aᵀ = (2I − N)N⁻¹ = 2G − I,
    Bhᵀ = Y G.  The explicit inverse plus one GEMM costs about 2q³ + pq² multiply-adds
    against (2/3)q³ + 2(q+p)q² for a solve with the stacked right-hand side [2I − N; Y],
    and GEMMs run closer to peak than triangular solves.
    """
    x, y = pt[..., :q, :], pt[..., q:, :]
    p = y.shape[-2]
    n = _skew_or_herm(x, -1.0)  # X − Xᴴ
    n.diagonal(dim1=-2, dim2=-1).add_(1.0)
    yh = _adjoint(y)
    if p > 0:
        if n.dim() == 3:
            n.baddbmm_(yh, y)
        elif n.dim() == 2:
            n.addmm_(yh, y)
        else:
            n = n + yh @ y
    g = accretive_inverse(n)
    s = torch.empty(pt.shape, dtype=pt.dtype, device=pt.device)  # row-major [Aᵀ; Bhᵀ]
    at, bht = s[..., :q, :], s[..., q:, :]
    torch.mul(g, 2.0, out=at)
    at.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    if p > 0:
        torch.matmul(y, g, out=bht)
    return at, bht, yh


class _CayleyRows(torch.autograd.Function):
    """P = [X; Y] ↦ (Aᵀ, Bhᵀ) = ((2I − N)N⁻¹, Y N⁻¹), N = I + X − Xᴴ + YᴴY, one inverse.

    Backward with G = N⁻¹ = (Aᵀ + I)/2 (real loss, g = ∂L/∂Re + i∂L/∂Im):
      g_G = 2 g_Aᵀ + Yᴴ g_Bhᵀ,   g_N = −Gᴴ g_G Gᴴ,
      g_X = g_N − g_Nᴴ,          g_Y = g_Bhᵀ Gᴴ + Y (g_N + g_Nᴴ).
    Five batched GEMMs, no second inverse.
    """

    @staticmethod
    def forward(ctx, pt, q):
        at, bht, yh = _cayley_rows_forward(pt, q)
        ctx.q = q
        ctx.save_for_backward(at, pt, yh)
        return at, bht

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_at, g_bht):
        at, pt, yh = ctx.saved_tensors
        q = ctx.q
        y = pt[..., q:, :]
        p = y.shape[-2]
        gh = _adjoint(at).mul_(0.5)  # Gᴴ = (Aᵀᴴ + I)/2
        gh.diagonal(dim1=-2, dim2=-1).add_(0.5)
        if g_at is None:
            g_at = torch.zeros_like(at)
        if g_bht is None or p == 0:
            g_g = g_at * 2.0
        else:
            g_g = _addmm(g_at, yh, g_bht, beta=2.0)
        g_np = _mm(_mm(gh, g_g), gh)  # −g_N
        g_nph = _adjoint(g_np, contiguous=True)
        grad = torch.empty_like(pt)
        torch.sub(g_nph, g_np, out=grad[..., :q, :])  # g_X = g_N − g_Nᴴ
        if p > 0:
            herm = g_np.add_(g_nph)  # −(g_N + g_Nᴴ)   (g_np is no longer needed)
            g_y = _mm(g_bht, gh) if g_bht is not None else torch.zeros_like(y)
            if g_y.dim() == 3:
                g_y.baddbmm_(y, herm, alpha=-1.0)
            elif g_y.dim() == 2:
                g_y.addmm_(y, herm, alpha=-1.0)
            else:
                g_y = g_y - y @ herm
            grad[..., q:, :].copy_(g_y)
        return grad, None


def cayley_rows(pt: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Aᵀ, Bhᵀ) for the row-stacked free block P = [X; Y] (…, q+p, q): the spec's own
    form Fᵀ = [X; Y] (sandwich.md §2.2).  Aᵀ = (I+Z)⁻¹(I−Z), Bᵀ = −2·Bhᵀ = −2Y(I+Z)⁻¹
    with Z = X − Xᴴ + YᴴY, from ONE batched inverse G = (I+Z)⁻¹ (Aᵀ = 2G − I, Bhᵀ = YG).
    Real or complex, batched, differentiable (GEMM-only backward)."""
    if pt.dim() < 2 or not 1 <= q <= pt.shape[-2] or pt.shape[-1] != q:
        raise ValueError(f"cayley_rows expects a (…, q+p, q) block with q={q}, got {tuple(pt.shape)}")
    if torch.is_grad_enabled() and pt.requires_grad:
        return _CayleyRows.apply(pt, q)
    return _cayley_rows_forward(pt, q)[:2]


def cayley_block(pbar: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, Bh) for the column-stacked block P̄ = [U | V] (…, q, q+p) (U = Xᵀ, V = Yᵀ);
    B = −2·Bh.  A Aᴴ + B Bᴴ = I.  Differentiable; see :func:`cayley_rows`."""
    if pbar.dim() < 2 or not 1 <= q <= pbar.shape[-1] or pbar.shape[-2] != q:
        raise ValueError(f"cayley_block expects a (…, q, q+p) block with q={q}, got {tuple(pbar.shape)}")
    at, bht = cayley_rows(pbar.mT, q)
    return at.mT, bht.mT


def cayley_parts(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A, Bh) with A = M⁻¹(2I − M) and Bh = M⁻¹V, so that B = −2·Bh."""
    if u.shape[-1] != u.shape[-2] or u.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"cayley_parts expects U (…, q, q) and V (…, q, p), got {tuple(u.shape)} and {tuple(v.shape)}")
    return cayley_block(torch.cat([u, v], dim=-1), u.shape[-1])


def sandwich_cayley(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cayley transform of the free block P̄ = [U | V] (sandwich.md §2.4 / §3.3).

    Returns (A, B), A ∈ K^{q×q}, B ∈ K^{q×p}, with A Aᴴ + B Bᴴ = I (up to rounding).
    """
    a, bh = cayley_parts(u, v)
    return a, -2.0 * bh


def _re_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ over all but the last dimension of Re(conj(a)·b) (a column-sum over a
    contiguous 2-D view, which reduces fast)."""
    q = a.shape[-1]
    if a.is_complex():
        prod = torch.view_as_real(a) * torch.view_as_real(b)  # (…, q, 2)
        return prod.reshape(-1, 2 * q).sum(dim=0).view(q, 2).sum(dim=1)
    return (a * b).reshape(-1, q).sum(dim=0)


class _FoldScales(torch.autograd.Function):
    """(Aᵀ, Bhᵀ, ψ) ↦ (K1, K2) = (pre·Bhᵀ·Ψ⁻¹, post·Ψ·conj(A)) with hand-written backward."""

    @staticmethod
    def forward(ctx, at, bht, psi, pre, post):
        c1 = pre / psi
        c2 = post * psi
        k1 = bht * c1
        k2 = _adjoint(at * c2)  # K2[i, j] = c2_i · conj(Aᵀ[j, i])
        ctx.save_for_backward(at, bht, psi)
        ctx.pre, ctx.post = pre, post
        return k1, k2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_k1, g_k2):
        at, bht, psi = ctx.saved_tensors
        g_at = g_bht = None
        g_psi = torch.zeros_like(psi)
        if g_k1 is not None:
            g_bht = g_k1 * (ctx.pre / psi)
            g_psi = g_psi - _re_inner(g_bht, bht) / psi
        if g_k2 is not None:
            g_at = _adjoint(g_k2).mul_(ctx.post * psi)
            g_psi = g_psi + _re_inner(g_at, at) / psi
        return g_at, g_bht, g_psi, None, None


def fold_sandwich_scales(at: torch.Tensor, bht: torch.Tensor, psi: torch.Tensor, pre: float, post: float):
    """Row-form operators of a sandwich layer from (Aᵀ, Bhᵀ) and the diagonal Ψ = diag(ψ):

        K1 = pre · Bhᵀ Ψ⁻¹   (…, p, q),      K2 = post · Ψ conj(A)   (…, q, q),

    so that the layer is x ↦ σ(x K1 + b) K2 on row vectors.  With pre = −2√2·scale
    and post = √2 this is √2·scale·Ψ⁻¹B and √2·AᴴΨ transposed (B = −2Bh).  Differentiable.
    """
    if torch.is_grad_enabled() and (at.requires_grad or bht.requires_grad or psi.requires_grad):
        return _FoldScales.apply(at, bht, psi, float(pre), float(post))
    return bht * (pre / psi), _adjoint(at * (post * psi))


def _gamma(n: int) -> float:
    """Higham's γ_n = n·u/(1 − n·u) for float64 (u = 2⁻⁵³)."""
    unit = 2.0 ** -53
    return n * unit / (1.0 - n * unit)


def cayley_residual_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """Guaranteed upper bound on max over the batch of ‖A Aᴴ + B Bᴴ − I‖₂.

    Computed in float64/complex128.  The returned value is the spectral norm from an SVD
    plus an allowance for the rounding of that computation: the entries of the computed
    E differ from the exact ones by at most γ_n (|A||A|ᴴ + |B||B|ᴴ + I) entrywise
    (n = 2(q + p) + 8 covers complex products and the scalings done by callers), whose
    spectral norm is at most γ_n (‖A‖_F² + ‖B‖_F² + 1); the SVD of the computed E adds
    at most a few ulps of ‖E‖_F, allowed for as q·u·‖E‖_F.
    """
    if a.shape[-1] != a.shape[-2] or a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"cayley_residual_norm expects A (…, q, q) and B (…, q, p), got {tuple(a.shape)}, {tuple(b.shape)}")
    cdtype = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    a64 = a.detach().to(cdtype)
    b64 = b.detach().to(cdtype)
    if a64.dim() == 2:
        a64, b64 = a64.unsqueeze(0), b64.unsqueeze(0)
    q, p = a64.shape[-1], b64.shape[-1]
    e = a64 @ a64.mH + b64 @ b64.mH - _eye_like(a64)
    norm = _per_slice_lapack(lambda t: torch.linalg.matrix_norm(t, ord=2), e)
    fro_e = torch.linalg.matrix_norm(e, ord="fro")
    mass = a64.abs().square().sum(dim=(-2, -1)) + b64.abs().square().sum(dim=(-2, -1)) + 1.0
    slack = _gamma(2 * (q + p) + 8) * mass + q * 2.0 ** -53 * fro_e
    value = float((norm + slack).max())
    if not math.isfinite(value):
        raise ValueError(f"cayley_residual_norm: non-finite residual {value}")
    return round_up(value)


def sandwich_residual_bound(residual: float) -> float:
    """Layer bound √(1 + 4e(1 + e)) for a measured residual e ≥ ‖E‖₂ (certification.md §3.2(g)).

    Proof sketch: in the proof of LBDN Theorem 3.2 with AAᵀ = I + E − BBᵀ the excess
    term is 2(ΨΔu)ᵀE(ΨΔu) ≤ 2e‖ΨΔu‖² ≤ 4e‖B‖²‖Δh‖², and ‖B‖² ≤ 1 + e.
    """
    e = float(residual)
    if not e >= 0 or not math.isfinite(e):
        raise ValueError(f"sandwich_residual_bound expects a finite residual >= 0, got {residual}")
    return round_up(math.sqrt(1.0 + 4.0 * e * (1.0 + e)))
