"""Empirical *lower* bounds on the ℓ2 Lipschitz constant (diagnostics, never certificates).

Every value returned here is attained by the model: a Jacobian norm ‖J v‖ for a unit
vector v at an actual input, or a ratio ‖f(a) − f(b)‖/‖a − b‖ for an actual pair.  So it
can only under-estimate the true constant, and the certified (upper) bound must never
be below it (certification.md §4(3); sandwich.md §6.1).  Tightness = lower ÷ upper.

* :func:`jacobian_norm_lower_bound` – power iteration on JᵀJ at each input point, using
  forward-mode JVPs and reverse-mode VJPs (``torch.func``; autograd double-backward as a
  fallback for modules without forward-mode support).
* :func:`pair_ratio_lower_bound` – Adam ascent of the pair ratio over (a, δ), from data
  and from noise (uniform + 0.3·Gaussian, as in the LBDN paper), no projection; the best
  pairs are re-evaluated in float64 so that cancellation in ``f(a + δ) − f(a)`` for a
  tiny δ can never inflate the reported ratio.
* :func:`lower_bound` – the larger of the two.
* :func:`layer_lower_bound` – Jacobian power iteration for one layer around example inputs.

The model is evaluated in eval mode (flags restored afterwards), per sample: it must
treat the samples of a batch independently.  Parameter ``.grad`` fields are untouched.
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["jacobian_norm_lower_bound", "pair_ratio_lower_bound", "lower_bound", "layer_lower_bound"]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_x(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, ...), got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...) with N >= 1 and at least 2 dimensions, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must contain only finite values, got NaN or inf entries")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _randn(shape, like: torch.Tensor, generator) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand(shape, like: torch.Tensor, generator) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device)


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _normalise(v: torch.Tensor) -> torch.Tensor:
    n = _norms(v)
    good = torch.isfinite(n) & (n > 0)
    return torch.nan_to_num(v) * _bc(torch.where(good, 1.0 / torch.where(good, n, torch.ones_like(n)),
                                                 torch.zeros_like(n)), v)


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must map an (N, ...) batch to an (N, ...) tensor with N={x.shape[0]}, got {shape}")
    return out


class _Linearisation:
    """J v and Jᵀ u of ``model`` at fixed inputs ``x``, per sample."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model = model
        self.x = x.detach()
        self.mode = "func"
        try:
            with torch.no_grad():
                _output(model, self.x)  # warm any eval-mode operator cache outside the transforms
            out, self._vjp = torch.func.vjp(lambda inp: _output(model, inp), self.x)
            torch.func.jvp(lambda inp: _output(model, inp), (self.x,), (torch.zeros_like(self.x),))
            self.out_shape = out.shape
        except (RuntimeError, NotImplementedError, TypeError):
            # No forward-mode AD somewhere: J v = ∂/∂u ⟨Jᵀu, v⟩ by double backward.
            self.mode = "autograd"
            with torch.enable_grad():
                xg = self.x.clone().requires_grad_(True)
                out = _output(model, xg)
                self.out_shape = out.shape
                self._u = torch.zeros_like(out, requires_grad=True)
                (self._jt_u,) = torch.autograd.grad(out, xg, self._u, create_graph=True)
                self._xg, self._out = xg, out
            try:
                self.jvp(torch.zeros_like(self.x))
            except RuntimeError:
                # No double backward either (custom autograd Functions): J v by central
                # differences.  Only the search direction uses it; the reported value is
                # an exact ‖Jᵀu‖ (see _power_iteration), so the result stays a lower bound.
                self.mode = "fd"

    def _fd_jvp(self, v: torch.Tensor) -> torch.Tensor:
        h = 1e-4 if self.x.dtype == torch.float64 else 1e-2
        with torch.no_grad():
            return (_output(self.model, self.x + h * v) - _output(self.model, self.x - h * v)) / (2 * h)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "fd":
            return self._fd_jvp(v)
        if self.mode == "func":
            return torch.func.jvp(lambda inp: _output(self.model, inp), (self.x,), (v,))[1].detach()
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(self._jt_u, self._u, v, retain_graph=True)
        return jv.detach()

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        if self.mode == "func":
            return self._vjp(u)[0].detach()
        with torch.enable_grad():
            (jt,) = torch.autograd.grad(self._out, self._xg, u, retain_graph=True)
        return jt.detach()


