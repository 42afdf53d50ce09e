"""Sandwich layers (Wang & Manchester, "Direct Parameterization of Lipschitz-Bounded Deep
Networks", ICML 2023) and the LBDN container.  Math: /spec/sandwich.md.

Every layer is a *direct* parameterisation: any value of the free parameters gives a
layer that is 1-Lipschitz in ℓ2 (times its fixed input ``scale``).  Nothing is
projected or iterated.  The layer map is

    h_out = √2 · Aᵀ Ψ · σ(√2 · Ψ⁻¹ B · (scale · h_in) + b),

with (A, B) the Cayley transform of the weight-normalised free block (see
:mod:`liptorch.ops.cayley`: A Aᵀ + B Bᵀ = I), Ψ = diag(exp(d)) and σ slope-restricted in
[0, 1].  The layers are contractions, NOT orthogonal, and their two factors
√2Ψ⁻¹B and √2AᵀΨ can each have norm far above 1: never bound a sandwich network by the
product of its factor norms.

Guarantee actually certified (certification.md §3.2(g)): ``lipschitz_bound()`` rebuilds
A and B in float64 from the *cached* operator used in eval mode (which stores the
folded products √2·scale·Ψ⁻¹B and √2AᵀΨ) and measures E = AAᵀ + BBᵀ − I; the bound is
scale·√(1 + 4‖E‖(1 + ‖E‖)) (for the convolution, ‖E‖ is the max over frequencies).  The
eval cache is built in float64/complex128 and only then cast, so in float32 the bound is
1 + O(1e-6).  Linear variants are bounded by the exact SVD of their cached operator.

Training notes.  The reference implementation reports vanishing gradients in deep
sandwich ConvNets (Prach et al., CVPR 2024: gradient norm ≈ 3e-7 at the first layer);
:func:`gradient_norms` gives the per-layer parameter-gradient norms to watch for it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cayley import cayley_residual_norm, cayley_rows, fold_sandwich_scales, sandwich_residual_bound
from ..ops.freq_major import (
    add_dc_bias,
    hermitian_symmetrize,
    irfft2_freq_major,
    kernel_spectrum_rows,
    rfft2_freq_major,
    tap_gram_weights,
    tap_phase_matrix,
)
from ..ops.linalg import round_up, spectral_norm
from .base import LipschitzModule, check_positive_int

__all__ = [
    "SandwichLinear",
    "SandwichOutput",
    "SandwichConv2d",
    "LBDN",
    "resolve_activation",
    "gradient_norms",
]

_SQRT2 = math.sqrt(2.0)
_PSI_CLIP = 20.0


# ----------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------
_NAMED = {"relu": 0.0, "tanh": None, "sigmoid": None, "leaky_relu": 0.01}


def resolve_activation(activation) -> tuple[str | None, float]:
    """Validate an activation for a sandwich layer; return (name, negative_slope).

    Accepted (element-wise and slope-restricted in [0, 1], sandwich.md §2.1):
    ``None`` / ``"identity"`` (the linear variant), ``"relu"``, ``"tanh"``, ``"sigmoid"``,
    ``"leaky_relu"`` (slope 0.01), ``("leaky_relu", slope)`` with 0 ≤ slope ≤ 1, and the
    module instances ``nn.ReLU()``, ``nn.Tanh()``, ``nn.Sigmoid()``, ``nn.LeakyReLU(s)``,
    ``nn.Identity()``.  Anything else (GELU, SiLU, MaxMin/GroupSort, slopes > 1, arbitrary
    callables) raises ValueError, since the Lipschitz proof would not hold.
    """
    if activation is None or isinstance(activation, nn.Identity):
        return None, 0.0
    slope: float | None = None
    if isinstance(activation, str):
        name = activation.strip().lower()
        if name in ("identity", "linear", "none"):
            return None, 0.0
        if name not in _NAMED:
            raise ValueError(
                "activation must be an element-wise activation with slopes in [0, 1]: "
                f"None, 'relu', 'tanh', 'sigmoid' or 'leaky_relu'; got {activation!r}"
            )
        return name, float(_NAMED[name] or 0.0)
    if isinstance(activation, tuple) and len(activation) == 2 and activation[0] == "leaky_relu":
        slope = activation[1]
    elif type(activation) is nn.LeakyReLU:
        slope = activation.negative_slope
    elif type(activation) is nn.ReLU:
        return "relu", 0.0
    elif type(activation) is nn.Tanh:
        return "tanh", 0.0
    elif type(activation) is nn.Sigmoid:
        return "sigmoid", 0.0
    else:
        raise ValueError(
            "activation must be an element-wise activation with slopes in [0, 1] (None, 'relu', "
            "'tanh', 'sigmoid', 'leaky_relu', ('leaky_relu', slope) or the matching nn module); "
            f"got {activation!r}"
        )
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not (0.0 <= float(slope) <= 1.0):
        raise ValueError(f"leaky_relu slope must be a number in [0, 1], got {slope!r}")
    return "leaky_relu", float(slope)


def _act(name: str, slope: float, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    return F.leaky_relu(x, slope)


def _act_module(name: str | None, slope: float) -> nn.Module | None:
    if name is None:
        return None
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}.get(name, lambda: nn.LeakyReLU(slope))()


def _act_repr(name: str | None, slope: float) -> str:
    if name == "leaky_relu":
        return f"('leaky_relu', {slope})"
    return repr(name)


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return scale


def _check_bias(bias) -> bool:
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be True or False, got {bias!r}")
    return bias


def _work_dtype(dtype: torch.dtype, precise: bool) -> torch.dtype:
    if precise:
        return torch.float64
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _check_features(module: nn.Module, x: torch.Tensor, features: int, dtype: torch.dtype) -> None:
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{name} expects input of shape (*, {features}), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} expects dtype {dtype} (its parameters' dtype), got {x.dtype}")


# ----------------------------------------------------------------------------------------
# dense layers
# ----------------------------------------------------------------------------------------
class _DenseOp(NamedTuple):
    """Row-form operators: y = σ(x·k1 + b)·k2 (k2 None: y = x·k1 + b)."""

    linear: bool
    k1: torch.Tensor  # (p, q): (√2·scale·Ψ⁻¹B)ᵀ, or (2·scale·AᵀB)ᵀ for the linear form
    k2: torch.Tensor | None  # (q, q): (√2·AᵀΨ)ᵀ = √2·Ψ·A
    bias: torch.Tensor | None
    psi: torch.Tensor | None  # Ψ diagonal in float64 (for the bound)


def _dense_free_block(weight: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """F̄ = α·F/‖F‖_F in ``dtype``."""
    w = weight.to(dtype)
    norm = torch.linalg.vector_norm(w).clamp_min(torch.finfo(dtype).tiny)
    return w * (alpha.to(dtype) / norm)


class _SandwichDenseBase(LipschitzModule):
    def _init_free(self, in_features: int, out_features: int, bias: bool) -> None:
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        _check_bias(bias)
        p, q = in_features, out_features
        bound = 1.0 / math.sqrt(p + q)
        self.weight = nn.Parameter(torch.empty(q, q + p).uniform_(-bound, bound))
        self.alpha = nn.Parameter(torch.linalg.vector_norm(self.weight.detach()).reshape(()))
        if bias:
            self.bias = nn.Parameter(torch.empty(q).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def cayley_factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the current free parameters, computed in ``dtype`` (differentiable)."""
        at, bht = cayley_rows(_dense_free_block(self.weight, self.alpha, dtype).mT, self.out_features)
        return at.mT, -2.0 * bht.mT


