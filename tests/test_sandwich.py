"""Tests of the sandwich (LBDN) layers: Cayley identity, Fourier conventions, exact
Jacobians against certified bounds, the LBDN container and its MLP export, caching and
state handling, argument validation (sandwich.md §7, certification.md §4)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from liptorch.nn.sandwich import (
    LBDN,
    SandwichConv2d,
    SandwichLinear,
    SandwichOutput,
    gradient_norms,
    resolve_activation,
)
from liptorch.nn.simple import MaxMin
from liptorch.ops import circular_kernel_spectrum
from liptorch.ops.cayley import (
    cayley_block,
    cayley_residual_norm,
    cayley_rows,
    fold_sandwich_scales,
    sandwich_cayley,
    sandwich_residual_bound,
)
from liptorch.ops.freq_major import (
    irfft2_freq_major,
    rfft2_freq_major,
    tap_gram_weights,
    tap_phase_matrix,
)

TOL = 1e-6


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def impulse_jacobian(layer: nn.Module, in_shape, dtype=torch.float64) -> torch.Tensor:
    """Exact Jacobian of an affine layer: push the identity basis through it (eval mode)."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *in_shape)
    with torch.no_grad():
        y0 = layer(torch.zeros((1, *in_shape), dtype=dtype))
        y = layer(basis) - y0
    return y.reshape(n, -1).T


def autograd_jacobian_norms(layer: nn.Module, in_shape, points: int = 3, dtype=torch.float64, spread: float = 1.0):
    """Spectral norms of the autograd Jacobian at random points (eval mode).  All rows of
    J come from one backward pass: the point is replicated once per output coordinate
    and each copy receives one basis cotangent (the layer acts on samples independently)."""
    norms = []
    for _ in range(points):
        x = spread * torch.randn(in_shape, dtype=dtype)
        with torch.no_grad():
            n_out = layer(x.unsqueeze(0)).numel()
        xs = x.unsqueeze(0).repeat(n_out, *([1] * x.dim())).requires_grad_()
        y = layer(xs).reshape(n_out, n_out)
        (grad,) = torch.autograd.grad(y, xs, torch.eye(n_out, dtype=dtype))
        norms.append(float(torch.linalg.matrix_norm(grad.reshape(n_out, -1), ord=2)))
    return norms


def train_a_bit(layer: nn.Module, in_shape, steps: int = 3, lr: float = 0.05, dtype=torch.float64):
    """A few Adam steps on a random loss so that parameters leave their initial values."""
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    layer.train()
    x = torch.randn((4, *in_shape), dtype=dtype)
    target = None
    for _ in range(steps):
        opt.zero_grad()
        y = layer(x)
        if target is None:
            target = torch.randn_like(y)
        ((y - target) ** 2).mean().backward()
        opt.step()
    layer.eval()
    return opt


