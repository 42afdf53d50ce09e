"""BCOPConv2d: exact Jacobians, orthogonality, bounds, construction (bcop.md §11), caching."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from liptorch.nn.bcop import BCOPConv2d, assemble_bcop_kernel, bcop_kernel, circular_conv2d, circular_pad
from liptorch.ops.orthogonalize import bjorck_orthonormalize, bjorck_scale


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second thread only adds barrier waits on a busy machine.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------- helpers
def reference_conv(x: torch.Tensor, kernel: torch.Tensor, stride: int, before: int) -> torch.Tensor:
    """Independent circular cross-correlation: y[i,j] = Σ K[a,b] x[(i+a−p) mod n, (j+b−p) mod n],
    after a pixel-unshuffle by ``stride`` (built from torch.roll, not from F.pad/F.conv2d)."""
    if stride > 1:
        x = F.pixel_unshuffle(x, stride)
    k = kernel.shape[-1]
    y = x.new_zeros(x.shape[0], kernel.shape[0], x.shape[2], x.shape[3])
    for a in range(k):
        for b in range(k):
            xs = torch.roll(x, shifts=(before - a, before - b), dims=(2, 3))
            y = y + torch.einsum("oc,nchw->nohw", kernel[:, :, a, b], xs)
    return y


def jacobian_of(fn, in_shape, dtype) -> torch.Tensor:
    """Exact Jacobian of an affine map by impulse response: columns T(e_i) − T(0)."""
    d = math.prod(in_shape)
    basis = torch.eye(d, dtype=dtype).reshape((d,) + tuple(in_shape))
    with torch.no_grad():
        y0 = fn(torch.zeros((1,) + tuple(in_shape), dtype=dtype))
        y = fn(basis) - y0
    return y.reshape(d, -1).T.to(torch.float64)


def train_steps(layer, n, steps=3, lr=0.05, seed=0):
    """A few Adam steps on a random loss so the parameters leave their initialisation."""
    gen = torch.Generator().manual_seed(seed)
    dtype = layer.matrices.dtype
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    layer.train()
    for _ in range(steps):
        x = torch.randn(3, layer.in_channels, n, n, generator=gen, dtype=torch.float64).to(dtype)
        opt.zero_grad()
        y = layer(x)
        target = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
        ((y - target) ** 2).sum().backward()
        opt.step()
    layer.eval()
    return layer


def check_spectrum(sv: torch.Tensor, c_in_eff: int, c_out: int, tol: float = 1e-4) -> None:
    """σ of J (min(rows, cols) of them): all ≈ 1 for orthogonal / isometry / co-isometry."""
    assert sv.max() <= 1 + tol
    assert sv.min() >= 1 - tol, f"σ_min = {sv.min().item()} (c_in_eff={c_in_eff}, c_out={c_out})"


GRID = [
    # (c_in, c_out, kernel, stride, n)
    *[(ci, co, k, 1, n) for k, sizes in ((1, (1, 3)), (2, (1, 4)), (3, (2, 4)), (5, (3, 4)))
      for (ci, co) in ((3, 5), (4, 4), (5, 2)) for n in sizes],
    *[(ci, co, k, 2, n) for k in (2, 4) for (ci, co) in ((1, 5), (2, 8), (3, 4)) for n in (2, 4)],
    (2, 3, 1, 2, 4),  # kernel < stride: unshuffle then a 1x1 BCOP
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("c_in,c_out,k,s,n", GRID)
def test_exact_jacobian(c_in, c_out, k, s, n, dtype):
    torch.manual_seed(1000 * k + 10 * c_in + c_out + n)
    layer = BCOPConv2d(c_in, c_out, k, stride=s).to(dtype)
    train_steps(layer, n)
    in_shape = (c_in, n, n)
    with torch.no_grad():
        layer(torch.randn((2,) + in_shape, dtype=dtype))  # eval forward: caches, records size
    kernel = layer.kernel()
    assert kernel is layer.kernel()  # cached in eval
    kk = max(1, k // s)
    assert kernel.shape == (c_out, c_in * s * s, kk, kk) and kernel.dtype == dtype

    # Exact operator of the cached kernel, from an independent fp64 implementation ...
    j_ref = jacobian_of(lambda t: reference_conv(t, kernel.double(), s, kk // 2), in_shape, torch.float64)
    # ... and the layer's own forward computes it (bias removed by T(e) − T(0)).
    j_layer = jacobian_of(layer, in_shape, dtype)
    tol_fwd = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.allclose(j_layer, j_ref, atol=tol_fwd, rtol=0)

    sv = torch.linalg.svdvals(j_ref)
    bound = layer.lipschitz_bound()
    assert bound >= sv.max().item() * (1 - 1e-12) - 1e-12
    assert sv.max().item() <= bound * (1 + 1e-6)
    assert bound <= 1 + 1e-3
    # The bound is the exact norm of the cached operator, not a loose estimate.
    assert bound <= sv.max().item() + 1e-9
    assert layer.lipschitz_bound((n, n)) == bound
    check_spectrum(sv, c_in * s * s, c_out)
    if c_in * s * s <= c_out:  # isometry: JᵀJ = I
        gram = j_ref.T @ j_ref
    else:  # co-isometry: JJᵀ = I
        gram = j_ref @ j_ref.T
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=2e-4)


@pytest.mark.parametrize("k,s,sizes", [(3, 1, (1, 2, 3, 5)), (2, 1, (1, 3)), (4, 2, (2, 4, 6)), (5, 1, (1, 2, 3))])
def test_bound_is_exact_for_non_orthogonal_kernels_at_every_size(k, s, sizes):
    """The bound must equal the exact σ_max of the Jacobian at the size given, including
    after the unshuffle and for n < k.  Checked (1) on a layer whose kernel is far from
    orthogonal (one Björck step from a Frobenius scaling) and (2) on random kernels fed
    to the same bound routine, whose norm depends on the size, so a wrong size or a
    wrong wrap offset would be caught."""
    torch.manual_seed(7)
    layer = BCOPConv2d(2, 3, k, stride=s, bjorck_iters=1, bjorck_scale="frobenius", bjorck_early_stop=False)
    layer.double()
    with torch.no_grad():
        layer.matrices.add_(0.3 * torch.randn_like(layer.matrices))
    layer.eval()
    kk = max(1, k // s)
    # Symbol exactly 0 at z = (1, 1): small dyadic taps whose sum is exactly 0 in float64,
    # so where that is the only frequency (n = 2 after a stride-2 unshuffle) the operator
    # is exactly zero and the SVD and the bound carry no round-off to compare.
    random_kernel = torch.randint(-16, 17, (3, 2 * s * s, kk, kk)).to(torch.float64) / 8
    random_kernel[..., -1, -1] -= random_kernel.sum(dim=(2, 3))
    values = []
    for n in sizes:
        j = jacobian_of(layer, (2, n, n), torch.float64)
        exact = torch.linalg.svdvals(j).max().item()
        bound = layer.lipschitz_bound((n, n))
        assert exact <= bound <= exact * (1 + 1e-9) + 1e-12
        assert bound < 0.999  # not orthogonal: not trivially 1 = 1
        j = jacobian_of(lambda t: reference_conv(t, random_kernel, s, kk // 2), (2, n, n), torch.float64)
        exact = torch.linalg.svdvals(j).max().item()
        bound = layer.compute_lipschitz_bound(random_kernel, (n, n))
        assert exact <= bound <= exact * (1 + 1e-9) + 1e-12
        values.append(bound)
    if kk > 1:
        assert max(values) - min(values) > 1e-3  # the norm really depends on the size


def test_lipschitz_bound_uses_last_size_and_requires_one():
    layer = BCOPConv2d(2, 2, 3).double().eval()
    with pytest.raises(ValueError, match="input_size"):
        layer.lipschitz_bound()
    layer(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert layer.default_input_size() == (5, 5)
    assert layer.lipschitz_bound() == layer.lipschitz_bound((5, 5))
    strided = BCOPConv2d(2, 4, 4, stride=2)
    with pytest.raises(ValueError, match="multiple of the stride"):
        strided.lipschitz_bound((5, 6))


# ----------------------------------------------------------------------------- construction (§11)
def torus_symbol(ortho: torch.Tensor, z1: complex, z2: complex) -> torch.Tensor:
    """U(z) = O_0 Π_i (P_{2i−1} + (I−P_{2i−1}) z₁)(P_{2i} + (I−P_{2i}) z₂), written directly."""
    nmat, c, _ = ortho.shape
    o = ortho.to(torch.complex128)
    eye = torch.eye(c, dtype=torch.complex128)
    u = o[0]
    for j in range(1, nmat):
        d = o[j][:, : c // 2]
        p = d @ d.mH
        z = z1 if j % 2 == 1 else z2
        u = u @ (p + (eye - p) * z)
    return u


@pytest.mark.parametrize("c_in,c_out,k", [(3, 3, 3), (2, 5, 4), (5, 3, 5), (4, 4, 2), (3, 3, 1)])
def test_kernel_matches_symbol_product_at_random_torus_points(c_in, c_out, k):
    torch.manual_seed(3)
    layer = BCOPConv2d(c_in, c_out, k).double()
    train_steps(layer, 4, steps=2)
    with torch.no_grad():
        ortho = layer.orthogonal_matrices()
        assert torch.equal(ortho, bjorck_orthonormalize(layer.matrices, iters=layer.bjorck_iters))
        kernel = layer.kernel()
    assert torch.equal(kernel, assemble_bcop_kernel(ortho, c_out, c_in))
    a = torch.arange(k, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    for theta in torch.rand(6, 2, generator=gen, dtype=torch.float64) * 2 * math.pi:
        z1, z2 = complex(torch.cos(theta[0]), torch.sin(theta[0])), complex(torch.cos(theta[1]), torch.sin(theta[1]))
        powers = (z1 ** a.to(torch.complex128))[:, None] * (z2 ** a.to(torch.complex128))[None, :]
        from_kernel = torch.einsum("ocab,ab->oc", kernel.to(torch.complex128), powers)
        full = torus_symbol(ortho, z1, z2)
        assert torch.allclose(from_kernel, full[:c_out, :c_in], atol=1e-12)
        # paraunitary on the torus (up to the Björck residual)
        eye = torch.eye(full.shape[0], dtype=torch.complex128)
        assert torch.allclose(full.mH @ full, eye, atol=1e-9)


def reference_kernel(matrices, out_channels, in_channels, iters):
    """Plain-autograd Björck (order 1, s constant) and tap-by-tap block convolution."""
    a = matrices / bjorck_scale(matrices, "power")
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    for _ in range(iters):
        a = a @ (1.5 * eye - 0.5 * a.mT @ a)
    nmat, c, _ = a.shape
    k = (nmat + 1) // 2
    taps = {(0, 0): a[0]}
    for j in range(1, nmat):
        d = a[j][:, : c // 2]
        p = d @ d.T
        step = (1, 0) if j % 2 == 1 else (0, 1)
        new = {}
        for (i0, i1), x in taps.items():
            for (d0, d1), f in (((0, 0), p), (step, eye - p)):
                key = (i0 + d0, i1 + d1)
                new[key] = new.get(key, 0) + x @ f
        taps = new
    rows = [torch.stack([taps[(i, j)][:out_channels, :in_channels] for j in range(k)], -1) for i in range(k)]
    return torch.stack(rows, -2)


@pytest.mark.parametrize("c_in,c_out,k", [(3, 3, 3), (2, 5, 2), (5, 3, 4), (4, 4, 1), (1, 2, 3)])
def test_hand_written_kernel_gradient_matches_autograd(c_in, c_out, k):
    torch.manual_seed(21)
    c = max(c_in, c_out)
    m = torch.randn(2 * k - 1, c, c, dtype=torch.float64) + 2 * torch.eye(c, dtype=torch.float64)
    m.requires_grad_(True)
    kernel = bcop_kernel(m, c_out, c_in, iters=5, early_stop=False)
    ref = reference_kernel(m, c_out, c_in, 5)
    assert torch.allclose(kernel, ref, atol=1e-12)
    g = torch.randn_like(ref)
    (gk,) = torch.autograd.grad(kernel, m, g)
    (gr,) = torch.autograd.grad(ref, m, g)
    assert torch.allclose(gk, gr, atol=1e-11)
    assert gr.abs().max() > 1e-3


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_parameter_matrix_gets_a_gradient(k):
    torch.manual_seed(11)
    layer = BCOPConv2d(4, 4, k).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    (layer(x) * torch.randn(2, 4, 6, 6, dtype=torch.float64)).sum().backward()
    grad = layer.matrices.grad
    assert grad.shape[0] == 2 * k - 1
    norms = grad.flatten(1).norm(dim=1)
    assert (norms > 1e-6 * norms.max()).all(), norms


@pytest.mark.parametrize("k", [2, 3, 5])
def test_perturbing_any_matrix_changes_the_kernel_last_pair_included(k):
    torch.manual_seed(12)
    layer = BCOPConv2d(4, 4, k).double().eval()
    base = layer.kernel().clone()
    gen = torch.Generator().manual_seed(0)
    for j in list(range(2 * k - 1)) + [2 * k - 3, 2 * k - 2]:  # the last pair once more, on purpose
        saved = layer.matrices.detach().clone()
        with torch.no_grad():
            layer.matrices[j] += 0.5 * torch.randn(4, 4, generator=gen, dtype=torch.float64)
        changed = (layer.kernel() - base).abs().max().item()
        assert changed > 1e-3, f"matrix {j} does not reach the kernel"
        with torch.no_grad():
            layer.matrices.copy_(saved)
        assert torch.allclose(layer.kernel(), base, atol=1e-12)


def test_half_rank_projectors():
    torch.manual_seed(2)
    c = 6
    ortho = bjorck_orthonormalize(torch.randn(3, c, c, dtype=torch.float64), iters=30)
    d = ortho[1][:, : c // 2]
    p = d @ d.T
    assert torch.allclose(p @ p, p, atol=1e-12) and torch.allclose(p, p.T)
    assert round(torch.trace(p).item()) == c // 2


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("c_in,c_out,k,s", [(4, 4, 3, 1), (3, 3, 2, 1), (5, 3, 3, 1), (2, 8, 4, 2), (3, 4, 2, 2)])
def test_gradient_norm_preservation(c_in, c_out, k, s):
    """‖Jᵀg‖ = ‖g‖ for orthogonal and co-isometric (c_in·s² ≥ c_out) layers, train and eval."""
    torch.manual_seed(4)
    layer = BCOPConv2d(c_in, c_out, k, stride=s).double()
    train_steps(layer, 4)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        x = torch.randn(3, c_in, 4, 4, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        ratio = (gx.norm() / g.norm()).item()
        assert abs(ratio - 1) < 1e-6, (mode, ratio)


def test_widening_layer_preserves_input_norm():
    torch.manual_seed(5)
    layer = BCOPConv2d(3, 7, 3).double()
    train_steps(layer, 5)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x) - layer(torch.zeros_like(x))
    assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-9)


def test_train_forward_matches_eval_forward():
    torch.manual_seed(6)
    layer = BCOPConv2d(3, 5, 3)
    x = torch.randn(2, 3, 6, 6)
    y_train = layer(x)
    layer.eval()
    assert torch.allclose(layer(x), y_train, atol=1e-6)
    assert y_train.requires_grad


# ----------------------------------------------------------------------------- cache and state
def fresh_output(layer, x):
    with torch.no_grad():
        kernel = layer._transform(layer.matrices)
        return reference_conv(x, kernel, layer.stride[0], layer.padding[0]) + (
            0 if layer.bias is None else layer.bias.view(1, -1, 1, 1)
        )


def test_cache_refreshes_after_optimizer_step():
    torch.manual_seed(8)
    layer = BCOPConv2d(3, 3, 3, stride=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    layer.eval()
    before = layer(x)
    assert torch.allclose(before, fresh_output(layer, x), atol=1e-12)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    (layer(x) ** 3).sum().backward()
    opt.step()
    layer.eval()
    after = layer(x)
    assert (after - before).abs().max() > 1e-4  # the step really changed the map
    assert torch.allclose(after, fresh_output(layer, x), atol=1e-12)


def test_cache_refreshes_after_load_state_dict_and_in_place_edit():
    torch.manual_seed(9)
    a = BCOPConv2d(2, 8, 4, stride=2).double().eval()
    b = BCOPConv2d(2, 8, 4, stride=2).double().eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() > 1e-3
    a.load_state_dict(b.state_dict())
    assert torch.allclose(a(x), yb, atol=1e-12)
    assert torch.allclose(a(x), fresh_output(a, x), atol=1e-12)
    with torch.no_grad():
        a.matrices[0].mul_(-1.0)
    assert (a(x) - yb).abs().max() > 1e-3
    assert torch.allclose(a(x), fresh_output(a, x), atol=1e-12)


def test_state_dict_round_trip_and_contents():
    torch.manual_seed(10)
    layer = BCOPConv2d(3, 4, 3, bias=True)
    train_steps(layer, 4)
    x = torch.randn(2, 3, 4, 4)
    y = layer(x)
    sd = layer.state_dict()
    assert set(sd) == {"matrices", "bias"}
    assert sd["matrices"].shape == (5, 4, 4)
    clone = BCOPConv2d(3, 4, 3)
    clone.load_state_dict(sd)
    clone.eval()
    assert torch.equal(clone(x), y)  # deterministic: bit-identical
    nobias = BCOPConv2d(3, 4, 3, bias=False)
    assert set(nobias.state_dict()) == {"matrices"}
    restored = copy.deepcopy(layer)
    assert torch.equal(restored(x), y)


def test_to_float64_refreshes_and_follows_dtype():
    torch.manual_seed(13)
    layer = BCOPConv2d(3, 3, 3).eval()
    x = torch.randn(2, 3, 5, 5)
    y32 = layer(x)
    assert y32.dtype == torch.float32 and layer.kernel().dtype == torch.float32
    layer.to(torch.float64)
    y64 = layer(x.double())
    assert y64.dtype == torch.float64 and layer.kernel().dtype == torch.float64
    assert torch.allclose(y64, y32.double(), atol=1e-5)
    with pytest.raises(ValueError, match="float64"):
        layer(x)  # float32 input to a float64 layer


def test_forward_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(14)
    layer = BCOPConv2d(4, 4, 3)
    x = torch.randn(2, 4, 5, 5)
    state = torch.get_rng_state()
    y1 = layer(x)
    y2 = layer(x)
    layer.eval()
    y3 = layer(x)
    y4 = layer(x)
    layer.lipschitz_bound()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y1, y2) and torch.equal(y3, y4)
    # Train mode convolves in the input's layout (NCHW here), eval in channels_last:
    # the same kernel, summed in another order.
    assert torch.allclose(y1.detach(), y3, rtol=0, atol=1e-6)


def test_no_grad_forwards_reusing_the_pad_workspace_stay_independent():
    torch.manual_seed(16)
    layer = BCOPConv2d(3, 3, 3).double().eval()
    x1, x2 = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ref1, ref2 = layer(x1), layer(x2)  # grad enabled: fresh buffers
    with torch.no_grad():
        y1 = layer(x1)
        y2 = layer(x2)  # same shape: reuses the buffer y1 was computed from
    assert torch.equal(y1, ref1.detach()) and torch.equal(y2, ref2.detach())
    with torch.inference_mode():
        assert torch.equal(layer(x1), ref1.detach())


@pytest.mark.parametrize("train", [True, False])
def test_stacked_same_shape_layers_backprop_correctly(train):
    """Two layers with identically shaped padded inputs, with a graph recorded (e.g. an
    attack on an eval model): no buffer may be shared, and the composition is GNP."""
    torch.manual_seed(17)
    net = torch.nn.Sequential(BCOPConv2d(3, 3, 3), BCOPConv2d(3, 3, 3)).double().train(train)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = net(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert abs(gx.norm().item() / g.norm().item() - 1) < 1e-6


def test_any_batch_size_and_output_shape():
    layer = BCOPConv2d(2, 6, 4, stride=2)
    for batch in (1, 5):
        y = layer(torch.randn(batch, 2, 8, 6))
        assert y.shape == (batch, 6, 4, 3)
    y = layer(torch.randn(0, 2, 8, 8))
    assert y.shape == (0, 6, 4, 4)


def test_non_square_inputs_are_orthogonal():
    torch.manual_seed(15)
    layer = BCOPConv2d(2, 2, 3).double()
    train_steps(layer, 4)
    j = jacobian_of(layer, (2, 3, 5), torch.float64)
    sv = torch.linalg.svdvals(j)
    assert (sv - 1).abs().max() < 1e-4
    assert sv.max() <= layer.lipschitz_bound((3, 5)) * (1 + 1e-6)


def test_circular_pad_matches_torch_and_wraps_small_inputs():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    assert torch.equal(circular_pad(x, 1, 1), F.pad(x, (1, 1, 1, 1), mode="circular"))
    assert torch.equal(circular_pad(x, 2, 1), F.pad(x, (2, 1, 2, 1), mode="circular"))
    tiny = torch.randn(1, 2, 1, 2, dtype=torch.float64)
    padded = circular_pad(tiny, 2, 2)
    idx_h = torch.arange(-2, 3) % 1
    idx_w = torch.arange(-2, 4) % 2
    assert torch.equal(padded, tiny[:, :, idx_h][:, :, :, idx_w])
    xg = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: circular_pad(t, 2, 1), (xg,))


@pytest.mark.parametrize("before,after", [(1, 1), (2, 1), (1, 0), (0, 2), (3, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_circular_pad_backward_is_the_adjoint_and_keeps_the_input_layout(before, after, channels_last):
    """The hand-written backward of the wrap-once pad equals autograd through F.pad
    (with a channels_last incoming gradient, as the convolution produces) and returns
    the gradient in the input's memory layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y = circular_pad(x, before, after)
    ref = F.pad(x, (before, after, before, after), mode="circular")
    assert torch.equal(y, ref)
    g = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, gr, rtol=0, atol=1e-12)
    assert gx.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(lambda t: circular_pad(t, before, after), (x.detach()[:1, :2].clone().requires_grad_(),))


