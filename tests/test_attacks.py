"""Attacks (liptorch.attacks) and empirical Lipschitz lower bounds (liptorch.empirical).

Linear classifiers z = W x + b give closed-form ground truth: the minimal adversarial
L2 distance of x (unbounded inputs) is min_{j≠y} (z_y − z_j)/‖w_y − w_j‖, and the
Lipschitz constant is σ_max(W).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from liptorch.attacks import attack_certificates, competitor_ranking, min_norm_attack, pgd_l2
from liptorch.empirical import (
    jacobian_norm_lower_bound,
    layer_lower_bound,
    lower_bound,
    pair_ratio_lower_bound,
)


@pytest.fixture(autouse=True)
def _single_thread():
    # These tensors are tiny; intra-op threading only adds contention on shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_case(seed: int = 0, n: int = 24, d: int = 16, c: int = 5):
    g = _gen(seed)
    lin = nn.Linear(d, c).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z = lin(x)
    y = z.argmax(1)
    w = lin.weight.detach()
    pair_norm = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)          # (n, c)
    dist = (z.gather(1, y[:, None]) - z) / pair_norm
    dist[torch.arange(n), y] = math.inf
    exact, closest = dist.min(dim=1)
    runner_up = z.scatter(1, y[:, None], -math.inf).argmax(1)
    return lin, x, y, exact, closest, runner_up


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _mlp(seed: int, d: int = 10, h: int = 32, c: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))


# --------------------------------------------------------------------------------------
# attacks on linear classifiers (exact ground truth)
# --------------------------------------------------------------------------------------

def test_linear_case_is_nontrivial():
    # The closest boundary is not always the runner-up's, so a pure runner-up attack
    # would fail on this fixture; the attacks below must handle it.
    _, _, _, _, closest, runner_up = _linear_case()
    assert bool((closest != runner_up).any())


def test_competitor_ranking_is_exact_on_linear_model():
    lin, x, y, _, closest, _ = _linear_case()
    order = competitor_ranking(lin, x, y)
    assert order.shape == (x.shape[0], 4)
    assert torch.equal(order[:, 0], closest)
    assert not bool((order == y[:, None]).any())


def test_min_norm_matches_exact_distance_on_linear_model():
    lin, x, y, exact, _, _ = _linear_case()
    x_adv, norms = min_norm_attack(lin, x, y, steps=100, clamp=None, generator=_gen(1))
    assert torch.isfinite(norms).all()
    # never below the true minimum (up to fp64 rounding), within 1 % above it
    assert bool((norms >= exact * (1 - 1e-9)).all()), (norms / exact).min()
    assert bool((norms <= exact * 1.01).all()), (norms / exact).max()
    with torch.no_grad():
        assert bool((lin(x_adv).argmax(1) != y).all())
    assert torch.allclose((x_adv - x).norm(dim=1), norms, rtol=1e-12, atol=0)


def test_pgd_succeeds_just_outside_and_fails_just_inside_exact_distance():
    lin, x, y, exact, _, _ = _linear_case()
    x_out = pgd_l2(lin, x, y, 1.01 * exact, steps=40, restarts=5, clamp=None, generator=_gen(2))
    x_in = pgd_l2(lin, x, y, 0.99 * exact, steps=40, restarts=5, clamp=None, generator=_gen(3))
    with torch.no_grad():
        assert bool((lin(x_out).argmax(1) != y).all())
        assert not bool((lin(x_in).argmax(1) != y).any())
    assert bool(((x_out - x).norm(dim=1) <= 1.01 * exact * (1 + 1e-12)).all())
    assert bool(((x_in - x).norm(dim=1) <= 0.99 * exact * (1 + 1e-12)).all())


def test_pgd_targeted_and_ce_loss():
    lin, x, y, exact, closest, _ = _linear_case()
    # Aimed at the minimising class, one restart is enough on a linear model.
    xa = pgd_l2(lin, x, y, 1.01 * exact, steps=40, restarts=1, target=closest, clamp=None, generator=_gen(4))
    with torch.no_grad():
        z = lin(xa)
    assert bool((z.gather(1, closest[:, None])[:, 0] > z.gather(1, y[:, None])[:, 0]).all())
    xc = pgd_l2(lin, x, y, 0.99 * exact, steps=20, restarts=2, loss="ce", clamp=None, generator=_gen(5))
    with torch.no_grad():
        assert not bool((lin(xc).argmax(1) != y).any())


def test_pgd_respects_box_and_zero_radius():
    torch.manual_seed(0)
    model = _mlp(0)
    x = torch.rand(16, 10, generator=_gen(6))
    y = model(x).argmax(1)
    eps = torch.full((16,), 2.0)
    eps[:4] = 0.0
    xa = pgd_l2(model, x, y, eps, steps=10, restarts=2, generator=_gen(7))
    assert bool((xa >= 0).all()) and bool((xa <= 1).all())
    assert bool(((xa - x).norm(dim=1) <= eps * (1 + 1e-6)).all())
    assert torch.equal(xa[:4], x[:4])


# --------------------------------------------------------------------------------------
# attacks on a small unconstrained MLP
# --------------------------------------------------------------------------------------

def _fit_random_labels(model: nn.Module, x: torch.Tensor, classes: int, g: torch.Generator,
                       steps: int = 20, lr: float = 0.1) -> None:
    """A few SGD steps on random labels, so that decision boundaries cross the data."""
    yt = torch.randint(0, classes, (x.shape[0],), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), yt).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def test_pgd_finds_adversarials_beyond_min_norm_distance_on_mlp():
    model = _mlp(1)
    g = _gen(8)
    x = torch.rand(24, 10, generator=g)
    _fit_random_labels(model, x, 4, g)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_mn, d_mn = min_norm_attack(model, x, y, steps=100, clamp=None, generator=_gen(9))
    assert torch.isfinite(d_mn).all()
    with torch.no_grad():
        assert bool((model(x_mn).argmax(1) != y).all())
    x_adv = pgd_l2(model, x, y, 1.2 * d_mn, steps=50, restarts=5, clamp=None, generator=_gen(10))
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) != y).all())
    # attacks leave the model's mode and parameter gradients alone
    assert all(p.grad is None for p in model.parameters())


def test_attacks_use_eval_mode_and_restore_flags():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    x = torch.rand(8, 6, generator=_gen(11))
    with torch.no_grad():
        model.eval()
        y = model(x).argmax(1)
        model.train()
    _, norms = min_norm_attack(model, x, y, steps=30, generator=_gen(12))
    assert model.training and model[1].training
    # with dropout active the walk would be random; in eval mode the result is reproducible
    _, norms2 = min_norm_attack(model, x, y, steps=30, generator=_gen(12))
    assert torch.equal(norms, norms2)


# --------------------------------------------------------------------------------------
# attack_certificates
# --------------------------------------------------------------------------------------

def test_attack_certificates_flags_wrong_radius_not_true_one():
    lin, x, y, exact, closest, _ = _linear_case(n=12)
    kw = dict(steps=30, restarts=3, min_norm_steps=60, clamp=None, targets=closest)
    true = attack_certificates(lin, x, exact, generator=_gen(13), rtol=1e-9, **kw)
    assert true["n_attacked"] == 12 and true["n_violations"] == 0
    assert bool((true["distance"] >= exact * (1 - 1e-9)).all())
    assert bool((true["ratio"] <= 1.01).all())  # the attack comes close to the true radius

    wrong = attack_certificates(lin, x, 3 * exact, generator=_gen(14), **kw)
    assert wrong["n_violations"] == 12 and bool(wrong["violations"].all())
    assert bool(wrong["pgd_success"].all())
    assert bool((wrong["ratio"] < 0.34).all())
    with torch.no_grad():
        assert bool((lin(wrong["x_adv"]).argmax(1) != y).all())


def test_attack_certificates_respects_sound_radii_of_mlp_in_box():
    # r = margin / (√2 · Π‖W_l‖) is a sound certificate (§2.1); attacks inside the
    # [0, 1] box must never beat it, while a 10× inflated radius is refuted somewhere.
    model = _mlp(5, d=8, h=16, c=3).double()
    x = torch.rand(10, 8, generator=_gen(16), dtype=torch.float64)
    _fit_random_labels(model, x, 3, _gen(19), steps=50, lr=0.5)
    lip = 1.0
    for m in model:
        if isinstance(m, nn.Linear):
            lip *= float(torch.linalg.matrix_norm(m.weight.detach(), 2))
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    radius = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * lip)
    out = attack_certificates(model, x, radius, steps=30, restarts=3, min_norm_steps=60, generator=_gen(17))
    assert out["n_violations"] == 0
    assert bool((out["ratio"] >= 1).all())
    assert bool((out["x_adv"] >= 0).all()) and bool((out["x_adv"] <= 1).all())
    inflated = attack_certificates(model, x, 10 * radius, steps=30, restarts=3, min_norm_steps=60,
                                   generator=_gen(18))
    assert inflated["n_violations"] > 0


def test_attack_certificates_skips_zero_radius():
    lin, x, y, exact, _, _ = _linear_case(n=6)
    radius = 0.5 * exact
    radius[:2] = 0.0
    out = attack_certificates(lin, x, radius, steps=10, restarts=2, min_norm_steps=30, clamp=None,
                              generator=_gen(15))
    assert out["attacked"].tolist() == [False, False, True, True, True, True]
    assert torch.isnan(out["ratio"][:2]).all() and not out["violations"][:2].any()
    assert out["n_violations"] == 0
    assert torch.equal(out["pred"], y)


# --------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------

def test_attack_input_validation():
    lin, x, y, exact, _, _ = _linear_case(n=4)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        pgd_l2(lin, x, y, -1.0, clamp=None)
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        pgd_l2(lin, x, y[:3], 1.0, clamp=None)
    with pytest.raises(ValueError, match="inside the clamp box"):
        pgd_l2(lin, x, y, 1.0)  # Gaussian inputs are outside the default [0, 1] box
    with pytest.raises(ValueError, match="loss must be"):
        pgd_l2(lin, x, y, 1.0, clamp=None, loss="hinge")
    with pytest.raises(ValueError, match="target must differ"):
        pgd_l2(lin, x, y, 1.0, clamp=None, target=y)
    with pytest.raises(ValueError, match="steps must be an integer"):
        min_norm_attack(lin, x, y, steps=0, clamp=None)
    with pytest.raises(ValueError, match="class indices"):
        min_norm_attack(lin, x, y, clamp=None, targets=torch.full((4,), 7))
    with pytest.raises(ValueError, match="eps_scale"):
        attack_certificates(lin, x, exact, eps_scale=1.5, clamp=None)
    with pytest.raises(ValueError, match="radius must be finite"):
        attack_certificates(lin, x, torch.full((4,), math.inf), clamp=None)
    with pytest.raises(ValueError, match="model must map"):
        pgd_l2(nn.Flatten(0), x, y, 1.0, clamp=None)


# --------------------------------------------------------------------------------------
# empirical lower bounds
# --------------------------------------------------------------------------------------

def test_jacobian_lower_bound_of_linear_map_is_sigma_max():
    g = _gen(20)
    w = torch.randn(7, 12, generator=g, dtype=torch.float64)
    lin = nn.Linear(12, 7).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(8, 12, generator=g, dtype=torch.float64)
    sigma = float(torch.linalg.svdvals(w)[0])
    est = jacobian_norm_lower_bound(lin, x, iters=50, generator=g)
    assert abs(est - sigma) <= 1e-4 * sigma
    assert est <= sigma * (1 + 1e-12)


def _orthogonal_net(relu: bool, d: int = 12, depth: int = 3, seed: int = 21) -> nn.Module:
    g = _gen(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(d, d).double()
        with torch.no_grad():
            lin.weight.copy_(_orthogonal(d, g))
            lin.bias.copy_(0.3 * torch.randn(d, generator=g, dtype=torch.float64))
        layers.append(lin)
        if relu and i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def test_pair_ratio_bounded_by_one_for_orthogonal_relu_net():
    net = _orthogonal_net(relu=True)
    x = torch.rand(16, 12, generator=_gen(22), dtype=torch.float64)
    lb = pair_ratio_lower_bound(net, x, steps=100, restarts=4, generator=_gen(23))
    assert 0.5 < lb <= 1 + 1e-6
    assert jacobian_norm_lower_bound(net, x, iters=20) <= 1 + 1e-6


def test_pair_ratio_reaches_one_on_orthogonal_linear_net_and_scales():
    net = _orthogonal_net(relu=False)
    x = torch.rand(8, 12, generator=_gen(24), dtype=torch.float64)
    lb = pair_ratio_lower_bound(net, x, steps=30, restarts=2, generator=_gen(25))
    assert 0.99 <= lb <= 1 + 1e-6
    # the bound is not capped at 1: scaling the map scales it
    scaled = nn.Sequential(net, nn.Linear(12, 12, bias=False).double())
    with torch.no_grad():
        scaled[1].weight.copy_(2.5 * torch.eye(12, dtype=torch.float64))
    lb2 = pair_ratio_lower_bound(scaled, x, steps=30, restarts=2, generator=_gen(25))
    assert 2.5 * 0.99 <= lb2 <= 2.5 * (1 + 1e-6)


def test_lower_bound_of_relu_mlp_below_product_of_norms():
    model = _mlp(3, d=10, h=24, c=5).double()
    x = torch.rand(16, 10, generator=_gen(26), dtype=torch.float64)
    prod = 1.0
    for m in model:
        if isinstance(m, nn.Linear):
            prod *= float(torch.linalg.matrix_norm(m.weight.detach(), 2))
    jac = jacobian_norm_lower_bound(model, x, iters=30)
    both = lower_bound(model, x, iters=30, steps=100, restarts=2, generator=_gen(27))
    assert 0 < jac <= both <= prod * (1 + 1e-9)
    with pytest.raises(ValueError, match="unexpected keyword"):
        lower_bound(model, x, itres=3)


def test_layer_lower_bound_of_conv_matches_exact_operator_norm():
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    ex = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    # exact operator norm from the impulse response (bias removed by differencing)
    eye = torch.eye(2 * 25, dtype=torch.float64).reshape(50, 2, 5, 5)
    with torch.no_grad():
        jac = (conv(eye) - conv(torch.zeros_like(eye[:1]))).reshape(50, -1)
    exact = float(torch.linalg.svdvals(jac)[0])
    est = layer_lower_bound(conv, ex, iters=100, generator=_gen(28))
    assert 0.98 * exact <= est <= exact * (1 + 1e-12)


def test_empirical_input_validation():
    lin = nn.Linear(3, 2)
    x = torch.rand(4, 3)
    with pytest.raises(ValueError, match="iters must be an integer >= 1"):
        jacobian_norm_lower_bound(lin, x, iters=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        pair_ratio_lower_bound(lin, x, lr=-1.0)
    with pytest.raises(ValueError, match="floating-point"):
        pair_ratio_lower_bound(lin, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        layer_lower_bound(lambda t: t, x)