def _power_iteration(model: nn.Module, x: torch.Tensor, iters: int, generator) -> torch.Tensor:
    """Per-sample lower bounds ‖J(x_i) v_i‖ with unit v_i after ``iters`` power steps."""
    lin = _Linearisation(model, x)
    v = _normalise(_randn(x.shape, x, generator))
    for _ in range(iters):
        w = lin.vjp(lin.jvp(v))
        w_unit = _normalise(w)
        # keep the previous vector where Jᵀ J v vanished (J = 0 there)
        v = torch.where(_bc(_norms(w) > 0, v), w_unit, v)
    if lin.mode == "fd":
        # ‖Jᵀu‖ ≤ σ_max for unit u: exact through the VJP, whatever the search did.
        u = _normalise(lin.jvp(v))
        return _norms(lin.vjp(u))
    return _norms(lin.jvp(v))


def _as_float64(model: nn.Module) -> nn.Module | None:
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.dtype == torch.float64 for t in tensors if t.is_floating_point()):
        return model
    try:
        return copy.deepcopy(model).double()
    except Exception as err:  # noqa: BLE001 – any failure just means no fp64 re-evaluation
        warnings.warn(f"could not make a float64 copy of the model ({err}); pair ratios are "
                      "evaluated in the model's own precision", RuntimeWarning, stacklevel=3)
        return None


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------

def jacobian_norm_lower_bound(model: nn.Module, x: torch.Tensor, iters: int = 50,
                              generator: torch.Generator | None = None) -> float:
    """Largest Jacobian spectral norm found at the points ``x`` (a lower bound on Lip).

    Power iteration on J(x_i)ᵀJ(x_i) for every sample at once (JVP then VJP per step),
    started from a random vector; returns max_i ‖J(x_i) v_i‖ for the final unit v_i,
    which never exceeds σ_max(J(x_i)).  Computed in x's dtype (pass float64 inputs and a
    float64 model for tight comparisons).
    """
    _check_model(model)
    _check_x("x", x)
    iters = _check_int("iters", iters, 1)
    _check_generator(generator)
    with _eval_mode(model), torch.enable_grad():
        sig = _power_iteration(model, x, iters, generator)
    sig = sig[torch.isfinite(sig)]
    return float(sig.max()) if sig.numel() else 0.0