@pytest.mark.parametrize("before,after,c_in,c_out", [(1, 1, 3, 4), (2, 1, 4, 2), (1, 0, 2, 2), (0, 2, 3, 3), (2, 2, 2, 5)])
@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("x_layout,layout", [("nchw", "input"), ("channels_last", "input"), ("nchw", "channels_last")])
def test_circular_conv2d_backward_matches_autograd_through_the_pad(before, after, c_in, c_out, grad_layout, x_layout, layout):
    """circular_conv2d's hand-written backward (input gradient as a circular convolution
    with the adjoint kernel, weight gradient against the padded input) equals autograd
    through F.pad + F.conv2d for every subset of inputs requiring grad, with either
    incoming gradient layout, in both computation layouts, and passes gradcheck.  The
    output has the chosen layout and is bit-identical to the no-grad forward's."""
    torch.manual_seed(0)
    k = before + after + 1
    x_fmt = torch.channels_last if x_layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, c_in, 5, 4, dtype=torch.float64).contiguous(memory_format=x_fmt)
    w = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64)
    fmt = torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
    y_fmt = torch.channels_last if "channels_last" in (x_layout, layout) else torch.contiguous_format
    with torch.no_grad():
        y_nograd = circular_conv2d(x, w, b, before, after, layout=layout)
    assert y_nograd.is_contiguous(memory_format=y_fmt)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (True, True, False)]:
        leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, b), need)]
        y = circular_conv2d(*leaves, before, after, layout=layout)
        assert y.is_contiguous(memory_format=y_fmt)
        assert torch.equal(y.detach(), y_nograd)
        ref = F.conv2d(F.pad(leaves[0], (before, after, before, after), mode="circular"), leaves[1], leaves[2])
        assert torch.allclose(y, ref, rtol=0, atol=1e-12)
        g = torch.randn_like(ref).contiguous(memory_format=fmt)
        wanted = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad(y, wanted, g)
        expected = torch.autograd.grad(ref, wanted, g)
        for a, e in zip(got, expected):
            assert a.shape == e.shape
            assert torch.allclose(a, e, rtol=0, atol=1e-10)
    args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: circular_conv2d(*t, before, after, layout=layout), args)
    # no bias, and an input smaller than the padding (falls back to the wrap-many pad)
    small = torch.randn(1, c_in, 1, 2, dtype=torch.float64, requires_grad=True)
    wb = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, u: circular_conv2d(t, u, None, before, after), (small, wb))


