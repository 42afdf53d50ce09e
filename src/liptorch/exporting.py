"""Export trained constrained models to plain PyTorch modules.

:func:`export` turns a liptorch model into an equivalent inference-only module that
does not depend on any liptorch parameterisation: every constrained layer is replaced
by the operator it uses in eval mode (its cached operator), frozen into standard
``torch.nn`` modules wherever one exists:

====================================  ================================================
liptorch layer                        exported as
====================================  ================================================
``BCOPConv2d``                        one ``nn.Conv2d`` (stride s, the unshuffle folded
                                      into an (s·k')×(s·k') kernel) with
                                      ``padding_mode="circular"`` (odd k'); an even k',
                                      which wraps more pixels before than after:
                                      ``nn.CircularPad2d`` + unpadded ``nn.Conv2d``, or
                                      with ``bcop_even="embed"`` one circular
                                      ``nn.Conv2d`` whose kernel has s zero taps
                                      appended (symmetric padding)
``OrthogonalLinear``, ``LLNLinear``,  ``nn.Linear``
``SandwichOutput``
``SandwichLinear``                    ``nn.Linear`` + activation + ``nn.Linear``
``LBDN``                              its own ``LBDN.export()`` (a merged plain MLP)
``MLPHead``                           ``nn.Linear`` + ``nn.Softplus(beta)`` + ``nn.Linear``
``SOCConv2d``                         [``nn.PixelUnshuffle``] + :class:`SkewExpConv2d`
                                      (direct convolutions, zero or circular padding)
``SandwichConv2d``                    [``nn.PixelUnshuffle``] + two :class:`FourierConv2d`
                                      (or two dense circular ``nn.Conv2d`` with
                                      ``sandwich_conv="dense"``), activation between;
                                      1×1 kernels: two 1×1 ``nn.Conv2d``
``InvertibleDownsample``              ``nn.PixelUnshuffle``
``MaxMin`` / ``GroupSort`` /          :class:`PairMaxMin` / :class:`ChannelGroupSort` /
``PairMaxPool``                       :class:`PairMax`
``HouseholderActivation``             :class:`PairHouseholder` (angles as buffers)
``ManifoldPool``                      :class:`PairLipPool` (angles as buffers)
``ChannelPad`` / ``FirstChannels``    :class:`ChannelResize`
``Normalize`` / ``Scale``             :class:`ChannelStandardize` / :class:`ConstantScale`
``SpatialPad``                        :class:`CenterZeroPad`
``nn.Sequential``,                    a flat ``nn.Sequential`` of the exported parts
``LipschitzClassifier``
other ``torch.nn`` leaf modules       a copy
====================================  ================================================

The classes defined here are the only non-standard modules an export can contain.
They hold fixed buffers and do parameter-free math only (no Björck, Cayley, skew or
normalisation computation at run time), and they are TorchScript-scriptable and
ONNX-exportable.  The export is a snapshot: it does not follow later training.  Its
outputs equal the original's eval-mode outputs up to floating-point rounding (the
same operators are applied; measured ≤ 1e-6 relative in float32 for the zoo models).
Parameters of the exported module have ``requires_grad=False``.

No certificate travels with the export: certify with the liptorch model; the
exported module is for deployment.

:func:`export_run` exports a training run to a file:

* ``OUT.pt``: a TorchScript archive (``torch.jit.script`` + ``torch.jit.save``), which
  loads with ``torch.jit.load(OUT)`` in an environment where liptorch is NOT
  installed (a ``torch.save`` pickle of the module would need the liptorch classes);
* ``OUT.onnx``: ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch axis
  (needs the ``onnx`` and ``onnxscript`` packages: ``pip install onnx onnxscript``;
  ``onnxruntime``, when installed, is used to check the file).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "export",
    "export_run",
    "register_exporter",
    "compare_outputs",
    "time_interleaved",
    "SkewExpConv2d",
    "FourierConv2d",
    "PairMaxMin",
    "ChannelGroupSort",
    "PairMax",
    "PairHouseholder",
    "PairLipPool",
    "ChannelResize",
    "ChannelStandardize",
    "ConstantScale",
    "CenterZeroPad",
    "FIXED_MODULES",
]

_TWO_PI = 2.0 * math.pi


# =========================================================================================
# Fixed modules (scriptable; no liptorch imports at run time)
# =========================================================================================
def _broadcast_shape(ndim: int) -> List[int]:
    """[1, -1, 1, …] of length ``ndim`` (per-channel vectors against (N, C, …))."""
    shape: List[int] = [1, -1]
    for _ in range(ndim - 2):
        shape.append(1)
    return shape


def _check_pairs(x: torch.Tensor, channels: int, name: str) -> None:
    if x.dim() < 2 or x.shape[1] != channels:
        raise ValueError(name + " expects " + str(channels) + " channels in dimension 1, got shape " + str(x.shape))


class SkewExpConv2d(nn.Module):
    """y = S_K(A)·x̃ (+ bias) with A the fixed "same" convolution by L, zero-padded or
    (``padding_mode="circular"``) circularly padded.

    The exported form of ``SOCConv2d``: x̃ is x zero-padded in channels to c,
    S_K(A)x̃ = Σ_{j<K} Aʲx̃/j! is evaluated by Horner's rule (z ← x̃ + conv(z, L/i),
    i = K−1 … 1, one convolution per term; zero padding means the K−1 convolutions
    are genuinely repeated, not one larger kernel), and the first ``out_channels``
    channels are kept (the last convolution computes only those).  ``filters`` holds
    L/i for i = 1 … K−1 (entry i−1), ``last_filter`` the first ``out_channels`` output
    rows of L.  ``in_channels`` is the channel count of the input (≤ c).  On CPU the
    float32/bfloat16 work runs in channels_last memory, as the original layer does.  A
    circular ``SOCConv2d`` evaluates the same map frequency by frequency; here it is the
    direct Horner form (equal up to rounding, at every input size).
    """

    def __init__(
        self, filters: torch.Tensor, bias: Optional[torch.Tensor], in_channels: int, out_channels: int,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.circular = padding_mode == "circular"
        if filters.dim() != 5 or filters.shape[1] != filters.shape[2] or filters.shape[-1] % 2 == 0:
            raise ValueError(f"SkewExpConv2d expects (K−1, c, c, k, k) filters with odd k, got {tuple(filters.shape)}")
        self.channels = int(filters.shape[1])
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        for name, value in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if not 1 <= value <= self.channels:
                raise ValueError(f"{name} must lie in [1, {self.channels}], got {value}")
        self.terms = int(filters.shape[0]) + 1
        self.padding = (int(filters.shape[-1]) - 1) // 2
        self.register_buffer("filters", filters.detach().clone())
        self.register_buffer("last_filter", filters[0, : self.out_channels].detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                "SkewExpConv2d expects (N, " + str(self.in_channels) + ", H, W), got shape " + str(x.shape)
            )
        if self.in_channels < self.channels:
            x = F.pad(x, [0, 0, 0, 0, 0, self.channels - self.in_channels])
        if x.device.type == "cpu" and (x.dtype == torch.float32 or x.dtype == torch.bfloat16):
            x = x.contiguous(memory_format=torch.channels_last)
        z = x
        for i in range(self.terms - 1, 1, -1):
            z = self._conv(z, self.filters[i - 1], None) + x
        if self.out_channels == self.channels:
            return self._conv(z, self.filters[0], self.bias) + x
        return self._conv(z, self.last_filter, self.bias) + x[:, : self.out_channels]

    def _conv(self, z: torch.Tensor, filt: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.padding
        if self.circular and p > 0:
            h, w = z.shape[2], z.shape[3]
            if p <= h and p <= w:
                return F.conv2d(F.pad(z, [p, p, p, p], mode="circular"), filt, bias)
            # images smaller than the padding wrap more than once (F.pad cannot)
            rows = torch.remainder(torch.arange(-p, h + p, device=z.device), h)
            cols = torch.remainder(torch.arange(-p, w + p, device=z.device), w)
            return F.conv2d(z.index_select(2, rows).index_select(3, cols), filt, bias)
        return F.conv2d(z, filt, bias, 1, p)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, channels={self.channels}, terms={self.terms}, "
            f"padding={self.padding}, bias={self.bias is not None}"
            + (", padding_mode='circular'" if self.circular else "")
        )


class FourierConv2d(nn.Module):
    """Fixed circular convolution applied frequency by frequency, at one spatial size.

    y = irfft2(X̂[f]ᵀ·K[f]) (+ bias) with per-frequency complex matrices K[f] (p × q) over
    the H·(W//2+1) frequencies of ``torch.fft.rfft2`` (row form, frequency-major).  They
    are stored as the real block matrices [[Re K, Im K], [−Im K, Re K]] (F, 2p, 2q), so
    run time is one rfft2, one real batched GEMM and one irfft2 (and it exports to ONNX,
    which has no complex GEMM).
    """

    def __init__(self, kernel: torch.Tensor, bias: Optional[torch.Tensor], size) -> None:
        super().__init__()
        h, w = int(size[0]), int(size[1])
        if not kernel.is_complex() or kernel.dim() != 3 or kernel.shape[0] != h * (w // 2 + 1):
            raise ValueError(
                f"FourierConv2d expects a complex (H·(W//2+1), p, q) kernel for size {(h, w)}, got "
                f"{kernel.dtype} {tuple(kernel.shape)}"
            )
        self.height, self.width = h, w
        self.in_channels, self.out_channels = int(kernel.shape[1]), int(kernel.shape[2])
        re, im = kernel.real, kernel.imag
        block = torch.cat([torch.cat([re, im], dim=2), torch.cat([-im, re], dim=2)], dim=1)
        self.register_buffer("weight", block.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, p, q = self.height, self.width, self.in_channels, self.out_channels
        if x.dim() != 4 or x.shape[1] != p or x.shape[2] != h or x.shape[3] != w:
            raise ValueError(
                "FourierConv2d expects input of shape (N, " + str(p) + ", " + str(h) + ", " + str(w)
                + "), got " + str(x.shape)
            )
        n = x.shape[0]
        wf = w // 2 + 1
        xh = torch.view_as_real(torch.fft.rfft2(x))  # (N, p, H, Wf, 2)
        xf = xh.permute(2, 3, 0, 4, 1).reshape(h * wf, n, 2 * p)  # [Re x̂ | Im x̂] per frequency
        yf = torch.bmm(xf, self.weight).reshape(h, wf, n, 2, q).permute(2, 4, 0, 1, 3)
        y = torch.fft.irfft2(torch.complex(yf[..., 0], yf[..., 1]), s=[h, w])
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, size=({self.height}, {self.width}), "
            f"bias={self.bias is not None}"
        )


class PairMaxMin(nn.Module):
    """Channel i paired with i + C/2 → (max, min) halves (exported ``MaxMin``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % 2 != 0:
            raise ValueError("PairMaxMin needs an even channel count in dimension 1, got shape " + str(x.shape))
        h = x.shape[1] // 2
        a, b = x.narrow(1, 0, h), x.narrow(1, h, h)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class ChannelGroupSort(nn.Module):
    """Sort each group of ``group_size`` consecutive channels, descending (``GroupSort``)."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = int(group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        if x.dim() < 2 or x.shape[1] % g != 0:
            raise ValueError("ChannelGroupSort needs channels divisible by " + str(g) + ", got shape " + str(x.shape))
        grouped_shape: List[int] = [x.shape[0], x.shape[1] // g, g]
        for d in x.shape[2:]:
            grouped_shape.append(d)
        return x.reshape(grouped_shape).sort(dim=2, descending=True).values.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class PairMax(nn.Module):
    """max(x_i, x_{i+C/2}): C → C/2 channels (exported ``PairMaxPool``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_pairs(x, self.channels, "PairMax")
        h = self.channels // 2
        return torch.maximum(x.narrow(1, 0, h), x.narrow(1, h, h))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class PairHouseholder(nn.Module):
    """Householder activation of order 1 or 2 on channel pairs (i, i + C/2) with fixed
    angles ``theta`` ((C/2,) for order 1; (3, C/2), already clamped to [0, 2π], for
    order 2).  Same formulas as ``HouseholderActivation``."""

    def __init__(self, theta: torch.Tensor, order: int) -> None:
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.order = int(order)
        half = int(theta.shape[-1])
        self.channels = 2 * half
        if order == 2:
            theta = theta.clamp(0.0, _TWO_PI)
        self.register_buffer("theta", theta.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_pairs(x, self.channels, "PairHouseholder")
        h = self.channels // 2
        a, b = x.narrow(1, 0, h), x.narrow(1, h, h)
        shape = _broadcast_shape(x.dim())
        theta = self.theta.to(dtype=x.dtype, device=x.device)
        if self.order == 1:
            t = theta.reshape(shape)
            reflect = a * torch.sin(t / 2) - b * torch.cos(t / 2) > 0
            c, s = torch.cos(t), torch.sin(t)
            return torch.cat([torch.where(reflect, a * c + b * s, a), torch.where(reflect, a * s - b * c, b)], dim=1)
        t0, t1, t2 = theta[0].reshape(shape), theta[1].reshape(shape), theta[2].reshape(shape)
        phi = torch.remainder(torch.atan2(b, a) - t0 / 2, 2.0 * math.pi)
        in_s1 = phi < t1 / 2
        in_s2 = phi < (t1 + t2) / 2
        in_s3 = phi < math.pi + t2 / 2
        c1, s1 = torch.cos(t0 + t1), torch.sin(t0 + t1)
        c2, s2 = torch.cos(t2), torch.sin(t2)
        c0, s0 = torch.cos(t0), torch.sin(t0)
        out_a = torch.where(
            in_s1, a, torch.where(in_s2, a * c1 + b * s1, torch.where(in_s3, a * c2 + b * s2, a * c0 + b * s0))
        )
        out_b = torch.where(
            in_s1, b, torch.where(in_s2, a * s1 - b * c1, torch.where(in_s3, b * c2 - a * s2, a * s0 - b * c0))
        )
        return torch.cat([out_a, out_b], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, order={self.order}"


class PairLipPool(nn.Module):
    """LipPool on channel pairs with fixed cone angles ``theta`` (C/2,), already clamped
    to [0, π]: signed distance to the cone boundary (exported ``ManifoldPool``).  The
    apex distance is √(a² + b²) (``hypot`` has no ONNX form; equal up to rounding)."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.channels = 2 * int(theta.shape[-1])
        self.register_buffer("theta", theta.detach().clamp(0.0, math.pi).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_pairs(x, self.channels, "PairLipPool")
        h = self.channels // 2
        a, b = x.narrow(1, 0, h), x.narrow(1, h, h)
        t = self.theta.to(dtype=x.dtype, device=x.device).reshape(_broadcast_shape(x.dim()))
        s, c = torch.sin(t / 2), torch.cos(t / 2)
        phi = torch.remainder(torch.atan2(b, a), 2.0 * math.pi)
        upper = phi < (t + math.pi) / 2
        lower = phi >= (3 * math.pi - t) / 2
        apex = ~(upper | lower) & ((a != 0) | (b != 0))
        upper = upper | ~(apex | lower)
        ra = torch.where(apex, a, torch.ones_like(a))
        rb = torch.where(apex, b, torch.zeros_like(b))
        r = torch.sqrt(ra * ra + rb * rb)
        return torch.where(upper, b * c - a * s, torch.where(apex, r, -a * s - b * c))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class ChannelResize(nn.Module):
    """``mode="pad"``: zero-pad dimension 1 up to ``channels`` (exported ``ChannelPad``);
    ``mode="first"``: keep the first ``channels`` (exported ``FirstChannels``)."""

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        if mode not in ("pad", "first"):
            raise ValueError(f"mode must be 'pad' or 'first', got {mode!r}")
        self.channels = int(channels)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError("ChannelResize expects (N, C, ...), got shape " + str(x.shape))
        c = x.shape[1]
        if self.mode == "first":
            if c < self.channels:
                raise ValueError("ChannelResize(first " + str(self.channels) + ") got only " + str(c) + " channels")
            return x[:, : self.channels]
        if c > self.channels:
            raise ValueError("ChannelResize(pad to " + str(self.channels) + ") got " + str(c) + " channels")
        pads: List[int] = []
        for _ in range(x.dim() - 2):
            pads += [0, 0]
        pads += [0, self.channels - c]
        return F.pad(x, pads)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}"


class ChannelStandardize(nn.Module):
    """(x − mean_c) / std_c per channel (exported ``Normalize``)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                "ChannelStandardize expects " + str(self.mean.shape[0]) + " channels in dim 1, got shape " + str(x.shape)
            )
        shape = _broadcast_shape(x.dim())
        return (x - self.mean.view(shape)) / self.std.view(shape)


class ConstantScale(nn.Module):
    """x ↦ factor·x (exported ``Scale``)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class CenterZeroPad(nn.Module):
    """Zero-pad (N, C, H, W) symmetrically to size × size (exported ``SpatialPad``)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] > self.size or x.shape[3] > self.size:
            raise ValueError("CenterZeroPad(" + str(self.size) + ") expects (N, C, H, W) with H, W <= size, got "
                             + str(x.shape))
        h, w = x.shape[2], x.shape[3]
        top, left = (self.size - h) // 2, (self.size - w) // 2
        return F.pad(x, [left, self.size - w - left, top, self.size - h - top])

    def extra_repr(self) -> str:
        return f"size={self.size}"


#: The non-standard module classes an export may contain.
FIXED_MODULES = (
    SkewExpConv2d,
    FourierConv2d,
    PairMaxMin,
    ChannelGroupSort,
    PairMax,
    PairHouseholder,
    PairLipPool,
    ChannelResize,
    ChannelStandardize,
    ConstantScale,
    CenterZeroPad,
)


# =========================================================================================
# Exporters
# =========================================================================================
_EXPORTERS: dict[type, Callable] = {}
_SANDWICH_CONV_MODES = ("fft", "dense")
_BCOP_EVEN_MODES = ("pad", "embed")


def register_exporter(cls: type, fn: Callable | None = None):
    """Register ``fn(module, ctx) -> nn.Module`` as the exporter of modules of exactly
    type ``cls`` (subclasses are not matched: they may change the forward).  ``ctx`` has
    ``ctx.export(child, name)`` to export a child, ``ctx.sandwich_conv`` and
    ``ctx.bcop_even``.  Usable as a decorator: ``@register_exporter(MyLayer)``.  The
    result must consist of standard ``torch.nn`` modules and this file's fixed modules."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"register_exporter expects an nn.Module subclass, got {cls!r}")

    def deco(f):
        if not callable(f):
            raise ValueError(f"the exporter for {cls.__name__} must be callable, got {f!r}")
        _EXPORTERS[cls] = f
        return f

    return deco if fn is None else deco(fn)


class _Context:
    def __init__(self, sandwich_conv: str, bcop_even: str) -> None:
        self.sandwich_conv = sandwich_conv
        self.bcop_even = bcop_even
        self._path: list[str] = []

    def where(self) -> str:
        return ".".join(self._path) or "<root>"

    def export(self, module: nn.Module, name: str | None = None) -> nn.Module:
        if name is not None:
            self._path.append(name)
        try:
            return _export_one(module, self)
        finally:
            if name is not None:
                self._path.pop()


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    w = weight.detach()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach().to(w.dtype))
    return lin


def _frozen_conv(kernel: torch.Tensor, bias: torch.Tensor | None, padding, circular: bool, stride: int = 1) -> nn.Conv2d:
    k = kernel.detach()
    conv = nn.Conv2d(
        k.shape[1], k.shape[0], tuple(k.shape[-2:]), stride=stride, padding=padding, bias=bias is not None,
        padding_mode="circular" if circular else "zeros", device=k.device, dtype=k.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(k)
        if bias is not None:
            conv.bias.copy_(bias.detach().to(k.dtype))
    return conv


def _sequential(parts: list[nn.Module]) -> nn.Module:
    """A flat Sequential (nested Sequentials spliced, Identities dropped)."""
    flat: list[nn.Module] = []
    for p in parts:
        if type(p) is nn.Sequential:
            flat.extend(p.children())
        elif type(p) is not nn.Identity:
            flat.append(p)
    if not flat:
        return nn.Identity()
    return nn.Sequential(*flat)


def _activation(name: str | None, slope: float) -> nn.Module | None:
    if name is None:
        return None
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "leaky_relu":
        return nn.LeakyReLU(slope)
    raise ValueError(f"unknown sandwich activation {name!r}")


def _bcop(m, ctx) -> nn.Module:
    """BCOP = pixel-unshuffle by s, circular pad (p = k'//2 before, a = (k'−1)//2 after),
    conv with the k'×k' kernel K on s²·c_in channels.  Folded into ONE stride-s conv on
    the original input: W[o, c, s·u + r, s·v + t] = K[o, c·s² + r·s + t, u, v] (the
    unshuffle's channel order), circular padding s·p before and s·a after (s divides
    the input size, so wrapping mod n/s after the unshuffle is wrapping mod n before)."""
    op = m.cached_operator()
    s = m.stride[0]
    k = op.shape[-1]
    c_out, c_in = m.out_channels, m.in_channels
    w = op.reshape(c_out, c_in, s, s, k, k).permute(0, 1, 4, 2, 5, 3).reshape(c_out, c_in, s * k, s * k)
    before, after = s * (k // 2), s * ((k - 1) // 2)
    if before == after:
        return _frozen_conv(w, m.bias, before, circular=True, stride=s)
    if ctx.bcop_even == "embed":
        # wrap `before` on both sides instead: append before − after zero taps at the end
        # of each kernel axis, so the extra wrapped pixels are multiplied by zero
        big = F.pad(w, (0, before - after, 0, before - after))
        return _frozen_conv(big, m.bias, before, circular=True, stride=s)
    return nn.Sequential(
        nn.CircularPad2d((before, after, before, after)), _frozen_conv(w, m.bias, 0, circular=False, stride=s)
    )


def _orthogonal_linear(m, ctx) -> nn.Module:
    return _frozen_linear(m.cached_operator(), m.bias)


def _lln(m, ctx) -> nn.Module:
    w, b = m.cached_operator()
    return _frozen_linear(w, b)


def _mlp_head(m, ctx) -> nn.Module:
    w1, b1, w2, b2 = m.cached_operator()
    # softplus_β without a cut-over vs nn.Softplus's linear branch above βu = 20:
    # they differ by log1p(e^{−20})/β ≈ 2e-9/β, below float32 resolution there.
    return nn.Sequential(_frozen_linear(w1, b1), nn.Softplus(beta=m.beta), _frozen_linear(w2, b2))


def _soc(m, ctx) -> nn.Module:
    op = m.cached_operator()
    terms = m.eval_terms
    scales = torch.tensor([1.0 / i for i in range(1, terms)], dtype=op.dtype, device=op.device)
    filters = op.unsqueeze(0) * scales.view(-1, 1, 1, 1, 1)
    parts: list[nn.Module] = []
    if m.stride == 2:
        parts.append(nn.PixelUnshuffle(2))
    parts.append(SkewExpConv2d(filters, m.bias, m.in_channels_eff, m.out_channels, m.padding_mode))
    return _sequential(parts)


def _sandwich_linear(m, ctx) -> nn.Module:
    op = m.cached_operator()
    first = _frozen_linear(op.k1.mT, op.bias)
    if op.linear:
        return first
    return nn.Sequential(first, _activation(m.activation_name, m.negative_slope), _frozen_linear(op.k2.mT, None))


def _sandwich_output(m, ctx) -> nn.Module:
    op = m.cached_operator()
    return _frozen_linear(op.k1.mT, op.bias)


def _dense_circular_kernel(k: torch.Tensor, size) -> tuple[torch.Tensor, tuple[int, int]]:
    """Spatial cross-correlation kernel and symmetric circular padding equal to the
    circular convolution with per-frequency row-form matrices ``k`` (F, p, q).

    Impulse response G[o, i] = irfft2(k[:, i, o]) (float64); nn.Conv2d computes
    y[u] = Σ_a W[a]·x[u + a − P], so W[a] = G[(P − a) mod n]; an even side n needs a
    kernel of n + 1 taps (P = n/2) whose last tap is zero (taps 0 and n would both
    read offset P)."""
    h, w = size
    wf = w // 2 + 1
    p, q = k.shape[1], k.shape[2]
    spec = k.detach().to(torch.complex128).permute(2, 1, 0).reshape(q, p, h, wf)
    g = torch.fft.irfft2(spec, s=(h, w))  # (q, p, H, W) float64

    def taps(n: int) -> tuple[torch.Tensor, int, int]:
        size_k = n if n % 2 else n + 1
        pad = size_k // 2
        idx = (pad - torch.arange(size_k, device=k.device)) % n
        return idx, size_k, pad

    ih, sh, ph = taps(h)
    iw, sw, pw = taps(w)
    kern = g.index_select(2, ih).index_select(3, iw)
    if h % 2 == 0:
        kern[:, :, sh - 1] = 0.0
    if w % 2 == 0:
        kern[:, :, :, sw - 1] = 0.0
    return kern, (ph, pw)


def _sandwich_conv(m, ctx) -> nn.Module:
    op = m.cached_operator()
    parts: list[nn.Module] = []
    if m.stride == 2:
        parts.append(nn.PixelUnshuffle(2))
    act = _activation(m.activation_name, m.negative_slope)
    if op.pointwise:
        parts.append(_frozen_conv(op.k1[:, :, None, None], op.bias, 0, circular=False))
        if not op.linear:
            parts += [act, _frozen_conv(op.k2[:, :, None, None], None, 0, circular=False)]
        return _sequential(parts)
    size = m.conv_size
    dtype = m.weight.dtype

    def one(kernel, bias):
        if ctx.sandwich_conv == "fft":
            return FourierConv2d(kernel, bias, size)
        kern, pad = _dense_circular_kernel(kernel, size)
        return _frozen_conv(kern.to(dtype), bias, pad, circular=True)

    parts.append(one(op.k1, op.bias))
    if not op.linear:
        parts += [act, one(op.k2, None)]
    return _sequential(parts)


def _lbdn(m, ctx) -> nn.Module:
    return m.export()


def _max_min(m, ctx) -> nn.Module:
    return PairMaxMin()


def _group_sort(m, ctx) -> nn.Module:
    return ChannelGroupSort(m.group_size)


def _pair_max(m, ctx) -> nn.Module:
    return PairMax(m.channels)


def _householder(m, ctx) -> nn.Module:
    return PairHouseholder(m.theta, m.order)


def _manifold_pool(m, ctx) -> nn.Module:
    return PairLipPool(m.theta)


def _channel_pad(m, ctx) -> nn.Module:
    return ChannelResize(m.out_channels, "pad")


def _first_channels(m, ctx) -> nn.Module:
    return ChannelResize(m.n, "first")


def _normalize(m, ctx) -> nn.Module:
    return ChannelStandardize(m.mean, m.std)


def _scale(m, ctx) -> nn.Module:
    return ConstantScale(m.factor)


def _spatial_pad(m, ctx) -> nn.Module:
    return CenterZeroPad(m.size)


def _unshuffle(m, ctx) -> nn.Module:
    return nn.PixelUnshuffle(m.factor)


def _sequential_exporter(m, ctx) -> nn.Module:
    return _sequential([ctx.export(child, name) for name, child in m.named_children()])


def _classifier(m, ctx) -> nn.Module:
    return _sequential([ctx.export(m.features, "features"), ctx.export(m.head, "head")])


def _register_builtin() -> None:
    from .models.classifier import LipschitzClassifier
    from .nn.bcop import BCOPConv2d
    from .nn.heads import LLNLinear, MLPHead
    from .nn.householder import HouseholderActivation
    from .nn.normalize import Normalize, Scale
    from .nn.orthogonal import OrthogonalLinear
    from .nn.pooling import ManifoldPool, PairMaxPool
    from .nn.sandwich import LBDN, SandwichConv2d, SandwichLinear, SandwichOutput
    from .nn.simple import ChannelPad, FirstChannels, GroupSort, InvertibleDownsample, MaxMin
    from .nn.soc import SOCConv2d
    from .nn.spatial import SpatialPad

    table = {
        BCOPConv2d: _bcop,
        OrthogonalLinear: _orthogonal_linear,
        LLNLinear: _lln,
        MLPHead: _mlp_head,
        SOCConv2d: _soc,
        SandwichLinear: _sandwich_linear,
        SandwichOutput: _sandwich_output,
        SandwichConv2d: _sandwich_conv,
        LBDN: _lbdn,
        MaxMin: _max_min,
        GroupSort: _group_sort,
        PairMaxPool: _pair_max,
        HouseholderActivation: _householder,
        ManifoldPool: _manifold_pool,
        ChannelPad: _channel_pad,
        FirstChannels: _first_channels,
        Normalize: _normalize,
        Scale: _scale,
        SpatialPad: _spatial_pad,
        InvertibleDownsample: _unshuffle,
        nn.Sequential: _sequential_exporter,
        LipschitzClassifier: _classifier,
    }
    for cls, fn in table.items():
        _EXPORTERS.setdefault(cls, fn)


def _is_standard(module: nn.Module) -> bool:
    mod = type(module).__module__
    return mod == "torch.nn" or mod.startswith("torch.nn.modules.")


def _export_one(module: nn.Module, ctx: _Context) -> nn.Module:
    cls = type(module)
    fn = _EXPORTERS.get(cls)
    if fn is not None:
        return fn(module, ctx)
    where = ctx.where()
    if _is_standard(module):
        if any(True for _ in module.children()):
            raise ValueError(
                f"export: cannot export module {where!r} of type {cls.__name__}: torch.nn containers other "
                "than nn.Sequential are not supported"
            )
        if module._forward_hooks or module._forward_pre_hooks:
            raise ValueError(
                f"export: module {where!r} of type {cls.__name__} has forward hooks, which an export cannot "
                "carry; remove them first"
            )
        return copy.deepcopy(module)
    raise ValueError(
        f"export: cannot export module {where!r} of type {cls.__module__}.{cls.__name__}: no exporter is "
        "registered for it (liptorch.exporting.register_exporter adds one)"
    )


def _check_plain(module: nn.Module) -> None:
    from .nn.base import LipschitzModule

    for name, sub in module.named_modules():
        if isinstance(sub, LipschitzModule) or not (_is_standard(sub) or type(sub) in FIXED_MODULES):
            raise ValueError(
                f"export produced a non-plain module {name!r} of type {type(sub).__module__}.{type(sub).__name__}; "
                "its exporter must return standard torch.nn modules or liptorch.exporting fixed modules"
            )


def export(model: nn.Module, *, sandwich_conv: str = "fft", bcop_even: str = "pad") -> nn.Module:
    """Return an equivalent plain PyTorch module of ``model``'s eval-mode map.

    The result is built only of standard ``torch.nn`` modules and the fixed modules of
    this file (see the module docstring), is in eval mode with ``requires_grad=False``
    parameters, lives on the model's device in its dtype, and does not track later
    changes of ``model``.  ``model`` itself is not modified (its mode is untouched).

    ``sandwich_conv``: ``"fft"`` (default) exports ``SandwichConv2d`` as
    :class:`FourierConv2d` (rfft2 → per-frequency GEMM → irfft2, the layer's own
    algorithm; it also exports to ONNX); ``"dense"`` as an ``nn.Conv2d`` with an n×n (n odd) or (n+1)×(n+1)
    (n even) circular kernel at the layer's size n — a standard module, but
    O(n²) times the work per pixel, for small images or runtimes without FFTs.

    ``bcop_even``: how a BCOP layer with an even (effective) kernel k', which wraps
    k'/2 pixels before and k'/2 − 1 after (times the stride), is exported: ``"pad"``
    (default) ``nn.CircularPad2d`` with that asymmetric padding + an unpadded
    ``nn.Conv2d``; ``"embed"`` one ``nn.Conv2d(padding_mode="circular")`` with
    symmetric padding whose kernel is the k'×k' one with a zero last row and column
    (s of them for stride s): the same map with (k'+1)²/k'² the multiply-adds.

    Raises ValueError naming the first module (by its path) that cannot be exported.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export expects an nn.Module, got {type(model).__name__}")
    if sandwich_conv not in _SANDWICH_CONV_MODES:
        raise ValueError(f"sandwich_conv must be one of {_SANDWICH_CONV_MODES}, got {sandwich_conv!r}")
    _register_builtin()
    if bcop_even not in _BCOP_EVEN_MODES:
        raise ValueError(f"bcop_even must be one of {_BCOP_EVEN_MODES}, got {bcop_even!r}")
    ctx = _Context(sandwich_conv, bcop_even)
    with torch.no_grad():
        out = ctx.export(model)
    _check_plain(out)
    out.eval()
    out.requires_grad_(False)
    return out


# =========================================================================================
# Runs → files
# =========================================================================================
def compare_outputs(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |a − b|, max |a − b| / max |a|): the relative figure is normalised by the
    largest reference magnitude (element-wise ratios are meaningless near zero)."""
    ref = reference.detach().to(torch.float64)
    oth = torch.as_tensor(other).detach().to(torch.float64)
    if ref.shape != oth.shape:
        raise ValueError(f"output shapes differ: {tuple(ref.shape)} vs {tuple(oth.shape)}")
    diff = float((ref - oth).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return diff, (diff / scale if scale > 0 else diff)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median wall time (seconds) of each zero-argument callable, the calls interleaved
    round-robin so background load affects all of them alike."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _script(module: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def _missing(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def _save_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    missing = _missing("onnx", "onnxscript")
    if missing:
        raise ImportError(
            f"ONNX export needs the packages {', '.join(missing)}: pip install onnx onnxscript "
            "(and onnxruntime to check the file)"
        )
    batch = torch.export.Dim("batch", min=1)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), input_names=["input"], output_names=["logits"], dynamo=True,
                dynamic_shapes=({0: batch},), verbose=False,
            )
    finally:
        onnx_log.setLevel(level)
    program.save(str(path))


def export_run(
    run_dir,
    out_path,
    *,
    probe_batch: int = 64,
    timing_batch: int = 256,
    repeats: int = 7,
    sandwich_conv: str = "fft",
    bcop_even: str = "pad",
    seed: int = 0,
) -> dict:
    """Load a training run (``liptorch.load_checkpoint(run_dir)``), export it and save it.

    ``out_path`` ending in ``.pt``: TorchScript archive (loads with ``torch.jit.load``,
    no liptorch needed); ``.onnx``: ONNX (needs ``pip install onnx onnxscript``; ImportError
    otherwise).  ``sandwich_conv`` and ``bcop_even`` are passed to :func:`export`.

    Returns a dict: ``path``, ``format``, ``checked`` (what the probe compared with the
    original: the reloaded file, or the exported module when onnxruntime is missing),
    ``probe_batch``, ``max_abs_diff``, ``max_rel_diff`` (see :func:`compare_outputs`; on
    uniform [0, 1) probe images), and ``timing``: ``batch_size``, median ``original_ms``
    (eval mode, no grad), ``exported_ms`` (the plain module in this process),
    ``saved_ms`` (the reloaded file: TorchScript, or onnxruntime with as many threads
    as PyTorch, when installed; else None) and ``speedup`` = original_ms / exported_ms, from ``repeats`` interleaved runs.
    """
    from . import load_checkpoint

    out = Path(out_path)
    suffix = out.suffix.lower()
    if suffix not in (".pt", ".onnx"):
        raise ValueError(f"export_run: the output must end in .pt (TorchScript) or .onnx, got {str(out_path)!r}")
    for name, value in (("probe_batch", probe_batch), ("timing_batch", timing_batch), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if suffix == ".onnx" and _missing("onnx", "onnxscript"):
        raise ImportError(
            f"ONNX export needs the packages {', '.join(_missing('onnx', 'onnxscript'))}: "
            "pip install onnx onnxscript (and onnxruntime to check the file)"
        )
    model = load_checkpoint(run_dir)
    model.eval()
    input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise ValueError(f"export_run: the model of {run_dir} has no input_shape (not a LipschitzClassifier)")
    exported = export(model, sandwich_conv=sandwich_conv, bcop_even=bcop_even)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    probe = torch.rand((probe_batch, *input_shape), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    bench = torch.rand((timing_batch, *input_shape), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)

    saved_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    if suffix == ".pt":
        fmt = "torchscript"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(_script(exported), str(out))
            loaded = torch.jit.load(str(out), map_location=device)
        saved_fn = loaded
        checked = "saved file (torch.jit.load)"
    else:
        fmt = "onnx"
        _save_onnx(exported, probe, out)
        checked = "exported module (onnxruntime not installed)"
        if not _missing("onnxruntime"):
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # same budget as PyTorch
            session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
            in_name = session.get_inputs()[0].name

            def saved_fn(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(None, {in_name: x.detach().cpu().numpy()})[0])

            checked = "saved file (onnxruntime)"

    with torch.no_grad():
        reference = model(probe)
        candidate = saved_fn(probe) if saved_fn is not None else exported(probe)
        max_abs, max_rel = compare_outputs(reference, candidate)

        fns = {"original": lambda: model(bench), "exported": lambda: exported(bench)}
        if saved_fn is not None:
            fns["saved"] = lambda: saved_fn(bench)
        times = time_interleaved(fns, repeats=repeats)
    timing = {
        "batch_size": timing_batch,
        "original_ms": 1e3 * times["original"],
        "exported_ms": 1e3 * times["exported"],
        "saved_ms": 1e3 * times["saved"] if "saved" in times else None,
        "speedup": times["original"] / times["exported"] if times["exported"] > 0 else math.inf,
        "repeats": repeats,
    }
    return {
        "path": str(out),
        "format": fmt,
        "sandwich_conv": sandwich_conv,
        "checked": checked,
        "probe_batch": probe_batch,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "timing": timing,
    }