class SandwichLinear(_SandwichDenseBase):
    r"""Fully-connected sandwich layer (LBDN eq. 10), 1-Lipschitz times ``scale``.

    h_out = √2 · Aᵀ Ψ · σ(√2 · Ψ⁻¹ B · (scale · x) + b),

    A ∈ R^{q×q}, B ∈ R^{q×p} the Cayley transform of F̄ = α·F/‖F‖_F, F = ``weight``
    (q × (q+p), first q columns X-block, last p Y-block), Ψ = diag(exp(clip(d, ±20)))
    (``log_psi`` = d), b = ``bias`` (inside σ).  α (``alpha``) is one trainable gain,
    initialised to ‖F‖_F.  ``activation=None`` gives the linear form y = 2AᵀB·scale·x + b
    (any contraction, Proposition 3.3); it has no Ψ.

    Lipschitz guarantee: ‖f(x) − f(x')‖ ≤ scale·‖x − x'‖ for every parameter value; the
    certified ``lipschitz_bound()`` is scale·√(1 + 4‖E‖(1+‖E‖)) with E measured from the
    cached operator (nonlinear), or the exact SVD norm of the cached matrix (linear).

    Args mirror ``nn.Linear``: in_features (p), out_features (q), bias; then
    ``activation`` (see :func:`resolve_activation`) and ``scale`` > 0.
    Input (*, p), output (*, q).
    """

    guarantee = "contraction"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation="relu", scale: float = 1.0):
        super().__init__()
        self._init_free(in_features, out_features, bias)
        self.activation_name, self.negative_slope = resolve_activation(activation)
        self.scale = _check_scale(scale)
        if self.activation_name is not None:
            self.log_psi = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("log_psi", None)

    def _extra_cache_key(self) -> tuple:
        return (self.scale, self.activation_name, self.negative_slope)

    def compute_operator(self) -> _DenseOp:
        precise = not torch.is_grad_enabled()
        dtype = self.weight.dtype
        wd = _work_dtype(dtype, precise)
        # F̄ᵀ = [X; Y] (sandwich.md §2.2) → (Aᵀ, Bhᵀ), B = −2·Bh
        at, bht = cayley_rows(_dense_free_block(self.weight, self.alpha, wd).mT, self.out_features)
        bias = self.bias
        if self.activation_name is None:
            k1 = (-4.0 * self.scale) * (bht @ at.mT)  # (2·scale·AᵀB)ᵀ = −4·scale·Bhᵀ·A
            return _DenseOp(True, k1.to(dtype), None, bias, None)
        psi = torch.exp(self.log_psi.to(wd).clamp(-_PSI_CLIP, _PSI_CLIP))
        k1, k2 = fold_sandwich_scales(at, bht, psi, -2.0 * _SQRT2 * self.scale, _SQRT2)
        return _DenseOp(False, k1.to(dtype), k2.to(dtype), bias, psi.detach().to(torch.float64))

    def check_input(self, x: torch.Tensor) -> None:
        _check_features(self, x, self.in_features, self.weight.dtype)

    def apply_operator(self, x: torch.Tensor, op: _DenseOp) -> torch.Tensor:
        v = F.linear(x, op.k1.mT, op.bias)
        if op.linear:
            return v
        return F.linear(_act(self.activation_name, self.negative_slope, v), op.k2.mT)

    def compute_lipschitz_bound(self, op: _DenseOp, input_size) -> float:
        if op.linear:
            return spectral_norm(op.k1)
        psi = op.psi
        b = (op.k1.detach().to(torch.float64) * (psi / (_SQRT2 * self.scale))).mT  # B = (K1·Ψ/(√2·scale))ᵀ
        a = op.k2.detach().to(torch.float64) / (_SQRT2 * psi).unsqueeze(1)  # A = Ψ⁻¹K2/√2
        return round_up(self.scale * sandwich_residual_bound(cayley_residual_norm(a, b)))

    def export_parts(self, dtype: torch.dtype = torch.float64):
        """(W_pre, b, activation name, slope, W_post) of the current parameters in ``dtype``:
        the layer is x ↦ W_post σ(W_pre x + b) (W_post None for the linear form, where
        σ is the identity).  Used for the LBDN → plain-MLP export (sandwich.md §2.9)."""
        with torch.no_grad():
            a, b = self.cayley_factors(dtype)
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            if self.activation_name is None:
                return 2.0 * self.scale * (a.mT @ b), bias, None, 0.0, None
            psi = torch.exp(self.log_psi.detach().to(dtype).clamp(-_PSI_CLIP, _PSI_CLIP))
            w_pre = (_SQRT2 * self.scale) * b / psi.unsqueeze(1)
            w_post = _SQRT2 * a.mT * psi.unsqueeze(0)
            return w_pre, bias, self.activation_name, self.negative_slope, w_post

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation={_act_repr(self.activation_name, self.negative_slope)}, scale={self.scale}"
        )


