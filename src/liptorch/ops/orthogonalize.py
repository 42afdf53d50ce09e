"""Batched, deterministic Björck–Bowie orthonormalisation (bcop.md §4).

:func:`bjorck_orthonormalize` orthonormalises a batch of matrices at once: every
iteration is one or two batched matmuls over the whole batch, so a BCOP layer's
2k − 1 matrices cost the same number of kernel launches as a single one.  It is one
autograd node with a hand-written backward (the exact gradient of the iterations
performed, by reverse accumulation through each step), which avoids the per-op
autograd overhead that dominates for small matrices.

Differences from :func:`liptorch.ops.linalg.bjorck`, all intentional:

* the power-iteration scale starts from a *fixed* pseudo-random vector drawn from a
  private generator, so a forward pass never touches the global RNG and is
  bit-reproducible (training resume, evaluation);
* the iteration stops early once it has converged to working precision (see
  :func:`bjorck_orthonormalize`): the result then equals the one of the full
  ``iters`` iterations up to rounding;
* small problems run on one thread (:func:`serial_for`).

Nothing here is a certificate: the result is only approximately orthogonal and
every bound must measure the explicit operator (certification.md §3.2f).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "power_start_vector",
    "batched_sigma_estimate",
    "bjorck_orthonormalize",
    "bjorck_scale",
    "bjorck_forward_pass",
    "bjorck_backward_pass",
    "limit_threads",
    "serial_for",
    "SERIAL_WORK_LIMIT",
]

_START_SEED = 0x5EED_B0C
_START_CACHE: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def power_start_vector(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A fixed unit vector of length ``n`` (pseudo-random, from a private generator).

    The same ``n`` always gives the same vector, on every device and in every dtype
    (it is drawn in float64 on the CPU and converted), and the global RNG is untouched.
    """
    device = torch.device(device)
    key = (int(n), dtype, str(device))
    v = _START_CACHE.get(key)
    if v is None:
        gen = torch.Generator(device="cpu").manual_seed(_START_SEED + int(n))
        v64 = torch.randn(int(n), generator=gen, dtype=torch.float64)
        v = (v64 / v64.norm()).to(device=device, dtype=dtype)
        _START_CACHE[key] = v
    return v


def _power_on_gram(gram: torch.Tensor, iters: int, rtol: float = 1e-3) -> torch.Tensor:
    """σ_max² estimates (lower bounds) of a batch of PSD matrices (B, c, c) by at most
    ``iters`` power steps from :func:`power_start_vector`.

    G is first divided by ‖G‖_F ≥ λ_max, so the unnormalised iterates w_k = Gᵏ v₀ can
    neither overflow nor underflow (λ_max/‖G‖_F ≥ 1/√c), and the estimate after step k
    is ‖w_k‖/‖w_{k−1}‖ (non-decreasing, ≤ λ_max).  Stops once no estimate grew by more
    than ``rtol`` (relative) in a step: the value only sets Björck's starting scale, and
    the limit of the iteration does not depend on it."""
    c = gram.shape[-1]
    tiny = torch.finfo(gram.dtype).tiny
    fro = torch.linalg.matrix_norm(gram).clamp_min(tiny)
    g = gram / fro.reshape(-1, 1, 1)
    w = power_start_vector(c, gram.dtype, gram.device).reshape(1, c, 1).expand(gram.shape[0], c, 1)
    prev_norm = None
    est = None
    for _ in range(max(int(iters), 1)):
        w = g @ w
        norm = w.norm(dim=1).reshape(-1).clamp_min(tiny)
        new = norm if prev_norm is None else norm / prev_norm
        if est is not None and float(((new - est) / new).max()) <= rtol:
            est = new
            break
        est, prev_norm = new, norm
    return est * fro


