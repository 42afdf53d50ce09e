"""Certification rules, rounding slack, eps parsing, losses and schedules."""
import math

import pytest
import torch
from torch import nn

import liptorch
from liptorch.certify import logit_rounding_slack, parse_eps
from liptorch.losses import certificate_regularizer, global_certificate, hinge_loss, offset_cross_entropy
from liptorch.train import lr_factor, SCHEDULES


def linear_model(c=5, d=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, c))


def exact_linear_distance(w, b, x):
    """Exact minimal ℓ2 distance to a change of the argmax for a linear classifier."""
    z = x @ w.T + b
    pred = z.argmax(1)
    out = []
    for i in range(x.shape[0]):
        y = pred[i]
        dists = [(z[i, y] - z[i, j]) / (w[y] - w[j]).norm() for j in range(w.shape[0]) if j != y]
        out.append(min(dists))
    return pred, torch.stack(out)


def test_global_radius_is_sound_on_linear_model():
    model = linear_model().double()
    x = torch.randn(50, 6, dtype=torch.float64)
    pred, radius = liptorch.certified_radius(model, x)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    pred_exact, dist = exact_linear_distance(w, b, x)
    assert torch.equal(pred, pred_exact)
    assert (radius <= dist + 1e-12).all()
    # The global rule: (top-1 − top-2 − τ) / (√2·σ_max), σ_max from an exact SVD.
    sigma = torch.linalg.matrix_norm(w, ord=2)
    z = model(x).detach().topk(2, dim=1).values
    _, r0 = liptorch.certified_radius(model, x, tau=0.0)
    assert torch.allclose(r0, (z[:, 0] - z[:, 1]) / (math.sqrt(2) * sigma), rtol=1e-12)
    assert radius.max() > 0


def test_two_class_orthogonal_head_radius_is_exact():
    # Rows e1, e2 are orthonormal: ‖w_1 − w_2‖ = √2 = √2·σ_max, so the radius is exact.
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    x = torch.tensor([[0.9, 0.1, 3.0]], dtype=torch.float64)
    pred, radius = liptorch.certified_radius(model, x, tau=0.0)
    assert pred.item() == 0
    assert radius.item() == pytest.approx(0.8 / math.sqrt(2), rel=1e-12)
    # The point at that distance along (w_2 − w_1)/√2 is on the boundary.
    x_adv = x + radius.item() * torch.tensor([[-1.0, 1.0, 0]], dtype=torch.float64) / math.sqrt(2) * 1.000001
    assert model(x_adv).argmax(1).item() == 1


def test_ties_and_strict_inequality():
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 1.0], [1.0 + math.sqrt(2) * 0.5, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    pred, radius = liptorch.certified_radius(model, x, tau=0.0)
    assert radius[0] == 0  # a tie is never certified
    res = liptorch.certified_accuracy(model, x, y, [0.5, 0.25], tau=0.0)
    # radius of the second point is exactly 0.5: not > 0.5.
    assert radius[1].item() == pytest.approx(0.5)
    assert res["certified_accuracy"]["0.5"] == 0.0
    assert res["certified_accuracy"]["0.25"] == 0.5


def test_rounding_slack_is_positive_in_fp32_and_tiny():
    model = linear_model(d=30)
    x = torch.randn(64, 30)
    tau = logit_rounding_slack(model, x)
    assert 0 < tau < 1e-3
    _, r_default = liptorch.certified_radius(model, x)
    _, r_zero = liptorch.certified_radius(model, x, tau=0.0)
    assert (r_default <= r_zero).all()


def test_exact_mode_and_precision_refusal():
    model = linear_model()
    x = torch.randn(8, 6)
    p1, r1 = liptorch.certified_radius(model, x, exact=True)
    p2, r2 = liptorch.certified_radius(model, x)
    assert torch.equal(p1, p2) and torch.allclose(r1, r2, atol=1e-4)
    with pytest.raises(ValueError, match="float32 or float64"):
        liptorch.certified_radius(linear_model().half(), x.half())
    with pytest.raises(ValueError, match="batch"):
        liptorch.certified_radius(model, torch.randn(6))


def test_parse_eps():
    assert parse_eps("36/255,0.5") == [36 / 255, 0.5]
    assert parse_eps(1.58) == [1.58]
    with pytest.raises(ValueError):
        parse_eps("abc")
    with pytest.raises(ValueError):
        parse_eps("-1")
    with pytest.raises(ValueError):
        parse_eps("")


def test_losses():
    torch.manual_seed(0)
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    m = 0.7
    manual = torch.stack([
        sum(torch.clamp(m - z[i, y[i]] + z[i, j], min=0) for j in range(4) if j != y[i]) / 4 for i in range(6)
    ]).mean()
    assert torch.allclose(hinge_loss(z, y, m), manual)
    oce = offset_cross_entropy(z, y, offset=1.0, temperature=0.5)
    shifted = z - torch.nn.functional.one_hot(y, 4)
    assert torch.allclose(oce, torch.nn.functional.cross_entropy(shifted / 0.5, y) * 0.5)
    cert = global_certificate(z, y, lipschitz=2.0)
    top = z.detach().clone()
    assert cert[0].item() == pytest.approx(((top[0, 0] - top[0, 1:].max()) / (math.sqrt(2) * 2)).item())
    reg = certificate_regularizer(cert, 0.5)
    reg.backward()
    assert z.grad is not None
    with pytest.raises(ValueError):
        hinge_loss(z, y, -1.0)
    with pytest.raises(ValueError):
        offset_cross_entropy(z, y, 1.0, temperature=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_are_bounded(schedule):
    vals = [lr_factor(schedule, p / 100) for p in range(101)]
    assert all(0 <= v <= 1.0 + 1e-12 for v in vals)
    if schedule not in ("constant",):
        assert vals[-1] < vals[len(vals) // 3]
