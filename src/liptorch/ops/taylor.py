"""Truncated exponential of a skew-symmetric convolution (SOC, Singla & Feizi 2021).

Pure functions of tensors, no module state:

* :func:`filter_transpose` and :func:`skew_filter`: the filter M^⊤ whose zero-padded
  ("same", odd k, stride 1) convolution is the exact transpose of the convolution with M,
  and the skew filter L = (M − M^⊤)/2 (soc.md §A2);
* :func:`fantastic_four_reshapes` and :func:`fantastic_four_bound`: the four reshapes
  R₁…R₄ of a filter and the guaranteed bound √(hw)·minᵢ‖Rᵢ‖₂ from exact fp64 SVDs
  (soc.md §A3, certification.md §3.2b);
* :func:`taylor_remainder_bound`: ρ^K/K!, rounded up (soc.md §A5);
* :func:`conv_exp`: y = S_K(A)x = Σ_{j<K} A^j x / j! with A = "convolve with L, zero
  same padding", by Horner's rule, with a choice of backward pass:

  - ``"exact"``: a custom :class:`torch.autograd.Function` whose backward is the exact
    gradient (input gradient S_K(−A)g, filter gradient Σ_i (1/i)·wgrad(s_i, ḡ_{i−1})
    over the saved Horner states), i.e. what autograd computes (measured within a few
    per cent of plain autograd's speed on CPU: both cost 3(K−1) convolutions);
  - ``"fast"``: soc.md §C3.  Only the filter and the last Horner state z = φ(A)x are
    saved; the input gradient is exact (S_K(Aᵀ)g = S_K(−A)g by Horner with the
    transposed convolution) and the filter gradient is the single weight-gradient
    convolution of φ(Aᵀ)g = φ(−A)g with z, an approximation that agrees with the exact
    gradient to first order in A;
  - ``"autograd"``: plain autograd through ``F.conv2d`` (supports double backward).

The conv in the exact/fast backward uses ``torch.ops.aten.convolution_backward``, the
public generic convolution-backward operator (the same kernel autograd calls).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .linalg import round_up, spectral_norm

__all__ = [
    "filter_transpose",
    "skew_filter",
    "fantastic_four_reshapes",
    "fantastic_four_fold",
    "fantastic_four_bound",
    "taylor_remainder_bound",
    "conv_exp",
    "CONV_EXP_BACKWARDS",
]

CONV_EXP_BACKWARDS = ("exact", "fast", "autograd")


def filter_transpose(m: torch.Tensor) -> torch.Tensor:
    """M^⊤[i, j, a, b] = M[j, i, k−1−a, k−1−b] (channel swap + spatial flip).

    For odd k and zero "same" padding (or circular padding), stride 1, the Jacobian of
    "convolve with M^⊤" is the transpose of the Jacobian of "convolve with M".
    """
    if m.dim() != 4 or m.shape[0] != m.shape[1]:
        raise ValueError(f"filter_transpose expects a (c, c, kh, kw) filter, got shape {tuple(m.shape)}")
    return m.transpose(0, 1).flip(2, 3)


def skew_filter(m: torch.Tensor) -> torch.Tensor:
    """L = (M − M^⊤)/2: its zero-padded same convolution A satisfies Aᵀ = −A exactly.

    In floating point the pair L[i,j,a,b], L[j,i,k−1−a,k−1−b] are (p − q)/2 and
    (q − p)/2, exact negatives of each other, so A is skew bit for bit.
    """
    return 0.5 * (m - filter_transpose(m))


def fantastic_four_reshapes(kernel: torch.Tensor) -> list[torch.Tensor]:
    """The four matrix reshapes of a (co, ci, h, w) filter used by the Fantastic-Four bound.

    R₁: (co·h) × (ci·w), R₂: (co·w) × (ci·h), R₃: co × (ci·h·w), R₄: (co·h·w) × ci.
    Differentiable views/copies of ``kernel``.
    """
    if kernel.dim() != 4:
        raise ValueError(f"fantastic_four_reshapes expects a 4-D filter, got shape {tuple(kernel.shape)}")
    co, ci, h, w = kernel.shape
    return [
        kernel.permute(0, 2, 1, 3).reshape(co * h, ci * w),
        kernel.permute(0, 3, 1, 2).reshape(co * w, ci * h),
        kernel.reshape(co, ci * h * w),
        kernel.permute(0, 2, 3, 1).reshape(co * h * w, ci),
    ]


def fantastic_four_fold(index: int, u: torch.Tensor, v: torch.Tensor, shape) -> torch.Tensor:
    """The filter T with ⟨T, K⟩ = uᵀ R_index(K) v for every filter K of ``shape``.

    That is the outer product u vᵀ folded back from the layout of reshape R_index
    (0-based, in the order of :func:`fantastic_four_reshapes`) to (co, ci, h, w); it is
    the gradient of the estimate uᵀRv with respect to the filter.
    """
    co, ci, h, w = shape
    outer = torch.outer(u, v)
    if index == 0:
        return outer.reshape(co, h, ci, w).permute(0, 2, 1, 3)
    if index == 1:
        return outer.reshape(co, w, ci, h).permute(0, 2, 3, 1)
    if index == 2:
        return outer.reshape(co, ci, h, w)
    if index == 3:
        return outer.reshape(co, h, w, ci).permute(0, 3, 1, 2)
    raise ValueError(f"index must be 0, 1, 2 or 3, got {index!r}")


def fantastic_four_bound(kernel: torch.Tensor) -> float:
    """Guaranteed bound ‖J‖₂ ≤ √(hw)·minᵢ‖Rᵢ‖₂ on the zero-padded (or circular) stride-1
    convolution with ``kernel`` at every input size, from exact fp64 SVDs (rounded up)."""
    k64 = kernel.detach().to(torch.float64)
    h, w = k64.shape[-2:]
    best = min(spectral_norm(r) for r in fantastic_four_reshapes(k64))
    return round_up(math.sqrt(h * w) * best)


def taylor_remainder_bound(rho: float, terms: int) -> float:
    """Upper bound on ρ^K/K! (K = ``terms``) computed in fp64 and rounded up.

    For skew-symmetric A with ‖A‖₂ ≤ ρ: ‖exp(A) − S_K(A)‖₂ ≤ ρ^K/K!, hence
    ‖S_K(A)‖₂ ≤ 1 + ρ^K/K! (soc.md §A5).
    """
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 0:
        raise ValueError(f"terms must be an integer >= 0, got {terms!r}")
    rho = float(rho)
    if not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    value = 1.0
    for j in range(1, terms + 1):
        value = value * rho / j
    if value == 0.0:
        return 0.0  # only when ρ = 0 (or underflow far below any meaningful slack)
    # 2K roundings of relative size ≤ 2⁻⁵³ each: a relative margin of 1e-9 covers them.
    return round_up(value * (1.0 + 1e-9))


# ----------------------------------------------------------------------------------------
# The truncated exponential S_K(A)x
# ----------------------------------------------------------------------------------------

_conv_bwd = torch.ops.aten.convolution_backward.default


def _backward_conv(grad, inp, weight, pad: int, need_input: bool, need_weight: bool):
    """(Aᵀ grad, wgrad) for y = A inp = conv2d(inp, weight, zero same padding, stride 1)."""
    gi, gw, _ = _conv_bwd(
        grad, inp, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
        [need_input, need_weight, False],
    )
    return gi, gw


def _scaled_filters(filt: torch.Tensor, terms: int) -> torch.Tensor:
    """Stack of L/i for i = 1, …, K−1 (one op; entry i−1 is used by Horner step i)."""
    scales = torch.tensor([1.0 / i for i in range(1, terms)], dtype=filt.dtype, device=filt.device)
    return filt.unsqueeze(0) * scales.view(-1, 1, 1, 1, 1)


def _horner(x: torch.Tensor, filts: torch.Tensor, pad: int, keep: str | None = None, bias=None):
    """S_K(A)x (+ bias) by Horner: z ← x + conv(z, L/i) for i = K−1, …, 1 (no autograd).

    ``filts`` is :func:`_scaled_filters`; the bias rides on the last convolution.
    ``keep="all"`` also returns the conv inputs [s_{K−1} = x, …, s_1]; ``keep="last"``
    returns [s_1] = [φ(A)x].
    """
    z = x
    states = []
    for i in range(filts.shape[0], 0, -1):
        if keep == "all" or (keep == "last" and i == 1):
            states.append(z)
        y = F.conv2d(z, filts[i - 1], bias if i == 1 else None, padding=pad)
        y.add_(x)
        z = y
    return z, states


def _horner_transpose(g: torch.Tensor, filts: torch.Tensor, pad: int, stop: int = 1):
    """S_K(Aᵀ)g by Horner with the transposed convolution (for a skew filter S_K(−A)g).

    With ``stop=2`` the last step is skipped and φ(Aᵀ)g is returned.
    """
    t = g
    for i in range(filts.shape[0], stop - 1, -1):
        y, _ = _backward_conv(t, t, filts[i - 1], pad, True, False)
        y.add_(g)
        t = y
    return t


class _ConvExp(torch.autograd.Function):
    """y = S_K(A)x with an exact or the fast (soc.md §C3) backward; see :func:`conv_exp`."""

    @staticmethod
    def forward(ctx, x, filt, bias, terms, fast):
        pad = (filt.shape[-1] - 1) // 2
        need_filter = ctx.needs_input_grad[1]
        keep = None if not need_filter else ("last" if fast else "all")
        filts = _scaled_filters(filt, terms)
        y, states = _horner(x, filts, pad, keep, bias)
        ctx.save_for_backward(*states)
        ctx.filts = filts  # an intermediate (L/i), not an input: kept on ctx
        ctx.terms, ctx.fast, ctx.pad = terms, fast, pad
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.fmt = torch.channels_last if channels_last else torch.contiguous_format
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        states = ctx.saved_tensors
        filts, terms, pad = ctx.filts, ctx.terms, ctx.pad
        need_x, need_filter, need_bias = ctx.needs_input_grad[:3]
        g = grad.contiguous(memory_format=ctx.fmt)
        gbias = g.sum(dim=(0, 2, 3)) if need_bias else None
        if not need_filter:
            gx = _horner_transpose(g, filts, pad) if need_x else None
            return gx, None, gbias, None, None
        gx = gf = None
        if ctx.fast:
            # soc.md §C3: t = φ(Aᵀ)g; ∂L ≈ wgrad(φ(A)x, φ(Aᵀ)g); ∂x = g + Aᵀt (exact).
            (s1,) = states
            t = _horner_transpose(g, filts, pad, stop=2)
            gi, gf = _backward_conv(t, s1, filts[0], pad, need_x, True)
            if need_x:
                gx = gi.add_(g)
            return gx, gf, gbias, None, None
        # Exact: s_{i−1} = x + (1/i)·A s_i; adjoints ḡ_i = (1/i)·Aᵀ ḡ_{i−1}, ḡ_0 = g;
        # ∂L = Σ_i (1/i)·wgrad(s_i, ḡ_{i−1}); ∂x = Σ_i ḡ_i (x enters every state).
        gb = g
        for i in range(1, terms):
            s_i = states[terms - 1 - i]
            need_next = need_x or i < terms - 1
            gi, gw_i = _backward_conv(gb, s_i, filts[i - 1], pad, need_next, True)
            gf = gw_i if gf is None else gf.add_(gw_i, alpha=1.0 / i)
            if need_next:
                gb = gi
                if need_x:
                    gx = g + gb if gx is None else gx.add_(gb)
        return gx, gf, gbias, None, None


def _compute_format(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on CPU for float32/bfloat16 (oneDNN's fastest layout for these
    convs); otherwise the input as it is, made dense."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def conv_exp(
    x: torch.Tensor, filt: torch.Tensor, terms: int, backward: str = "exact", bias: torch.Tensor | None = None
) -> torch.Tensor:
    """S_K(A)x (+ bias) = Σ_{j=0}^{K−1} A^j x / j! with A x = conv2d(x, filt, zero same padding).

    Args:
        x: (N, c, H, W) input.
        filt: (c, c, k, k) filter, k odd (skew-symmetric for SOC, not required here).
        terms: K ≥ 1, the number of terms counting the identity.
        backward: ``"exact"`` (custom exact backward, default), ``"fast"`` (soc.md §C3:
            exact input gradient, single-convolution approximate filter gradient; the
            forward value is identical) or ``"autograd"`` (plain autograd).
        bias: optional (c,) bias added to the result (fused into the last convolution).

    The exact and fast backwards apply Aᵀ as the transposed convolution (for a skew
    filter Aᵀ = −A, so the input gradient is S_K(−A)g); they are valid for any filter.
    Neither supports double backward (use ``"autograd"`` for that).
    """
    if backward not in CONV_EXP_BACKWARDS:
        raise ValueError(f"backward must be one of {CONV_EXP_BACKWARDS}, got {backward!r}")
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise ValueError(f"terms must be an integer >= 1, got {terms!r}")
    if filt.dim() != 4 or filt.shape[0] != filt.shape[1] or filt.shape[2] != filt.shape[3] or filt.shape[2] % 2 == 0:
        raise ValueError(f"conv_exp expects a (c, c, k, k) filter with odd k, got shape {tuple(filt.shape)}")
    if x.dim() != 4 or x.shape[1] != filt.shape[1]:
        raise ValueError(
            f"conv_exp expects an input of shape (N, {filt.shape[1]}, H, W), got {tuple(x.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != filt.shape[0]):
        raise ValueError(f"conv_exp expects a bias of shape ({filt.shape[0]},), got {tuple(bias.shape)}")
    if terms == 1:
        return x if bias is None else x + bias.view(1, -1, 1, 1)
    pad = (filt.shape[-1] - 1) // 2
    x = _compute_format(x)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or filt.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        y, _ = _horner(x, _scaled_filters(filt, terms), pad, None, bias)
        return y
    if backward == "autograd":
        z = x
        for i in range(terms - 1, 0, -1):
            z = x + F.conv2d(z, filt if i == 1 else filt * (1.0 / i), bias if i == 1 else None, padding=pad)
        return z
    return _ConvExp.apply(x, filt, bias, terms, backward == "fast")