class SandwichOutput(_SandwichDenseBase):
    r"""Affine B-only output layer of an LBDN (sandwich.md §2.8): y = scale · B x + b.

    B ∈ R^{q×p} is the B block of the Cayley transform of F̄ = α·F/‖F‖_F
    (F = ``weight``, q × (q+p)); A is discarded.  Since BBᵀ = I − AAᵀ ⪯ I, ‖B‖₂ ≤ 1.

    Lipschitz guarantee: scale·‖B‖₂ ≤ scale; ``lipschitz_bound()`` returns the exact
    scale·‖B‖₂ from an SVD (float64) of the cached matrix scale·B.
    """

    guarantee = "contraction"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0):
        super().__init__()
        self._init_free(in_features, out_features, bias)
        self.scale = _check_scale(scale)

    def _extra_cache_key(self) -> tuple:
        return (self.scale,)

    def compute_operator(self) -> _DenseOp:
        precise = not torch.is_grad_enabled()
        dtype = self.weight.dtype
        wd = _work_dtype(dtype, precise)
        _, bht = cayley_rows(_dense_free_block(self.weight, self.alpha, wd).mT, self.out_features)
        return _DenseOp(True, ((-2.0 * self.scale) * bht).to(dtype), None, self.bias, None)  # (scale·B)ᵀ

    def check_input(self, x: torch.Tensor) -> None:
        _check_features(self, x, self.in_features, self.weight.dtype)

    def apply_operator(self, x: torch.Tensor, op: _DenseOp) -> torch.Tensor:
        return F.linear(x, op.k1.mT, op.bias)

    def compute_lipschitz_bound(self, op: _DenseOp, input_size) -> float:
        return spectral_norm(op.k1)

    def export_parts(self, dtype: torch.dtype = torch.float64):
        """(scale·B, b, None, 0.0, None) in ``dtype`` (see :meth:`SandwichLinear.export_parts`)."""
        with torch.no_grad():
            _, b = self.cayley_factors(dtype)
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            return self.scale * b, bias, None, 0.0, None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale={self.scale}"
        )