def test_circular_conv2d_rejects_an_unknown_layout():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="layout must be 'input' or 'channels_last'"):
        circular_conv2d(x, w, None, 1, 1, layout="nhwc")


@pytest.mark.parametrize("channels_last", [False, True])
def test_bcop_output_layout_follows_the_input_in_training_and_is_channels_last_in_eval(channels_last):
    """Training-mode forwards keep the input's layout (the faster weight gradient for
    NCHW); eval-mode forwards, with or without a graph, run in channels_last and agree
    bit for bit; train and eval differ only by summation order."""
    torch.manual_seed(3)
    layer = BCOPConv2d(4, 4, 3).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y_train = layer(x)
    assert y_train.is_contiguous(memory_format=fmt)
    layer.eval()
    y_graph = layer(x)
    with torch.no_grad():
        y_eval = layer(x)
    assert y_eval.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_graph.detach(), y_eval)
    assert torch.allclose(y_train.detach(), y_eval, rtol=0, atol=1e-13)
    (gx,) = torch.autograd.grad(y_graph, x, torch.ones_like(y_graph))
    (gt,) = torch.autograd.grad(y_train, x, torch.ones_like(y_train))
    assert torch.allclose(gx, gt, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_channels=3, out_channels=4, kernel_size=0), "kernel_size"),
        (dict(in_channels=3, out_channels=4, kernel_size=-1), "kernel_size"),
        (dict(in_channels=3, out_channels=4, kernel_size=2.5), "kernel_size"),
        (dict(in_channels=3, out_channels=4, kernel_size=(3, 5)), "kernel_size"),
        (dict(in_channels=3, out_channels=4, kernel_size=4, stride=3), "multiple of stride"),
        (dict(in_channels=3, out_channels=4, kernel_size=5, stride=2), "multiple of stride"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, stride=0), "stride"),
        (dict(in_channels=-3, out_channels=4, kernel_size=3), "in_channels"),
        (dict(in_channels=3, out_channels=0, kernel_size=3), "out_channels"),
        (dict(in_channels=3.0, out_channels=4, kernel_size=3), "in_channels"),
        (dict(in_channels="3", out_channels=4, kernel_size=3), "in_channels"),
        (dict(in_channels=True, out_channels=4, kernel_size=3), "in_channels"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, bjorck_iters=0), "bjorck_iters"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, bjorck_order=3), "bjorck_order"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, bjorck_scale="svd"), "bjorck_scale"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, bias="yes"), "bias"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BCOPConv2d(**kwargs)


