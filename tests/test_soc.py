"""Tests for SOCConv2d (soc.md Parts A, C3, F; certification.md §3.2(b),(e), §4).

Every linear map is checked through its exact Jacobian, built by pushing the identity
basis through it (impulse response) and taking an SVD in float64.
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from liptorch.nn.soc import SOCConv2d
from liptorch.ops.taylor import (
    conv_exp,
    fantastic_four_bound,
    fantastic_four_fold,
    fantastic_four_reshapes,
    filter_transpose,
    skew_filter,
    taylor_remainder_bound,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one thread is faster and robust to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def impulse_jacobian(fn, c: int, h: int, w: int, dtype=F64) -> torch.Tensor:
    """Exact Jacobian of an affine map on (c, h, w) inputs: columns are the responses to
    the c·h·w unit impulses minus the response to zero."""
    basis = torch.eye(c * h * w, dtype=dtype).reshape(-1, c, h, w)
    with torch.no_grad():
        out = fn(basis) - fn(torch.zeros(1, c, h, w, dtype=dtype))
    return out.reshape(basis.shape[0], -1).T.to(F64)


def conv_same(x: torch.Tensor, filt: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    p = (filt.shape[-1] - 1) // 2
    if padding_mode == "circular":
        return F.conv2d(F.pad(x, (p, p, p, p), mode="circular") if p else x, filt)
    return F.conv2d(x, filt, padding=p)


def reference_forward(layer: SOCConv2d, x: torch.Tensor, terms: int, filt: torch.Tensor | None = None) -> torch.Tensor:
    """Independent forward: forward accumulation Σ A^j x / j! with the layer's filter
    (direct convolutions, zero or circular padding as the layer's padding_mode)."""
    if filt is None:
        filt = layer.cached_operator()
    if layer.stride == 2:
        x = F.pixel_unshuffle(x, 2)
    pad = layer.channels - x.shape[1]
    if pad > 0:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    term, total = x, x
    for j in range(1, terms):
        term = conv_same(term, filt, layer.padding_mode) / j
        total = total + term
    total = total[:, : layer.out_channels]
    if layer.bias is not None:
        total = total + layer.bias.view(1, -1, 1, 1)
    return total


def train_steps(layer: SOCConv2d, shape, steps: int = 3, lr: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = layer.weight.dtype
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    layer.train()
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=dtype)
        y = layer(x)
        target = torch.randn(y.shape, generator=gen, dtype=dtype)
        loss = (y - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def make_layer(c_in, c_out, k, stride=1, dtype=F64, seed=0, **kw) -> SOCConv2d:
    torch.manual_seed(seed)
    return SOCConv2d(c_in, c_out, k, stride=stride, **kw).to(dtype)


def singular_values(j: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(j.to(F64))


# ----------------------------------------------------------------------------------------
# skewness and the transposed filter
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
def test_filter_transpose_is_exact_jacobian_transpose(k):
    torch.manual_seed(1)
    m = torch.randn(3, 3, k, k, dtype=F64)
    for n in (1, 2, 4):  # includes n < k
        j = impulse_jacobian(lambda z: conv_same(z, m), 3, n, n)
        jt = impulse_jacobian(lambda z: conv_same(z, filter_transpose(m)), 3, n, n)
        assert torch.equal(jt, j.T)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_skew_filter_jacobian_exactly_antisymmetric(k):
    layer = make_layer(4, 4, k)
    train_steps(layer, (2, 4, 5, 5))
    layer.eval()
    filt = layer.cached_operator()
    for n in (1, 3, 6):
        j = impulse_jacobian(lambda z: conv_same(z, filt), 4, n, n)
        assert j.abs().max() > 0
        assert torch.equal(j, -j.T), "A must be exactly skew-symmetric (bit for bit)"
    # float32 too: each Jacobian entry is a single filter tap, so exactness survives.
    filt32 = filt.float()
    j32 = impulse_jacobian(lambda z: conv_same(z, filt32), 4, 3, 3, dtype=torch.float32)
    assert torch.equal(j32, -j32.T)


def test_normalised_filter_formula_and_power_iteration():
    layer = make_layer(3, 5, 3)
    layer.eval()
    filt = layer.cached_operator()
    m = layer.weight.detach()
    c, k = layer.channels, layer.kernel_size
    skew = torch.empty_like(m)
    for i, j, a, b in itertools.product(range(c), range(c), range(k), range(k)):
        skew[i, j, a, b] = (m[i, j, a, b] - m[j, i, k - 1 - a, k - 1 - b]) / 2
    # The four reshapes, written out index by index.
    r1 = torch.empty(c * k, c * k, dtype=F64)
    r2 = torch.empty(c * k, c * k, dtype=F64)
    r3 = torch.empty(c, c * k * k, dtype=F64)
    r4 = torch.empty(c * k * k, c, dtype=F64)
    for o, i, a, b in itertools.product(range(c), range(c), range(k), range(k)):
        r1[o * k + a, i * k + b] = skew[o, i, a, b]
        r2[o * k + b, i * k + a] = skew[o, i, a, b]
        r3[o, i * k * k + a * k + b] = skew[o, i, a, b]
        r4[o * k * k + a * k + b, i] = skew[o, i, a, b]
    sig = [
        float((getattr(layer, f"ff_u{i}") @ r @ getattr(layer, f"ff_v{i}")).abs())
        for i, r in enumerate((r1, r2, r3, r4))
    ]
    expected = 0.7 * skew / min(sig)
    torch.testing.assert_close(filt, expected, rtol=1e-12, atol=1e-14)
    assert layer.normalizer_estimate() == pytest.approx(min(sig), rel=1e-12)
    # 50 initial iterations (run in float32 before .to(float64), so the vectors are unit
    # to ~1e-7): the estimate is a lower bound on the exact norms, and close.
    exact = [float(torch.linalg.matrix_norm(r, 2)) for r in (r1, r2, r3, r4)]
    for s, e in zip(sig, exact):
        assert s <= e * (1 + 1e-6)
        assert s >= 0.9 * e
    # The folded outer products: ⟨T_i, K⟩ = u_iᵀ R_i(K) v_i for any filter K.
    other = torch.randn(c, c, k, k, dtype=F64)
    for i in range(4):
        u, v = getattr(layer, f"ff_u{i}"), getattr(layer, f"ff_v{i}")
        t = fantastic_four_fold(i, u, v, other.shape)
        assert float((t * other).sum()) == pytest.approx(float(u @ fantastic_four_reshapes(other)[i] @ v), rel=1e-12)
    # FF bound of L_n: √(k²)·min‖R_i(L_n)‖ (exact SVDs).
    assert fantastic_four_bound(filt) == pytest.approx(3 * 0.7 * min(exact) / min(sig), rel=1e-12)


def test_normaliser_gradient_matches_explicit_formula():
    layer = make_layer(3, 4, 3)
    train_steps(layer, (2, 3, 5, 5))
    layer.eval()  # no buffer update inside compute_operator
    g = torch.randn(4, 4, 3, 3, dtype=F64)
    (got,) = torch.autograd.grad((layer.compute_operator() * g).sum(), layer.weight)
    w = layer.weight.detach().clone().requires_grad_()
    skew = skew_filter(w)
    sig = torch.stack(
        [
            (getattr(layer, f"ff_u{i}") @ r @ getattr(layer, f"ff_v{i}")).abs()
            for i, r in enumerate(fantastic_four_reshapes(skew))
        ]
    ).min()
    (ref,) = torch.autograd.grad((0.7 * skew / sig * g).sum(), w)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------------------
# soundness of ρ and of the Taylor bound
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (5, 1), (3, 2)])
def test_rho_bounds_exact_A_and_truncated_exponential(k, stride):
    layer = make_layer(3, 4 * stride * stride - 1, k, stride=stride, eval_terms=15)
    train_steps(layer, (2, 3, 4, 4), steps=4)
    layer.eval()
    filt = layer.cached_operator()
    c = layer.channels
    for n in (2, 6):  # input size; n' = n / stride after the unshuffle
        inner = n // stride
        j_a = impulse_jacobian(lambda z: conv_same(z, filt), c, inner, inner)
        norm_a = float(singular_values(j_a)[0])
        rho = layer.spectral_bound_A((n, n))
        assert rho >= norm_a * (1 - 1e-12)
        assert rho <= fantastic_four_bound(filt)  # the min of the computed bounds
        assert layer.spectral_bound_A(n) == rho
        for terms in (2, 4, 15):
            layer.eval_terms = terms
            j = impulse_jacobian(layer, 3, n, n)
            smax = float(singular_values(j)[0])
            bound = layer.lipschitz_bound((n, n))
            assert bound == pytest.approx(1 + rho**terms / math.factorial(terms), rel=1e-8, abs=1e-15)
            assert bound >= 1 + rho**terms / math.factorial(terms)
            assert smax <= bound + 1e-12
        layer.eval_terms = 15


def test_bound_does_not_trust_power_iteration():
    """Corrupt the power-iteration vectors so that σ̂ under-estimates the norms and
    ‖A‖ is large: the bound must follow the actual filter, not the estimate."""
    layer = make_layer(4, 4, 3, eval_terms=15)
    train_steps(layer, (2, 4, 6, 6))
    layer.eval()
    bound_before = layer.lipschitz_bound((6, 6))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, buf in layer.named_buffers():
            buf.copy_(torch.randn(buf.shape, generator=gen, dtype=F64))
            buf.div_(buf.norm())
    rho = layer.spectral_bound_A((6, 6))
    filt = layer.cached_operator()
    j_a = impulse_jacobian(lambda z: conv_same(z, filt), 4, 6, 6)
    norm_a = float(singular_values(j_a)[0])
    assert norm_a > 3.0 * 0.7, "the corrupted estimate must push ‖A‖ past c_corr·√(hw)"
    assert rho >= norm_a
    j = impulse_jacobian(layer, 4, 6, 6)
    smax = float(singular_values(j)[0])
    bound = layer.lipschitz_bound((6, 6))
    assert smax > 1 + 1e-6  # the truncation error is real here ...
    assert bound >= smax  # ... and bounded
    assert bound > bound_before


def test_zero_filter_is_identity_and_recovers():
    """A symmetric M gives L = 0: the layer is the identity (+ bias) with bound 1, and the
    power-iteration vectors must not collapse to zero (they would then stay zero)."""
    layer = make_layer(3, 3, 3)
    with torch.no_grad():
        layer.weight.copy_(layer.weight + filter_transpose(layer.weight))  # symmetric
    layer.update_normalizer(3)
    for i in range(4):
        assert float(getattr(layer, f"ff_u{i}").norm()) == pytest.approx(1.0, abs=1e-6)
    layer.eval()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    torch.testing.assert_close(layer(x), x + layer.bias.view(1, -1, 1, 1), rtol=0, atol=1e-15)
    assert layer.lipschitz_bound((4, 4)) == pytest.approx(1.0, abs=1e-14)
    # the vectors survived: once M is non-symmetric again, the scaling works at once
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
    layer.train()
    layer(x)  # one power iteration
    layer.eval()
    assert layer.normalizer_estimate() > 0.1
    assert 0.1 < layer.spectral_bound_A((4, 4)) < 3
    assert torch.isfinite(layer(x)).all()


def test_taylor_remainder_bound_values():
    assert taylor_remainder_bound(1.0, 15) == pytest.approx(1 / math.factorial(15), rel=1e-8)
    assert taylor_remainder_bound(1.0, 15) >= 1 / math.factorial(15)
    assert taylor_remainder_bound(2.1, 6) == pytest.approx(0.1191, rel=1e-3)
    assert taylor_remainder_bound(0.0, 6) == 0.0
    with pytest.raises(ValueError, match="rho"):
        taylor_remainder_bound(-1.0, 3)
    with pytest.raises(ValueError, match="terms"):
        taylor_remainder_bound(1.0, -1)


# ----------------------------------------------------------------------------------------
# exact-Jacobian grid
# ----------------------------------------------------------------------------------------
# (c_in, c_out) for c_out < s²c_in, = s²c_in, > s²c_in at stride 1 and 2.
_CHANNELS = {
    1: {"fewer_out": (5, 3), "equal": (4, 4), "more_out": (3, 5)},
    2: {"fewer_out": (3, 5), "equal": (2, 8), "more_out": (1, 6)},
}


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("relation", ["fewer_out", "equal", "more_out"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_exact_jacobian_grid(padding_mode, k, relation, stride, dtype):
    c_in, c_out = _CHANNELS[stride][relation]
    layer = make_layer(c_in, c_out, k, stride=stride, dtype=dtype, seed=k + 7 * stride, padding_mode=padding_mode)
    train_steps(layer, (3, c_in, 4, 4), steps=3)
    layer.eval()
    tol_bound = 1e-6 if dtype == F64 else 1e-5
    tol_orth = 1e-4
    for n in (2, 6):  # n < k for k = 3, 5 (and 1 × 1 after the unshuffle)
        x = torch.randn(4, c_in, n, n, dtype=dtype)
        y = layer(x)
        assert y.shape == (4, c_out, n // stride, n // stride)
        assert y.dtype == dtype
        if padding_mode == "zeros" or n // stride >= (k - 1) // 2:  # F.pad wraps at most once
            ref = reference_forward(layer, x, layer.eval_terms)
            torch.testing.assert_close(y, ref, rtol=1e-5 if dtype != F64 else 1e-11, atol=1e-5 if dtype != F64 else 1e-12)
        j = impulse_jacobian(layer, c_in, n, n, dtype=dtype)
        s = singular_values(j)
        bound = layer.lipschitz_bound((n, n))
        assert layer.lipschitz_bound() == bound  # default: the last input size seen
        assert float(s[0]) <= bound * (1 + tol_bound)
        assert bound <= 1 + 1e-3
        if relation == "equal":
            assert j.shape[0] == j.shape[1]
            assert (s - 1).abs().max() < tol_orth
        elif relation == "more_out":  # isometry: JᵀJ ≈ I
            assert j.shape[0] > j.shape[1]
            eye = torch.eye(j.shape[1], dtype=F64)
            assert (j.T @ j - eye).abs().max() < tol_orth
        else:  # co-isometry: JJᵀ ≈ I
            assert j.shape[0] < j.shape[1]
            eye = torch.eye(j.shape[0], dtype=F64)
            assert (j @ j.T - eye).abs().max() < tol_orth
            assert float(s[-1]) > 1 - tol_orth


def test_model_bound_composition():
    from liptorch.lipschitz import lipschitz_bound

    torch.manual_seed(4)
    model = torch.nn.Sequential(SOCConv2d(2, 8, 3, stride=2, eval_terms=4), SOCConv2d(8, 8, 5, eval_terms=4)).double()
    for layer in model:
        train_steps(layer, (2, layer.in_channels, 4, 4), steps=2)
    model.eval()
    total = lipschitz_bound(model, (2, 6, 6))
    b1, b2 = model[0].lipschitz_bound((6, 6)), model[1].lipschitz_bound((3, 3))
    assert total >= b1 * b2 and total == pytest.approx(b1 * b2, rel=1e-12)
    assert total > 1 + 1e-6  # 4 terms: a visible truncation error
    smax = float(singular_values(impulse_jacobian(model, 2, 6, 6))[0])
    assert smax <= total


def test_even_kernels_raise():
    for k in (2, 4, (2, 2), (3, 5), 0):
        with pytest.raises(ValueError, match="kernel"):
            SOCConv2d(4, 4, k)


# ----------------------------------------------------------------------------------------
# terms, gradients, caching
# ----------------------------------------------------------------------------------------
def test_train_and_eval_terms_really_differ():
    layer = make_layer(4, 4, 3, train_terms=3, eval_terms=7)
    train_steps(layer, (2, 4, 5, 5))
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    layer.train()
    y_train = layer(x)
    torch.testing.assert_close(y_train, reference_forward(layer, x, 3), rtol=1e-11, atol=1e-12)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, reference_forward(layer, x, 7), rtol=1e-11, atol=1e-12)
    assert (y_train - y_eval).abs().max() > 1e-3
    # eval with 7 terms differs from eval with 15 terms by ≤ ‖x‖·2ρ^7/7!-ish, but differs
    layer.eval_terms = 15
    assert (layer(x) - y_eval).abs().max() > 0


@pytest.mark.parametrize("relation", ["equal", "fewer_out"])
def test_gradient_norm_preservation(relation):
    c_in, c_out = _CHANNELS[1][relation]
    layer = make_layer(c_in, c_out, 3)
    train_steps(layer, (2, c_in, 6, 6))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, c_in, 6, 6, generator=gen, dtype=F64)
    g = torch.randn(3, c_out, 6, 6, generator=gen, dtype=F64)
    for mode in ("exact", "fast", "autograd"):
        layer.fast_backward = mode == "fast"
        layer.custom_backward = mode != "autograd"
        # eval (15 terms): Jᵀ is an isometry up to ρ^15/15!
        layer.eval()
        xe = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(layer(xe), xe, g)
        ratio = float(gx.norm() / g.norm())
        assert abs(ratio - 1) < 1e-6, (mode, ratio)
        # training (6 terms): per sample, within 1 ± ρ^6/6! for the training filter.
        layer.train()
        xt = x.clone().requires_grad_()
        y = layer(xt)
        eps = taylor_remainder_bound(layer.spectral_bound_A((6, 6)), layer.train_terms)
        (gx,) = torch.autograd.grad(y, xt, g)
        ratios = gx.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
        assert ((ratios - 1).abs() <= eps + 1e-12).all(), (mode, ratios, eps)
    layer.fast_backward, layer.custom_backward = False, False


def test_cache_refresh_after_optimizer_step():
    layer = make_layer(4, 4, 3)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    layer.eval()
    y1 = layer(x)
    b1 = layer.lipschitz_bound((5, 5))
    op1 = layer.cached_operator()
    assert layer.cached_operator() is op1  # cached while nothing changes
    train_steps(layer, (2, 4, 5, 5), steps=1)
    layer.eval()
    y2 = layer(x)
    fresh = copy.deepcopy(layer)  # no cache: recomputed from the new parameters
    fresh.invalidate_cache()
    torch.testing.assert_close(y2, fresh(x), rtol=0, atol=0)
    assert (y2 - y1).abs().max() > 1e-4
    assert layer.lipschitz_bound((5, 5)) == fresh.lipschitz_bound((5, 5))
    assert layer.lipschitz_bound((5, 5)) != b1
    # manual in-place edit of the weight
    with torch.no_grad():
        layer.weight.mul_(1.5)
    fresh2 = copy.deepcopy(layer)
    fresh2.invalidate_cache()
    torch.testing.assert_close(layer(x), fresh2(x), rtol=0, atol=0)
    assert not torch.equal(layer(x), y2)


def test_cache_refresh_after_load_state_dict_and_round_trip():
    a = make_layer(3, 6, 3, stride=2, seed=0)
    b = make_layer(3, 6, 3, stride=2, seed=1)
    train_steps(a, (2, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    a.eval()
    b.eval()
    yb_before = b(x)
    assert b.lipschitz_bound((6, 6)) != a.lipschitz_bound((6, 6))
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias"} | {f"ff_{p}{i}" for p in "uv" for i in range(4)}
    b.load_state_dict(sd)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert not torch.equal(b(x), yb_before)
    assert b.lipschitz_bound((6, 6)) == a.lipschitz_bound((6, 6))
    # training-mode forward also identical (same buffers → same power-iteration update)
    a.train()
    b.train()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_eval_does_not_update_power_iteration_buffers():
    layer = make_layer(4, 4, 3)
    x = torch.randn(2, 4, 5, 5, dtype=F64)

    def snapshot():
        return {k: (v.clone(), v._version) for k, v in layer.named_buffers()}

    layer.eval()
    before = snapshot()
    layer(x)
    layer(x.requires_grad_())
    layer.lipschitz_bound()
    after = snapshot()
    for k in before:
        assert torch.equal(before[k][0], after[k][0]) and before[k][1] == after[k][1]
    layer.train()
    with torch.no_grad():  # training mode without grad: no update either
        layer(x)
    after_nograd = snapshot()
    for k in before:
        assert before[k][1] == after_nograd[k][1]
    layer(x)  # training forward with grad: one power iteration
    after_train = snapshot()
    assert any(not torch.equal(before[k][0], after_train[k][0]) for k in before)
    assert all(before[k][1] != after_train[k][1] for k in before)


def test_dtype_device_and_batch_size():
    layer = make_layer(4, 4, 3, dtype=torch.float32)
    train_steps(layer, (2, 4, 5, 5))
    layer.eval()
    x = torch.randn(5, 4, 5, 5)
    y32 = layer(x)
    bound32 = layer.lipschitz_bound((5, 5))
    # batch size independence
    torch.testing.assert_close(layer(x[:1]), y32[:1], rtol=1e-5, atol=1e-6)
    layer.to(F64)  # .to() invalidates the cache
    assert layer.cached_operator().dtype == F64
    y64 = layer(x.double())
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-5)
    assert layer.lipschitz_bound((5, 5)) == pytest.approx(bound32, abs=1e-9)
    with pytest.raises(ValueError, match="float32"):
        layer(x)  # float32 input into a float64 layer


def test_bad_arguments_raise():
    bad = [
        dict(in_channels=0), dict(in_channels=2.5), dict(in_channels=True), dict(out_channels=-1),
        dict(stride=3), dict(stride=0), dict(stride=(1, 2)), dict(train_terms=1), dict(eval_terms=0),
        dict(train_terms=2.0), dict(correction=0.0), dict(correction=-1.0), dict(correction=float("nan")),
        dict(correction="0.7"), dict(power_iters_init=0), dict(fast_backward="yes"), dict(bias="no"),
        dict(padding_mode="reflect"), dict(padding_mode=None),
    ]
    for kw in bad:
        args = dict(in_channels=4, out_channels=4, kernel_size=3)
        args.update(kw)
        with pytest.raises(ValueError) as info:
            SOCConv2d(**args)
        name = next(iter(kw))
        assert name in str(info.value), (kw, str(info.value))  # the message names the argument


def test_bad_inputs_raise():
    layer = make_layer(4, 4, 3)
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(4, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="4 features/channels"):
        layer(torch.randn(1, 3, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(1, 4, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="float64"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float32))
    layer2 = make_layer(2, 8, 3, stride=2)
    with pytest.raises(ValueError, match="even"):
        layer2(torch.randn(1, 2, 5, 6, dtype=F64))
    with pytest.raises(ValueError, match="even"):
        layer2.lipschitz_bound((5, 5))


def test_default_correction_and_repr():
    assert SOCConv2d(2, 2, 3).correction == 0.7
    assert SOCConv2d(2, 2, 1).correction == 1.0
    assert SOCConv2d(2, 2, 5, correction=1.0).correction == 1.0
    layer = SOCConv2d(2, 4, (3, 3), stride=(2, 2))
    assert layer.channels == 8 and layer.kernel_size == 3 and layer.stride == 2
    assert "train_terms=6" in repr(layer) and "eval_terms=15" in repr(layer)


# ----------------------------------------------------------------------------------------
# fast backward
# ----------------------------------------------------------------------------------------
def _grads(layer, x, g, mode):
    layer.fast_backward = mode == "fast"
    layer.custom_backward = mode != "autograd"
    layer.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in layer.named_buffers()}
    xr = x.clone().requires_grad_()
    (layer(xr) * g).sum().backward()
    with torch.no_grad():  # restore the power-iteration buffers for the next mode
        for k, v in layer.named_buffers():
            v.copy_(state[k])
    return xr.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("k,stride,c_in,c_out", [(3, 1, 6, 6), (5, 1, 4, 3), (3, 2, 2, 8), (1, 1, 4, 6)])
def test_fast_backward_gradients(k, stride, c_in, c_out):
    layer = make_layer(c_in, c_out, k, stride=stride)
    train_steps(layer, (2, c_in, 6, 6), steps=3)
    layer.train()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, c_in, 6, 6, generator=gen, dtype=F64)
    g = torch.randn(3, c_out, 6 // stride, 6 // stride, generator=gen, dtype=F64)
    gx_ref, gw_ref, gb_ref = _grads(layer, x, g, "autograd")
    gx_ex, gw_ex, gb_ex = _grads(layer, x, g, "exact")
    gx_fast, gw_fast, gb_fast = _grads(layer, x, g, "fast")
    # exact custom backward = autograd
    torch.testing.assert_close(gx_ex, gx_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gw_ex, gw_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gb_ex, gb_ref, rtol=0, atol=1e-10)
    # fast: input (and bias) gradient exact, filter gradient approximate
    torch.testing.assert_close(gx_fast, gx_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gb_fast, gb_ref, rtol=0, atol=1e-10)
    cos = float(F.cosine_similarity(gw_fast.flatten(), gw_ref.flatten(), dim=0))
    print(f"fast-backward cosine(dM) k={k} stride={stride} c_in={c_in} c_out={c_out}: {cos:.5f}")
    assert cos >= 0.99
    if k > 1:
        assert not torch.allclose(gw_fast, gw_ref, rtol=0, atol=1e-8)  # it is an approximation
    layer.fast_backward, layer.custom_backward = False, False


@pytest.mark.parametrize("backward", ["exact", "fast"])
def test_conv_exp_backward_matches_autograd_for_general_filters(backward):
    """The custom backwards use the transposed convolution, so they are exact for the
    input gradient of any filter; only-input and only-filter gradients also work."""
    gen = torch.Generator().manual_seed(2)
    filt0 = 0.1 * torch.randn(5, 5, 3, 3, generator=gen, dtype=F64)  # not skew
    x0 = torch.randn(2, 5, 4, 4, generator=gen, dtype=F64)
    g = torch.randn(2, 5, 4, 4, generator=gen, dtype=F64)
    bias0 = torch.randn(5, generator=gen, dtype=F64)
    for need_x, need_f, need_b in itertools.product((True, False), repeat=3):
        if not (need_x or need_f or need_b):
            continue
        res = {}
        for mode in ("autograd", backward):
            x = x0.clone().requires_grad_(need_x)
            filt = filt0.clone().requires_grad_(need_f)
            bias = bias0.clone().requires_grad_(need_b)
            y = conv_exp(x, filt, 5, mode, bias)
            inputs = [t for t in (x, filt, bias) if t.requires_grad]
            names = [n for n, t in zip("xfb", (x, filt, bias)) if t.requires_grad]
            res[mode] = dict(zip(names, torch.autograd.grad(y, inputs, g)))
        torch.testing.assert_close(
            conv_exp(x0, filt0, 5, backward, bias0), conv_exp(x0, filt0, 5, "autograd", bias0), rtol=0, atol=1e-13
        )
        for name in res["autograd"]:
            if name == "f" and backward == "fast":
                continue  # approximate by design
            torch.testing.assert_close(res[backward][name], res["autograd"][name], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="backward"):
        conv_exp(x0, filt0, 5, "approx")
    with pytest.raises(ValueError, match="odd"):
        conv_exp(x0, torch.zeros(5, 5, 2, 2, dtype=F64), 5)


def test_double_backward_default_and_custom_refusal():
    layer = make_layer(2, 2, 3)
    assert layer.custom_backward is False and layer.fast_backward is False
    x = torch.randn(1, 2, 4, 4, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gx.sum().backward()  # the default (plain autograd) supports double backward
    assert layer.weight.grad is not None and layer.weight.grad.abs().max() > 0
    for custom, fast in ((True, False), (False, True)):
        layer.custom_backward, layer.fast_backward = custom, fast
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            gx.sum().backward()


# ----------------------------------------------------------------------------------------
# padding_mode="circular": the exponential frequency by frequency
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride,c_in,c_out,n", [(3, 1, 4, 4, 5), (5, 1, 3, 5, 6), (3, 2, 2, 6, 6), (1, 1, 6, 4, 3), (3, 1, 6, 3, 4)])
def test_circular_matches_direct_circular_convolutions_and_gradients_are_exact(k, stride, c_in, c_out, n):
    """The frequency-domain forward equals Horner with direct circularly padded
    convolutions, in training (6 terms) and eval (15 terms), and its gradients (input,
    weight, bias) equal autograd through that direct reference with the same filter."""
    layer = make_layer(c_in, c_out, k, stride=stride, seed=k + n, padding_mode="circular")
    train_steps(layer, (2, c_in, n, n), steps=2)
    twin = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, c_in, n, n, generator=gen, dtype=F64)
    g = torch.randn(3, c_out, n // stride, n // stride, generator=gen, dtype=F64)
    layer.train()
    xl = x.clone().requires_grad_()
    y = layer(xl)
    grads = torch.autograd.grad(y, [xl, layer.weight, layer.bias], g)
    xt = x.clone().requires_grad_()
    filt = twin.compute_operator()  # the same power-iteration update as layer's forward
    ref = reference_forward(twin, xt, twin.train_terms, filt)
    torch.testing.assert_close(y, ref, rtol=1e-11, atol=1e-12)
    ref_grads = torch.autograd.grad(ref, [xt, twin.weight, twin.bias], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(layer, x, layer.eval_terms), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_circular_orthogonal_bound_is_the_exact_norm_and_any_size_works(dtype):
    """k = 5 on sizes below, at and above the kernel (the spectrum wraps, no F.pad
    reference needed): square layers are orthogonal, the bound is ≥ the exact σ_max and
    within float rounding of it, and the size-free fallback is ≥ the sized bound."""
    layer = make_layer(3, 3, 5, dtype=dtype, seed=3, padding_mode="circular")
    train_steps(layer, (2, 3, 6, 6), steps=3)
    layer.eval()
    tol = 1e-12 if dtype == F64 else 1e-6
    for n in (1, 2, 3, 7):
        j = impulse_jacobian(layer, 3, n, n, dtype=dtype)
        s = singular_values(j)
        bound = layer.lipschitz_bound((n, n))
        assert float(s[0]) <= bound * (1 + (1e-12 if dtype == F64 else 1e-6))
        assert bound - float(s[0]) < tol  # the exact norm of the operator used, not a tail bound
        assert (s - 1).abs().max() < 1e-4
    sized = layer.lipschitz_bound((7, 7))
    object.__setattr__(layer, "_last_input_size", None)
    assert layer.lipschitz_bound(None) >= sized


def test_circular_eval_cache_follows_parameters_and_sizes():
    layer = make_layer(4, 4, 3, seed=8, padding_mode="circular")
    x5, x6 = torch.randn(2, 4, 5, 5, dtype=F64), torch.randn(2, 4, 6, 6, dtype=F64)
    layer.eval()
    y5, y6 = layer(x5), layer(x6)
    torch.testing.assert_close(layer(x5), y5, rtol=0, atol=0)  # back to size 5: recomputed, same
    train_steps(layer, (2, 4, 5, 5), steps=1)
    layer.eval()
    fresh = copy.deepcopy(layer)
    fresh.invalidate_cache()
    object.__setattr__(fresh, "_freq_memo", None)
    torch.testing.assert_close(layer(x6), fresh(x6), rtol=0, atol=0)
    assert (layer(x6) - y6).abs().max() > 1e-4
    other = make_layer(4, 4, 3, seed=9, padding_mode="circular").eval()
    other(x6)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x6), layer(x6), rtol=0, atol=0)
    assert other.lipschitz_bound((6, 6)) == layer.lipschitz_bound((6, 6))


def test_circular_gradient_norm_preservation_and_fast_backward_refused():
    layer = make_layer(4, 4, 3, seed=2, padding_mode="circular")
    train_steps(layer, (2, 4, 6, 6))
    layer.eval()
    x = torch.randn(3, 4, 6, 6, dtype=F64, requires_grad=True)
    g = torch.randn(3, 4, 6, 6, dtype=F64)
    (gx,) = torch.autograd.grad(layer(x), x, g)
    assert abs(float(gx.norm() / g.norm()) - 1) < 1e-9
    with pytest.raises(ValueError, match="fast_backward"):
        SOCConv2d(4, 4, 3, padding_mode="circular", fast_backward=True)
    assert "padding_mode='circular'" in repr(layer)


@pytest.mark.parametrize("k,stride,c_in,c_out,n", [(3, 1, 8, 8, 5), (3, 2, 3, 10, 6), (5, 1, 10, 7, 4)])
def test_circular_batch_route_equals_the_matrix_route(k, stride, c_in, c_out, n):
    """Training batches of at most half the channels accumulate the terms on the batch
    spectrum instead of building S_K(Â) — same output and gradients (float64)."""
    layer = make_layer(c_in, c_out, k, stride=stride, seed=n, padding_mode="circular")
    x = torch.randn(2, c_in, n, n, dtype=F64)  # 2·N ≤ c: the batch route
    assert 2 * x.shape[0] <= layer.channels
    results = []
    for force_matrix in (False, True):
        twin = copy.deepcopy(layer)
        if force_matrix:  # the matrix route, as taken for larger batches
            twin._batch_terms = lambda op, xh, size, terms, t=twin: torch.bmm(
                xh, t.frequency_operator(op, size, terms, precise=False)
            )
        xl = x.clone().requires_grad_()
        y = twin(xl)
        results.append((y, torch.autograd.grad(y.square().sum(), [xl, twin.weight, twin.bias])))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_circular_after_inference_mode_empty_batch_reduced_precision_and_pickling():
    """Memos filled under torch.inference_mode still serve training and graph-recording
    eval passes (attacks); an empty batch gives an empty output; reduced precision is a
    clear error; copies do not carry the derived frequency matrices."""
    layer = make_layer(4, 4, 3, seed=12, padding_mode="circular")
    x = torch.randn(8, 4, 4, 4, dtype=F64)
    layer.eval()
    with torch.inference_mode():
        y_inf = layer(x)
        layer.lipschitz_bound((4, 4))
    xg = x.clone().requires_grad_()
    y = layer(xg)  # eval with a graph, reusing the memo built in inference mode
    (gx,) = torch.autograd.grad(y.square().sum(), xg)
    assert torch.equal(y.detach(), y_inf) and gx.shape == x.shape
    layer.train()
    layer(x).square().sum().backward()  # training after inference mode (float64: same phase memo key)
    assert layer.weight.grad is not None
    for mode in (True, False):
        layer.train(mode)
        out = layer(torch.randn(0, 4, 4, 4, dtype=F64))
        assert out.shape == (0, 4, 4, 4)
    half = SOCConv2d(4, 4, 3, padding_mode="circular").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float64"):
        half(torch.randn(1, 4, 4, 4, dtype=torch.bfloat16))
    layer.eval()
    layer(x)
    assert layer.__dict__.get("_freq_memo") is not None
    twin = copy.deepcopy(layer)
    assert "_freq_memo" not in twin.__dict__ and "_phase_memo" not in twin.__dict__
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
