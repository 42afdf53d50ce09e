"""Base class of every constrained layer: free parameters → explicit operator → apply.

A :class:`LipschitzModule` implements

* ``compute_operator()``: builds the explicit operator (weight, kernel, per-frequency
  matrices, …) from the free parameters, differentiably;
* ``apply_operator(x, op)``: the cheap forward given the operator;
* ``compute_lipschitz_bound(op, input_size)``: a *guaranteed* upper bound on the ℓ2
  Lipschitz constant of the map actually evaluated in eval mode, from the operator.

In training mode (with grad enabled) the operator is rebuilt on every forward so
gradients reach the free parameters.  Otherwise it is cached and the cache is keyed on
the identity, storage, version counter, device and dtype of every parameter and buffer
it depends on, so an optimizer step, ``load_state_dict``, a manual in-place edit or
``.to()`` all invalidate it.  The cache is a plain attribute, never part of the state dict.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["LipschitzModule", "check_positive_int", "check_input"]


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_input(module: nn.Module, x: torch.Tensor, ndim: int, channels: int | None, dim: int = 1) -> None:
    """Raise a ValueError naming the module if ``x`` has the wrong rank or channel count."""
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} expects a {ndim}-D input, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[dim] != channels:
        raise ValueError(
            f"{name} expects {channels} features/channels in dimension {dim}, got shape {tuple(x.shape)}"
        )
    if not (x.is_floating_point()):
        raise ValueError(f"{name} expects a floating-point input, got dtype {x.dtype}")


class LipschitzModule(nn.Module):
    """A module with an explicit, cached operator and a guaranteed Lipschitz bound."""

    #: "orthogonal", "contraction" (≤ 1 by construction) or "bounded" (bound measured).
    guarantee: str = "contraction"
    #: attributes derived from the parameters and rebuilt on demand (memos): dropped on
    #: copy and pickle, like the operator cache.
    _derived_state: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_op_cache", None)
        object.__setattr__(self, "_bound_cache", {})

    # -- to implement -------------------------------------------------------------------
    def compute_operator(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_operator(self, x: torch.Tensor, op: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_lipschitz_bound(self, op: Any, input_size: tuple[int, int] | None) -> float:  # pragma: no cover
        raise NotImplementedError

    # -- caching --------------------------------------------------------------------------
    def _cache_key(self) -> tuple:
        key = []
        for t in list(self.parameters(recurse=True)) + list(self.buffers(recurse=True)):
            key.append((id(t), t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape)))
        key.append(self._extra_cache_key())
        return tuple(key)

    def _extra_cache_key(self) -> tuple:
        """Hyper-parameters that change the operator (override when mutable)."""
        return ()

    def cached_operator(self) -> Any:
        """The eval-mode operator: computed without grad and cached until parameters change."""
        key = self._cache_key()
        cache = self._op_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        # Built as a normal tensor even under torch.inference_mode, so that a later eval
        # pass that records a graph (an attack) can save it for backward.
        with torch.inference_mode(False), torch.no_grad():
            op = self.compute_operator()
        # The key is recomputed after the computation: it must not have moved.
        object.__setattr__(self, "_op_cache", (self._cache_key(), op))
        return op

    def operator(self) -> Any:
        """Operator for the current mode: fresh (differentiable) in training, cached otherwise."""
        if self.training and torch.is_grad_enabled():
            return self.compute_operator()
        return self.cached_operator()

    def invalidate_cache(self) -> None:
        object.__setattr__(self, "_op_cache", None)
        object.__setattr__(self, "_bound_cache", {})

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_op_cache"] = None
        state["_bound_cache"] = {}
        for name in self._derived_state:
            state.pop(name, None)
        return state

    # -- public -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if x.dim() == 4:
            object.__setattr__(self, "_last_input_size", (int(x.shape[-2]), int(x.shape[-1])))
        return self.apply_operator(x, self.operator())

    def check_input(self, x: torch.Tensor) -> None:
        """Validate ``x``; override in subclasses."""

    def default_input_size(self) -> tuple[int, int] | None:
        """Spatial size the bound is computed for when none is given: the size of the
        last input seen (None if never called, or for size-free layers)."""
        return getattr(self, "_last_input_size", None)

    def lipschitz_bound(self, input_size=None) -> float:
        """Guaranteed upper bound on the ℓ2 Lipschitz constant of the eval-mode map.

        Computed in float64 from the cached explicit operator actually used in eval,
        at ``input_size`` (the spatial size of this layer's input) for size-dependent
        layers.  Never an estimate.
        """
        if input_size is None:
            input_size = self.default_input_size()
        elif not isinstance(input_size, tuple):
            input_size = (int(input_size), int(input_size))
        key = (self._cache_key(), input_size)
        bound_cache = self._bound_cache
        if key in bound_cache:
            return bound_cache[key]
        op = self.cached_operator()
        value = float(self.compute_lipschitz_bound(op, input_size))
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{type(self).__name__} produced an invalid Lipschitz bound {value}")
        object.__setattr__(self, "_bound_cache", {key: value})
        return value
