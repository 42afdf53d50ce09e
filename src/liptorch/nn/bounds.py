"""Composing guaranteed Lipschitz upper bounds over a model (layer floor utility).

``lipschitz_bound(model, input_shape)`` multiplies the per-module bounds of a
sequential model (certification.md §3.1).  Modules that define ``lipschitz_bound``
(every liptorch layer and container) are asked directly, with the spatial size of
their input when it is known; a few plain PyTorch modules are bounded here
(``nn.Linear`` by an exact SVD, circular/zero-padded ``nn.Conv2d`` by per-frequency
SVD, ReLU-like activations and reshapes by 1).  Anything else raises a ValueError:
no module is ever silently assumed 1-Lipschitz.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ..ops.fft import circular_conv_norm
from ..ops.linalg import round_up, spectral_norm

__all__ = ["lipschitz_bound", "trace_input_sizes", "module_bound"]

_ONE_LIPSCHITZ = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten, nn.PixelUnshuffle,
    nn.Dropout, nn.Unflatten, nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.Softplus,
)


def trace_input_sizes(model: nn.Module, input_shape) -> dict[nn.Module, tuple[int, int] | None]:
    """Run one eval forward on zeros of ``(1, *input_shape)`` and record, for every
    submodule, the spatial size (H, W) of its (first) input, or None for non-images."""
    sizes: dict[nn.Module, tuple[int, int] | None] = {}
    hooks = []

    def hook(mod, args):
        if mod in sizes:
            return
        x = args[0] if args else None
        sizes[mod] = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None

    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        p = next(iter(model.parameters()), None)
        dtype = p.dtype if p is not None else torch.float32
        device = p.device if p is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_shape), dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def _plain_conv_bound(conv: nn.Conv2d, size) -> float:
    if conv.dilation != (1, 1):
        raise ValueError("cannot bound a dilated nn.Conv2d")
    if size is None:
        raise ValueError("bounding an nn.Conv2d needs its input size: pass input_shape to lipschitz_bound")
    h, w = size
    kh, kw = conv.kernel_size
    weight = conv.weight
    # Grouped conv is block-diagonal over groups: the max over groups, never the product.
    groups = weight.chunk(conv.groups, dim=0)
    if conv.padding_mode == "circular":
        if kh % 2 == 0 or kw % 2 == 0 or tuple(conv.padding) != ((kh - 1) // 2, (kw - 1) // 2):
            raise ValueError("a circular nn.Conv2d is bounded only with odd kernels and 'same' padding")
        norm = max(circular_conv_norm(g, (h, w)) for g in groups)
    elif conv.padding_mode == "zeros":
        # Circular embedding: a zero canvas of size ≥ n + k − 1 never wraps (certification.md §3.2b).
        big = (h + kh - 1, w + kw - 1)
        norm = max(circular_conv_norm(g, big) for g in groups)
    else:
        raise ValueError(f"cannot bound nn.Conv2d with padding_mode={conv.padding_mode!r}")
    # A strided conv keeps a subset of the stride-1 outputs: norm ≤ stride-1 norm.
    return norm


def module_bound(module: nn.Module, sizes: dict | None = None) -> float:
    """Guaranteed Lipschitz bound of one module (recursing into ``nn.Sequential``)."""
    sizes = sizes or {}
    size = sizes.get(module)
    if hasattr(module, "lipschitz_bound") and callable(module.lipschitz_bound):
        # Containers with their own rule take the traced sizes of their children.
        if "sizes" in inspect.signature(module.lipschitz_bound).parameters:
            return float(module.lipschitz_bound(input_size=size, sizes=sizes))
        return float(module.lipschitz_bound(input_size=size))
    if isinstance(module, nn.Sequential):
        total = 1.0
        for child in module:
            total = round_up(total * module_bound(child, sizes))
        return total
    if isinstance(module, _ONE_LIPSCHITZ):
        if isinstance(module, nn.LeakyReLU) and abs(module.negative_slope) > 1:
            return abs(module.negative_slope)
        return 1.0
    if isinstance(module, nn.Linear):
        return spectral_norm(module.weight)
    if isinstance(module, nn.Conv2d):
        return _plain_conv_bound(module, size)
    if isinstance(module, nn.AvgPool2d):
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        s = module.stride if isinstance(module.stride, int) else module.stride[0]
        if k == s and module.padding in (0, (0, 0)):
            return round_up(1.0 / k)
    raise ValueError(
        f"cannot bound the Lipschitz constant of {type(module).__name__}: give it a "
        "lipschitz_bound(input_size=None) method or use a liptorch layer"
    )


def lipschitz_bound(model: nn.Module, input_shape=None) -> float:
    """Guaranteed ℓ2 Lipschitz upper bound of ``model`` in eval mode.

    ``input_shape`` (without the batch dimension, e.g. ``(1, 28, 28)``) lets the
    size-dependent layers (circular convolutions) be bounded at their actual input
    size; without it they use the size they last saw or raise.
    """
    sizes = trace_input_sizes(model, input_shape) if input_shape is not None else {}
    value = module_bound(model, sizes)
    if not math.isfinite(value):
        raise ValueError(f"non-finite Lipschitz bound {value}")
    return value