def test_bad_inputs():
    layer = BCOPConv2d(3, 4, 4, stride=2)
    with pytest.raises(ValueError, match="3 input channels"):
        layer(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(1, 1, 3, 4, 4))
    with pytest.raises(ValueError, match="multiples of 2"):
        layer(torch.randn(1, 3, 5, 4))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.ones(1, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="Tensor"):
        layer([[1.0]])
    three = BCOPConv2d(3, 3, 3, stride=3)
    with pytest.raises(ValueError, match="multiples of 3"):
        three(torch.randn(1, 3, 6, 7))


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,n",
    [(4, 4, 3, 1, 6), (3, 6, 2, 1, 5), (6, 4, 4, 2, 8), (2, 5, 4, 2, 6), (4, 4, 5, 1, 3), (3, 3, 6, 2, 4), (5, 3, 3, 1, 7)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_fft_training_path_equals_the_direct_convolution(c_in, c_out, k, stride, n, bias):
    """conv_impl='fft' (per-frequency GEMMs, used by 'auto' for wide layers on small
    images) gives the direct circular convolution's output and gradients (input,
    matrices, bias) to float64 rounding, for odd and even kernels, strides, channel
    changes, odd sizes and images smaller than the kernel."""
    torch.manual_seed(k + 10 * stride + n)
    direct = BCOPConv2d(c_in, c_out, k, stride=stride, bias=bias, conv_impl="direct").double()
    fft = BCOPConv2d(c_in, c_out, k, stride=stride, bias=bias, conv_impl="fft").double()
    fft.load_state_dict(direct.state_dict())
    x = torch.randn(3, c_in, n, n, dtype=torch.float64)
    outs = []
    for layer in (direct, fft):
        xl = x.clone().requires_grad_()
        y = layer(xl)
        leaves = [xl, layer.matrices] + ([layer.bias] if bias else [])
        outs.append((y, torch.autograd.grad(y.square().sum(), leaves)))
    (yd, gd), (yf, gf) = outs
    torch.testing.assert_close(yf, yd, rtol=0, atol=1e-12)
    for a, b in zip(gf, gd):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_conv_impl_auto_rule_eval_path_and_validation():
    wide = BCOPConv2d(64, 64, 3)
    x16, x32 = torch.empty(1, 64, 16, 16), torch.empty(1, 64, 32, 32)
    assert wide._use_fft(x16) and not wide._use_fft(x32)  # small image: FFT; 32×32: direct
    assert not BCOPConv2d(16, 16, 3)._use_fft(torch.empty(1, 16, 16, 16))  # narrow: direct
    assert not BCOPConv2d(64, 64, 2, stride=2)._use_fft(torch.empty(1, 256, 8, 8))  # 1×1 inner kernel
    assert not BCOPConv2d(64, 64, 4, stride=2)._use_fft(torch.empty(1, 256, 8, 8))  # 2×2 inner kernel
    assert BCOPConv2d(64, 64, 5)._use_fft(x16)
    with torch.no_grad():
        assert not wide._use_fft(x16)  # no graph: the direct (eval-style) convolution
    wide.eval()
    assert not wide._use_fft(x16)
    forced = BCOPConv2d(4, 4, 3, conv_impl="fft")
    assert forced._use_fft(torch.empty(1, 4, 32, 32)) and "conv_impl='fft'" in repr(forced)
    with pytest.raises(ValueError, match="conv_impl must be 'auto', 'direct' or 'fft'"):
        BCOPConv2d(4, 4, 3, conv_impl="winograd")


def test_inference_mode_then_graph_passes_empty_batches_and_reduced_precision():
    """Buffers and caches made under torch.inference_mode (the eval pad workspace, the
    cached kernel) keep serving no-grad and graph-recording passes; the FFT training
    path handles an empty batch (it falls back to direct) and refuses reduced precision
    clearly, while 'auto' falls back to direct for it."""
    torch.manual_seed(21)
    layer = BCOPConv2d(6, 6, 3).eval()
    x = torch.randn(2, 6, 5, 5)
    with torch.inference_mode():
        y_inf = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y_inf)  # reuses the workspace made in inference mode
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layer(xg).square().sum(), xg)
    assert gx.shape == x.shape
    wide = BCOPConv2d(64, 64, 3)
    assert wide(torch.randn(0, 64, 8, 8)).shape == (0, 64, 8, 8)
    fft = BCOPConv2d(4, 4, 3, conv_impl="fft").to(torch.bfloat16)
    with pytest.raises(ValueError, match="conv_impl='fft' needs float32 or float64"):
        fft(torch.randn(1, 4, 6, 6, dtype=torch.bfloat16))
    auto = BCOPConv2d(64, 64, 3).to(torch.bfloat16)
    assert not auto._use_fft(torch.empty(1, 64, 8, 8, dtype=torch.bfloat16))
    assert auto(torch.randn(2, 64, 8, 8, dtype=torch.bfloat16)).shape == (2, 64, 8, 8)
