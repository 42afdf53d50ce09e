"""BCOP: orthogonal convolutions from products of symmetric projectors (bcop.md §1–7).

Li, Haque, Anil, Lucas, Grosse, Jacobsen, "Preventing Gradient Attenuation in
Lipschitz Constrained Convolutional Networks", NeurIPS 2019.

Construction (stride 1, kernel k, c = max(c_in, c_out) channels):

* 2k − 1 free matrices M_0 … M_{2k−2} ∈ R^{c×c}, orthonormalised together by one
  batched Björck iteration into O_0 … O_{2k−2} ∈ O(c);
* H = O_0 and half-rank projectors P_j = O_j D (O_j D)ᵀ, D = the first ⌊c/2⌋ columns;
* the symbol  U(z₁, z₂) = H · Π_{i=1}^{k−1} (P_{2i−1} + (I − P_{2i−1}) z₁)(P_{2i} + (I − P_{2i}) z₂),
  i.e. the kernel H □ B(P₁,Q₁) □ … □ B(P_{k−1},Q_{k−1}) with every pair used exactly
  once (the published loop reused the first pair and dropped the last, bcop.md §11);
* tap U[a, b] is the coefficient of z₁^a z₂^b; the layer keeps the top-left
  c_out × c_in block of every tap and applies it as a cross-correlation
  y[:, i, j] = Σ_{a,b} U[a,b] x[:, i+a−p, j+b−p] with circular indices and
  p = k//2 pixels of wrap before, (k−1)//2 after.

Each factor (P + (I−P)z) is unitary on the torus (P(I−P) = 0), so U(z) is unitary at
every point of the torus and the circular convolution is orthogonal at every input
size n (also n < k).  With c_in ≤ c_out it is an isometry (JᵀJ = I); with
c_in > c_out it is a co-isometry (JJᵀ = I, gradient-norm preserving).  Both are exactly
1-Lipschitz up to Björck's residual, which :meth:`BCOPConv2d.lipschitz_bound` measures
by an exact per-frequency SVD of the cached kernel (certification.md §3.2a,f).

Stride s: pixel-unshuffle by s (a permutation) then a stride-1 BCOP with kernel
max(1, k // s) on s²·c_in channels (bcop.md §7).

Speed (CPU): the 2k − 1 matrices go through one batched Björck and the taps are built
by 2(k−1) one-sided factor products (one matmul per tap), Björck and assembly forming a
single autograd node with a hand-written backward (first-order gradients only); that
small-matrix work runs on one thread (:func:`liptorch.ops.orthogonalize.serial_for`).
Memory layout: in training mode the convolution keeps the input's layout (channels_last
in, channels_last out; NCHW in, NCHW out): on the AVX2 CPU measured, oneDNN's weight
gradient is ≈ 20 % slower in channels_last, so following an NCHW input saves ≈ 0.06–0.1
of a plain convolution's training step.  In eval mode the input is always padded into
channels_last (NHWC), whose forward measured ≈ 0.07 of a plain convolution faster than
NCHW's; eval outputs are channels_last.  Forwards that record no gradient pad into a
reused per-thread buffer.  In training, pad and
convolution are one autograd node (:func:`circular_conv2d`) whose backward stays on the
unpadded grid: the input gradient is a circular convolution with the adjoint kernel, so
there is no input gradient on the padded grid to fold back.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..ops.fft import as_size, circular_kernel_spectrum
from ..ops.freq_major import add_dc_bias, irfft2_freq_major, kernel_spectrum_rows, memo_tap_phases, rfft2_freq_major
from ..ops.linalg import round_up
from ..ops.orthogonalize import bjorck_backward_pass, bjorck_forward_pass, limit_threads, serial_for
from .base import LipschitzModule, check_positive_int
from .orthogonal import BjorckSettings

__all__ = ["BCOPConv2d", "assemble_bcop_kernel", "bcop_kernel", "circular_conv2d", "circular_pad", "pixel_unshuffle"]


_PAD_AFTER = ((0, 0, 0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 0, 1))  # one zero tap after, along dim 0 / 1


def _factor_forward(x: torch.Tensor, proj: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Multiply the tap grid ``x`` (ka, kb, r, c) on the right by the symbol P + (I − P)z
    along tap axis ``dim``: Y[a] = X[a] P + X[a−1] (I − P)  (one more tap along ``dim``).
    ``out``, if given, is the (ka', kb', r, c) result buffer (any memory layout)."""
    m = x.shape[dim]
    xp = x @ proj
    if out is None:
        y = torch.constant_pad_nd(xp, _PAD_AFTER[dim])
    else:
        y = out
        y.narrow(dim, 0, m).copy_(xp)
        y.narrow(dim, m, 1).zero_()
    tail = y.narrow(dim, 1, m)
    tail.add_(x)
    tail.sub_(xp)
    return y