def batched_sigma_estimate(a: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Power-iteration estimate of σ_max for each matrix of a batch ``(B, r, c)``.

    Runs ``iters`` steps of v ← AᵀA v (normalised) from :func:`power_start_vector` and
    returns ‖AᵀA v‖^{1/2} of shape (B,).  This is a **lower** bound on σ_max (never a
    certificate); it is used only to scale Björck's starting point.  No gradient.
    """
    with torch.no_grad():
        a = a.detach()
        if a.dim() == 2:
            a = a.unsqueeze(0)
        if a.shape[-2] < a.shape[-1]:
            a = a.mT
        return _power_on_gram(a.mT @ a, iters).sqrt()


def bjorck_scale(a: torch.Tensor, scale: str, power_iters: int = 10) -> torch.Tensor:
    """The divisor s of Björck's starting point A₀ = W / s, shape (B, 1, 1), no gradient.

    ``"power"``: σ_max estimated by power iteration (LConvNet default);
    ``"frobenius"``: ‖W‖_F ≥ σ_max (always inside the convergence region);
    ``"sqrt"``: √(rows·cols) (Anil et al.).
    """
    with torch.no_grad():
        if a.dim() == 2:
            a = a.unsqueeze(0)
        if scale == "power":
            s = batched_sigma_estimate(a, power_iters)
        elif scale == "frobenius":
            s = torch.linalg.matrix_norm(a.detach(), ord="fro")
        elif scale == "sqrt":
            s = torch.full(a.shape[:1], math.sqrt(a.shape[-2] * a.shape[-1]), dtype=a.dtype, device=a.device)
        else:
            raise ValueError(f"bjorck scale must be 'power', 'frobenius' or 'sqrt', got {scale!r}")
        return s.clamp_min(torch.finfo(a.dtype).tiny).reshape(-1, 1, 1)


# ----------------------------------------------------------------------------- threading
#: Largest problem (multiply-adds of one batched c×c product) still run on one thread.
SERIAL_WORK_LIMIT = 1 << 24


@contextlib.contextmanager
def limit_threads(n: int):
    """Temporarily cap the intra-op thread count (restored on exit)."""
    prev = torch.get_num_threads()
    if prev <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def serial_for(t: torch.Tensor):
    """One thread for a small CPU parameter transform, else a no-op context.

    Many small matmuls gain nothing from a second thread, but every multi-threaded
    BLAS call ends on a thread-team barrier, and on a loaded machine each barrier can
    wait a whole scheduler time slice (measured on a shared 2-core box: a 5×64×64
    batched matmul took ~10 ms with 2 threads and ~20 µs with one).  Used when the
    batched c×c product of ``t`` (B, r, c) has at most ``SERIAL_WORK_LIMIT``
    multiply-adds; always the same choice for the same shape, so results do not depend
    on the caller's thread count.
    """
    work = math.prod(t.shape[:-1]) * t.shape[-1] * t.shape[-1]
    if t.device.type == "cpu" and work <= SERIAL_WORK_LIMIT:
        return limit_threads(1)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- Björck
_EYE_CACHE: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def _eye(c: int, dtype: torch.dtype, device) -> torch.Tensor:
    key = (c, dtype, str(device))
    eye = _EYE_CACHE.get(key)
    if eye is None:
        eye = _EYE_CACHE[key] = torch.eye(c, dtype=dtype, device=device)
    return eye


def _bjorck_forward(a: torch.Tensor, gram0, iters: int, order: int, early_stop: bool, save: bool):
    """Iterate from A₀ = ``a`` (tall or square batch).  ``gram0`` = A₀ᵀA₀ if known.
    Returns (A_T, saved) with saved = [(A_t, S_t), …] when ``save``."""
    c = a.shape[-1]
    eye = _eye(c, a.dtype, a.device)
    eps = torch.finfo(a.dtype).eps
    tol = math.sqrt(eps) if order == 1 else eps ** (1.0 / 3.0)
    prev = math.inf
    saved = []
    for t in range(iters):
        s = gram0 if (t == 0 and gram0 is not None) else a.mT @ a
        if early_stop:
            e = float((s - eye).abs().sum(dim=-1).amax())  # ‖S − I‖_∞ ≥ ‖S − I‖₂ (symmetric)
            if e < 1e-2 and e > 0.5 * prev:
                break  # at the rounding floor: further steps cannot improve A
            prev = e
        if save:
            saved.append((a, s))
        if order == 1:
            a = torch.baddbmm(a, a, s, beta=1.5, alpha=-0.5)
        else:
            inner = torch.add(s @ s, s, alpha=-10.0 / 3.0).mul_(0.375)  # 3/8 S² − 5/4 S
            a = torch.baddbmm(a, a, inner, beta=1.875)
        if early_stop and e <= tol:
            break
    return a, saved


def _bjorck_backward(grad: torch.Tensor, saved, order: int) -> torch.Tensor:
    """Reverse accumulation through the saved steps: returns dL/dA₀."""
    g = grad
    for a, s in reversed(saved):
        at_g = a.mT @ g
        if order == 1:
            # A' = 3/2 A − 1/2 A S,  S = AᵀA:  dA = 3/2 G − 1/2 G S − 1/2 A (AᵀG + GᵀA)
            y = at_g + at_g.mT
            g = torch.baddbmm(torch.baddbmm(g, g, s, beta=1.5, alpha=-0.5), a, y, alpha=-0.5)
        else:
            # A' = 15/8 A + A N,  N = 3/8 S² − 5/4 S:  dN = AᵀG,
            # dS = 3/8 (dN S + S dN) − 5/4 dN,  dA = 15/8 G + G N + A (dS + dSᵀ)
            n = torch.add(s @ s, s, alpha=-10.0 / 3.0).mul_(0.375)
            ds = torch.baddbmm(at_g, at_g, s, beta=-1.25, alpha=0.375)
            ds = torch.baddbmm(ds, s, at_g, alpha=0.375)
            g = torch.baddbmm(torch.baddbmm(g, g, n, beta=1.875), a, ds + ds.mT)
    return g


def bjorck_forward_pass(w: torch.Tensor, iters: int, order: int, scale: str, power_iters: int,
                        early_stop: bool, save: bool):
    """No-grad Björck on a tall or square batch (B, r, c): returns (O, saved, s) where
    ``saved`` holds what :func:`bjorck_backward_pass` needs (empty unless ``save``)."""
    a0, gram0, s = _scaled_start(w, scale, power_iters)
    a, saved = _bjorck_forward(a0, gram0, iters, order, early_stop, save)
    return a, saved, s


def _scaled_start(w: torch.Tensor, scale: str, power_iters: int):
    """(A₀ = W / s, A₀ᵀA₀ or None, s): the power scale reuses its Gram matrix."""
    if scale == "power":
        gram = w.mT @ w
        s2 = _power_on_gram(gram, power_iters).clamp_min(torch.finfo(w.dtype).tiny)
        s = s2.sqrt().reshape(-1, 1, 1)
        return w / s, gram / s2.reshape(-1, 1, 1), s
    s = bjorck_scale(w, scale, power_iters)
    return w / s, None, s


def bjorck_backward_pass(grad: torch.Tensor, saved, order: int, s: torch.Tensor) -> torch.Tensor:
    """dL/dW from dL/dO through the saved steps (s is a constant, as in LConvNet)."""
    return _bjorck_backward(grad.contiguous(), saved, order) / s


class _BjorckFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, iters, order, scale, power_iters, early_stop):
        with serial_for(w):
            a, saved, s = bjorck_forward_pass(w, iters, order, scale, power_iters, early_stop, ctx.needs_input_grad[0])
        ctx.saved = saved
        ctx.order = order
        ctx.save_for_backward(s)
        return a

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        with serial_for(grad):
            g = bjorck_backward_pass(grad, ctx.saved, ctx.order, s)
        return g, None, None, None, None, None


# Gram-space form for tall matrices (order 1).  Every order-1 iterate is A_k = A₀P_k with
# P₀ = I, P_{k+1} = P_k(3/2 I − 1/2 S_k) and S_k = A_kᵀA_k = P_kᵀ G P_k, G = A₀ᵀA₀: while
# the iterate is far from orthogonal the iteration runs on c×c matrices and touches the
# r×c matrix only to form G and A₀P_k — 3c³ multiply-adds a step instead of 2rc², and
# three r×c×c products in the whole backward instead of three a step.  G squares the
# condition number, so in float32 the Gram phase alone would leave an ill-conditioned W
# visibly non-orthogonal (σ_max 1.005 at cond 10³); it therefore stops once
# ‖S − I‖_∞ ≤ _GRAM_SWITCH, and always leaves the last _GRAM_RESERVE steps of the budget,
# to the plain iteration, which corrects its own rounding (an ill-conditioned G can keep
# the Gram estimate of ‖S − I‖ above the switch for good).  Same iterates, same step
# budget and stopping rule.
_GRAM_RATIO = 2
_GRAM_SWITCH = 0.1
_GRAM_RESERVE = 3


def _bjorck_gram_forward(a0: torch.Tensor, gram0, iters: int, save: bool):
    """Order-1 Björck steps of the tall batch ``a0`` (B, r, c) through its Gram matrix,
    while ‖S − I‖_∞ > _GRAM_SWITCH, at most ``iters`` − _GRAM_RESERVE of them.  Returns
    (A_k, state, k) with state = (G, P_k, [(P_j or None, S_j, G P_j), …])."""
    g = gram0 if gram0 is not None else a0.mT @ a0
    eye = _eye(a0.shape[-1], a0.dtype, a0.device)
    p = None  # P₀ = I
    saved = []
    steps = 0
    for _ in range(iters - _GRAM_RESERVE):
        gp = g if p is None else g @ p
        s = g if p is None else p.mT @ gp
        if float((s - eye).abs().sum(dim=-1).amax()) <= _GRAM_SWITCH:
            break
        if save:
            saved.append((p, s, gp))
        p = torch.add(eye, s, alpha=-1.0 / 3.0).mul_(1.5) if p is None else torch.baddbmm(p, p, s, beta=1.5, alpha=-0.5)
        steps += 1
    return (a0 if p is None else a0 @ p), (g, p, saved), steps


def _bjorck_gram_backward(grad: torch.Tensor, a0: torch.Tensor, state) -> torch.Tensor:
    """dL/dA₀ from dL/dA_K for :func:`_bjorck_gram_forward` (S_k symmetric, G symmetric)."""
    g, p_last, saved = state
    if p_last is None:
        return grad
    da0 = grad @ p_last.mT
    dp = a0.mT @ grad  # dL/dP_K
    dg = torch.zeros_like(g)
    for p, s, gp in reversed(saved):
        if p is None:  # first step: P₁ = 3/2 I − 1/2 G (P₀ = I is a constant)
            dg.add_(dp, alpha=-0.5)
            break
        # P_{k+1} = 3/2 P_k − 1/2 P_k S_k with S_k = P_kᵀ G P_k
        ds = (p.mT @ dp).mul_(-0.5)
        dp_prev = torch.baddbmm(dp, dp, s, beta=1.5, alpha=-0.5)
        dp_prev.baddbmm_(gp, ds + ds.mT)
        dg.baddbmm_(p @ ds, p.mT)
        dp = dp_prev
    return da0.baddbmm_(a0, dg + dg.mT)


class _BjorckGramFn(torch.autograd.Function):
    """Order-1 Björck of a tall batch: Gram phase, then plain steps (see above)."""

    @staticmethod
    def forward(ctx, w, iters, scale, power_iters, early_stop):
        save = ctx.needs_input_grad[0]
        with serial_for(w):
            a0, gram0, s = _scaled_start(w, scale, power_iters)
            a, state, steps = _bjorck_gram_forward(a0, gram0, iters, save)
            a, saved = _bjorck_forward(a, gram0 if steps == 0 else None, iters - steps, 1, early_stop, save)
        ctx.state, ctx.saved = state, saved
        ctx.save_for_backward(a0, s)
        return a

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a0, s = ctx.saved_tensors
        with serial_for(grad):
            g = _bjorck_backward(grad.contiguous(), ctx.saved, 1)
            g = _bjorck_gram_backward(g, a0, ctx.state) / s
        return g, None, None, None, None


def bjorck_orthonormalize(
    w: torch.Tensor,
    iters: int = 20,
    order: int = 1,
    scale: str = "power",
    power_iters: int = 10,
    early_stop: bool = True,
) -> torch.Tensor:
    """Björck–Bowie orthonormalisation of a matrix ``(r, c)`` or a batch ``(B, r, c)``.

    A₀ = W / s (see :func:`bjorck_scale`; s is a constant for the gradient, as in
    LConvNet), then

    * order 1:  A ← A (3/2 I − 1/2 AᵀA),
    * order 2:  A ← A (15/8 I − 5/4 AᵀA + 3/8 (AᵀA)²),

    which converges to the (semi-)orthogonal polar factor W (WᵀW)^{-1/2} while every
    singular value of A₀ lies in (0, √3).  Wide matrices are transposed first, so the
    result has orthonormal columns when r ≥ c and orthonormal rows when r < c.

    ``early_stop``: with E = AᵀA − I and e = ‖E‖_∞ (≥ ‖E‖₂, E is symmetric), one more
    step leaves a residual ≈ ¾e² (order 1) or ≈ e³ (order 2) and moves A by ≈ e/2.
    Once e ≤ ε^{1/2} (order 1) or ε^{1/3} (order 2), ε the dtype's machine epsilon,
    that step is taken and the loop stops: the remaining iterations could only move A
    by O(ε).  It also stops when e has reached the rounding floor (stopped
    decreasing).  At most ``iters`` steps; the count is data-dependent but
    deterministic.  The gradient is the exact gradient of the steps performed
    (first-order only).

    Order 1 on a tall matrix (r ≥ 2c after the transpose) takes the same steps more
    cheaply: while far from orthogonal it iterates on the c×c Gram matrix (A_k = A₀P_k),
    then finishes with at least the last three steps of the budget on A itself, which
    corrects the rounding of the Gram phase (the c = 512, r = 4096 case: 1.6–1.7× faster
    forward + backward).
    """
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"bjorck order must be 1 or 2, got {order!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"bjorck iters must be an integer >= 0, got {iters!r}")
    if scale not in ("power", "frobenius", "sqrt"):
        raise ValueError(f"bjorck scale must be 'power', 'frobenius' or 'sqrt', got {scale!r}")
    if not isinstance(w, torch.Tensor) or w.dim() not in (2, 3):
        raise ValueError(f"bjorck_orthonormalize expects a matrix or a batch of matrices, got {getattr(w, 'shape', w)}")
    squeeze = w.dim() == 2
    if squeeze:
        w = w.unsqueeze(0)
    wide = w.shape[-2] < w.shape[-1]
    a = w.mT if wide else w
    if order == 1 and a.shape[-2] >= _GRAM_RATIO * a.shape[-1]:
        out = _BjorckGramFn.apply(a.contiguous(), iters, scale, power_iters, early_stop)
    else:
        out = _BjorckFn.apply(a.contiguous(), iters, order, scale, power_iters, early_stop)
    if wide:
        out = out.mT
    return out.squeeze(0) if squeeze else out
