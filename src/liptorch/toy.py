"""The square-wave toy experiment of the Sandwich paper (sandwich.md §6.2).

Fit y = 1 if x ≤ −1 or 0 < x ≤ 1 else 0 on [−2, 2] with γ-Lipschitz networks of 8 hidden
layers (~120K parameters): a Sandwich MLP (width 86) and an orthogonal Björck/MaxMin MLP
(width 128) scaled by γ.  Reports tightness = empirical Lipschitz lower bound / certified
bound and the largest slope reached at the jumps (the best γ-Lipschitz fit has slope γ).
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from .nn.bounds import lipschitz_bound
from .nn.normalize import Scale
from .nn.simple import MaxMin

__all__ = ["square_wave", "make_toy_model", "run_toy", "slope_lower_bound"]


def square_wave(x: torch.Tensor) -> torch.Tensor:
    return (((x <= -1) | ((x > 0) & (x <= 1))).to(x.dtype))


def make_toy_model(kind: str, gamma: float, depth: int = 8) -> nn.Module:
    if kind == "sandwich":
        from .nn.sandwich import LBDN

        return LBDN(1, [86] * depth, 1, gamma=gamma)
    if kind == "orthogonal":
        from .nn.orthogonal import OrthogonalLinear

        layers: list[nn.Module] = [Scale(gamma), OrthogonalLinear(1, 128), MaxMin()]
        for _ in range(depth - 1):
            layers += [OrthogonalLinear(128, 128), MaxMin()]
        layers.append(OrthogonalLinear(128, 1))
        return nn.Sequential(*layers)
    raise ValueError(f"toy model kind must be 'sandwich' or 'orthogonal', got {kind!r}")


def slope_lower_bound(model: nn.Module, lo: float = -3.0, hi: float = 3.0, points: int = 200001) -> float:
    """max |f(a) − f(b)| / |a − b| over a fine grid of neighbours: a lower bound on Lip(f).

    Evaluated on a float64 copy of the model: at a grid step of 3e-5, float32 rounding
    in the forward pass would dominate the differences and inflate the slopes."""
    import copy

    x = torch.linspace(lo, hi, points, dtype=torch.float64).unsqueeze(1)
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        y = torch.cat([ref(x[i:i + 20000]) for i in range(0, points, 20000)]).reshape(-1)
    return float(((y[1:] - y[:-1]).abs() / (x[1:, 0] - x[:-1, 0])).max())


def run_toy(gammas=(1.0, 5.0, 10.0), kinds=("sandwich", "orthogonal"), epochs: int = 200, seed: int = 0,
            lr: float = 0.01, log=print) -> list[dict]:
    from .empirical import pair_ratio_lower_bound

    gen = torch.Generator().manual_seed(seed)
    x_train = torch.rand(300, 1, generator=gen) * 4 - 2
    y_train = square_wave(x_train)
    x_test = torch.linspace(-2, 2, 200).unsqueeze(1)
    y_test = square_wave(x_test)
    rows = []
    for gamma in gammas:
        for kind in kinds:
            torch.manual_seed(seed)
            model = make_toy_model(kind, gamma)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            steps_per_epoch = math.ceil(300 / 50)
            total = epochs * steps_per_epoch
            t0 = time.perf_counter()
            step = 0
            for epoch in range(epochs):
                perm = torch.randperm(300, generator=gen)
                for i in range(0, 300, 50):
                    p = step / total  # LBDN piecewise-linear schedule
                    f = p / 0.4 if p < 0.4 else (1 - (p - 0.4) / 0.4 * 0.95 if p < 0.8 else 0.05 * (1 - p) / 0.2)
                    for g in opt.param_groups:
                        g["lr"] = lr * max(f, 1e-4)
                    idx = perm[i:i + 50]
                    loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
            model.eval()
            with torch.no_grad():
                test_mse = float(nn.functional.mse_loss(model(x_test), y_test))
            bound = lipschitz_bound(model)
            grid = slope_lower_bound(model)
            ascent = pair_ratio_lower_bound(model, x_test[::10].clone(), steps=200, restarts=5)
            lower = max(grid, ascent)
            if lower > bound:
                raise RuntimeError(f"soundness violation: empirical Lipschitz {lower} exceeds the bound {bound}")
            row = {
                "gamma": gamma, "model": kind, "parameters": sum(p.numel() for p in model.parameters()),
                "test_mse": test_mse, "certified_bound": bound, "empirical_lower_bound": lower,
                "tightness_percent": 100 * lower / bound, "max_slope": grid, "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            log(f"gamma={gamma:g} {kind:<10} params={row['parameters']:,} mse={test_mse:.4f} bound={bound:.4f} "
                f"lower={lower:.4f} tightness={row['tightness_percent']:.1f}% slope={grid:.2f}")
    return rows