def _assemble_forward(ortho: torch.Tensor, rows: int, cols: int, save: bool):
    nmat, c, _ = ortho.shape
    k = (nmat + 1) // 2
    # Only the first c_out rows of H are ever needed: every factor multiplies on the right.
    taps = ortho[0].narrow(0, 0, rows).reshape(1, 1, rows, c)
    projs, inputs = None, []
    if k > 1:
        half = ortho.narrow(0, 1, nmat - 1).narrow(2, 0, c // 2)
        projs = half @ half.mT  # (2k − 2, c, c): P_j = O_j D (O_j D)ᵀ
        for j, proj in enumerate(projs.unbind(0)):  # pair i = (2i−1, 2i), each used exactly once, in order
            if save:
                inputs.append(taps)
            out = None
            if j == nmat - 2 and cols == c:
                # write the last factor straight into the kernel's channels_last layout
                out = ortho.new_empty((rows, k, k, c)).permute(1, 2, 0, 3)
            taps = _factor_forward(taps, proj, j % 2, out)
    # (k, k, c_out, c) → physical (c_out, k, k, c_in) → logical (c_out, c_in, k, k).
    kernel = (taps if cols == c else taps.narrow(3, 0, cols)).permute(2, 0, 1, 3)
    if not kernel.is_contiguous():
        kernel = kernel.contiguous()
    return kernel.permute(0, 3, 1, 2), projs, inputs


def _assemble_backward(grad: torch.Tensor, ortho: torch.Tensor, projs, inputs, rows: int, cols: int):
    nmat, c, _ = ortho.shape
    k = (nmat + 1) // 2
    g = grad.permute(2, 3, 0, 1)  # (k, k, c_out, c_in)
    if cols == c:
        g = g.contiguous()
    else:
        g = torch.cat([g, g.new_zeros(k, k, rows, c - cols)], dim=-1)
    dortho = torch.zeros_like(ortho)
    if k > 1:
        dp = ortho.new_empty((nmat - 1, c, c))
        dp_list, proj_list = dp.unbind(0), projs.unbind(0)
        for j in range(nmat - 2, -1, -1):
            x, dim = inputs[j], j % 2
            m = x.shape[dim]
            d1 = g.narrow(dim, 1, m)
            e = g.narrow(dim, 0, m) - d1
            # Y[a] = X[a]P + X[a−1](I−P):  dX[a] = (dY[a] − dY[a+1]) P + dY[a+1],
            #                              dP = Σ_a X[a]ᵀ (dY[a] − dY[a+1])   (P symmetric)
            torch.mm(x.reshape(-1, c).mT, e.reshape(-1, c), out=dp_list[j])
            g = torch.matmul(e, proj_list[j]).add_(d1)
        half = ortho.narrow(0, 1, nmat - 1).narrow(2, 0, c // 2)
        # P = QQᵀ: dQ = (dP + dPᵀ) Q
        dortho.narrow(0, 1, nmat - 1).narrow(2, 0, c // 2).copy_(torch.baddbmm(dp @ half, dp.mT, half))
    dortho[0].narrow(0, 0, rows).copy_(g.reshape(rows, c))
    return dortho


class _AssembleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ortho, rows, cols):
        with serial_for(ortho):
            kernel, projs, inputs = _assemble_forward(ortho, rows, cols, ctx.needs_input_grad[0])
        ctx.dims = (rows, cols)
        ctx.inputs = inputs
        ctx.save_for_backward(ortho, projs)
        return kernel

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ortho, projs = ctx.saved_tensors
        with serial_for(ortho):
            d = _assemble_backward(grad, ortho, projs, ctx.inputs, *ctx.dims)
        return d, None, None


def assemble_bcop_kernel(ortho: torch.Tensor, out_channels: int, in_channels: int) -> torch.Tensor:
    """Assemble the BCOP kernel from 2k − 1 orthogonal c×c matrices (differentiable,
    first order, with a hand-written backward).

    ``ortho`` has shape (2k − 1, c, c); returns the cross-correlation kernel of shape
    (out_channels, in_channels, k, k) — the top-left block of every tap of
    U(z) = O_0 Π_i (P_{2i−1} + (I−P_{2i−1}) z₁)(P_{2i} + (I−P_{2i}) z₂), tap (a, b) being
    the coefficient of z₁^a z₂^b, P_j = O_j D (O_j D)ᵀ with D the first ⌊c/2⌋ columns —
    in channels_last memory format.
    """
    if ortho.dim() != 3 or ortho.shape[-1] != ortho.shape[-2] or ortho.shape[0] % 2 != 1:
        raise ValueError(f"assemble_bcop_kernel expects a (2k−1, c, c) stack, got shape {tuple(ortho.shape)}")
    c = ortho.shape[-1]
    if not (1 <= out_channels <= c and 1 <= in_channels <= c):
        raise ValueError(f"channel counts ({out_channels}, {in_channels}) must lie in [1, {c}]")
    return _AssembleFn.apply(ortho.contiguous(), int(out_channels), int(in_channels))


class _BCOPKernelFn(torch.autograd.Function):
    """M (2k−1, c, c) → kernel, Björck and assembly in one autograd node."""

    @staticmethod
    def forward(ctx, m, rows, cols, iters, order, scale, early_stop):
        save = ctx.needs_input_grad[0]
        with serial_for(m):
            ortho, saved, s = bjorck_forward_pass(m, iters, order, scale, 10, early_stop, save)
            kernel, projs, inputs = _assemble_forward(ortho, rows, cols, save)
        if save:
            ctx.state = (ortho, projs, inputs, saved, s, order, rows, cols)
        return kernel

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ortho, projs, inputs, saved, s, order, rows, cols = ctx.state
        with serial_for(ortho):
            d = _assemble_backward(grad, ortho, projs, inputs, rows, cols)
            d = bjorck_backward_pass(d, saved, order, s)
        return d, None, None, None, None, None, None


def bcop_kernel(
    matrices: torch.Tensor,
    out_channels: int,
    in_channels: int,
    iters: int = 20,
    order: int = 1,
    scale: str = "power",
    early_stop: bool = True,
) -> torch.Tensor:
    """The BCOP kernel from the free matrices: Björck-orthonormalise the (2k − 1, c, c)
    stack (:func:`liptorch.ops.orthogonalize.bjorck_orthonormalize`, 10 power steps for
    the scale) and assemble it (:func:`assemble_bcop_kernel`), as one differentiable
    (first-order) operation."""
    if matrices.dim() != 3 or matrices.shape[-1] != matrices.shape[-2] or matrices.shape[0] % 2 != 1:
        raise ValueError(f"bcop_kernel expects a (2k−1, c, c) stack, got shape {tuple(matrices.shape)}")
    c = matrices.shape[-1]
    if not (1 <= out_channels <= c and 1 <= in_channels <= c):
        raise ValueError(f"channel counts ({out_channels}, {in_channels}) must lie in [1, {c}]")
    return _BCOPKernelFn.apply(matrices.contiguous(), int(out_channels), int(in_channels), iters, order, scale, early_stop)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _wrap_fill(out: torch.Tensor, x: torch.Tensor, before: int, after: int, hdim: int) -> None:
    """Write ``x`` (spatial dims ``hdim``, ``hdim + 1``) into the middle of ``out`` (the
    same layout, ``before + after`` larger in both) and fill the border by wrapping once.
    Needs max(before, after) ≤ min(H, W)."""
    wdim = hdim + 1
    h, w = x.shape[hdim], x.shape[wdim]
    mid = out.narrow(hdim, before, h)  # the h unwrapped rows
    mid.narrow(wdim, before, w).copy_(x)
    # The wrapped borders are thin copies: one thread, so they add no thread-team
    # barriers (each of which can cost a scheduler time slice on a busy machine).
    with limit_threads(1):
        if before:
            mid.narrow(wdim, 0, before).copy_(mid.narrow(wdim, w, before))
        if after:
            mid.narrow(wdim, before + w, after).copy_(mid.narrow(wdim, before, after))
        if before:
            out.narrow(hdim, 0, before).copy_(out.narrow(hdim, h, before))
        if after:
            out.narrow(hdim, before + h, after).copy_(out.narrow(hdim, before, after))


def _circular_pad_into(x: torch.Tensor, before: int, after: int, out: torch.Tensor | None) -> torch.Tensor:
    """Forward of the wrap-once circular pad into an (N, H', W', C) buffer; returns the
    (N, C, H', W') channels_last view.  Needs max(before, after) ≤ min(H, W)."""
    n, ch, h, w = x.shape
    if out is None:
        out = x.new_empty((n, h + before + after, w + before + after, ch))
    _wrap_fill(out, x.permute(0, 2, 3, 1), before, after, 1)
    return out.permute(0, 3, 1, 2)


def _circular_pad_nchw(x: torch.Tensor, before: int, after: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The wrap-once circular pad into a contiguous (NCHW) tensor, ``out`` if given."""
    n, ch, h, w = x.shape
    if out is None:
        out = x.new_empty((n, ch, h + before + after, w + before + after))
    _wrap_fill(out, x, before, after, 2)
    return out


def _circular_pad_adjoint(g: torch.Tensor, before: int, after: int, h: int, w: int, channels_last: bool) -> torch.Tensor:
    """Adjoint of the wrap-once circular pad: the (N, C, H', W') gradient folded back onto
    (N, C, H, W) — one copy of the interior (into the input's memory layout, so autograd
    needs no further conversion) plus the wrapped strips added in place."""
    gp = g.permute(0, 2, 3, 1)  # (N, H', W', C) view (a plain view for channels_last g)
    interior = gp.narrow(1, before, h).narrow(2, before, w)
    if channels_last:
        res = interior.clone(memory_format=torch.contiguous_format)  # (N, H, W, C) memory
    else:
        res = torch.empty((g.shape[0], g.shape[1], h, w), dtype=g.dtype, device=g.device).permute(0, 2, 3, 1)
        res.copy_(interior)  # NCHW memory, indexed as (N, H, W, C)
    with limit_threads(1):
        for src_rows, dst_rows, count in ((0, h - before, before), (before + h, 0, after)):
            if count:  # rows wrapped from the other side (all padded columns of them)
                band = gp.narrow(1, src_rows, count)
                res.narrow(1, dst_rows, count).add_(band.narrow(2, before, w))
                if before:
                    res.narrow(1, dst_rows, count).narrow(2, w - before, before).add_(band.narrow(2, 0, before))
                if after:
                    res.narrow(1, dst_rows, count).narrow(2, 0, after).add_(band.narrow(2, before + w, after))
        rows = gp.narrow(1, before, h)
        if before:
            res.narrow(2, w - before, before).add_(rows.narrow(2, 0, before))
        if after:
            res.narrow(2, 0, after).add_(rows.narrow(2, before + w, after))
    return res.permute(0, 3, 1, 2)


class _CircularPadFn(torch.autograd.Function):
    """Wrap-once circular pad with a one-pass hand-written backward (autograd through the
    in-place strip copies would zero-fill and copy the padded gradient several times)."""

    @staticmethod
    def forward(ctx, x, before, after):
        cl = _is_channels_last(x)
        ctx.dims = (before, after, x.shape[-2], x.shape[-1], cl)
        return _circular_pad_into(x, before, after, None)

    @staticmethod
    def backward(ctx, g):
        return _circular_pad_adjoint(g, *ctx.dims), None, None


def circular_pad(x: torch.Tensor, before: int, after: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Circular padding of both spatial dims of (N, C, H, W) by ``before``/``after``
    pixels, returned in channels_last memory format (what the convolution prefers).

    Wraps any number of times, so it also works for H or W smaller than the padding.
    ``out``, if given, is an (N, H', W', C) contiguous buffer written in place (only
    when no gradient is recorded).  Differentiable; the common wrap-once case has a
    hand-written backward (the adjoint folds the wrapped strips back, one pass).
    """
    n, ch, h, w = x.shape
    if before == 0 and after == 0:
        return x
    if max(before, after) <= min(h, w):
        if torch.is_grad_enabled() and x.requires_grad:
            return _CircularPadFn.apply(x, before, after)
        return _circular_pad_into(x, before, after, out)
    idx_h = torch.arange(-before, h + after, device=x.device) % h
    idx_w = torch.arange(-before, w + after, device=x.device) % w
    padded = x.index_select(2, idx_h).index_select(3, idx_w)
    return padded.contiguous(memory_format=torch.channels_last)


_conv_backward = torch.ops.aten.convolution_backward.default


class _CircularConvFn(torch.autograd.Function):
    """y = conv2d(circular_pad(x), W) + b with a backward that never leaves the unpadded
    grid: the input gradient is the circular convolution of g with the adjoint kernel
    Wᵀ flipped (pad g by (after, before), one 'valid' forward convolution), and the weight
    gradient is one weight-only convolution backward against the saved padded input.
    Against autograd through the pad and the conv this drops the input gradient on the
    padded (H', W') grid and the fold of its wrapped strips back onto (H, W).

    ``cl`` chooses the memory layout of every tensor involved: True pads into NHWC and
    convolves with a channels_last kernel, False pads into NCHW and convolves with a
    contiguous kernel; the incoming gradient is brought to the same layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, before, after, cl):
        if cl:
            weight = weight.contiguous(memory_format=torch.channels_last)
            xp = _circular_pad_into(x, before, after, None)
        else:
            weight = weight.contiguous()
            xp = _circular_pad_nchw(x, before, after)
        ctx.save_for_backward(xp if ctx.needs_input_grad[1] else None, weight)
        ctx.pads = (before, after)
        ctx.channels_last = cl
        return F.conv2d(xp, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        xp, weight = ctx.saved_tensors
        before, after = ctx.pads
        g = g.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x:
            adjoint = weight.transpose(0, 1).flip(2, 3)
            if ctx.channels_last:
                gx = F.conv2d(_circular_pad_into(g, after, before, None), adjoint)
            else:
                gx = F.conv2d(_circular_pad_nchw(g, after, before), adjoint.contiguous())
        if need_w:
            _, gw, gb = _conv_backward(
                g, xp, weight, [weight.shape[0]] if need_b else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [False, True, need_b],
            )
        elif need_b:
            gb = g.sum(dim=(0, 2, 3))
        return gx, gw, gb, None, None, None


def circular_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, before: int, after: int,
                    out: torch.Tensor | None = None, layout: str = "input") -> torch.Tensor:
    """Cross-correlation of (N, C, H, W) ``x`` with ``weight`` (k = before + after + 1)
    on the torus: ``F.conv2d(circular_pad(x, before, after), weight, bias)``.

    Recorded for autograd (wrap-once case) through a hand-written first-order backward
    that works on the unpadded grid (:class:`_CircularConvFn`); otherwise the pad goes
    into ``out`` if given (the buffer :func:`_pad_workspace` hands out for ``x``) and one
    ``F.conv2d`` follows.

    ``layout`` picks the memory layout of the wrap-once computation: ``"input"`` (the
    default) that of ``x`` (channels_last if ``x`` is, else NCHW), ``"channels_last"``
    always NHWC.  With or without a graph the same layout gives the same bits; wrapping
    more than once always goes through :func:`circular_pad` (channels_last)."""
    if layout not in ("input", "channels_last"):
        raise ValueError(f"layout must be 'input' or 'channels_last', got {layout!r}")
    h, w = x.shape[-2:]
    if not 0 < max(before, after) <= min(h, w):
        return F.conv2d(circular_pad(x, before, after), weight, bias)
    cl = layout == "channels_last" or _is_channels_last(x)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return _CircularConvFn.apply(x, weight, bias, before, after, cl)
    if cl:
        return F.conv2d(_circular_pad_into(x, before, after, out), weight.contiguous(memory_format=torch.channels_last), bias)
    return F.conv2d(_circular_pad_nchw(x, before, after, out), weight.contiguous(), bias)


_WORKSPACE = threading.local()
_WORKSPACE_SLOTS = 8


def _pad_workspace(x: torch.Tensor, before: int, after: int, channels_last: bool) -> torch.Tensor | None:
    """A reusable buffer for the padded input, per thread, for forwards that record no
    gradient (the buffer is dead once ``F.conv2d`` returns): (N, H', W', C) if
    ``channels_last``, else (N, C, H', W').  Reusing it avoids fresh
    multi-megabyte allocations, whose page faults cost as much as a quarter of the
    padding copy.  None when a graph is being recorded."""
    n, ch, h, w = x.shape
    if torch.is_grad_enabled() or x.device.type != "cpu" or not 0 < max(before, after) <= min(h, w):
        return None
    hp, wp = h + before + after, w + before + after
    key = (n, hp, wp, ch, x.dtype) if channels_last else (n, ch, hp, wp, x.dtype)
    slots = getattr(_WORKSPACE, "slots", None)
    if slots is None:
        slots = _WORKSPACE.slots = {}
    buf = slots.pop(key, None)
    if buf is None:
        with torch.inference_mode(False):  # a normal tensor: reusable outside inference mode
            buf = torch.empty(key[:4], dtype=x.dtype)
        if len(slots) >= _WORKSPACE_SLOTS:
            slots.pop(next(iter(slots)))
    slots[key] = buf  # most recently used last
    return buf


def pixel_unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel-unshuffle (C, s·h, s·w) → (C·s², h, w) with ``F.pixel_unshuffle``'s channel
    order (channel, row offset, column offset), returned in channels_last memory format.
    A permutation of coordinates (orthogonal).  Unlike ``F.pixel_unshuffle`` it also
    handles an empty batch."""
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // factor, factor, w // factor, factor).permute(0, 2, 4, 1, 3, 5)
    y = y.reshape(n, h // factor, w // factor, c * factor * factor)
    return y.permute(0, 3, 1, 2)


def _as_square(name: str, value, minimum: int) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints (square), got {value!r}")
        value = value[0]
    return check_positive_int(name, value, minimum)


class BCOPConv2d(BjorckSettings, LipschitzModule):
    r"""Orthogonal 2-D convolution by Block Convolution Orthogonal Parameterization.

    ``BCOPConv2d(in_channels, out_channels, kernel_size, stride=1, bias=True,
    bjorck_iters=20, bjorck_order=1, bjorck_scale="power", *, bjorck_early_stop=True)``

    Math (see the module docstring): the symbol U(z₁, z₂) = H Π (P + (I−P)z₁)(Q + (I−Q)z₂)
    of a k × k kernel on c = max(s²·c_in, c_out) channels is unitary on the torus, so the
    circularly padded convolution with its top-left c_out × (s²·c_in) block is, at every
    input size, orthogonal (square), an isometry (c_in·s² < c_out) or a co-isometry
    (c_in·s² > c_out, gradient-norm preserving).  Stride s is a pixel-unshuffle (a
    permutation) followed by a stride-1 BCOP with kernel max(1, k // s).

    Lipschitz guarantee: 1 up to the Björck residual.  :meth:`lipschitz_bound` returns the
    exact operator norm of the eval-mode map, max over frequencies of σ_max of the
    per-frequency matrices of the cached kernel (fp64 SVD), at the layer's input size.

    Padding is always circular: k // 2 pixels before and (k − 1) // 2 after (even kernels
    wrap one more pixel in front).  ``kernel_size`` must be a multiple of ``stride`` or
    smaller than it.  In eval mode the forward is one ``F.conv2d`` with the cached
    assembled kernel, on a channels_last padded input (the output is channels_last).

    Training forwards (a graph is recorded) compute the same circular convolution in
    one of two ways, chosen by ``conv_impl``: ``"direct"`` pads and convolves in the
    input's memory layout (:func:`circular_conv2d`); ``"fft"`` applies the kernel's
    per-frequency c_in×c_out matrices (rfft2, one batched complex GEMM, irfft2; exact
    gradients through the hand-written FFT adjoints), ≈ k²/4 times fewer multiply-adds
    than the direct convolution, which pays off once the kernel is large, the channels
    wide and the image small.  ``"auto"`` (default) takes ``"fft"`` on CPU when, after
    the unshuffle, the kernel is at least 3×3, min(s²·c_in, c_out) ≥ 48 and H·W ≤ 256,
    else ``"direct"`` — a rule measured on an AVX2 CPU (train step, 64 channels at
    16×16, batch 64: 3×3 0.98× of a plain ``nn.Conv2d`` with FFT against 1.20× direct,
    5×5 30.5 ms against 80.5 ms; 2×2 kernels, 16–32 channels or 32×32 images favour
    direct).  The map, its bound and eval are the same either way.

    Björck: ``bjorck_iters`` iterations (at most; see ``bjorck_early_stop``) of order 1 or
    2 from W / s, s = a power-iteration estimate of σ_max started from a fixed vector
    (deterministic, never touches the global RNG), ‖W‖_F or √(rows·cols).
    ``bjorck_early_stop`` stops once converged to working precision, where further
    iterations change the kernel only by rounding (:func:`bjorck_orthonormalize`).
    The power iteration takes at most 10 steps and stops once its estimate has
    settled (relative change < 1e-3): the scale does not change the limit.

    Gradients are first order (the parameter transform has a hand-written backward);
    double backward through the kernel is not supported.
    """

    guarantee = "orthogonal"
    _derived_state = ("_phase_memo",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        bias: bool = True,
        bjorck_iters: int = 20,
        bjorck_order: int = 1,
        bjorck_scale: str = "power",
        *,
        bjorck_early_stop: bool = True,
        conv_impl: str = "auto",
    ) -> None:
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        out_channels = check_positive_int("out_channels", out_channels)
        k = _as_square("kernel_size", kernel_size, 1)
        s = _as_square("stride", stride, 1)
        if s > 1 and k > s and k % s != 0:
            raise ValueError(
                f"kernel_size must be a multiple of stride (or smaller than it): a {k}x{k} kernel with "
                f"stride {s} would become a {k // s}x{k // s} kernel after the {s}x{s} pixel-unshuffle and "
                f"silently lose receptive field; use kernel_size={(k // s + 1) * s} or {max(s, (k // s) * s)}"
            )
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        self._init_bjorck(bjorck_iters, bjorck_order, bjorck_scale, bjorck_early_stop)
        if conv_impl not in ("auto", "direct", "fft"):
            raise ValueError(f"conv_impl must be 'auto', 'direct' or 'fft', got {conv_impl!r}")
        #: how training forwards compute the circular convolution (see the class docstring)
        self.conv_impl = conv_impl

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (k, k)
        self.stride = (s, s)
        #: kernel size, input channels and padding of the stride-1 BCOP after unshuffle
        self.inner_kernel_size = max(1, k // s)
        self.inner_in_channels = in_channels * s * s
        self.channels = max(self.inner_in_channels, out_channels)
        self.padding = (self.inner_kernel_size // 2, (self.inner_kernel_size - 1) // 2)

        c, kk = self.channels, self.inner_kernel_size
        self.matrices = nn.Parameter(torch.empty(2 * kk - 1, c, c))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """M_j ← random orthogonal / √c (bcop.md §4); bias ~ U(−1/√c_out, 1/√c_out)."""
        c = self.channels
        with torch.no_grad():
            g = torch.randn(self.matrices.shape, dtype=torch.float64)
            q, r = torch.linalg.qr(g)
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            self.matrices.copy_(q / math.sqrt(c))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.out_channels)
                self.bias.uniform_(-bound, bound)
        self.invalidate_cache()

    # -- operator -------------------------------------------------------------------------
    def orthogonal_matrices(self) -> torch.Tensor:
        """The 2k − 1 Björck-orthonormalised matrices O_j (differentiable)."""
        return self._orthonormalize(self.matrices)

    def _transform(self, matrices: torch.Tensor) -> torch.Tensor:
        return bcop_kernel(matrices, self.out_channels, self.inner_in_channels, **self._bjorck_kwargs())

    def compute_operator(self) -> torch.Tensor:
        return self._transform(self.matrices)

    def kernel(self) -> torch.Tensor:
        """The kernel (c_out, s²·c_in, k', k') the forward uses in the current mode."""
        return self.operator()

    def _use_fft(self, x: torch.Tensor) -> bool:
        impl = self.conv_impl
        if impl == "direct" or self.inner_kernel_size == 1 or not (self.training and torch.is_grad_enabled()):
            return False
        if x.shape[0] == 0:
            return False  # nothing to transform; the direct path handles an empty batch
        if impl == "fft":
            return True
        return (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and self.inner_kernel_size >= 3
            and min(self.inner_in_channels, self.out_channels) >= 48
            and x.shape[-2] * x.shape[-1] <= 256
        )

    def _apply_fft(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """The circular convolution as per-frequency GEMMs (training path, differentiable)."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        cd = torch.complex128 if kernel.dtype == torch.float64 else torch.complex64
        k, p = self.inner_kernel_size, self.padding[0]
        phases = memo_tap_phases(self.__dict__.setdefault("_phase_memo", {}), (k, k), (h, w), (p, p), kernel.device, cd)
        k1 = kernel_spectrum_rows(kernel, phases)  # row form: ŷᵀ = x̂ᵀ·k1
        yh = add_dc_bias(torch.bmm(rfft2_freq_major(x), k1), self.bias, (h, w))
        return irfft2_freq_major(yh, (h, w)).contiguous()

    def apply_operator(self, x: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        if s > 1:
            x = pixel_unshuffle(x, s)
        if self._use_fft(x):
            return self._apply_fft(x, op)
        before, after = self.padding
        # Training follows the input's layout (NCHW makes oneDNN's weight gradient faster);
        # eval pads into NHWC, the faster inference forward (see the module docstring).
        cl = not self.training or _is_channels_last(x)
        layout = "channels_last" if cl else "input"
        return circular_conv2d(x, op, self.bias, before, after, _pad_workspace(x, before, after, cl), layout)

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects {self.in_channels} input channels, got shape {tuple(x.shape)}")
        if x.dtype != self.matrices.dtype:
            raise ValueError(
                f"{name} expects a {self.matrices.dtype} input (the dtype of its parameters), got {x.dtype}"
            )
        h, w = x.shape[-2:]
        s = self.stride[0]
        if h < 1 or w < 1 or h % s or w % s:
            raise ValueError(f"{name} with stride {s} needs H and W positive multiples of {s}, got {h}x{w}")
        if self.conv_impl == "fft" and x.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"{name} with conv_impl='fft' needs float32 or float64 (torch.fft has no {x.dtype} CPU kernels); "
                "use conv_impl='auto' or 'direct'"
            )

    # -- bound ----------------------------------------------------------------------------
    def compute_lipschitz_bound(self, op: torch.Tensor, input_size) -> float:
        if input_size is None:
            raise ValueError(
                f"{type(self).__name__}.lipschitz_bound needs the spatial size of this layer's input: the layer "
                "has not seen an input yet, so pass input_size=(H, W)"
            )
        h, w = as_size(input_size)
        s = self.stride[0]
        if h % s or w % s:
            raise ValueError(f"input_size must be a multiple of the stride {s}, got {h}x{w}")
        p = self.padding[0]
        spec = circular_kernel_spectrum(op.detach().to(torch.float64), (h // s, w // s), offset=(p, p))
        return round_up(float(torch.linalg.matrix_norm(spec, ord=2).max()))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"bias={self.bias is not None}, " + self._bjorck_repr()
            + (f", conv_impl={self.conv_impl!r}" if self.conv_impl != "auto" else "")
        )
