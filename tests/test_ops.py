"""Pure-math primitives: FFT spectra, exact norms, Gram iteration, Björck."""
import math

import pytest
import torch
import torch.nn.functional as F

from liptorch.ops import (
    bjorck,
    circular_conv_norm,
    circular_kernel_spectrum,
    gram_iteration_bound,
    power_iteration,
    round_up,
    spectral_norm,
)


def circular_conv(x, k):
    kh, kw = k.shape[-2:]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    # Wrap as many times as needed (n < k): tile, then crop the window the conv needs.
    n_h, n_w = x.shape[-2:]
    reps_h, reps_w = math.ceil(kh / n_h) + 2, math.ceil(kw / n_w) + 2
    tiled = x.repeat(1, 1, reps_h, reps_w)
    start_h, start_w = n_h * (reps_h // 2) - ph, n_w * (reps_w // 2) - pw
    window = tiled[..., start_h:start_h + n_h + kh - 1, start_w:start_w + n_w + kw - 1]
    return F.conv2d(window, k)


@pytest.mark.parametrize("k,n", [(1, 4), (2, 5), (3, 4), (3, 2), (5, 3), (4, 6), (5, 1)])
def test_spectrum_diagonalises_circular_conv(k, n):
    torch.manual_seed(0)
    kern = torch.randn(3, 2, k, k, dtype=torch.float64)
    x = torch.randn(4, 2, n, n, dtype=torch.float64)
    y = circular_conv(x, kern)
    spec = circular_kernel_spectrum(kern, n)  # (n, n//2+1, q, p)
    xh = torch.fft.rfft2(x).permute(2, 3, 1, 0)  # (n, n//2+1, p, N)
    yh = (spec @ xh).permute(3, 2, 0, 1)
    assert torch.allclose(torch.fft.irfft2(yh, s=(n, n)), y, atol=1e-12)


@pytest.mark.parametrize("k,n", [(3, 4), (3, 2), (2, 3), (5, 3)])
def test_circular_conv_norm_is_exact(k, n):
    torch.manual_seed(1)
    kern = torch.randn(2, 3, k, k, dtype=torch.float64)
    eye = torch.eye(3 * n * n, dtype=torch.float64).reshape(-1, 3, n, n)
    jac = circular_conv(eye, kern).reshape(3 * n * n, -1).T
    exact = torch.linalg.matrix_norm(jac, ord=2).item()
    bound = circular_conv_norm(kern, n)
    assert exact <= bound <= exact * (1 + 1e-12)


def test_gram_iteration_upper_bounds_and_is_tight():
    torch.manual_seed(2)
    for shape in [(5, 7), (30, 20), (1, 9)]:
        w = torch.randn(*shape, dtype=torch.float64)
        s = torch.linalg.matrix_norm(w, ord=2).item()
        b = gram_iteration_bound(w, steps=10)
        assert s <= b <= s * (1 + 1e-3)
    batch = torch.randn(4, 6, 6, dtype=torch.complex128)
    s = torch.linalg.matrix_norm(batch, ord=2).max().item()
    assert s <= gram_iteration_bound(batch, steps=10) <= s * (1 + 1e-3)
    # Zero steps is the Frobenius norm: still a bound, and loose.
    assert gram_iteration_bound(w, steps=0) >= spectral_norm(w)


def test_power_iteration_is_a_lower_bound():
    torch.manual_seed(3)
    w = torch.randn(20, 10, dtype=torch.float64)
    est, _, _ = power_iteration(w, iters=3)
    assert est <= spectral_norm(w)


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)])
@pytest.mark.parametrize("order", [1, 2])
def test_bjorck_orthonormalises(shape, order):
    torch.manual_seed(4)
    w = torch.randn(*shape, dtype=torch.float64)
    q = bjorck(w, iters=25, order=order)
    s = torch.linalg.svdvals(q)
    assert (s - 1).abs().max() < 1e-8


def test_bjorck_rejects_bad_settings():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="order"):
        bjorck(w, order=3)
    with pytest.raises(ValueError, match="scale"):
        bjorck(w, scale="nope")


def test_round_up_is_upward():
    assert round_up(1.0) > 1.0
    assert round_up(1.0) - 1.0 < 1e-14


def test_spectral_norm_validates():
    with pytest.raises(ValueError, match="matrix"):
        spectral_norm(torch.ones(3))


@pytest.mark.parametrize("m", [1, 2, 15, 16, 17, 37, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32, torch.complex64])
def test_accretive_inverse_matches_lapack(m, dtype):
    """The block-elimination inverse used by the Cayley transform equals LAPACK's on
    matrices with Hermitian part ⪰ I (the Cayley's N = I + X − Xᴴ + YᴴY), batched and
    unbatched, odd and even sizes, including a large YᴴY; residual ‖NG − I‖ at rounding level."""
    from liptorch.ops.cayley import accretive_inverse

    torch.manual_seed(m)
    for batch, scale in (((5,), 0.3), ((), 3.0), ((2, 3), 1.0)):
        x = scale * torch.randn(*batch, m, m, dtype=dtype)
        y = scale * torch.randn(*batch, m + 3, m, dtype=dtype)
        n = torch.eye(m, dtype=dtype) + x - x.mH + y.mH @ y
        g = accretive_inverse(n)
        assert g.shape == n.shape and g.dtype == dtype
        eps = torch.finfo(dtype).eps
        ref = torch.linalg.inv(n)
        assert (g - ref).abs().max() <= 200 * m * eps * max(1.0, ref.abs().max().item())
        resid = n @ g - torch.eye(m, dtype=dtype)
        assert resid.abs().max() <= 200 * m * eps * n.abs().max().item()