# ----------------------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------------------
class _ConvOp(NamedTuple):
    pointwise: bool  # 1×1 kernel: real matrices applied per pixel, no FFT
    linear: bool
    k1: torch.Tensor  # fft: (F, p, q) complex, row form x̂ᵀ·k1; pointwise: (q, p) real
    k2: torch.Tensor | None  # fft: (F, q, q); pointwise: (q, q)
    bias: torch.Tensor | None
    psi: torch.Tensor | None  # float64


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


class SandwichConv2d(LipschitzModule):
    r"""Convolutional sandwich layer (LBDN §3, Algorithm 1) at a fixed spatial size.

    h_out = √2 · C_Aᵀ Ψ · σ(√2 · Ψ⁻¹ C_B · (scale · h) + b),

    with C_A, C_B circular convolutions whose per-frequency matrices (Ã[f], B̃[f]) are the
    complex Cayley transform of the weight-normalised spectrum of the free kernel
    P = ``weight`` ∈ R^{q×(q+p)×k×k}:  P̂[f] = ω^{−c(f₁+f₂)} conj(DFT_n(P)[f]) with centre
    offset c = ⌊(k−1)/2⌋ (even kernels sit half a pixel off centre; kernels larger than
    the image wrap around), P̄ = α·P̂/‖P̂‖_F (Frobenius over all stored frequencies; α =
    ``alpha`` initialised to ‖P̂‖_F at construction), [U | V] = P̄[f], X = Uᵀ, Y = Vᵀ.
    Per frequency Ã Ãᴴ + B̃ B̃ᴴ = I, so the layer is 1-Lipschitz (× scale) on inputs of
    exactly ``input_size``; the boundary is circular (wrap-around).  The operators are
    global n×n circular convolutions (no compact ``nn.Conv2d`` export exists).

    ``stride=2`` is emulated (§3.6): pixel-unshuffle by 2 (PyTorch channel order), then a
    stride-1 layer with 4·in_channels inputs and kernel max(1, k//2) at half the size.
    A 1×1 (effective) kernel needs no FFT: it is the dense sandwich layer at every pixel.
    ``activation=None`` gives the linear circular convolution 2ÃᴴB̃·scale (+ bias).
    ``freeze_alpha=True`` stores α as a buffer (not trained), as in the published conv
    results of the reference code.

    Lipschitz guarantee: ``lipschitz_bound()`` = scale·√(1 + 4 max_f‖E[f]‖(1 + max_f‖E[f]‖))
    with E[f] measured in complex128 from the cached per-frequency matrices (linear form:
    the exact per-frequency SVD norm of the cached operator).  Valid only at
    ``input_size``; any other input size raises ValueError (never silently rebuilt).

    Args mirror ``nn.Conv2d``: in_channels, out_channels, kernel_size (int or pair),
    input_size (int or (H, W): the size of this layer's input, before the unshuffle),
    stride (1 or 2), bias; then activation, scale, freeze_alpha.
    """

    guarantee = "contraction"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        input_size,
        stride=1,
        bias: bool = True,
        activation="relu",
        scale: float = 1.0,
        freeze_alpha: bool = False,
    ):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.input_size = _pair("input_size", input_size)
        st = _pair("stride", stride)
        if st[0] != st[1] or st[0] not in (1, 2):
            raise ValueError(f"stride must be 1 or 2 (emulated by pixel-unshuffle), got {stride!r}")
        self.stride = st[0]
        _check_bias(bias)
        if not isinstance(freeze_alpha, bool):
            raise ValueError(f"freeze_alpha must be True or False, got {freeze_alpha!r}")
        self.freeze_alpha = freeze_alpha
        self.activation_name, self.negative_slope = resolve_activation(activation)
        self.scale = _check_scale(scale)
        s = self.stride
        if s == 2 and (self.input_size[0] % 2 or self.input_size[1] % 2):
            raise ValueError(f"stride=2 needs an even input_size (pixel-unshuffle by 2), got {self.input_size}")
        self.conv_size = (self.input_size[0] // s, self.input_size[1] // s)
        self.conv_in = in_channels * s * s
        self.conv_kernel = (
            self.kernel_size if s == 1 else (max(1, self.kernel_size[0] // 2), max(1, self.kernel_size[1] // 2))
        )
        self.pointwise = self.conv_kernel == (1, 1)
        p, q = self.conv_in, out_channels
        kh, kw = self.conv_kernel
        bound = 1.0 / math.sqrt((p + q) * kh * kw)
        self.weight = nn.Parameter(torch.empty(q, q + p, kh, kw).uniform_(-bound, bound))
        with torch.no_grad():
            alpha0 = self._spectrum_norm(self.weight, torch.float64).reshape(()).to(torch.float32)
        if freeze_alpha:
            self.register_buffer("alpha", alpha0)
        else:
            self.alpha = nn.Parameter(alpha0)
        if self.activation_name is not None:
            self.log_psi = nn.Parameter(torch.zeros(q))
        else:
            self.register_parameter("log_psi", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(q).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        object.__setattr__(self, "_memo", {})

    # -- helpers ---------------------------------------------------------------------------
    def _extra_cache_key(self) -> tuple:
        return (self.scale, self.activation_name, self.negative_slope)

    def _phases(self, device, cdtype) -> tuple[torch.Tensor, torch.Tensor]:
        memo = self.__dict__.setdefault("_memo", {})
        key = (str(device), cdtype)
        if key not in memo:
            ph = tap_phase_matrix(self.conv_kernel, self.conv_size)
            q = tap_gram_weights(ph)
            rdtype = torch.float64 if cdtype == torch.complex128 else torch.float32
            memo[key] = (ph.to(device=device, dtype=cdtype), q.to(device=device, dtype=rdtype))
        return memo[key]

    def _spectrum_norm(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """‖P̂‖_F over the stored frequencies, from the tap Gram matrix (no FFT needed)."""
        _, gram = self._phases(weight.device, _complex_of(dtype))
        taps = weight.to(dtype).reshape(weight.shape[0] * weight.shape[1], -1)
        return ((gram * (taps.mT @ taps)).sum().clamp_min(0)).sqrt()

    def cayley_factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frequency (Ã, B̃) of the current parameters, shapes (F, q, q), (F, q, p),
        F = H'·(W'//2+1) at the conv size, complex of ``dtype`` (differentiable).  For a
        1×1 (effective) kernel the matrices are real and shared by all frequencies."""
        wd = _work_dtype(dtype, dtype == torch.float64)
        at, bht = cayley_rows(self._free_rows(wd), self.out_channels)
        return at.mT, -2.0 * bht.mT

    def free_spectrum(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """P̄[f] = α·P̂[f]/‖P̂‖_F, shape (F, q, q+p), complex (differentiable)."""
        wd = _work_dtype(dtype, dtype == torch.float64)
        return self._spectrum_rows(wd).mT

    def _spectrum_rows(self, wd: torch.dtype) -> torch.Tensor:
        """P̄[f]ᵀ = [X; Y] (F, q+p, q): one (F × k²)·(k² × (q+p)q) complex GEMM of the
        normalised taps (the normaliser comes from the k²×k² tap Gram, no FFT)."""
        cd = _complex_of(wd)
        ph, _ = self._phases(self.weight.device, cd)
        w = self.weight.to(wd)
        scaled = w * (self.alpha.to(wd) / self._spectrum_norm(w, wd).clamp_min(torch.finfo(wd).tiny))
        return kernel_spectrum_rows(scaled, ph)

    def _free_rows(self, wd: torch.dtype) -> torch.Tensor:
        """[X; Y] for the Cayley step: (F, q+p, q) complex, or (q+p, q) real for 1×1."""
        if not self.pointwise:
            return self._spectrum_rows(wd)
        taps = self.weight.to(wd)[:, :, 0, 0]
        nf = self.conv_size[0] * (self.conv_size[1] // 2 + 1)
        # constant spectrum: ‖P̂‖_F = √F·‖P‖_F over the F stored frequencies
        norm = (math.sqrt(nf) * torch.linalg.vector_norm(taps)).clamp_min(torch.finfo(wd).tiny)
        return (taps * (self.alpha.to(wd) / norm)).mT

    # -- LipschitzModule ------------------------------------------------------------------
    def compute_operator(self) -> _ConvOp:
        precise = not torch.is_grad_enabled()
        dtype = self.weight.dtype
        wd = _work_dtype(dtype, precise)
        s = self.scale
        at, bht = cayley_rows(self._free_rows(wd), self.out_channels)  # Aᵀ, Bhᵀ; B = −2·Bh
        psi = None
        if self.activation_name is not None:
            psi = torch.exp(self.log_psi.to(wd).clamp(-_PSI_CLIP, _PSI_CLIP))
        if self.pointwise:
            # real matrices in conv-weight form: w1 = √2·s·Ψ⁻¹B (q, p), w2 = √2·AᵀΨ (q, q)
            if psi is None:
                w1 = (-4.0 * s) * (bht @ at.mT).mT  # 2·s·AᵀB
                return _ConvOp(True, True, w1.to(dtype).contiguous(), None, self.bias, None)
            k1, k2 = fold_sandwich_scales(at, bht, psi, -2.0 * _SQRT2 * s, _SQRT2)
            return _ConvOp(
                True, False, k1.mT.to(dtype).contiguous(), k2.mT.to(dtype).contiguous(), self.bias,
                psi.detach().to(torch.float64),
            )
        cd = _complex_of(dtype)
        if psi is None:
            # Row form: ŷᵀ = x̂ᵀ (2·s·Ãᴴ B̃)ᵀ = x̂ᵀ · (−4s)·Bhᵀ·conj(Ã)
            k1 = ((-4.0 * s) * (bht @ at.mH)).to(cd)
            if precise:
                k1 = hermitian_symmetrize(k1.contiguous(), self.conv_size)
            return _ConvOp(False, True, k1, None, self.bias, None)
        # Row form: ŵᵀ = x̂ᵀ·k1, k1 = (√2·s·Ψ⁻¹B̃)ᵀ (F, p, q);  ŷᵀ = ûᵀ·k2, k2 = (√2·ÃᴴΨ)ᵀ (F, q, q)
        k1, k2 = fold_sandwich_scales(at, bht, psi, -2.0 * _SQRT2 * s, _SQRT2)
        if precise:
            k1 = hermitian_symmetrize(k1.to(cd).contiguous(), self.conv_size)
            k2 = hermitian_symmetrize(k2.to(cd).contiguous(), self.conv_size)
            psi = psi.detach().to(torch.float64)
        return _ConvOp(False, False, k1, k2, self.bias, psi)

    def default_input_size(self):
        return self.input_size

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} expects input of shape (N, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"{name} is defined (and certified) only at input size {self.input_size}, got "
                f"{tuple(x.shape[-2:])}; build a new layer for another size"
            )
        if x.dtype != self.weight.dtype:
            raise ValueError(f"{name} expects dtype {self.weight.dtype} (its parameters' dtype), got {x.dtype}")

    def apply_operator(self, x: torch.Tensor, op: _ConvOp) -> torch.Tensor:
        if self.stride == 2:
            x = F.pixel_unshuffle(x, 2)
        if op.pointwise:
            return self._apply_pointwise(x, op)
        size = self.conv_size
        wh = add_dc_bias(torch.bmm(rfft2_freq_major(x), op.k1), op.bias, size)  # (F, N, q)
        w = irfft2_freq_major(wh, size)
        if op.linear:
            return w.contiguous()
        u = _act(self.activation_name, self.negative_slope, w)
        return irfft2_freq_major(torch.bmm(rfft2_freq_major(u), op.k2), size).contiguous()

    def _apply_pointwise(self, x: torch.Tensor, op: _ConvOp) -> torch.Tensor:
        v = F.conv2d(x, op.k1[:, :, None, None], op.bias)
        if op.linear:
            return v
        return F.conv2d(_act(self.activation_name, self.negative_slope, v), op.k2[:, :, None, None])

    def compute_lipschitz_bound(self, op: _ConvOp, input_size) -> float:
        if input_size is not None and tuple(input_size) != self.input_size:
            raise ValueError(
                f"SandwichConv2d is defined (and certified) only at input size {self.input_size}, "
                f"asked for {tuple(input_size)}"
            )
        if op.linear:
            return spectral_norm(op.k1)
        psi = op.psi
        s = self.scale
        k1 = op.k1.detach()
        k2 = op.k2.detach()
        cdt = torch.complex128 if k1.is_complex() else torch.float64
        if op.pointwise:
            b = k1.to(cdt) * (psi / (_SQRT2 * s)).unsqueeze(1)
            a = (k2.to(cdt) / (_SQRT2 * psi).unsqueeze(0)).mT
        else:
            b = (k1.to(cdt) * (psi / (_SQRT2 * s))).mT  # B̃ (F, q, p)
            a = (k2.to(cdt) / (_SQRT2 * psi).unsqueeze(-1)).conj()  # Ã (F, q, q)
        return round_up(s * sandwich_residual_bound(cayley_residual_norm(a, b)))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, input_size={self.input_size}, "
            f"stride={self.stride}, bias={self.bias is not None}, "
            f"activation={_act_repr(self.activation_name, self.negative_slope)}, scale={self.scale}"
            + (", freeze_alpha=True" if self.freeze_alpha else "")
        )


# ----------------------------------------------------------------------------------------
# LBDN container
# ----------------------------------------------------------------------------------------
class LBDN(nn.Module):
    r"""Sandwich MLP with Lipschitz bound ``gamma`` (LBDN eq. 9, sandwich.md §2.8).

    h₀ = √γ·x;  h_{k+1} = SandwichLinear_k(h_k);  y = √γ·B_L h_L + b_L.

    The first hidden layer carries the input scale √γ, the last layer is the affine
    B-only :class:`SandwichOutput` with scale √γ (γ if there is no hidden layer).  Each
    hidden layer is 1-Lipschitz and ‖B_L‖ ≤ 1, so the network is γ-Lipschitz.
    ``lipschitz_bound()`` multiplies the certified per-layer bounds (≈ γ; never the
    product of factor norms).  ``export()`` returns the equivalent plain MLP (eq. 8).
    """

    def __init__(self, in_features: int, hidden_features, out_features: int, gamma: float = 1.0, activation="relu"):
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if isinstance(hidden_features, int) and not isinstance(hidden_features, bool):
            hidden = [hidden_features]
        elif isinstance(hidden_features, (list, tuple)):
            hidden = list(hidden_features)
        else:
            raise ValueError(f"hidden_features must be an int or a sequence of ints, got {hidden_features!r}")
        for h in hidden:
            check_positive_int("hidden_features entries", h)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
        resolve_activation(activation)
        self.in_features, self.out_features = in_features, out_features
        self.hidden_features = tuple(hidden)
        self.gamma = float(gamma)
        root = math.sqrt(self.gamma)
        widths = [in_features] + hidden
        layers: list[nn.Module] = [
            SandwichLinear(p, q, activation=activation, scale=root if i == 0 else 1.0)
            for i, (p, q) in enumerate(zip(widths[:-1], widths[1:]))
        ]
        layers.append(SandwichOutput(widths[-1], out_features, scale=root if hidden else self.gamma))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def lipschitz_bound(self, input_size=None) -> float:
        """Product of the certified per-layer bounds (≈ gamma), rounded up."""
        total = 1.0
        for layer in self.layers:
            total = round_up(total * layer.lipschitz_bound())
        return total

    def export(self) -> nn.Sequential:
        """Equivalent plain MLP ``nn.Sequential(Linear, act, …, Linear)`` (sandwich.md §2.9).

        W_k = W_pre,k · W_post,k−1 (W_post,−1 = I), i.e. 2Ψ_k⁻¹B_kA_{k−1}ᵀΨ_{k−1} with the
        scales folded in; biases unchanged.  Products in float64, cast to the parameter
        dtype at the end.  The export is a snapshot: it does not track later training.
        """
        dtype = self.layers[0].weight.dtype
        device = self.layers[0].weight.device
        mods: list[nn.Module] = []
        post = None
        for layer in self.layers:
            w_pre, bias, act, slope, w_post = layer.export_parts(torch.float64)
            w = w_pre if post is None else w_pre @ post
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w.to(dtype))
                if bias is not None:
                    lin.bias.copy_(bias.to(dtype))
            mods.append(lin)
            act_mod = _act_module(act, slope)
            if act_mod is not None:
                mods.append(act_mod)
            post = w_post
        return nn.Sequential(*mods)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """ℓ2 norm of the accumulated gradient of each parameter-owning submodule (after
    ``backward()``), keyed by module name: a diagnostic for the vanishing gradients
    reported for deep sandwich ConvNets.  Modules without gradients are omitted."""
    out: dict[str, float] = {}
    for name, mod in model.named_modules():
        grads = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name or type(mod).__name__] = float(torch.sqrt(sum(g.detach().double().square().sum() for g in grads)))
    return out
