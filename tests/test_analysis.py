"""Sound analysis: upper bounds dominate exact Jacobian norms; lower ≤ upper; a model
whose operator is tampered with behind the bound's back is caught."""
import pytest
import torch
from torch import nn

import liptorch
from liptorch.empirical import jacobian_norm_lower_bound, lower_bound
from liptorch.lipschitz import upper_bound
from liptorch.nn import BCOPConv2d, LBDN, MaxMin, OrthogonalLinear, SandwichConv2d, SOCConv2d


def small_models():
    torch.manual_seed(0)
    return {
        "bcop": (nn.Sequential(BCOPConv2d(2, 4, 3), MaxMin(), BCOPConv2d(4, 4, 2, stride=2), nn.Flatten(),
                               OrthogonalLinear(16, 3)), (2, 4, 4)),
        "soc": (nn.Sequential(SOCConv2d(2, 4, 3), MaxMin(), SOCConv2d(4, 4, 3, stride=2), nn.Flatten(),
                              OrthogonalLinear(16, 3)), (2, 4, 4)),
        "soc-circular": (nn.Sequential(SOCConv2d(2, 4, 3, padding_mode="circular"), MaxMin(),
                                       SOCConv2d(4, 4, 3, stride=2, padding_mode="circular"), nn.Flatten(),
                                       OrthogonalLinear(16, 3)), (2, 4, 4)),
        "sandwich": (nn.Sequential(SandwichConv2d(2, 4, 3, 4), SandwichConv2d(4, 4, 3, 4, stride=2), nn.Flatten(),
                                   OrthogonalLinear(16, 3)), (2, 4, 4)),
        "lbdn": (nn.Sequential(nn.Flatten(), LBDN(32, [16, 16], 3, gamma=2.0)), (2, 4, 4)),
    }


def _train_a_bit(model, shape):
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(3):
        x = torch.randn(8, *shape, dtype=torch.float64)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", ["bcop", "soc", "soc-circular", "sandwich", "lbdn"])
def test_upper_bound_dominates_exact_jacobians_and_lower_bounds(name):
    model, shape = small_models()[name]
    model = _train_a_bit(model.double(), shape)
    up = upper_bound(model, input_shape=shape)
    for _ in range(3):
        x = torch.randn(1, *shape, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, *shape)).reshape(-1), x.reshape(-1))
        assert torch.linalg.matrix_norm(jac, ord=2).item() <= up * (1 + 1e-9)
    x = torch.rand(4, *shape, dtype=torch.float64)
    lo = lower_bound(model, x, steps=25, restarts=1)
    assert 0 < lo <= up


def test_tampered_operator_is_detected():
    torch.manual_seed(1)
    model = nn.Sequential(OrthogonalLinear(12, 12), MaxMin(), OrthogonalLinear(12, 12), MaxMin(),
                          OrthogonalLinear(12, 5)).double().eval()
    honest = upper_bound(model)
    x = torch.randn(16, 12, dtype=torch.float64)
    assert lower_bound(model, x, steps=80, restarts=2) <= honest
    # Scale the middle layer's explicit operator by 1.1 behind its bound's back.
    layer = model[2]
    original_apply = layer.apply_operator
    layer.apply_operator = lambda inp, op: original_apply(inp, op * 1.1)
    assert upper_bound(model) == honest  # the bound did not notice …
    caught = jacobian_norm_lower_bound(model, x, iters=50)
    assert caught > honest * 1.05  # … the bracket does: lower > upper flags the model as unsound


def test_certificates_of_tampered_model_are_refuted_by_attack():
    from liptorch.attacks import attack_certificates

    torch.manual_seed(2)
    w = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0][:4]
    model = nn.Sequential(nn.Linear(6, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(w)
    x = torch.rand(30, 6, dtype=torch.float64)
    pred, radius = liptorch.certified_radius(model, x, tau=0.0)
    assert attack_certificates(model, x, radius, pred=pred, steps=40, restarts=2, clamp=None)["n_violations"] == 0
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    # Certify with the stale (too small) bound L = 1: the attack must refute some radii.
    pred, radius = liptorch.certified_radius(model, x, tau=0.0, lipschitz=1.0 / 1.1 / 1.1)
    res = attack_certificates(model, x, radius, pred=pred, steps=60, restarts=2, clamp=None)
    assert res["n_violations"] > 0


def test_certificates_of_a_circular_soc_model_survive_a_strong_attack():
    """Radii from the circular SOC layers' bounds (the exact norm of their frequency
    matrices) are not broken by PGD + min-norm attacks, which do break 3× larger radii."""
    from liptorch.attacks import attack_certificates

    torch.manual_seed(5)
    model, shape = small_models()["soc-circular"]
    model = _train_a_bit(model.double(), shape)
    x = torch.rand(24, *shape, dtype=torch.float64)
    pred, radius = liptorch.certified_radius(model, x)
    assert (radius > 0).sum() >= 12
    res = attack_certificates(model, x, radius, pred=pred, steps=40, restarts=2, min_norm_steps=60, clamp=None,
                              generator=torch.Generator().manual_seed(6))
    assert res["n_violations"] == 0
    res = attack_certificates(model, x, 3 * radius, pred=pred, steps=40, restarts=2, min_norm_steps=60, clamp=None,
                              generator=torch.Generator().manual_seed(7))
    assert res["n_violations"] > 0


@pytest.mark.parametrize("name", ["bcop", "soc", "soc-circular", "sandwich", "lbdn"])
def test_caches_built_under_inference_mode_serve_attacks(name):
    """A model first evaluated under torch.inference_mode (cached operators built there)
    can afterwards be attacked: an eval forward that records a graph and backpropagates
    to the input works and gives the same outputs."""
    model, shape = small_models()[name]
    model = _train_a_bit(model.double(), shape)
    x = torch.rand(3, *shape, dtype=torch.float64)
    with torch.inference_mode():
        y_inf = model(x)
    xg = x.clone().requires_grad_()
    y = model(xg)
    (gx,) = torch.autograd.grad(y.sum(), xg)
    assert torch.equal(y.detach(), y_inf) and torch.isfinite(gx).all()
