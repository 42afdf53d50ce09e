"""Björck-orthonormalised dense layer (Anil, Lucas, Grosse, ICML 2019; bcop.md §4, §7)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linalg import spectral_norm
from ..ops.orthogonalize import bjorck_orthonormalize
from .base import LipschitzModule, check_positive_int

__all__ = ["OrthogonalLinear", "BjorckLinear", "BjorckSettings"]

_SCALES = ("power", "frobenius", "sqrt")


class BjorckSettings:
    """The Björck options shared by the layers that orthonormalise free matrices
    (``OrthogonalLinear``, ``BCOPConv2d``): validation, the eval-cache key, the call
    and the repr.  A mixin for :class:`LipschitzModule` subclasses."""

    def _init_bjorck(self, iters, order, scale, early_stop) -> None:
        self.bjorck_iters = check_positive_int("bjorck_iters", iters, 1)
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2):
            raise ValueError(f"bjorck_order must be 1 or 2, got {order!r}")
        if scale not in _SCALES:
            raise ValueError(f"bjorck_scale must be one of {_SCALES}, got {scale!r}")
        if not isinstance(early_stop, bool):
            raise ValueError(f"bjorck_early_stop must be True or False, got {early_stop!r}")
        self.bjorck_order = int(order)
        self.bjorck_scale = scale
        self.bjorck_early_stop = early_stop

    def _extra_cache_key(self) -> tuple:
        return (self.bjorck_iters, self.bjorck_order, self.bjorck_scale, self.bjorck_early_stop)

    def _bjorck_kwargs(self) -> dict:
        return dict(iters=self.bjorck_iters, order=self.bjorck_order, scale=self.bjorck_scale,
                    early_stop=self.bjorck_early_stop)

    def _orthonormalize(self, matrices: torch.Tensor) -> torch.Tensor:
        return bjorck_orthonormalize(matrices, **self._bjorck_kwargs())

    def _bjorck_repr(self) -> str:
        s = f"bjorck_iters={self.bjorck_iters}"
        if self.bjorck_order != 1:
            s += f", bjorck_order={self.bjorck_order}"
        if self.bjorck_scale != "power":
            s += f", bjorck_scale={self.bjorck_scale!r}"
        if not self.bjorck_early_stop:
            s += ", bjorck_early_stop=False"
        return s


class OrthogonalLinear(BjorckSettings, LipschitzModule):
    r"""Dense layer y = W x + b with a Björck-orthonormalised weight.

    ``OrthogonalLinear(in_features, out_features, bias=True, bjorck_iters=20,
    bjorck_order=1, bjorck_scale="power", *, bjorck_early_stop=True)``

    Math: the free parameter V ∈ R^{out×in} is mapped to W = Björck(V), the iteration
    A ← A(3/2 I − 1/2 AᵀA) (order 1; order 2 adds the next Taylor term of (AᵀA)^{-1/2})
    started from V / s, which converges to the polar factor V (VᵀV)^{-1/2}.  W is
    orthogonal when square; with out > in it has orthonormal columns (an isometry,
    WᵀW = I), with out < in orthonormal rows (WWᵀ = I, gradient-norm preserving).

    Lipschitz guarantee: 1 up to the Björck residual.  :meth:`lipschitz_bound` returns the
    exact σ_max (fp64 SVD) of the cached eval weight, which includes that residual.

    In training the weight is recomputed (differentiably) in every forward; in eval it
    is computed once and cached until a parameter changes.  s is a power-iteration
    estimate of σ_max(V) from a fixed start vector (LConvNet default; deterministic and
    never touches the global RNG), ‖V‖_F (``"frobenius"``) or √(out·in) (``"sqrt"``).
    ``bjorck_early_stop`` stops the iteration once it has converged to working precision
    (:func:`liptorch.ops.orthogonalize.bjorck_orthonormalize`); ``bjorck_iters`` is the
    maximum.  The power iteration takes at most 10 steps and stops once its estimate
    has settled.  Gradients are first order (hand-written backward through the steps
    taken); double backward through the weight is not supported.
    """

    guarantee = "orthogonal"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bjorck_iters: int = 20,
        bjorck_order: int = 1,
        bjorck_scale: str = "power",
        *,
        bjorck_early_stop: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        self._init_bjorck(bjorck_iters, bjorck_order, bjorck_scale, bjorck_early_stop)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """V ← random (semi-)orthogonal / √in; bias ~ U(−1/√in, 1/√in) (as ``nn.Linear``)."""
        with torch.no_grad():
            nn.init.orthogonal_(self.weight, gain=1.0 / math.sqrt(self.in_features))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)
        self.invalidate_cache()

    def compute_operator(self) -> torch.Tensor:
        return self._orthonormalize(self.weight)

    def orthogonal_weight(self) -> torch.Tensor:
        """The weight the forward uses in the current mode (cached in eval)."""
        return self.operator()

    def apply_operator(self, x: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        return F.linear(x, op, self.bias)

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{name} expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != self.weight.dtype:
            raise ValueError(f"{name} expects a {self.weight.dtype} input (the dtype of its parameters), got {x.dtype}")

    def compute_lipschitz_bound(self, op: torch.Tensor, input_size) -> float:
        return spectral_norm(op)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self._bjorck_repr()
        )


#: Name used in the BCOP paper and LConvNet.
BjorckLinear = OrthogonalLinear
