"""Skew Orthogonal Convolution (Singla & Feizi, ICML 2021; fast backward from NeurIPS 2022).

See soc.md Parts A, C3 and F and certification.md §3.2(b),(e).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.fft import as_size, circular_conv_norm
from ..ops.freq_major import (
    add_dc_bias,
    hermitian_symmetrize,
    irfft2_freq_major,
    kernel_spectrum_rows,
    memo_tap_phases,
    rfft2_freq_major,
)
from ..ops.linalg import round_up, spectral_norm
from ..ops.taylor import (
    conv_exp,
    fantastic_four_bound,
    fantastic_four_fold,
    fantastic_four_reshapes,
    skew_filter,
    taylor_remainder_bound,
)
from .base import LipschitzModule, check_input, check_positive_int

__all__ = ["SOCConv2d"]


def _odd_kernel_size(kernel_size) -> int:
    k = kernel_size
    if isinstance(k, (tuple, list)):
        if len(k) != 2 or k[0] != k[1]:
            raise ValueError(f"SOCConv2d needs a square kernel (an int or (k, k)), got kernel_size={kernel_size!r}")
        k = k[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(
            f"SOCConv2d needs an odd kernel_size >= 1 (the skew construction needs a centred "
            f"'same' padding), got kernel_size={kernel_size!r}"
        )
    return k


def _stride(stride) -> int:
    s = stride
    if isinstance(s, (tuple, list)):
        if len(s) != 2 or s[0] != s[1]:
            raise ValueError(f"SOCConv2d stride must be 1 or 2 (or (s, s)), got stride={stride!r}")
        s = s[0]
    if isinstance(s, bool) or s not in (1, 2):
        raise ValueError(f"SOCConv2d supports stride 1 or 2 only (stride 2 by pixel-unshuffle), got stride={stride!r}")
    return int(s)


def _normalize_or_keep(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new/‖new‖, or ``old`` when new is zero (no host synchronisation).

    Keeping the old vector matters when the filter is exactly zero (e.g. a symmetric M):
    the vectors must not collapse to zero and stay there once the filter moves.
    """
    norm = new.norm()
    return torch.where(norm > 0, new / norm.clamp_min(torch.finfo(new.dtype).tiny), old)


