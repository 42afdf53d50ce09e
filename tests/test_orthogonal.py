"""OrthogonalLinear / BjorckLinear and the batched Björck orthonormalisation."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from liptorch.nn.orthogonal import BjorckLinear, OrthogonalLinear
from liptorch.ops.orthogonalize import (
    batched_sigma_estimate,
    bjorck_orthonormalize,
    bjorck_scale,
    power_start_vector,
    serial_for,
)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def jacobian_of(fn, d_in, dtype):
    basis = torch.eye(d_in, dtype=dtype)
    with torch.no_grad():
        y = fn(basis) - fn(torch.zeros(1, d_in, dtype=dtype))
    return y.T.to(torch.float64)


def train_steps(layer, steps=3, lr=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = layer.weight.dtype
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    layer.train()
    for _ in range(steps):
        x = torch.randn(5, layer.in_features, generator=gen, dtype=torch.float64).to(dtype)
        opt.zero_grad()
        y = layer(x)
        ((y - torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)) ** 2).sum().backward()
        opt.step()
    layer.eval()
    return layer


# ----------------------------------------------------------------------------- Björck op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 7), (9, 4), (4, 9), (3, 6, 6), (2, 8, 5)])
@pytest.mark.parametrize("order", [1, 2])
def test_bjorck_converges_to_polar_factor(shape, order, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    w = w + 3 * torch.eye(shape[-2], shape[-1], dtype=torch.float64)  # well conditioned
    out = bjorck_orthonormalize(w.to(dtype), iters=30, order=order)
    assert out.shape == w.shape and out.dtype == dtype
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    polar = u @ vh
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(out.double(), polar, atol=tol)


@pytest.mark.parametrize("scale", ["power", "frobenius", "sqrt"])
def test_bjorck_scales_all_converge(scale):
    torch.manual_seed(1)
    w = torch.randn(3, 6, 6, dtype=torch.float64) + 2 * torch.eye(6, dtype=torch.float64)
    out = bjorck_orthonormalize(w, iters=60, scale=scale)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(out.mT @ out, eye.expand(3, 6, 6), atol=1e-10)


def test_batched_equals_one_by_one():
    torch.manual_seed(2)
    w = torch.randn(4, 5, 5, dtype=torch.float64) + 2 * torch.eye(5, dtype=torch.float64)
    together = bjorck_orthonormalize(w, iters=25, early_stop=False)
    for i in range(4):
        alone = bjorck_orthonormalize(w[i], iters=25, early_stop=False)
        assert torch.allclose(together[i], alone, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_early_stop_matches_full_iterations_value_and_gradient(dtype):
    torch.manual_seed(3)
    w0 = torch.linalg.qr(torch.randn(5, 8, 8, dtype=torch.float64))[0] + 0.1 * torch.randn(5, 8, 8, dtype=torch.float64)
    g = torch.randn(5, 8, 8, dtype=torch.float64)
    results = []
    for early in (True, False):
        w = w0.clone().to(dtype).requires_grad_(True)
        out = bjorck_orthonormalize(w, iters=20, early_stop=early)
        (out * g.to(dtype)).sum().backward()
        results.append((out.detach().double(), w.grad.double()))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(results[0][0], results[1][0], atol=tol)
    assert torch.allclose(results[0][1], results[1][1], atol=100 * tol, rtol=1e-4)


def test_early_stop_really_stops_early_and_full_run_does_not():
    calls = []
    orig = torch.baddbmm

    def counting(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    torch.manual_seed(4)
    q = torch.linalg.qr(torch.randn(3, 6, 6, dtype=torch.float64))[0] * 0.37
    try:
        torch.baddbmm = counting
        bjorck_orthonormalize(q, iters=20, early_stop=True)
        n_early = len(calls)
        calls.clear()
        bjorck_orthonormalize(q, iters=20, early_stop=False)
        n_full = len(calls)
    finally:
        torch.baddbmm = orig
    assert n_early <= 2 and n_full == 20


def test_power_scale_is_deterministic_and_rng_free():
    torch.manual_seed(5)
    w = torch.randn(3, 10, 10)
    state = torch.get_rng_state()
    a = batched_sigma_estimate(w)
    b = batched_sigma_estimate(w)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    exact = torch.linalg.matrix_norm(w.double(), ord=2)
    assert (a.double() <= exact * (1 + 1e-5)).all() and (a.double() >= 0.8 * exact).all()
    v = power_start_vector(10, torch.float64, "cpu")
    assert torch.equal(v, power_start_vector(10, torch.float64, "cpu")) and abs(v.norm().item() - 1) < 1e-12


def test_bjorck_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        bjorck_orthonormalize(torch.randn(3, 3), order=3)
    with pytest.raises(ValueError, match="iters"):
        bjorck_orthonormalize(torch.randn(3, 3), iters=-1)
    with pytest.raises(ValueError, match="scale"):
        bjorck_orthonormalize(torch.randn(3, 3), scale="nope")
    with pytest.raises(ValueError, match="matrix"):
        bjorck_orthonormalize(torch.randn(3))


def reference_bjorck(w, iters, order, scale):
    """Plain-autograd Björck (s constant for the gradient), for the hand-written backward."""
    wide = w.shape[-2] < w.shape[-1]
    a = w.mT if wide else w
    a = a / bjorck_scale(a, scale).reshape(a.shape[:-2] + (1, 1))
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    for _ in range(iters):
        s = a.mT @ a
        a = a @ (1.5 * eye - 0.5 * s) if order == 1 else a @ (1.875 * eye - 1.25 * s + 0.375 * s @ s)
    return a.mT if wide else a


@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 7, 4), (2, 4, 7), (5, 5)])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("scale", ["power", "frobenius", "sqrt"])
def test_hand_written_backward_matches_autograd(shape, order, scale):
    torch.manual_seed(6)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    out = bjorck_orthonormalize(w, iters=6, order=order, scale=scale, early_stop=False)
    ref = reference_bjorck(w, 6, order, scale)
    assert torch.allclose(out, ref, atol=1e-13)
    (gw,) = torch.autograd.grad(out, w, g)
    (gr,) = torch.autograd.grad(ref, w, g)
    assert torch.allclose(gw, gr, atol=1e-12)


def test_gradcheck_with_constant_scale():
    torch.manual_seed(7)
    w = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    for order in (1, 2):
        assert torch.autograd.gradcheck(
            lambda t: bjorck_orthonormalize(t, iters=4, order=order, scale="sqrt", early_stop=False), (w,)
        )


def test_small_problems_run_on_one_thread_and_restore_the_count():
    seen = []
    orig = torch.baddbmm

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return orig(*args, **kwargs)

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.baddbmm = spy
        w = torch.randn(3, 6, 6, requires_grad=True)
        bjorck_orthonormalize(w, iters=3, early_stop=False).sum().backward()
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        with serial_for(torch.zeros(1, 1024, 1024)):  # large: left alone
            assert torch.get_num_threads() == 2
    finally:
        torch.baddbmm = orig
        torch.set_num_threads(prev)


# ----------------------------------------------------------------------------- OrthogonalLinear
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("d_in,d_out", [(6, 6), (4, 9), (9, 4), (1, 3), (3, 1)])
def test_exact_jacobian_linear(d_in, d_out, dtype):
    torch.manual_seed(d_in * 10 + d_out)
    layer = OrthogonalLinear(d_in, d_out).to(dtype)
    train_steps(layer)
    weight = layer.orthogonal_weight()
    assert weight is layer.orthogonal_weight()  # cached in eval
    j = jacobian_of(layer, d_in, dtype)
    assert torch.allclose(j, weight.double(), atol=1e-12 if dtype == torch.float64 else 1e-6)
    j = weight.double()  # exact operator of the cached weight
    sv = torch.linalg.svdvals(j)
    bound = layer.lipschitz_bound()
    assert sv.max().item() <= bound * (1 + 1e-6)
    assert bound >= sv.max().item() and bound <= 1 + 1e-3
    assert (sv - 1).abs().max() < 1e-4
    if d_in <= d_out:
        gram = j.T @ j
    else:
        gram = j @ j.T
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=2e-4)


def test_linear_bound_is_exact_for_a_non_orthogonal_weight():
    torch.manual_seed(7)
    layer = OrthogonalLinear(5, 7, bjorck_iters=1, bjorck_scale="frobenius", bjorck_early_stop=False).double()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
    layer.eval()
    exact = torch.linalg.svdvals(jacobian_of(layer, 5, torch.float64)).max().item()
    bound = layer.lipschitz_bound()
    assert exact <= bound <= exact * (1 + 1e-12) and bound < 0.99


@pytest.mark.parametrize("d_in,d_out", [(6, 6), (9, 4)])
def test_linear_gradient_norm_preservation(d_in, d_out):
    torch.manual_seed(8)
    layer = OrthogonalLinear(d_in, d_out).double()
    train_steps(layer)
    for mode in (True, False):
        layer.train(mode)
        x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        assert abs((gx.norm() / g.norm()).item() - 1) < 1e-6


def test_linear_cache_refresh_after_step_load_and_to():
    torch.manual_seed(9)
    layer = OrthogonalLinear(5, 5)
    x = torch.randn(3, 5)
    layer.eval()
    before = layer(x)

    def fresh(lay, inp):
        with torch.no_grad():
            return inp @ lay.compute_operator().T + lay.bias

    assert torch.allclose(before, fresh(layer, x), atol=1e-6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    (layer(x) ** 3).sum().backward()
    opt.step()
    layer.eval()
    after = layer(x)
    assert (after - before).abs().max() > 1e-3
    assert torch.allclose(after, fresh(layer, x), atol=1e-6)

    other = OrthogonalLinear(5, 5).eval()
    y_other = other(x)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), y_other)

    layer.to(torch.float64)
    y64 = layer(x.double())
    assert y64.dtype == torch.float64 and layer.orthogonal_weight().dtype == torch.float64
    assert torch.allclose(y64, y_other.double(), atol=1e-5)


def test_linear_state_dict_determinism_and_shapes():
    torch.manual_seed(10)
    layer = OrthogonalLinear(4, 6, bias=False)
    assert set(layer.state_dict()) == {"weight"}
    x = torch.randn(2, 3, 4)  # arbitrary leading dims
    state = torch.get_rng_state()
    y = layer(x)
    assert y.shape == (2, 3, 6)
    assert torch.equal(layer(x), y)
    layer.eval()
    layer.lipschitz_bound()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    assert BjorckLinear is OrthogonalLinear


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_features=0, out_features=3), "in_features"),
        (dict(in_features=3, out_features=-2), "out_features"),
        (dict(in_features=2.5, out_features=3), "in_features"),
        (dict(in_features=3, out_features=3, bjorck_iters=0), "bjorck_iters"),
        (dict(in_features=3, out_features=3, bjorck_order=0), "bjorck_order"),
        (dict(in_features=3, out_features=3, bjorck_scale="max"), "bjorck_scale"),
        (dict(in_features=3, out_features=3, bias=None), "bias"),
    ],
)
def test_linear_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthogonalLinear(**kwargs)


def test_linear_bad_inputs():
    layer = OrthogonalLinear(4, 3)
    with pytest.raises(ValueError, match="4"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Tensor"):
        layer([1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("shape", [(12, 4), (3, 40, 8), (4, 9), (9, 4)])
@pytest.mark.parametrize("scale", ["power", "frobenius", "sqrt"])
@pytest.mark.parametrize("early_stop,iters", [(True, 20), (False, 12), (False, 2), (True, 4)])
def test_bjorck_gram_phase_of_tall_matrices_equals_the_plain_iteration(shape, scale, early_stop, iters):
    """For r ≥ 2c the order-1 iteration first runs on the c×c Gram matrix and hands the
    last steps to the plain iteration: in float64 its value and gradient equal those of
    the plain iteration step for step (same iterates, same budget, same stopping rule)."""
    from liptorch.ops.orthogonalize import _BjorckFn, _BjorckGramFn

    torch.manual_seed(3)
    w = torch.randn(shape, dtype=torch.float64)
    tall = w if w.shape[-2] >= w.shape[-1] else w.mT
    tall = (tall if tall.dim() == 3 else tall.unsqueeze(0)).contiguous().requires_grad_()
    g = torch.randn_like(tall)
    gram = _BjorckGramFn.apply(tall, iters, scale, 10, early_stop)
    plain = _BjorckFn.apply(tall, iters, 1, scale, 10, early_stop)
    assert torch.allclose(gram, plain, rtol=0, atol=1e-12)
    (dg,) = torch.autograd.grad(gram, tall, g)
    (dp,) = torch.autograd.grad(plain, tall, g)
    assert torch.allclose(dg, dp, rtol=0, atol=1e-11)
    # the public entry point takes the Gram route for these shapes
    out = bjorck_orthonormalize(w, iters=iters, scale=scale, early_stop=early_stop)
    ref = plain.detach() if w.dim() == 3 else plain.detach().squeeze(0)
    assert torch.allclose(out, ref if w.shape[-2] >= w.shape[-1] else ref.mT, rtol=0, atol=1e-12)


def test_bjorck_gram_phase_keeps_float32_orthogonality_for_ill_conditioned_matrices():
    """The Gram matrix squares the condition number; the plain steps that finish the
    iteration must bring an ill-conditioned (cond 10³) float32 matrix to the same
    orthogonality as the plain iteration alone."""
    torch.manual_seed(4)
    r, c = 512, 64
    u, _ = torch.linalg.qr(torch.randn(r, c, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    w = ((u * torch.logspace(0, -3, c, dtype=torch.float64)) @ v.T).float()
    out = bjorck_orthonormalize(w, iters=20).double()
    sv = torch.linalg.svdvals(out)
    assert (sv.max() - 1).abs() < 2e-6
    assert (out.mT @ out - torch.eye(c, dtype=torch.float64)).abs().max() < 2e-5
