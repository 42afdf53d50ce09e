"""Parameter-free 1-Lipschitz modules and the composition of bounds."""
import pytest
import torch
from torch import nn

import liptorch
from liptorch.nn import ChannelPad, FirstChannels, GroupSort, InvertibleDownsample, MaxMin, Normalize, Scale
from liptorch.nn.bounds import module_bound, trace_input_sizes
from liptorch.nn.spatial import SpatialPad


def jacobian_at(f, x):
    return torch.autograd.functional.jacobian(lambda v: f(v.reshape(x.shape)).reshape(-1), x.reshape(-1))


@pytest.mark.parametrize(
    "module,shape,kind",
    [
        (MaxMin(), (1, 4, 3, 3), "orthogonal"),
        (GroupSort(3), (1, 6, 2, 2), "orthogonal"),
        (InvertibleDownsample(2), (1, 2, 4, 4), "orthogonal"),
        (ChannelPad(5), (1, 3, 2, 2), "isometry"),
        (FirstChannels(2), (1, 4, 2, 2), "coisometry"),
        (SpatialPad(6), (1, 2, 3, 3), "isometry"),
    ],
)
def test_parameter_free_modules_have_exact_jacobians(module, shape, kind):
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(*shape, dtype=torch.float64)
        j = jacobian_at(module, x)
        s = torch.linalg.svdvals(j)
        assert s.max() <= module.lipschitz_bound() + 1e-12
        if kind in ("orthogonal", "isometry"):
            assert (s - 1).abs().max() < 1e-12 and j.shape[0] >= j.shape[1]
        else:
            assert torch.allclose(j @ j.T, torch.eye(j.shape[0], dtype=torch.float64))


def test_maxmin_groupsort_agree_up_to_permutation():
    x = torch.randn(5, 4)
    a = MaxMin()(x)
    b = GroupSort(2)(torch.stack([x[:, :2], x[:, 2:]], dim=2).reshape(5, 4))
    assert torch.allclose(a.sort(dim=1).values, b.sort(dim=1).values)


@pytest.mark.parametrize(
    "make,bad",
    [
        (lambda: MaxMin(), torch.randn(2, 3)),
        (lambda: GroupSort(4), torch.randn(2, 6)),
        (lambda: InvertibleDownsample(2), torch.randn(1, 2, 5, 4)),
        (lambda: InvertibleDownsample(2), torch.randn(2, 4)),
        (lambda: ChannelPad(2), torch.randn(1, 3, 2, 2)),
        (lambda: FirstChannels(4), torch.randn(1, 3)),
        (lambda: SpatialPad(4), torch.randn(1, 1, 5, 5)),
    ],
)
def test_bad_inputs_raise(make, bad):
    with pytest.raises(ValueError):
        make()(bad)


@pytest.mark.parametrize("make", [lambda: GroupSort(0), lambda: InvertibleDownsample(0), lambda: ChannelPad(-1),
                                  lambda: FirstChannels(1.5), lambda: Scale(0), lambda: Normalize([0.0], [0.0])])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_composition_of_plain_modules_is_sound():
    torch.manual_seed(1)
    model = nn.Sequential(
        Normalize([0.5, 0.5], [0.5, 0.25]),
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        MaxMin(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).double()
    bound = liptorch.lipschitz_bound(model, input_shape=(2, 4, 4))
    for _ in range(3):
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
        j = jacobian_at(model, x)
        assert torch.linalg.matrix_norm(j, ord=2) <= bound
    sizes = trace_input_sizes(model, (2, 4, 4))
    assert sizes[model[3]] == (4, 4) and sizes[model[7]] is None


def test_zero_padded_conv_bound_dominates_exact_norm():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    n = 4
    eye = torch.eye(2 * n * n, dtype=torch.float64).reshape(-1, 2, n, n)
    jac = conv(eye).reshape(2 * n * n, -1)
    exact = torch.linalg.matrix_norm(jac, ord=2).item()
    assert module_bound(conv, {conv: (n, n)}) >= exact


def test_unknown_module_raises_clear_error():
    with pytest.raises(ValueError, match="cannot bound"):
        liptorch.lipschitz_bound(nn.Sequential(nn.GELU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="input size"):
        module_bound(nn.Conv2d(1, 1, 3, padding=1))


@pytest.mark.parametrize("shape,channels_last", [((3, 6), False), ((2, 8, 3, 5), False), ((2, 8, 3, 5), True)])
def test_maxmin_custom_backward_matches_autograd_and_keeps_gradient_norm_at_ties(shape, channels_last):
    """MaxMin's hand-written backward equals autograd through maximum/minimum away from
    ties, keeps ‖Jᵀg‖ = ‖g‖ at ties (autograd's half split would shrink it), keeps the
    input's memory layout in the output, and supports double backward."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = MaxMin()(x)
    a, b = x.chunk(2, dim=1)
    ref = torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)
    assert torch.equal(y, ref)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx, gr)
    assert torch.autograd.gradcheck(MaxMin(), (x.detach().clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(MaxMin(), (x.detach().clone().requires_grad_(),))
    # all pairs tied: the gradient is permuted, not halved
    tied = torch.cat([a.detach(), a.detach()], dim=1).requires_grad_()
    (gt,) = torch.autograd.grad(MaxMin()(tied), tied, g)
    assert torch.allclose(gt.norm(), g.norm(), rtol=1e-12)
    h = g.shape[1] // 2
    assert torch.equal(gt, g) or torch.equal(gt, torch.cat([g[:, h:], g[:, :h]], dim=1))
    # no-grad path gives the same values
    with torch.no_grad():
        assert torch.equal(MaxMin()(x), ref)