class SOCConv2d(LipschitzModule):
    r"""Skew Orthogonal Convolution: y = S_K(A)·x̃ (+ bias), with A skew-symmetric.

    **Construction** (soc.md Part A).  A free filter M ∈ R^{c×c×k×k} (k odd,
    c = max(c_out, s²·c_in), s the stride) gives the skew filter L = (M − M^⊤)/2, where
    M^⊤[i,j,a,b] = M[j,i,k−1−a,k−1−b].  The zero-padded "same" stride-1 convolution
    A: z ↦ conv(z, L) then satisfies Aᵀ = −A exactly (bit for bit in floating point), so
    exp(A) is orthogonal.  L is rescaled to L_n = c_corr·L/σ̂ with the Fantastic-Four
    estimate σ̂ = minᵢ |uᵢᵀRᵢvᵢ| of the four reshapes Rᵢ of L, uᵢ, vᵢ persistent
    power-iteration buffers (``power_iters_init`` iterations at construction, one per
    training forward with grad enabled, none in eval or under ``no_grad``; call
    :meth:`update_normalizer` for the periodic 50 iterations of the reference code).
    ``correction=None`` means c_corr = 0.7 for k > 1 and 1.0 for k = 1 (the ICML/ICLR
    code; the NeurIPS code uses 1.0).  As in the reference code the division is by
    min σᵢ, not √(k²)·min σᵢ, so even with exact σ's only ‖A‖ ≤ k·c_corr is implied
    (2.1 for k = 3), and σ̂ may under-estimate; this is why the bound below measures
    L_n itself.  A symmetric M (L = 0) gives L_n = 0, the identity map; the scale-free
    parametrisation is singular there (as in the reference), but the power-iteration
    vectors never collapse to zero.

    **Forward.**  x̃ = pixel-unshuffle(x) for stride 2 (s²·c_in channels at half the
    size), zero-padded in channels up to c when c > s²·c_in; then the truncated
    exponential S_K(A)x̃ = Σ_{j<K} A^j x̃/j! by Horner (z ← x̃ + A z/i, i = K−1…1, one
    convolution per term), K = ``train_terms`` in training mode and ``eval_terms`` in
    eval mode; the first c_out channels are kept; the bias is added last.

    **Lipschitz guarantee.**  ‖exp(A) − S_K(A)‖₂ ≤ ‖A‖^K/K! for skew A, hence
    ‖S_K(A)‖₂ ≤ 1 + ρ^K/K! and σ_min(S_K(A)) ≥ 1 − ρ^K/K! for any ρ ≥ ‖A‖₂.  Unshuffle,
    channel padding and truncation have norm 1.  :meth:`lipschitz_bound` returns
    1 + ρ^K/K! with K = ``eval_terms`` and ρ a *guaranteed* bound on ‖A‖₂ for the cached
    eval filter L_n, computed in fp64: the minimum of √(k²)·minᵢ‖Rᵢ(L_n)‖₂ (exact SVDs)
    and, when the input size is known, the circular-embedding bound (exact per-frequency
    SVD on an (n+k−1)² canvas, n the size after the unshuffle).  The power-iteration
    estimate σ̂ enters only the parametrisation, never the bound.  With c_out = s²·c_in
    the eval map is orthogonal up to ρ^K/K!; with c_out > s²·c_in an isometry (JᵀJ ≈ I);
    with c_out < s²·c_in a co-isometry (JJᵀ ≈ I, gradient-norm preserving).

    **Circular padding** (``padding_mode="circular"``, an extension: the papers pad with
    zeros).  The circular convolution with a skew filter is skew too, so S_K(A) is again
    orthogonal up to ρ^K/K!, at every input size.  A circular convolution is one c×c
    matrix Â[f] per frequency, so the layer evaluates the exponential there: the
    operator is S_K(Â[f]) (K − 1 batched c×c complex products, independent of the batch
    size), applied as one rfft2, one batched GEMM and one irfft2 (≈ 4× fewer
    multiply-adds per Horner term than a direct 3×3 convolution, and one product instead
    of K − 1 sequential convolutions per batch); a training batch of at most half the
    channel count instead accumulates the K terms on its spectrum (cheaper then).
    Gradients are exact (autograd through the matrix polynomial or the terms).  The eval matrices are computed in complex128, rounded to
    the layer's precision, made exactly Hermitian-consistent and cached per input size,
    and :meth:`lipschitz_bound` is the exact norm of exactly those matrices,
    max_f σ_max(S[f]) by fp64 SVD (no Taylor tail needed); without an input size it
    falls back to 1 + ρ^K/K! with the size-free Fantastic-Four ρ.  ``fast_backward``
    does not apply (it is rejected at construction and ignored if set later).  With a
    1×1 kernel both paddings are the same map and the direct path is used.  Unlike the
    zero-padded default it has no double backward (the FFT adjoints are first order)
    and needs float32 or float64 (no reduced-precision FFTs on CPU).  Memory: the
    operator holds H·(W//2+1)·s²c_in·c_out complex numbers (4.7 MB for 64 channels at
    16×16 in float32), and training keeps K − 1 such tensors for the backward.

    **Backward.**  By default plain autograd through the K−1 Horner convolutions (exact;
    channels-last tensors on CPU, where oneDNN is fastest; double backward works).  The
    attribute ``custom_backward = True`` switches to an exact custom backward
    (:func:`liptorch.ops.taylor.conv_exp` with ``backward="exact"``): the same gradient,
    no double backward, and no measurable speed difference on CPU (both cost K−1 forward,
    K−1 input-gradient and K−1 weight-gradient convolutions).  ``fast_backward=True`` uses
    soc.md §C3: exact input gradient S_K(−A)g, filter gradient approximated by one
    weight-gradient convolution of φ(−A)g with φ(A)x̃ (K−2 fewer convolutions and only
    one saved state; it changes only the training gradient, never the forward map or
    the bound; no double backward).

    Args:
        in_channels, out_channels: channel counts (c_in, c_out).
        kernel_size: odd k (int or (k, k)); even sizes raise ``ValueError``.
        stride: 1 or 2.
        bias: learnable bias of size c_out, added after the exponential.
        train_terms, eval_terms: K in training / eval mode (≥ 2; defaults 6 and 15 as in
            the NeurIPS 2022 code).
        correction: c_corr > 0 (see above).
        power_iters_init: power iterations at construction (≥ 1).
        fast_backward: use the approximate fast filter gradient (off by default).
        padding_mode: ``"zeros"`` (the papers' layer, default) or ``"circular"`` (see above).
    """

    guarantee = "bounded"
    _derived_state = ("_phase_memo", "_freq_memo")
    #: Exact gradient through a custom autograd Function (True) or plain autograd (False,
    #: the default, which also allows double backward).  Ignored when fast_backward is set.
    custom_backward: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        bias: bool = True,
        train_terms: int = 6,
        eval_terms: int = 15,
        correction: float | None = None,
        power_iters_init: int = 50,
        fast_backward: bool = False,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = _odd_kernel_size(kernel_size)
        self.stride = _stride(stride)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        self.train_terms = check_positive_int("train_terms", train_terms, 2)
        self.eval_terms = check_positive_int("eval_terms", eval_terms, 2)
        if correction is None:
            correction = 0.7 if self.kernel_size > 1 else 1.0
        if isinstance(correction, bool) or not isinstance(correction, (int, float)) or not (
            math.isfinite(correction) and correction > 0
        ):
            raise ValueError(f"correction must be a finite number > 0 (or None), got {correction!r}")
        self.correction = float(correction)
        self.power_iters_init = check_positive_int("power_iters_init", power_iters_init, 1)
        if not isinstance(fast_backward, bool):
            raise ValueError(f"fast_backward must be True or False, got {fast_backward!r}")
        self.fast_backward = fast_backward
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        if padding_mode == "circular" and fast_backward:
            raise ValueError(
                "fast_backward approximates the filter gradient of the zero-padded convolution chain; "
                "padding_mode='circular' computes exact gradients in the frequency domain, so use one or the other"
            )
        self.padding_mode = padding_mode

        s2 = self.stride * self.stride
        self.in_channels_eff = s2 * self.in_channels
        self.channels = max(self.out_channels, self.in_channels_eff)
        c, k = self.channels, self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(c, c, k, k, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        shapes = [(c * k, c * k), (c * k, c * k), (c, c * k * k), (c * k * k, c)]
        for i, (rows, cols) in enumerate(shapes):
            self.register_buffer(f"ff_u{i}", torch.empty(rows, **factory))
            self.register_buffer(f"ff_v{i}", torch.empty(cols, **factory))
        self.reset_parameters()

    # -- initialisation ------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """M ~ N(0, 1/c); bias ~ U(±1/√c_out); power-iteration vectors re-initialised and
        iterated ``power_iters_init`` times (soc.md §A7)."""
        with torch.no_grad():
            nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.channels))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.out_channels)
                nn.init.uniform_(self.bias, -bound, bound)
            for i in range(4):
                for name in (f"ff_u{i}", f"ff_v{i}"):
                    buf = getattr(self, name)
                    buf.normal_()
                    buf.div_(buf.norm().clamp_min(1e-12))
        self.update_normalizer(self.power_iters_init)

    def update_normalizer(self, iters: int = 50) -> None:
        """Run ``iters`` power iterations on the four reshapes of the current skew filter
        (no grad), updating the uᵢ, vᵢ buffers (this invalidates the eval cache)."""
        check_positive_int("iters", iters, 1)
        with torch.no_grad():
            self._power_iterate(fantastic_four_reshapes(skew_filter(self.weight)), iters)

    def _power_iterate(self, mats: list[torch.Tensor], iters: int) -> None:
        with torch.no_grad():
            for i, r in enumerate(mats):
                u_buf, v_buf = getattr(self, f"ff_u{i}"), getattr(self, f"ff_v{i}")
                u, v = u_buf, v_buf
                for _ in range(iters):
                    v = _normalize_or_keep(r.mT @ u, v)
                    u = _normalize_or_keep(r @ v, u)
                u_buf.copy_(u)
                v_buf.copy_(v)

    # -- operator --------------------------------------------------------------------------
    def _extra_cache_key(self) -> tuple:
        return (self.correction, self.eval_terms, self.padding_mode)

    def compute_operator(self) -> torch.Tensor:
        """The normalised skew filter L_n = c_corr·L/σ̂ (differentiable in M).

        σ̂ = minᵢ |uᵢᵀRᵢ(L)vᵢ|, differentiable in L, not in uᵢ, vᵢ.  It is evaluated as
        ⟨L, Tᵢ*⟩ with Tᵢ* the folded outer product of the minimising pair, so autograd
        records two small ops.  In training mode with grad enabled, one power iteration
        first updates the buffers; otherwise (eval, ``no_grad``) they are only read.
        """
        update = self.training and torch.is_grad_enabled()
        filt = skew_filter(self.weight)
        with torch.no_grad():
            mats = fantastic_four_reshapes(filt.detach())
            if update:
                self._power_iterate(mats, 1)
            folds, sigmas = [], []
            for i, r in enumerate(mats):
                u, v = getattr(self, f"ff_u{i}"), getattr(self, f"ff_v{i}")
                sigmas.append(u @ (r @ v))
                folds.append(fantastic_four_fold(i, u, v, filt.shape))
            sigmas = torch.stack(sigmas)
            best = sigmas.abs().argmin()
            # |σ| = sign(σ)·⟨L, T⟩: fold the sign into T (no host synchronisation).
            t_best = torch.stack(folds).index_select(0, best.reshape(1))[0] * torch.sign(sigmas[best])
        sigma = (filt * t_best).sum().clamp_min(torch.finfo(filt.dtype).tiny)
        return filt * (self.correction / sigma)

    def normalizer_estimate(self) -> float:
        """σ̂ = minᵢ |uᵢᵀRᵢ(L)vᵢ| from the current buffers (a power-iteration *estimate*
        used for scaling only; diagnostics, never a bound)."""
        with torch.no_grad():
            filt = skew_filter(self.weight)
            vals = [
                float((getattr(self, f"ff_u{i}") @ (r @ getattr(self, f"ff_v{i}"))).abs())
                for i, r in enumerate(fantastic_four_reshapes(filt))
            ]
        return min(vals)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pixel_unshuffle(x, 2)
        if self.channels > x.shape[1]:
            x = F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))
        return x

    def _backward_mode(self) -> str:
        if self.fast_backward:
            return "fast"
        return "exact" if self.custom_backward else "autograd"

    def apply_operator(self, x: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        terms = self.train_terms if self.training else self.eval_terms
        if self._spectral:
            return self._apply_circular(x, op, terms)
        fuse_bias = self.out_channels == self.channels  # no truncation: bias rides on the last conv
        y = conv_exp(self._prepare(x), op, terms, self._backward_mode(), self.bias if fuse_bias else None)
        if self.out_channels < self.channels:
            y = y[:, : self.out_channels]
        if self.bias is not None and not fuse_bias:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    # -- circular padding: the exponential frequency by frequency -------------------------
    @property
    def _spectral(self) -> bool:
        # 1×1 kernels: both paddings give the same map, and K − 1 pointwise products on
        # the batch are cheaper than FFTs, so they keep the direct path.
        return self.padding_mode == "circular" and self.kernel_size > 1

    def _filter_spectrum(self, op: torch.Tensor, size: tuple[int, int], cdtype: torch.dtype) -> torch.Tensor:
        """Row-form per-frequency matrices of the filter: a[f][i, o] = Â[f][o, i] (F, c, c)."""
        k = self.kernel_size
        ph = memo_tap_phases(self.__dict__.setdefault("_phase_memo", {}), (k, k), size, None, op.device, cdtype)
        return kernel_spectrum_rows(op.to(cdtype), ph)

    def frequency_operator(self, op: torch.Tensor, size, terms: int, precise: bool = True) -> torch.Tensor:
        """S_K(Â[f]) for ``padding_mode="circular"`` at ``size`` (after the unshuffle), in
        row form (ŷ[f]ᵀ = x̂[f]ᵀ·S[f]) and restricted to the used block: shape
        (H·(W//2+1), s²·c_in, c_out), complex.  Horner on the per-frequency matrices of
        the filter ``op``: K − 1 batched products.  ``precise``: computed in complex128,
        rounded to the layer's precision and made exactly Hermitian-consistent (the
        eval operator); otherwise in the layer's precision, differentiably."""
        h, w = as_size(size)
        out_dtype = torch.complex128 if op.dtype == torch.float64 else torch.complex64
        cd = torch.complex128 if precise else out_dtype
        c = self.channels
        cin, cout = self.in_channels_eff, self.out_channels
        a = self._filter_spectrum(op, (h, w), cd)
        eye = torch.eye(c, dtype=cd, device=op.device)
        t = None  # Horner: T_i = I + a·T_{i+1}/i, T_K = I, S = T_1
        for i in range(terms - 1, 1, -1):
            t = eye + a / i if t is None else torch.baddbmm(eye, a, t, alpha=1.0 / i)
        head = a[:, :cin, :cout] if t is None else a[:, :cin] @ t[..., :cout]
        s = eye[:cin, :cout] + head
        if precise:
            s = hermitian_symmetrize(s.to(out_dtype).contiguous(), (h, w))
        return s

    def _circular_operator(self, op: torch.Tensor, size: tuple[int, int], terms: int) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return self.frequency_operator(op, size, terms, precise=False)
        # Without a graph: the precise matrices, cached for the cached filter (identity
        # check, so a new filter after a parameter change is never served stale).
        memo = self.__dict__.get("_freq_memo")
        if memo is not None and memo[0] is op and memo[1] == (size, terms):
            return memo[2]
        with torch.inference_mode(False):  # a normal tensor, reusable by passes that record a graph
            s = self.frequency_operator(op, size, terms, precise=True)
        self.__dict__["_freq_memo"] = (op, (size, terms), s)
        return s

    def _batch_terms(self, op: torch.Tensor, xh: torch.Tensor, size, terms: int) -> torch.Tensor:
        """ŷ = Σ_{j<K} x̂·a^j/j! accumulated on the batch spectrum (row form), for training
        steps where the batch is small against the channels: K − 1 products of (F, N, c)
        by (F, c, c) instead of K − 1 products of (F, c, c) matrices."""
        c, cout = self.channels, self.out_channels
        a = self._filter_spectrum(op, size, xh.dtype)
        xc = xh if xh.shape[-1] == c else F.pad(xh, (0, c - xh.shape[-1]))
        out = xc[..., :cout]
        u = xc
        for j in range(1, terms):
            u = u @ (a if j < terms - 1 else a[..., :cout]) / j
            out = out + (u if j == terms - 1 else u[..., :cout])
        return out

    def _apply_circular(self, x: torch.Tensor, op: torch.Tensor, terms: int) -> torch.Tensor:
        if self.stride == 2:
            x = F.pixel_unshuffle(x, 2)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if x.shape[0] == 0:
            return x.new_zeros((0, self.out_channels) + size)
        xh = rfft2_freq_major(x)  # (F, N, s²c_in); the channel padding is never materialised
        n, c = xh.shape[1], self.channels
        # Training with a batch at most half the channel count: the terms on the batch
        # spectrum ((K−1)·N·c² multiply-adds per frequency, forward) beat the polynomial on
        # c×c matrices ((K−1)·c³ + N·c²); measured 167 vs 241 ms at 256 channels, 4×4,
        # batch 128, while at N = c the matrix route's square GEMMs win (93 vs 100 ms).
        if self.training and torch.is_grad_enabled() and terms > 2 and 2 * n <= c:
            yh = self._batch_terms(op, xh, size, terms)
        else:
            yh = torch.bmm(xh, self._circular_operator(op, size, terms))  # (F, N, c_out)
        return irfft2_freq_major(add_dc_bias(yh, self.bias, size), size).contiguous()

    def check_input(self, x: torch.Tensor) -> None:
        check_input(self, x, 4, self.in_channels)
        if x.dtype != self.weight.dtype:
            raise ValueError(
                f"SOCConv2d has {self.weight.dtype} parameters but got a {x.dtype} input; "
                f"convert one of them (e.g. layer.to({x.dtype}))"
            )
        if x.device != self.weight.device:
            raise ValueError(f"SOCConv2d parameters are on {self.weight.device} but the input is on {x.device}")
        h, w = x.shape[-2:]
        if h < 1 or w < 1:
            raise ValueError(f"SOCConv2d expects a non-empty spatial size, got {h}x{w}")
        if self.stride == 2 and (h % 2 or w % 2):
            raise ValueError(f"SOCConv2d with stride 2 (pixel-unshuffle) needs even H and W, got {h}x{w}")
        if self._spectral and x.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"SOCConv2d with padding_mode='circular' needs float32 or float64 (torch.fft has no {x.dtype} CPU "
                "kernels); use padding_mode='zeros' for reduced precision"
            )

    # -- bounds ------------------------------------------------------------------------------
    def _inner_size(self, input_size) -> tuple[int, int] | None:
        """Spatial size after the unshuffle for a layer input of size ``input_size``."""
        if input_size is None:
            return None
        h, w = as_size(input_size)
        if self.stride == 2:
            if h % 2 or w % 2:
                raise ValueError(f"SOCConv2d with stride 2 needs an even input size, got {h}x{w}")
            h, w = h // 2, w // 2
        return h, w

    def _rho(self, op: torch.Tensor, input_size) -> float:
        filt = op.detach().to(torch.float64)
        rho = fantastic_four_bound(filt)
        size = self._inner_size(input_size)
        k = self.kernel_size
        if size is not None and self._spectral:
            return min(rho, circular_conv_norm(filt, size))
        if size is not None and k > 1:
            # Zero-padded conv on n×n ≤ circular conv on a canvas N ≥ n + k − 1 (no wrap).
            rho = min(rho, circular_conv_norm(filt, (size[0] + k - 1, size[1] + k - 1)))
        return rho

    def spectral_bound_A(self, input_size=None) -> float:
        """ρ: a guaranteed upper bound on ‖A‖₂ for the cached eval filter L_n (fp64).

        ``input_size`` is the spatial size of this layer's input (before the unshuffle);
        defaults to the last size seen; without one only the size-free Fantastic-Four
        bound is used.
        """
        if input_size is None:
            input_size = self.default_input_size()
        return self._rho(self.cached_operator(), input_size)

    def compute_lipschitz_bound(self, op: torch.Tensor, input_size) -> float:
        size = self._inner_size(input_size)
        if self._spectral and size is not None:
            # the exact norm of the eval matrices themselves (Hermitian-consistent, so the
            # real map is exactly their circulant operator)
            return spectral_norm(self.frequency_operator(op.detach(), size, self.eval_terms, precise=True))
        rho = self._rho(op, input_size)
        return round_up(1.0 + taylor_remainder_bound(rho, self.eval_terms))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"bias={self.bias is not None}, train_terms={self.train_terms}, eval_terms={self.eval_terms}, "
            f"correction={self.correction}, fast_backward={self.fast_backward}"
            + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else "")
        )
