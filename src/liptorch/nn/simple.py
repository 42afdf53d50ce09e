"""Parameter-free 1-Lipschitz modules: MaxMin, GroupSort, pixel-unshuffle, channel
padding and truncation.  Each is exactly 1-Lipschitz (most are isometries or
permutations), so ``lipschitz_bound()`` is 1 with no computation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_positive_int

__all__ = ["OneLipschitz", "MaxMin", "GroupSort", "InvertibleDownsample", "ChannelPad", "FirstChannels"]


class OneLipschitz(nn.Module):
    """Mixin for modules that are 1-Lipschitz by a proof that needs no computation."""

    guarantee = "contraction"

    def lipschitz_bound(self, input_size=None) -> float:
        return 1.0


def _check_channels(module: nn.Module, x: torch.Tensor, divisor: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{type(module).__name__} expects a tensor of shape (N, C, ...), got {getattr(x, 'shape', x)}")
    if x.shape[1] % divisor:
        raise ValueError(
            f"{type(module).__name__} needs the channel count (dim 1) divisible by {divisor}, got shape {tuple(x.shape)}"
        )


class _MaxMinFn(torch.autograd.Function):
    """(a, b) ↦ (max(a, b), min(a, b)) with the permutation chosen by one mask m = a ≥ b:
    the forward writes both halves straight into the output and the backward applies
    the same permutation to the gradient.  At ties the gradient follows the mask (a to
    the max half), an element of the Clarke subdifferential that keeps the gradient norm
    (autograd of max/min splits a tie's gradient in halves, shrinking it).  Saves a
    bool mask instead of the input; the backward is differentiable (double backward)."""

    @staticmethod
    def forward(ctx, x):
        a, b = x.chunk(2, dim=1)
        h = a.shape[1]
        mask = a >= b
        out = torch.empty_like(x)
        torch.where(mask, a, b, out=out[:, :h])
        torch.where(mask, b, a, out=out[:, h:])
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        g_max, g_min = g.chunk(2, dim=1)
        if torch.is_grad_enabled():  # create_graph: out= would cut the graph
            return torch.cat([torch.where(mask, g_max, g_min), torch.where(mask, g_min, g_max)], dim=1)
        h = g_max.shape[1]
        gx = torch.empty_like(g)
        torch.where(mask, g_max, g_min, out=gx[:, :h])
        torch.where(mask, g_min, g_max, out=gx[:, h:])
        return gx


class MaxMin(OneLipschitz):
    """GroupSort-2: channel i pairs with channel i + C/2; outputs (max, min) halves.

    Piecewise a permutation, so 1-Lipschitz and gradient-norm preserving (also at ties,
    where the gradient follows the max to the first half; see :class:`_MaxMinFn`).
    """

    guarantee = "orthogonal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(self, x, 2)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxMinFn.apply(x)
        a, b = x.chunk(2, dim=1)
        h = a.shape[1]
        out = torch.empty_like(x)
        torch.maximum(a, b, out=out[:, :h])
        torch.minimum(a, b, out=out[:, h:])
        return out


class GroupSort(OneLipschitz):
    """Sort (descending) each group of ``group_size`` consecutive channels.

    A permutation on every linear piece: 1-Lipschitz and gradient-norm preserving.
    ``GroupSort(2)`` equals :class:`MaxMin` up to a channel permutation.
    """

    guarantee = "orthogonal"

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        self.group_size = check_positive_int("group_size", group_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(self, x, self.group_size)
        shape = x.shape
        g = x.reshape(shape[0], shape[1] // self.group_size, self.group_size, *shape[2:])
        return g.sort(dim=2, descending=True).values.reshape(shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class InvertibleDownsample(OneLipschitz):
    """Pixel-unshuffle by ``factor``: (C, s·m, s·m) → (C·s², m, m), PyTorch channel order.

    A permutation of coordinates, hence orthogonal.
    """

    guarantee = "orthogonal"

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = check_positive_int("factor", factor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"InvertibleDownsample expects a 4-D input (N, C, H, W), got {getattr(x, 'shape', x)}")
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"InvertibleDownsample({self.factor}) needs H and W divisible by {self.factor}, got {h}x{w}"
            )
        return F.pixel_unshuffle(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class ChannelPad(OneLipschitz):
    """Zero-pad the channel dimension (dim 1) up to ``out_channels``: an isometry."""

    guarantee = "orthogonal"

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = check_positive_int("out_channels", out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"ChannelPad expects a tensor of shape (N, C, ...), got {getattr(x, 'shape', x)}")
        c = x.shape[1]
        if c > self.out_channels:
            raise ValueError(f"ChannelPad({self.out_channels}) got {c} channels, more than it pads to")
        if c == self.out_channels:
            return x
        pad = x.new_zeros((x.shape[0], self.out_channels - c) + tuple(x.shape[2:]))
        return torch.cat([x, pad], dim=1)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}"


class FirstChannels(OneLipschitz):
    """Keep the first ``n`` channels (dim 1): a coordinate projection, 1-Lipschitz."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = check_positive_int("n", n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"FirstChannels expects a tensor of shape (N, C, ...), got {getattr(x, 'shape', x)}")
        if x.shape[1] < self.n:
            raise ValueError(f"FirstChannels({self.n}) got only {x.shape[1]} channels")
        return x[:, : self.n]

    def extra_repr(self) -> str:
        return f"n={self.n}"