def pair_ratio_lower_bound(model: nn.Module, x: torch.Tensor, steps: int = 300, restarts: int = 10,
                           lr: float = 0.01, generator: torch.Generator | None = None,
                           delta_scale: float = 0.1) -> float:
    """max ‖f(a) − f(b)‖₂/‖a − b‖₂ found by Adam ascent over pairs (a, b = a + δ).

    Restarts alternate between starting ``a`` at the data ``x`` and at noise shaped like
    ``x`` (uniform [0, 1) + 0.3·standard Gaussian); δ starts as ``delta_scale``·Gaussian.
    Adam (no projection) maximises the sum of the per-pair ratios with a cosine
    learning-rate decay from ``lr`` to 0 over ``steps``.  The best pair of every sample
    and restart is re-evaluated in float64 (on a float64 copy of the model) and the
    largest re-evaluated ratio is returned.
    """
    _check_model(model)
    _check_x("x", x)
    steps = _check_int("steps", steps, 1)
    restarts = _check_int("restarts", restarts, 1)
    lr = _check_positive("lr", lr)
    delta_scale = _check_positive("delta_scale", delta_scale)
    _check_generator(generator)
    x = x.detach()
    n = x.shape[0]
    pairs_a: list[torch.Tensor] = []
    pairs_d: list[torch.Tensor] = []
    with _eval_mode(model), torch.enable_grad():
        for r in range(restarts):
            if r % 2 == 0:
                a0 = x.clone()
            else:
                a0 = _rand(x.shape, x, generator) + 0.3 * _randn(x.shape, x, generator)
            a = a0.requires_grad_(True)
            d = (delta_scale * _randn(x.shape, x, generator)).requires_grad_(True)
            opt = torch.optim.Adam([a, d], lr=lr)
            best = torch.full((n,), -1.0, dtype=x.dtype, device=x.device)
            best_a, best_d = a.detach().clone(), d.detach().clone()
            for t in range(steps + 1):
                fa = _output(model, a).flatten(1)
                fb = _output(model, a + d).flatten(1)
                ratio = (fb - fa).norm(dim=1) / _norms(d)
                val = torch.nan_to_num(ratio.detach(), nan=-1.0, posinf=-1.0)
                better = val > best
                if bool(better.any()):
                    best = torch.where(better, val, best)
                    best_a = torch.where(_bc(better, x), a.detach(), best_a)
                    best_d = torch.where(_bc(better, x), d.detach(), best_d)
                if t == steps:
                    break
                ga, gd = torch.autograd.grad(-torch.nan_to_num(ratio, nan=0.0).sum(), [a, d])
                a.grad, d.grad = ga, gd
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * t / steps))
                opt.step()
            pairs_a.append(best_a)
            pairs_d.append(best_d)
        a_all = torch.cat(pairs_a)
        d_all = torch.cat(pairs_d)

        ref = _as_float64(model)
        with torch.no_grad():
            if ref is not None:
                a64, b64 = a_all.double(), a_all.double() + d_all.double()
                with _eval_mode(ref):
                    num = (_output(ref, b64).flatten(1) - _output(ref, a64).flatten(1)).norm(dim=1)
                den = _norms(b64 - a64)
            else:
                b = a_all + d_all
                num = (_output(model, b).flatten(1) - _output(model, a_all).flatten(1)).norm(dim=1)
                den = _norms(b - a_all)
    ok = den > 0
    ratios = num[ok] / den[ok]
    ratios = ratios[torch.isfinite(ratios)]
    return float(ratios.max()) if ratios.numel() else 0.0


def lower_bound(model: nn.Module, x: torch.Tensor, **kw) -> float:
    """max(jacobian_norm_lower_bound, pair_ratio_lower_bound).

    Keyword arguments: ``iters`` goes to the Jacobian power iteration; ``steps``,
    ``restarts``, ``lr`` and ``delta_scale`` to the pair ascent; ``generator`` to both.
    """
    jac_keys = {"iters"}
    pair_keys = {"steps", "restarts", "lr", "delta_scale"}
    unknown = set(kw) - jac_keys - pair_keys - {"generator"}
    if unknown:
        raise ValueError(f"lower_bound got unexpected keyword arguments {sorted(unknown)}; expected a subset "
                         f"of {sorted(jac_keys | pair_keys | {'generator'})}")
    gen = kw.get("generator")
    jac = jacobian_norm_lower_bound(model, x, generator=gen, **{k: kw[k] for k in jac_keys if k in kw})
    pair = pair_ratio_lower_bound(model, x, generator=gen, **{k: kw[k] for k in pair_keys if k in kw})
    return max(jac, pair)


def layer_lower_bound(module: nn.Module, input_example: torch.Tensor, iters: int = 50, points: int = 4,
                      noise: float = 0.1, generator: torch.Generator | None = None) -> float:
    """Jacobian-norm lower bound of a single layer around example inputs.

    Evaluates the Jacobian power iteration at ``input_example`` (N, ...) and at
    ``points − 1`` perturbed copies ``input_example + noise·s·ξ`` (ξ standard Gaussian, s
    the standard deviation of the example, or 1 if it is constant), all with the same
    shape, so size-fixed layers see their own input size.  For a linear layer this is
    the power-iteration estimate of its operator norm.
    """
    _check_model(module)
    _check_x("input_example", input_example)
    iters = _check_int("iters", iters, 1)
    points = _check_int("points", points, 1)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    _check_generator(generator)
    ex = input_example.detach()
    s = float(ex.std()) if ex.numel() > 1 else 0.0
    s = s if s > 0 and math.isfinite(s) else 1.0
    batch = [ex] + [ex + noise * s * _randn(ex.shape, ex, generator) for _ in range(points - 1)]
    return jacobian_norm_lower_bound(module, torch.cat(batch), iters=iters, generator=generator)
