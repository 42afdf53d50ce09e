"""Householder activations (HH1, HH2), LipPool (ManifoldPool) and PairMaxPool.

Every check is in float64 unless it is about float32 behaviour.  Boundary-sensitive
checks skip the (measure-zero) points within 1e-6 of a piece boundary.
"""
from __future__ import annotations

import math

import pytest
import torch

from liptorch.nn.householder import HouseholderActivation
from liptorch.nn.pooling import ManifoldPool, PairMaxPool
from liptorch.nn.simple import MaxMin

TWO_PI = 2 * math.pi


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hh(channels, order, seed, low=0.0, high=TWO_PI):
    torch.manual_seed(seed)
    mod = HouseholderActivation(channels, order=order).double()
    with torch.no_grad():
        mod.theta.uniform_(low, high)
    return mod


def _ray_distance(p: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """ℓ2 distance from points p (..., 2) to the rays {t(cos α, sin α): t ≥ 0}."""
    u = torch.stack([angle.cos(), angle.sin()], dim=-1)
    along = (p * u).sum(-1)
    across = (p[..., 0] * u[..., 1] - p[..., 1] * u[..., 0]).abs()
    return torch.where(along >= 0, across, p.norm(dim=-1))


def _hh_boundary_angles(mod: HouseholderActivation) -> torch.Tensor:
    """(pairs, k) polar angles of the rays where the map changes piece."""
    if mod.order == 1:
        t = mod.theta.detach()
        # The line vᵀz = 0 with v = (sin θ/2, −cos θ/2) is spanned by (cos θ/2, sin θ/2).
        return torch.stack([t / 2, t / 2 + math.pi], dim=1)
    t0, t1, t2 = mod.theta.detach().clamp(0, TWO_PI)
    return torch.stack([t0 / 2, t0 / 2 + t1 / 2, t0 / 2 + (t1 + t2) / 2, t0 / 2 + math.pi + t2 / 2], dim=1)


def _near_boundary(x: torch.Tensor, angles: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """x (N, C): True for samples with some pair within tol of a boundary ray."""
    a, b = x.chunk(2, dim=1)
    p = torch.stack([a, b], dim=-1)  # (N, pairs, 2)
    dist = _ray_distance(p[:, :, None, :], angles[None])  # (N, pairs, k)
    return (dist < tol).flatten(1).any(dim=1)


def _jacobians(mod, x: torch.Tensor) -> torch.Tensor:
    single = lambda v: mod(v.unsqueeze(0)).squeeze(0)  # noqa: E731
    return torch.func.vmap(torch.func.jacrev(single))(x)


# --------------------------------------------------------------------------- HH1 / HH2
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hh1_at_init_is_maxmin_with_halves_swapped(dtype):
    mod = HouseholderActivation(8).to(dtype)
    assert torch.allclose(mod.theta, torch.full((4,), math.pi / 2, dtype=dtype))
    torch.manual_seed(0)
    for x in (torch.randn(64, 8, dtype=dtype), torch.randn(4, 8, 5, 5, dtype=dtype)):
        mm = MaxMin()(x)
        expected = torch.cat([mm[:, 4:], mm[:, :4]], dim=1)  # (min, max)
        out = mod(x)
        assert torch.allclose(out, expected, atol=1e-6, rtol=0)
        a, b = x.chunk(2, dim=1)
        assert torch.allclose(out[:, :4], torch.minimum(a, b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [1, 2])
def test_hh_jacobian_is_orthogonal(order):
    """Every singular value of the autograd Jacobian is 1 (GNP and exactly 1-Lipschitz)."""
    mod = _hh(8, order, seed=order)
    torch.manual_seed(10 + order)
    x = torch.randn(300, 8, dtype=torch.float64) * 2
    keep = ~_near_boundary(x, _hh_boundary_angles(mod))
    assert keep.sum() > 250
    jac = _jacobians(mod, x[keep])
    sv = torch.linalg.svdvals(jac)
    assert (sv - 1).abs().max() < 1e-6
    # Gradient-norm preservation for a random cotangent.
    g = torch.randn(jac.shape[0], 8, dtype=torch.float64)
    back = torch.einsum("ni,nij->nj", g, jac)
    assert torch.allclose(back.norm(dim=1), g.norm(dim=1), rtol=1e-9)


@pytest.mark.parametrize("order", [1, 2])
def test_hh_far_pairs_ratio_at_most_one(order):
    mod = _hh(6, order, seed=20 + order)
    torch.manual_seed(5)
    x, y = torch.randn(2000, 6, dtype=torch.float64) * 3, torch.randn(2000, 6, dtype=torch.float64) * 3
    with torch.no_grad():
        ratio = (mod(x) - mod(y)).norm(dim=1) / (x - y).norm(dim=1)
        assert ratio.max() <= 1 + 1e-12
        # Norm preservation around the origin (each piece is orthogonal and fixes 0).
        assert torch.allclose(mod(x).norm(dim=1), x.norm(dim=1), rtol=1e-12)
    assert mod.lipschitz_bound() == 1.0


@pytest.mark.parametrize("order", [1, 2])
def test_hh_continuous_across_every_boundary(order):
    """Just either side of each boundary ray the outputs differ only by O(ε·r)."""
    eps = 1e-7
    for seed in range(5):
        mod = _hh(6, order, seed=100 * order + seed)
        angles = _hh_boundary_angles(mod)  # (3, k)
        torch.manual_seed(seed)
        r = torch.rand(3, angles.shape[1], dtype=torch.float64) * 4 + 0.5
        outs = []
        for sign in (-1, 1):
            ang = angles + sign * eps
            a, b = r * ang.cos(), r * ang.sin()
            # Sample k: pair i gets the k-th boundary point of pair i.
            x = torch.cat([a.T, b.T], dim=1)
            with torch.no_grad():
                outs.append(mod(x))
        jump = (outs[0] - outs[1]).view(-1, 2, 3).norm(dim=1)  # (k, pairs)
        assert (jump <= 2 * eps * r.T * 1.001 + 1e-13).all(), jump.max()


def test_hh2_matches_polar_reference():
    """HH2 against an independent polar-coordinate implementation of the §B4 table."""
    mod = _hh(10, 2, seed=7, low=-1.0, high=7.5)  # some angles outside [0, 2π] get clamped
    t0, t1, t2 = mod.theta.detach().clamp(0, TWO_PI)
    torch.manual_seed(3)
    x = torch.randn(500, 10, dtype=torch.float64) * 2
    a, b = x.chunk(2, dim=1)
    r, psi = torch.hypot(a, b), torch.atan2(b, a)
    phi = torch.remainder(psi - t0 / 2, TWO_PI)
    new_psi = torch.empty_like(psi)
    s1 = phi < t1 / 2
    s2 = ~s1 & (phi < (t1 + t2) / 2)
    s3 = ~s1 & ~s2 & (phi < math.pi + t2 / 2)
    s4 = ~(s1 | s2 | s3)
    alpha1 = (t0 + t1).expand_as(psi)
    alpha0 = t0.expand_as(psi)
    new_psi[s1] = psi[s1]
    new_psi[s2] = alpha1[s2] - psi[s2]
    new_psi[s3] = (psi - t2)[s3]
    new_psi[s4] = alpha0[s4] - psi[s4]
    expected = torch.cat([r * new_psi.cos(), r * new_psi.sin()], dim=1)
    with torch.no_grad():
        out = mod(x)
    assert s2.any() and s3.any() and s4.any() and s1.any()
    assert torch.allclose(out, expected, atol=1e-12)


def test_hh2_clamps_angles_and_is_spatially_pointwise():
    torch.manual_seed(0)
    mod = HouseholderActivation(4, order=2).double()
    assert ((mod.theta >= 0) & (mod.theta < math.pi)).all() and mod.theta.shape == (3, 2)
    clamped = HouseholderActivation(4, order=2).double()
    with torch.no_grad():
        mod.theta.copy_(torch.tensor([[-1.0, 3.0], [7.0, 1.0], [2.0, 9.0]]))
        clamped.theta.copy_(mod.theta.clamp(0, TWO_PI))
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        out = mod(x)
        assert torch.equal(out, clamped(x))
        flat = x.permute(0, 2, 3, 1).reshape(-1, 4)
        per_pixel = mod(flat).reshape(3, 5, 6, 4).permute(0, 3, 1, 2)
    assert torch.allclose(out, per_pixel, atol=1e-14)


def test_hh1_reflects_only_on_positive_side():
    mod = _hh(2, 1, seed=4)
    t = float(mod.theta.detach())
    v = torch.tensor([math.sin(t / 2), -math.cos(t / 2)], dtype=torch.float64)
    h_mat = torch.eye(2, dtype=torch.float64) - 2 * torch.outer(v, v)
    torch.manual_seed(1)
    z = torch.randn(200, 2, dtype=torch.float64)
    with torch.no_grad():
        out = mod(z)
    side = z @ v > 0
    assert torch.allclose(out[~side], z[~side], atol=1e-15)
    assert torch.allclose(out[side], z[side] @ h_mat.T, atol=1e-12)


def test_hh_training_interface():
    for order in (1, 2):
        mod = HouseholderActivation(6, order=order)
        assert mod.no_weight_decay is True
        assert [n for n, _ in mod.named_parameters()] == ["theta"]
        x = torch.randn(5, 6, 3, 3)
        mod(x).square().sum().backward()
        assert mod.theta.grad is not None and mod.theta.grad.abs().sum() > 0
        clone = HouseholderActivation(6, order=order)
        clone.load_state_dict(mod.state_dict())
        assert torch.equal(clone(x), mod(x))
        assert mod.double()(x.double()).dtype == torch.float64


def test_hh_validation():
    with pytest.raises(ValueError, match="even"):
        HouseholderActivation(5)
    with pytest.raises(ValueError, match="order"):
        HouseholderActivation(4, order=3)
    with pytest.raises(ValueError, match="channels"):
        HouseholderActivation(True)
    mod = HouseholderActivation(4)
    with pytest.raises(ValueError, match="4 channels"):
        mod(torch.randn(2, 6))
    with pytest.raises(ValueError, match="floating"):
        mod(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        mod(torch.randn(4))


# --------------------------------------------------------------------------- LipPool
def _pool(channels, seed, init=None):
    torch.manual_seed(seed)
    return ManifoldPool(channels, init=init).double()


def _brute_signed_distance(p: torch.Tensor, theta: float, t_max: float = 8.0, samples: int = 40001) -> torch.Tensor:
    """Signed distance of p (N, 2) to the two rays at ±θ/2, by dense sampling of the rays."""
    t = torch.linspace(0, t_max, samples, dtype=torch.float64)
    pts = []
    for sgn in (1, -1):
        pts.append(torch.stack([t * math.cos(theta / 2), sgn * t * math.sin(theta / 2)], dim=1))
    ray = torch.cat(pts)
    dist = torch.cdist(p, ray).min(dim=1).values
    inside = torch.atan2(p[:, 1], p[:, 0]).abs() <= theta / 2
    return torch.where(inside, -dist, dist)


def test_manifold_pool_matches_bruteforce_distance():
    thetas = [0.0, 0.3, 1.2, math.pi / 2, 2.5, math.pi]
    mod = ManifoldPool(2 * len(thetas)).double()
    with torch.no_grad():
        mod.theta.copy_(torch.tensor(thetas))
    torch.manual_seed(2)
    x = torch.randn(300, 2 * len(thetas), dtype=torch.float64) * 1.5
    with torch.no_grad():
        out = mod(x)
    assert out.shape == (300, len(thetas))
    a, b = x.chunk(2, dim=1)
    for i, th in enumerate(thetas):
        ref = _brute_signed_distance(torch.stack([a[:, i], b[:, i]], dim=1), th)
        assert (out[:, i] - ref).abs().max() < 2e-4, (th, (out[:, i] - ref).abs().max())
        # Both signs occur (except for θ = 0, whose cone has no interior).
        if th > 0:
            assert (out[:, i] < 0).any() and (out[:, i] > 0).any()


def test_manifold_pool_special_angles():
    x = torch.randn(50, 4, 3, 3, dtype=torch.float64)
    a, b = x.chunk(2, dim=1)
    with torch.no_grad():
        assert torch.allclose(_pool(4, 0, init=math.pi)(x), -a, atol=1e-15)
        ray = torch.where(a >= 0, b.abs(), torch.hypot(a, b))
        assert torch.allclose(_pool(4, 0, init=0.0)(x), ray, atol=1e-15)
    mod = _pool(4, 0)
    with torch.no_grad():
        mod.theta.copy_(torch.tensor([-0.5, 4.0]))  # clamped to 0 and π
        out = mod(x)
    assert torch.allclose(out[:, 0], ray[:, 0], atol=1e-15)
    assert torch.allclose(out[:, 1], -a[:, 1], atol=1e-15)


def test_manifold_pool_is_one_lipschitz():
    mod = _pool(8, 3)
    torch.manual_seed(4)
    x = torch.randn(300, 8, dtype=torch.float64) * 2
    jac = _jacobians(mod, x)  # (N, 4, 8)
    sv = torch.linalg.svdvals(jac)
    assert sv.max() <= 1 + 1e-12
    # Each output depends on its own pair through a unit gradient: a co-isometry.
    assert (sv - 1).abs().max() < 1e-9
    y = torch.randn(300, 8, dtype=torch.float64) * 2
    with torch.no_grad():
        ratio = (mod(x) - mod(y)).norm(dim=1) / (x - y).norm(dim=1)
    assert ratio.max() <= 1 + 1e-12
    assert mod.lipschitz_bound() == 1.0


def test_manifold_pool_continuous_at_region_boundaries():
    eps = 1e-7
    for seed in range(5):
        mod = _pool(6, 10 + seed)
        th = mod.theta.detach()
        # Region changes: upper/apex at (θ+π)/2, apex/lower at (3π−θ)/2, lower/upper at 0.
        angles = torch.stack([(th + math.pi) / 2, (3 * math.pi - th) / 2, torch.zeros_like(th)], dim=1)
        r = torch.rand(3, 3, dtype=torch.float64) * 3 + 0.1
        outs = []
        for sign in (-1, 1):
            ang = angles + sign * eps
            x = torch.cat([(r * ang.cos()).T, (r * ang.sin()).T], dim=1)
            with torch.no_grad():
                outs.append(mod(x))
        jump = (outs[0] - outs[1]).abs()  # (k, pairs)
        assert (jump <= 2 * eps * r.T * 1.001 + 1e-13).all(), jump.max()


def test_manifold_pool_gradients_finite_at_origin_and_interface():
    mod = ManifoldPool(4)
    assert mod.no_weight_decay is True and [n for n, _ in mod.named_parameters()] == ["theta"]
    x = torch.zeros(3, 4)
    x[1, 0], x[1, 2] = -0.0, -0.0
    x[2] = torch.tensor([-1.0, 2.0, 0.5, -3.0])
    x.requires_grad_(True)
    mod(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(mod.theta.grad).all()
    clone = ManifoldPool(4)
    clone.load_state_dict(mod.state_dict())
    assert torch.equal(clone(x), mod(x))
    with pytest.raises(ValueError, match=r"\[0, π\]"):
        ManifoldPool(4, init=4.0)
    with pytest.raises(ValueError, match="even"):
        ManifoldPool(3)
    with pytest.raises(ValueError, match="4 channels"):
        mod(torch.randn(2, 8))


def test_pair_max_pool():
    mod = PairMaxPool(6)
    torch.manual_seed(0)
    x = torch.randn(10, 6, 4, 4, dtype=torch.float64)
    out = mod(x)
    assert out.shape == (10, 3, 4, 4)
    assert torch.equal(out, torch.maximum(x[:, :3], x[:, 3:]))
    y = torch.randn(10, 6, 4, 4, dtype=torch.float64)
    ratio = (mod(x) - mod(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max() <= 1 + 1e-12 and mod.lipschitz_bound() == 1.0
    with pytest.raises(ValueError, match="even"):
        PairMaxPool(7)
    with pytest.raises(ValueError, match="6 channels"):
        mod(torch.randn(2, 4))