def spec_dense_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the spec formulas (sandwich.md §2.3–2.4), written independently."""
    w = layer.weight.double()
    q = layer.out_features
    fbar = layer.alpha.double() * w / w.norm()
    x_, y_ = fbar[:, :q].T, fbar[:, q:].T
    z = x_ - x_.T + y_.T @ y_
    eye = torch.eye(q, dtype=torch.float64)
    at = torch.linalg.solve(eye + z, eye - z)
    bt = -2.0 * y_ @ torch.linalg.inv(eye + z)
    return at.T, bt.T


def spec_conv_reference(layer: SandwichConv2d, x: torch.Tensor) -> torch.Tensor:
    """Straight transcription of sandwich.md §3.3–3.4 (torch.fft, einsum, spatial bias)."""
    q = layer.out_channels
    if layer.stride == 2:
        x = F.pixel_unshuffle(x, 2)
    h, w = x.shape[-2:]
    spec = circular_kernel_spectrum(layer.weight, (h, w))  # (H, Wf, q, q+p), graph kept
    pbar = layer.alpha * spec / torch.linalg.vector_norm(spec)
    u, v = pbar[..., :q], pbar[..., q:]
    xx, yy = u.mT, v.mT
    z = xx - xx.mH + yy.mH @ yy
    eye = torch.eye(q, dtype=z.dtype)
    a_t = torch.linalg.solve(eye + z, eye - z)
    b_t = -2.0 * yy @ torch.linalg.inv(eye + z)
    a_, b_ = a_t.mT, b_t.mT
    xh = torch.fft.rfft2(x)
    s = layer.scale
    if layer.activation_name is None:
        yh = torch.einsum("hwoq,hwqp,nphw->nohw", a_.mH, 2.0 * s * b_, xh)
        out = torch.fft.irfft2(yh, s=(h, w))
        return out + layer.bias.view(1, -1, 1, 1) if layer.bias is not None else out
    psi = torch.exp(layer.log_psi)
    wh = math.sqrt(2) * torch.einsum("hwqp,nphw->nqhw", b_, s * xh) / psi.view(1, -1, 1, 1)
    wsp = torch.fft.irfft2(wh, s=(h, w))
    if layer.bias is not None:
        wsp = wsp + layer.bias.view(1, -1, 1, 1)
    act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}.get(
        layer.activation_name, lambda t: F.leaky_relu(t, layer.negative_slope)
    )
    uu = act(wsp) * psi.view(1, -1, 1, 1)
    yh = math.sqrt(2) * torch.einsum("hwoq,nqhw->nohw", a_.mH, torch.fft.rfft2(uu))
    return torch.fft.irfft2(yh, s=(h, w))


def circular_conv_reference(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """PyTorch conv2d with circular padding c = ⌊(k−1)/2⌋, for any k (tiles when n < k)."""
    kh, kw = kernel.shape[-2:]
    h, w = x.shape[-2:]
    ch, cw = (kh - 1) // 2, (kw - 1) // 2
    if kh <= h and kw <= w:
        xp = F.pad(x, (cw, kw - 1 - cw, ch, kh - 1 - ch), mode="circular")
    else:
        oh, ow = (-ch) % h, (-cw) % w  # xp[i] = x[(i − c) mod n]
        rh, rw = math.ceil((oh + h + kh - 1) / h), math.ceil((ow + w + kw - 1) / w)
        tiled = x.repeat(1, 1, rh, rw)
        xp = tiled[..., oh : oh + h + kh - 1, ow : ow + w + kw - 1]
    return F.conv2d(xp, kernel)


# ----------------------------------------------------------------------------------------
# Cayley transform
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("qp", [(4, 3), (3, 5), (1, 2), (5, 1)])
@pytest.mark.parametrize("mag", [1e-4, 1.0, 100.0])
def test_cayley_identity_fp64(dtype, qp, mag):
    torch.manual_seed(0)
    q, p = qp
    pbar = mag * torch.randn(6, q, q + p, dtype=dtype)
    a, b = sandwich_cayley(pbar[..., :q], pbar[..., q:])
    eye = torch.eye(q, dtype=dtype)
    err = (a @ a.mH + b @ b.mH - eye).abs().max()
    assert err <= 1e-10
    assert cayley_residual_norm(a, b) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("mag", [1e-4, 1.0, 5.0])
def test_cayley_identity_fp32(dtype, mag):
    torch.manual_seed(1)
    q, p = 6, 4
    pbar = mag * torch.randn(8, q, q + p, dtype=dtype) / math.sqrt(q + p)
    a, b = sandwich_cayley(pbar[..., :q], pbar[..., q:])
    err = (a @ a.mH + b @ b.mH - torch.eye(q, dtype=dtype)).abs().max()
    assert err <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_cayley_matches_spec_formula(dtype):
    """The (U, V) form equals the spec's Z = X − Xᴴ + YᴴY, X = Uᵀ, Y = Vᵀ (plain transposes)."""
    torch.manual_seed(2)
    q, p = 4, 3
    pbar = torch.randn(5, q, q + p, dtype=dtype)
    u, v = pbar[..., :q], pbar[..., q:]
    a, b = sandwich_cayley(u, v)
    x_, y_ = u.mT, v.mT
    z = x_ - x_.mH + y_.mH @ y_
    eye = torch.eye(q, dtype=dtype)
    at = torch.linalg.solve(eye + z, eye - z)
    bt = -2.0 * y_ @ torch.linalg.inv(eye + z)
    torch.testing.assert_close(a, at.mT, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b, bt.mT, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_cayley_custom_backward_gradcheck(dtype):
    torch.manual_seed(3)
    pbar = torch.randn(3, 3, 5, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cayley_block(t, 3), (pbar,))
    # one output unused (None incoming gradient)
    assert torch.autograd.gradcheck(lambda t: cayley_block(t, 3)[1].abs().sum(), (pbar,), fast_mode=True)
    p2 = torch.randn(3, 5, dtype=dtype, requires_grad=True)  # unbatched
    assert torch.autograd.gradcheck(lambda t: cayley_block(t, 3), (p2,))
    p3 = torch.randn(4, 1, 2, dtype=dtype, requires_grad=True)  # q = 1 (1×1 blocks are their own transpose)
    assert torch.autograd.gradcheck(lambda t: cayley_block(t, 1), (p3,))
    before = p3.detach().clone()
    cayley_block(p3, 1)[0].abs().sum().backward()
    assert torch.equal(p3.detach(), before)  # inputs never modified in place


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_cayley_rows_and_fold_gradcheck(dtype):
    """Row-stacked form [X; Y] (the spec's Fᵀ) and the folded scales, hand-written backwards."""
    torch.manual_seed(26)
    pt = torch.randn(3, 5, 3, dtype=dtype, requires_grad=True)
    at, bht = cayley_rows(pt, 3)
    a, bh = cayley_block(pt.detach().mT, 3)
    torch.testing.assert_close(at.detach(), a.mT)
    torch.testing.assert_close(bht.detach(), bh.mT)
    assert torch.autograd.gradcheck(lambda t: cayley_rows(t, 3), (pt,))
    at = torch.randn(3, 4, 4, dtype=dtype, requires_grad=True)
    bht = torch.randn(3, 2, 4, dtype=dtype, requires_grad=True)
    psi = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    k1, k2 = fold_sandwich_scales(at, bht, psi, -1.3, 0.7)
    torch.testing.assert_close(k1, -1.3 * bht / psi)
    torch.testing.assert_close(k2, 0.7 * psi[:, None] * at.mT.conj())
    assert torch.autograd.gradcheck(lambda a_, b_, p_: fold_sandwich_scales(a_, b_, p_, -1.3, 0.7), (at, bht, psi))
    assert torch.autograd.gradcheck(
        lambda a_, b_, p_: fold_sandwich_scales(a_, b_, p_, 2.0, 0.5)[1], (at, bht, psi), fast_mode=True
    )


def test_per_slice_lapack_matches_batched_call():
    """The batched solve split over plain threads gives the same result as one call and
    restores the intra-op thread count."""
    from liptorch.ops.cayley import _per_slice_lapack

    torch.manual_seed(29)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(7, 5, 5, dtype=torch.complex128) + 3 * torch.eye(5)
        b = torch.randn(7, 5, 3, dtype=torch.complex128)
        ref = torch.linalg.solve(a, b)
        torch.testing.assert_close(_per_slice_lapack(torch.linalg.solve, a, b), ref)
        out = torch.empty(7, 3, 5, dtype=torch.complex128).mT
        assert _per_slice_lapack(torch.linalg.solve, a, b, out=out) is out
        torch.testing.assert_close(out, ref)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_residual_bound_formula_and_measurement():
    assert sandwich_residual_bound(0.0) == pytest.approx(1.0)
    assert sandwich_residual_bound(0.01) == pytest.approx(math.sqrt(1 + 4 * 0.01 * 1.01))
    assert sandwich_residual_bound(0.01) >= math.sqrt(1 + 4 * 0.01 * 1.01)
    with pytest.raises(ValueError):
        sandwich_residual_bound(-1.0)
    # a perturbed pair: the measured residual is at least the true spectral norm of E
    torch.manual_seed(4)
    a, b = sandwich_cayley(torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    b = 1.01 * b
    exact = float(torch.linalg.matrix_norm(a @ a.T + b @ b.T - torch.eye(4, dtype=torch.float64), ord=2))
    assert exact > 1e-3
    assert exact <= cayley_residual_norm(a, b) <= exact * (1 + 1e-9) + 1e-12
    # an exactly orthonormal pair still gets the rounding allowance of the measurement
    eye, zero = torch.eye(4, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    assert 1e-15 < cayley_residual_norm(eye, zero) < 1e-13


# ----------------------------------------------------------------------------------------
# FFT helpers and Fourier conventions
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(4, 4), (5, 3), (3, 6), (1, 1), (2, 1), (6, 5), (3, 2)])
def test_freq_major_ffts_match_torch_and_gradcheck(size):
    torch.manual_seed(5)
    h, w = size
    wf = w // 2 + 1
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    xh = rfft2_freq_major(x)
    ref = torch.fft.rfft2(x).permute(2, 3, 0, 1).reshape(h * wf, 2, 3)
    torch.testing.assert_close(xh, ref)
    # inverse: equals torch's irfft2 for every spectrum (also not Hermitian-consistent),
    # in value and in gradient; inverts the forward; a per-frequency product is a conv
    torch.testing.assert_close(irfft2_freq_major(xh.detach(), size), x.detach())
    y = torch.randn(h * wf, 2, 3, dtype=torch.complex128, requires_grad=True)
    out = irfft2_freq_major(y, size)
    ref_out = torch.fft.irfft2(y.view(h, wf, 2, 3).permute(2, 3, 0, 1), s=size)
    torch.testing.assert_close(out, ref_out)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, y, g)[0], torch.autograd.grad(ref_out, y, g)[0])
    kernel = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    spec = circular_kernel_spectrum(kernel, size).reshape(-1, 4, 3)
    conv_out = irfft2_freq_major(torch.bmm(xh.detach(), spec.mT), size)
    torch.testing.assert_close(conv_out, circular_conv_reference(x.detach(), kernel))
    # backward passes are the exact adjoints of the forward maps (any complex input)
    small_x = x[:1, :2].detach().clone().requires_grad_()
    small_y = torch.randn(h * wf, 1, 2, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(rfft2_freq_major, (small_x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: irfft2_freq_major(t, size), (small_y,))


@pytest.mark.parametrize(
    "k,size", [((3, 3), (5, 5)), ((2, 2), (4, 4)), ((5, 5), (3, 3)), ((4, 3), (2, 5)), ((1, 1), (4, 4)), ((3, 3), (1, 1))]
)
def test_spectrum_conventions_equal_circular_conv2d(k, size):
    """Cayley step replaced by the identity: the per-frequency product is circular conv2d."""
    torch.manual_seed(6)
    kernel = torch.randn(3, 2, *k, dtype=torch.float64)
    phases = tap_phase_matrix(k, size)
    spec = (phases @ kernel.reshape(6, -1).T.to(torch.complex128)).reshape(-1, 3, 2)
    torch.testing.assert_close(spec.view(size[0], size[1] // 2 + 1, 3, 2), circular_kernel_spectrum(kernel, size))
    x = torch.randn(4, 2, *size, dtype=torch.float64)
    y = irfft2_freq_major(torch.bmm(rfft2_freq_major(x), spec.mT), size)
    torch.testing.assert_close(y, circular_conv_reference(x, kernel))
    gram = tap_gram_weights(phases)
    taps = kernel.reshape(6, -1)
    assert float((gram * (taps.T @ taps)).sum()) == pytest.approx(float(spec.abs().square().sum()), rel=1e-12)


@pytest.mark.parametrize("k,n", [(3, 5), (2, 4), (5, 3)])
def test_conv_layer_spectrum_convention(k, n):
    """The layer's free spectrum is the spec's P̂ (sandwich.md §3.2): at initialisation
    α = ‖P̂‖_F so P̄ = P̂, and its U block acts as circular conv2d with weight[:, :q]."""
    torch.manual_seed(7)
    layer = SandwichConv2d(2, 3, k, n).double()
    with torch.no_grad():
        layer.alpha.copy_(torch.linalg.vector_norm(circular_kernel_spectrum(layer.weight, (n, n))))
    pbar = layer.free_spectrum(torch.float64).detach()
    ref = circular_kernel_spectrum(layer.weight.detach(), (n, n)).reshape(-1, 3, 5)
    torch.testing.assert_close(pbar, ref)
    x = torch.randn(2, 3, n, n, dtype=torch.float64)
    y = irfft2_freq_major(torch.bmm(rfft2_freq_major(x), pbar[..., :3].mT), (n, n))
    torch.testing.assert_close(y, circular_conv_reference(x, layer.weight.detach()[:, :3]))


@pytest.mark.parametrize("activation", ["relu", None, "tanh"])
@pytest.mark.parametrize("cfg", [(2, 3, 3, 4, 1), (3, 2, 2, 5, 1), (2, 2, 5, 3, 1), (2, 3, 4, 4, 2), (1, 2, 3, 6, 2)])
def test_conv_layer_equals_spec_reference(cfg, activation):
    """Fast pipeline (freq-major FFTs, folded Ψ/√2, DC bias, custom backward) equals a
    literal transcription of the spec, in output and in every parameter gradient."""
    torch.manual_seed(8)
    p, q, k, n, s = cfg
    layer = SandwichConv2d(p, q, k, n, stride=s, activation=activation, scale=1.3).double()
    train_a_bit(layer, (p, n, n), steps=2)
    layer.train()
    x = torch.randn(3, p, n, n, dtype=torch.float64)
    assert layer.pointwise == ((k if s == 1 else max(1, k // 2)) == 1)
    out = layer(x)
    ref = spec_conv_reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    params = list(layer.parameters())
    g1 = torch.autograd.grad(out, params, g)
    g2 = torch.autograd.grad(ref, params, g)
    for a_, b_ in zip(g1, g2):
        torch.testing.assert_close(a_, b_, rtol=1e-8, atol=1e-10)
    layer.eval()
    torch.testing.assert_close(layer(x), ref.detach(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("size", [(6, 6), (5, 4), (4, 3), (1, 2)])
def test_hermitian_symmetrize_is_exact(size, monkeypatch):
    """The eval cache is made exactly conjugate-symmetric on the self-paired columns
    (so that the real map is exactly the circulant operator whose norm is certified),
    even when the computed operator is not."""
    from liptorch.nn import sandwich as sw_mod

    torch.manual_seed(27)
    h, w = size
    wf = w // 2 + 1
    k = torch.randn(h * wf, 3, 2, dtype=torch.complex64)
    orig = k.clone()
    out = sw_mod.hermitian_symmetrize(k.clone(), size).view(h, wf, 3, 2)
    rows = (-torch.arange(h)) % h
    cols = [0] + ([w // 2] if w % 2 == 0 and w > 1 else [])
    for col in cols:
        assert torch.equal(out[rows, col], out[:, col].conj())
        self_conj = [f for f in range(h) if rows[f] == f]
        assert torch.equal(out[self_conj, col].imag, torch.zeros_like(out[self_conj, col].imag))
    other = [j for j in range(wf) if j not in cols]
    assert torch.equal(out[:, other], orig.view(h, wf, 3, 2)[:, other])
    assert not torch.equal(out, orig.view(h, wf, 3, 2))
    # the layer's eval cache goes through it (k1 and k2)
    calls = []
    real = sw_mod.hermitian_symmetrize
    monkeypatch.setattr(sw_mod, "hermitian_symmetrize", lambda t, sz: calls.append(sz) or real(t, sz))
    SandwichConv2d(2, 3, 3, 4).eval().cached_operator()
    assert calls == [(4, 4), (4, 4)]


def test_conv_outputs_real_and_cache_hermitian():
    """No imaginary leakage: the cached per-frequency operators are exactly Hermitian-
    consistent on the self-paired columns, so the full complex inverse is real."""
    torch.manual_seed(9)
    n = 6
    layer = SandwichConv2d(2, 3, 3, n).double().eval()
    op = layer.cached_operator()
    for k in (op.k1, op.k2):
        kv = k.view(n, n // 2 + 1, *k.shape[1:])
        rows = (-torch.arange(n)) % n
        for col in (0, n // 2):
            assert torch.equal(kv[rows, col], kv[:, col].conj())
    x = torch.randn(2, 2, n, n, dtype=torch.float64)
    xh = torch.fft.fft2(x)  # full spectrum, complex pipeline with the Hermitian extension
    wf = n // 2 + 1
    full = torch.zeros(n, n, 2, 3, dtype=torch.complex128)
    kv = op.k1.view(n, wf, 2, 3)
    full[:, :wf] = kv
    rows = (-torch.arange(n)) % n
    for j in range(wf, n):
        full[:, j] = kv[rows, n - j].conj()
    wh = torch.einsum("nphw,hwpq->nqhw", xh, full)
    wsp = torch.fft.ifft2(wh)
    assert wsp.imag.abs().max() < 1e-12
    assert layer(x).dtype == torch.float64


# ----------------------------------------------------------------------------------------
# exact Jacobians against bounds
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pq", [(3, 5), (4, 4), (6, 2)])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_linear_dense_exact_jacobian(pq, scale):
    torch.manual_seed(10)
    p, q = pq
    layer = SandwichLinear(p, q, activation=None, scale=scale).double()
    train_a_bit(layer, (p,))
    jac = impulse_jacobian(layer, (p,))
    smax = float(torch.linalg.matrix_norm(jac, ord=2))
    bound = layer.lipschitz_bound()
    assert smax <= scale * (1 + TOL)
    # the impulse response carries ~1e-16 rounding (bias added and subtracted): 1e-12 slack
    assert smax <= bound * (1 + 1e-12) and bound <= smax * (1 + 1e-9) + 1e-12
    a, b = (t.detach() for t in layer.cayley_factors())
    torch.testing.assert_close(jac, 2 * scale * a.T @ b)  # the linear form is 2AᵀB·scale


CONV_GRID = [
    # (c_in, c_out, kernel, input size, stride)
    (2, 3, 1, 4, 1),
    (3, 3, 2, 4, 1),
    (3, 2, 3, 4, 1),
    (2, 2, 5, 3, 1),  # n < k: wrapped taps
    (2, 3, 5, 4, 1),
    (2, 3, 3, (4, 6), 1),  # rectangular
    (2, 2, 1, 4, 2),
    (2, 3, 3, 4, 2),  # 3×3 stride 2 = unshuffle + 1×1
    (3, 2, 4, 4, 2),
    (1, 3, 5, (6, 4), 2),
]


@pytest.mark.parametrize("cfg", CONV_GRID)
def test_conv_grid_linear_exact_and_relu_jacobians(cfg):
    torch.manual_seed(11)
    p, q, k, size, s = cfg
    hw = (size, size) if isinstance(size, int) else size
    in_shape = (p, *hw)
    # linear variant: impulse response, exact σ_max ≤ 1, bound tight
    lin = SandwichConv2d(p, q, k, size, stride=s, activation=None).double()
    train_a_bit(lin, in_shape)
    jac = impulse_jacobian(lin, in_shape)
    sv = torch.linalg.svdvals(jac)
    bound = lin.lipschitz_bound()
    assert sv[0] <= 1 + TOL
    assert float(sv[0]) <= bound * (1 + 1e-12) and bound <= float(sv[0]) * (1 + 1e-9) + 1e-12
    # ReLU variant: autograd Jacobians at several points ≤ bound ≈ 1
    nl = SandwichConv2d(p, q, k, size, stride=s, activation="relu", scale=1.5).double()
    train_a_bit(nl, in_shape)
    bound = nl.lipschitz_bound()
    assert 1.5 <= bound <= 1.5 * (1 + 1e-9)
    for norm in autograd_jacobian_norms(nl, in_shape, points=3):
        assert norm <= bound * (1 + TOL)


@pytest.mark.parametrize("cfg", [(2, 3, 3, 4, 1), (3, 2, 2, 4, 2), (2, 2, 1, 4, 1)])
def test_conv_grid_float32(cfg):
    torch.manual_seed(12)
    p, q, k, n, s = cfg
    layer = SandwichConv2d(p, q, k, n, stride=s)
    train_a_bit(layer, (p, n, n), dtype=torch.float32)
    bound = layer.lipschitz_bound()
    assert 1.0 <= bound <= 1.0 + 1e-5  # fp32 cache built in fp64: tiny residual
    layer64 = copy.deepcopy(layer).double().eval()
    x = torch.randn(5, p, n, n)
    torch.testing.assert_close(layer(x).double(), layer64(x.double()), rtol=1e-4, atol=1e-5)
    jac = impulse_jacobian(layer, (p, n, n), dtype=torch.float32).double()
    assert float(torch.linalg.matrix_norm(jac, ord=2)) <= bound * (1 + 1e-4)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", ("leaky_relu", 0.3)])
@pytest.mark.parametrize("pq", [(3, 5), (5, 3)])
def test_dense_nonlinear_jacobian_below_bound(activation, pq):
    torch.manual_seed(13)
    p, q = pq
    layer = SandwichLinear(p, q, activation=activation, scale=2.0).double()
    train_a_bit(layer, (p,), lr=0.1)
    bound = layer.lipschitz_bound()
    assert 2.0 <= bound <= 2.0 * (1 + 1e-9)
    for norm in autograd_jacobian_norms(layer, (p,), points=4, spread=2.0):
        assert norm <= bound * (1 + TOL)
    # finite differences, near and far apart
    x = torch.randn(16, p, dtype=torch.float64)
    with torch.no_grad():
        for d in (1e-4, 3.0):
            x2 = x + d * torch.randn_like(x)
            ratio = (layer(x) - layer(x2)).norm(dim=1) / (x - x2).norm(dim=1)
            assert float(ratio.max()) <= bound * (1 + TOL)


def test_dense_layer_equals_spec_formula():
    torch.manual_seed(14)
    layer = SandwichLinear(4, 3, activation="relu", scale=0.8).double()
    train_a_bit(layer, (4,))
    a, b = spec_dense_factors(layer)
    psi = torch.exp(layer.log_psi.detach())
    x = torch.randn(7, 4, dtype=torch.float64)
    v = math.sqrt(2) * (0.8 * x) @ b.T / psi + layer.bias.detach()
    ref = math.sqrt(2) * torch.relu(v) * psi @ a
    torch.testing.assert_close(layer(x), ref)
    layer.train()
    torch.testing.assert_close(layer(x), ref)


def test_factor_norms_exceed_one_but_layer_is_contraction():
    """The individual factors √2Ψ⁻¹B and √2AᵀΨ can be far above 1 (sandwich.md §2.6);
    the certified bound must not be their product."""
    torch.manual_seed(15)
    layer = SandwichLinear(6, 6, activation="relu").double()
    with torch.no_grad():
        layer.log_psi.copy_(torch.linspace(-2, 2, 6, dtype=torch.float64))
    layer.eval()
    op = layer.cached_operator()
    prod = float(torch.linalg.matrix_norm(op.k1, 2) * torch.linalg.matrix_norm(op.k2, 2))
    assert prod > 2.0
    bound = layer.lipschitz_bound()
    assert bound <= 1 + 1e-9
    assert max(autograd_jacobian_norms(layer, (6,), points=5)) <= bound * (1 + TOL)


def test_bound_is_measured_not_assumed():
    """Corrupting the cached operator must show up in the bound (it is measured)."""
    torch.manual_seed(16)
    for layer, shape in ((SandwichLinear(4, 4).double(), None), (SandwichConv2d(2, 2, 3, 4).double(), (4, 4))):
        layer.eval()
        op = layer.cached_operator()
        good = layer.lipschitz_bound()
        assert good <= 1 + 1e-9
        bad = op._replace(k2=op.k2 * 1.1)
        assert layer.compute_lipschitz_bound(bad, shape) > 1.05


# ----------------------------------------------------------------------------------------
# LBDN container
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.5, 2.0, 10.0])
def test_lbdn_jacobians_below_gamma(gamma):
    torch.manual_seed(17)
    net = LBDN(3, [6, 5], 2, gamma=gamma).double()
    train_a_bit(net, (3,), steps=4, lr=0.05)
    bound = net.lipschitz_bound()
    # hidden layers: ≈ 1 (× √γ on the first); output: exact √γ·‖B_L‖ ≤ √γ
    per_layer = [m.lipschitz_bound() for m in net.layers]
    assert per_layer[0] == pytest.approx(math.sqrt(gamma), rel=1e-9) and per_layer[1] == pytest.approx(1.0, rel=1e-9)
    assert 0.1 * math.sqrt(gamma) < per_layer[2] <= math.sqrt(gamma) * (1 + 1e-12)
    assert bound == pytest.approx(math.prod(per_layer), rel=1e-12)
    assert bound <= gamma * (1 + 1e-9)
    for norm in autograd_jacobian_norms(net, (3,), points=5, spread=2.0):
        assert norm <= bound * (1 + TOL)
    x = torch.randn(32, 3, dtype=torch.float64)
    with torch.no_grad():
        x2 = x + 3.0 * torch.randn_like(x)
        ratio = (net(x) - net(x2)).norm(dim=1) / (x - x2).norm(dim=1)
    assert float(ratio.max()) <= gamma * (1 + TOL)


def test_lbdn_empirical_lipschitz_ascent_below_gamma():
    """Empirical Lipschitz lower bound by Adam ascent on ‖f(x+δ) − f(x)‖/‖δ‖ (spec §7.4)."""
    torch.manual_seed(28)
    gamma = 3.0
    net = LBDN(2, [8, 8], 2, gamma=gamma).double()
    train_a_bit(net, (2,), steps=5, lr=0.05)
    best = 0.0
    for _ in range(4):  # restarts
        x = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
        d = (0.3 * torch.randn(16, 2, dtype=torch.float64)).requires_grad_()
        opt = torch.optim.Adam([x, d], lr=0.05)
        for _ in range(60):
            ratio = (net(x + d) - net(x)).norm(dim=1) / d.norm(dim=1).clamp_min(1e-12)
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
        with torch.no_grad():
            best = max(best, float(((net(x + d) - net(x)).norm(dim=1) / d.norm(dim=1)).max()))
    bound = net.lipschitz_bound()
    assert best <= bound * (1 + 1e-5)
    # the ascent finds at least the typical local slope (so it is not vacuous)
    local = sorted(autograd_jacobian_norms(net, (2,), points=8, spread=1.0))
    assert best >= 0.9 * local[len(local) // 2]


def test_lbdn_structure_last_layer_is_affine_b_only():
    torch.manual_seed(18)
    net = LBDN(4, [5, 6], 3, gamma=4.0).double()
    layers = list(net.layers)
    assert [type(m) for m in layers] == [SandwichLinear, SandwichLinear, SandwichOutput]
    assert layers[0].scale == pytest.approx(2.0) and layers[1].scale == 1.0 and layers[2].scale == pytest.approx(2.0)
    out = layers[-1]
    assert not hasattr(out, "log_psi") or out.log_psi is None
    train_a_bit(net, (4,))
    # affine: Jacobian constant and equal to √γ·B (A discarded)
    b = out.cayley_factors()[1].detach()
    jac = impulse_jacobian(out, (6,))
    torch.testing.assert_close(jac, 2.0 * b)
    h = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(out(h), 2.0 * h @ b.T + out.bias)
    assert out.lipschitz_bound() == pytest.approx(float(torch.linalg.matrix_norm(2.0 * b, 2)), rel=1e-12)
    # no hidden layer: the output layer carries γ
    single = LBDN(3, [], 2, gamma=9.0)
    assert len(single.layers) == 1 and single.layers[0].scale == pytest.approx(9.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["relu", "tanh", None])
def test_lbdn_export_equals_network(dtype, activation):
    torch.manual_seed(19)
    net = LBDN(5, [8, 7, 6], 3, gamma=3.0, activation=activation).to(dtype)
    train_a_bit(net, (5,), steps=3, lr=0.05, dtype=dtype)
    mlp = net.export()
    assert isinstance(mlp, nn.Sequential)
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.Tanh)) for m in mlp)
    assert sum(isinstance(m, nn.Linear) for m in mlp) == 4
    assert all(m.weight.dtype == dtype for m in mlp if isinstance(m, nn.Linear))
    x = 3 * torch.randn(64, 5, dtype=dtype)
    with torch.no_grad():
        y, y_exp = net(x), mlp(x)
    rel = float((y - y_exp).norm() / y.norm())
    assert rel <= (1e-5 if dtype == torch.float32 else 1e-12)


# ----------------------------------------------------------------------------------------
# caching, state, devices, dtypes
# ----------------------------------------------------------------------------------------
def _make(kind):
    if kind == "linear":
        return SandwichLinear(4, 3).double(), (4,)
    if kind == "output":
        return SandwichOutput(4, 3).double(), (4,)
    if kind == "conv":
        return SandwichConv2d(2, 3, 3, 4).double(), (2, 4, 4)
    if kind == "conv1x1":
        return SandwichConv2d(2, 3, 3, 4, stride=2).double(), (2, 4, 4)
    return LBDN(4, [5], 2, gamma=2.0).double(), (4,)


@pytest.mark.parametrize("kind", ["linear", "output", "conv", "conv1x1", "lbdn"])
def test_cache_refresh_after_step_and_load_state_dict(kind):
    torch.manual_seed(20)
    layer, shape = _make(kind)
    alphas = [m.alpha for m in layer.modules() if isinstance(getattr(m, "alpha", None), nn.Parameter)]
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert alphas and all(any(a is p for p in in_opt) for a in alphas)
    x = torch.randn(3, *shape, dtype=torch.float64)
    layer.eval()
    before = layer(x)
    layer.train()
    opt.zero_grad()
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    after = layer(x)  # no dummy training forward
    assert (after - before).abs().max() > 1e-6
    layer.train()
    fresh = layer(x).detach()  # training-mode recomputation from the current parameters
    layer.eval()
    torch.testing.assert_close(after, fresh, rtol=1e-10, atol=1e-12)
    # load_state_dict into an already-cached layer
    other, _ = _make(kind)
    other.eval()
    stale = other(x)
    other.load_state_dict(layer.state_dict())
    out = other(x)
    torch.testing.assert_close(out, after, rtol=1e-10, atol=1e-12)
    assert (out - stale).abs().max() > 1e-6
    # manual in-place edit (of α: the direction of F alone is scale-invariant)
    with torch.no_grad():
        next(p for name, p in other.named_parameters() if name.endswith("alpha")).mul_(0.5)
    assert (other(x) - out).abs().max() > 1e-8


def test_state_dict_round_trip_without_dummy_forward():
    torch.manual_seed(21)
    for ctor in (
        lambda: SandwichConv2d(2, 3, 3, 4, freeze_alpha=True),
        lambda: SandwichConv2d(2, 3, 3, (4, 6), stride=2, activation=None),
        lambda: LBDN(3, [4], 2, gamma=2.0),
    ):
        src = ctor()
        with torch.no_grad():
            for p in src.parameters():
                p.add_(0.1 * torch.randn_like(p))
        dst = ctor()
        dst.load_state_dict(src.state_dict())
        x = torch.randn(2, *((3,) if isinstance(src, LBDN) else (2, 4, src.input_size[1])))
        src.eval()
        dst.eval()
        torch.testing.assert_close(dst(x), src(x))
        assert not any("cache" in k for k in src.state_dict())


def test_freeze_alpha_and_parameters():
    layer = SandwichConv2d(2, 3, 3, 4, freeze_alpha=True)
    names = dict(layer.named_parameters())
    assert "alpha" not in names and "alpha" in dict(layer.named_buffers())
    assert "alpha" in layer.state_dict()
    trained = SandwichConv2d(2, 3, 3, 4)
    assert "alpha" in dict(trained.named_parameters())
    assert "log_psi" in dict(trained.named_parameters())
    assert SandwichConv2d(2, 3, 3, 4, activation=None).log_psi is None
    # α is initialised to ‖P̂‖_F so that P̄ = P̂ at construction
    spec = circular_kernel_spectrum(trained.weight.detach().double(), (4, 4))
    assert float(trained.alpha.detach()) == pytest.approx(float(torch.linalg.vector_norm(spec)), rel=1e-6)
    dense = SandwichLinear(3, 2)
    assert float(dense.alpha.detach()) == pytest.approx(float(dense.weight.detach().norm()), rel=1e-6)


def test_dtype_moves_and_copies():
    torch.manual_seed(22)
    layer = SandwichConv2d(2, 2, 3, 4)
    layer.eval()
    x = torch.randn(2, 2, 4, 4)
    y32 = layer(x)
    assert y32.dtype == torch.float32
    layer.double()
    y64 = layer(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-5)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x.double()), y64)
    with pytest.raises(ValueError, match="dtype"):
        layer(x)  # float32 input into a float64 layer
    # any batch size, including 1 and a batch of 0 rows for the dense layer
    dense = SandwichLinear(3, 2).eval()
    assert dense(torch.randn(1, 3)).shape == (1, 2)
    assert dense(torch.randn(2, 5, 3)).shape == (2, 5, 2)
    assert layer(torch.randn(1, 2, 4, 4, dtype=torch.float64)).shape == (1, 2, 4, 4)


@pytest.mark.parametrize("mag", [1e-4, 1e3])
def test_extreme_alpha_dense_identity(mag):
    torch.manual_seed(25)
    layer = SandwichLinear(3, 4).double()
    with torch.no_grad():
        layer.alpha.mul_(mag)
    a, b = layer.cayley_factors(torch.float64)
    assert (a @ a.T + b @ b.T - torch.eye(4, dtype=torch.float64)).abs().max() <= 1e-10
    layer.eval()
    assert layer.lipschitz_bound() <= 1 + 1e-10
    f32 = copy.deepcopy(layer).float().eval()
    assert f32.lipschitz_bound() <= 1 + 1e-5  # the fp32 eval cache is built in fp64


def test_extreme_alpha_conv_identity_per_frequency():
    torch.manual_seed(23)
    layer = SandwichConv2d(3, 2, 3, 5).double()
    norm0 = float(layer.alpha.detach())
    for mag in (1e-4, 1.0, 1e3):
        with torch.no_grad():
            layer.alpha.fill_(mag * norm0)
        a, b = layer.cayley_factors(torch.float64)
        eye = torch.eye(2, dtype=torch.complex128)
        assert (a @ a.mH + b @ b.mH - eye).abs().max() <= 1e-10
        f32 = copy.deepcopy(layer).float().eval()
        assert f32.lipschitz_bound() <= 1 + 1e-5  # fp32 cache: identity holds to ≤1e-5
        a32, b32 = f32.cayley_factors(torch.float32)
        assert a32.shape == (5 * 3, 2, 2) and b32.shape == (15, 2, 3)


def test_gradient_flows_to_all_parameters_and_diagnostic():
    torch.manual_seed(24)
    layer = SandwichConv2d(2, 3, 3, 4)
    layer(torch.randn(2, 2, 4, 4)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    norms = gradient_norms(nn.Sequential(layer))
    assert set(norms) == {"0"} and norms["0"] > 0


def test_composition_with_lipschitz_bound():
    from liptorch import lipschitz_bound

    model = nn.Sequential(
        SandwichConv2d(1, 2, 3, 4, scale=2.0),
        SandwichConv2d(2, 3, 3, 4, stride=2),
        nn.Flatten(),
        SandwichLinear(12, 5),
        SandwichOutput(5, 2, scale=0.5),
    ).double()
    value = lipschitz_bound(model, (1, 4, 4))
    parts = [m.lipschitz_bound() for m in model if not isinstance(m, nn.Flatten)]
    assert parts[0] == pytest.approx(2.0, rel=1e-9) and parts[1] == pytest.approx(1.0, rel=1e-9)
    assert value == pytest.approx(math.prod(parts), rel=1e-12)
    assert value <= 1.0 + 1e-9


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["gelu", "silu", nn.GELU(), MaxMin(), ("leaky_relu", 1.5), nn.LeakyReLU(2.0), nn.LeakyReLU(-0.1), torch.relu, 3]
)
def test_bad_activations_rejected(bad):
    with pytest.raises(ValueError):
        resolve_activation(bad)
    with pytest.raises(ValueError):
        SandwichLinear(3, 2, activation=bad)
    with pytest.raises(ValueError):
        SandwichConv2d(2, 2, 3, 4, activation=bad)
    with pytest.raises(ValueError):
        LBDN(3, [4], 2, activation=bad)


def test_good_activations_accepted():
    assert resolve_activation(None) == (None, 0.0)
    assert resolve_activation("identity") == (None, 0.0)
    assert resolve_activation("ReLU") == ("relu", 0.0)
    assert resolve_activation(nn.LeakyReLU(0.2)) == ("leaky_relu", 0.2)
    assert resolve_activation(("leaky_relu", 1)) == ("leaky_relu", 1.0)
    assert resolve_activation(nn.Sigmoid())[0] == "sigmoid"


@pytest.mark.parametrize(
    "ctor",
    [
        lambda: SandwichLinear(0, 2),
        lambda: SandwichLinear(3, 2.5),
        lambda: SandwichLinear(3, 2, bias="yes"),
        lambda: SandwichLinear(3, 2, scale=0.0),
        lambda: SandwichLinear(3, 2, scale=float("inf")),
        lambda: SandwichOutput(3, 0),
        lambda: SandwichOutput(3, 2, scale=-1.0),
        lambda: SandwichConv2d(2, 2, 0, 4),
        lambda: SandwichConv2d(2, 2, 3, 0),
        lambda: SandwichConv2d(2, 2, 3, 4, stride=3),
        lambda: SandwichConv2d(2, 2, 3, 5, stride=2),
        lambda: SandwichConv2d(2, 2, 3, 4, stride=(1, 2)),
        lambda: SandwichConv2d(2, 2, (3, 3, 3), 4),
        lambda: SandwichConv2d(2, 2, 3, 4, freeze_alpha=1),
        lambda: LBDN(3, [4], 2, gamma=0.0),
        lambda: LBDN(3, [4, 0], 2),
        lambda: LBDN(3, "4", 2),
    ],
)
def test_bad_constructor_args(ctor):
    with pytest.raises(ValueError):
        ctor()


def test_bad_inputs_raise():
    conv = SandwichConv2d(2, 3, 3, (4, 6))
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        with pytest.raises(ValueError, match="input size"):
            conv(torch.randn(1, 2, 6, 4))
        with pytest.raises(ValueError, match="input size"):
            conv(torch.randn(1, 2, 8, 8))
        with pytest.raises(ValueError):
            conv(torch.randn(1, 3, 4, 6))
        with pytest.raises(ValueError):
            conv(torch.randn(2, 4, 6))
    with pytest.raises(ValueError):
        conv.lipschitz_bound(input_size=(8, 8))
    assert conv.lipschitz_bound(input_size=(4, 6)) == conv.lipschitz_bound()
    dense = SandwichLinear(3, 2)
    with pytest.raises(ValueError):
        dense(torch.randn(4, 5))
    with pytest.raises(ValueError):
        dense(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        SandwichOutput(3, 2)(torch.randn(4, 2))
    with pytest.raises(ValueError):
        LBDN(3, [4], 2)(torch.randn(4, 4))
