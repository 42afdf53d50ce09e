"""L2 adversarial attacks used to try to falsify certified radii (certification.md §4(4)).

Everything here is model-agnostic: ``model`` is any ``nn.Module`` mapping an ``(N, ...)``
input batch to ``(N, C)`` logits.  The model is run in eval mode (its train/eval flags
are restored afterwards), its parameters' ``.grad`` fields are never touched, and it
must treat the samples of a batch independently (true of every eval-mode network),
because per-sample input gradients are taken from the gradient of a batch sum.

Attacks only ever *find* adversarial points, so a distance they report is an upper
bound on the true distance to the decision boundary; a certified radius is refuted as
soon as one verified adversarial point lies strictly inside it.

* :func:`pgd_l2` – projected gradient ascent on a CW-style margin inside an L2 ball,
  with random starts, normalised-gradient steps, a cosine step-size decay and, when no
  target is given, every other restart aimed at the competitors that are closest to
  the prediction in a first-order (DeepFool-style) sense.
* :func:`min_norm_attack` – walks to the decision boundary with a decoupled
  direction/norm scheme started from the linearised boundary, then bisects along the
  segment from ``x`` to the best adversarial point, per aimed competitor.
* :func:`attack_certificates` – runs both against every point with a positive radius
  and reports the smallest adversarial distance found and the violations.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .empirical import _check_generator, _check_x

__all__ = ["pgd_l2", "min_norm_attack", "attack_certificates", "competitor_ranking"]


# ----------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_labels(name: str, y, n: int, num_classes: int, allow_2d: bool = False) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    ok_shape = (y.dim() == 1 and y.shape[0] == n) or (allow_2d and y.dim() == 2 and y.shape[0] == n)
    if not ok_shape:
        expected = f"({n},)" + (f" or ({n}, K)" if allow_2d else "")
        raise ValueError(f"{name} must have shape {expected}, got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes - 1}], got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    return y.long()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_clamp(clamp, x: torch.Tensor):
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"clamp must be None or a pair (lo, hi), got {clamp!r}")
    try:
        lo, hi = float(clamp[0]), float(clamp[1])
    except (TypeError, ValueError):
        raise ValueError(f"clamp must be None or a pair of numbers (lo, hi), got {clamp!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clamp must be a pair of finite numbers with lo < hi, got {clamp!r}")
    below, above = float(x.min()), float(x.max())
    if below < lo or above > hi:
        raise ValueError(
            f"x must lie inside the clamp box [{lo}, {hi}], got values in [{below}, {above}]; "
            "pass clamp=None for unbounded inputs"
        )
    return lo, hi


def _per_sample(name: str, value, x: torch.Tensor, allow_zero: bool = True) -> torch.Tensor:
    """A non-negative finite scalar or (N,) tensor → an (N,) tensor in x's dtype/device."""
    n = x.shape[0]
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be real-valued, got dtype {value.dtype}")
        if value.dim() == 1 and value.shape[0] == n:
            t = value
        elif value.numel() == 1:
            t = value.reshape(()).expand(n)
        else:
            raise ValueError(f"{name} must be a number or a tensor of shape ({n},), got shape {tuple(value.shape)}")
        t = t.detach().to(dtype=x.dtype, device=x.device)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.full((n,), float(value), dtype=x.dtype, device=x.device)
    else:
        raise ValueError(f"{name} must be a number or a tensor of shape ({n},), got {type(value).__name__}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist() if n <= 8 else 'non-finite entries'}")
    if allow_zero and bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0, got minimum {float(t.min())}")
    if not allow_zero and bool((t <= 0).any()):
        raise ValueError(f"{name} must be > 0, got minimum {float(t.min())}")
    return t.clone()


# ----------------------------------------------------------------------------------------
# small tensor helpers
# ----------------------------------------------------------------------------------------

@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _norms(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).norm(dim=1)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (N,) tensor so that it broadcasts against ``like``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _rand(n: int, like: torch.Tensor, generator) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand((n,), generator=generator, device=device, dtype=like.dtype).to(like.device)


def _unit(d: torch.Tensor) -> torch.Tensor:
    """Per-sample normalisation; samples with a zero (or non-finite) norm become zero."""
    n = _norms(d)
    good = torch.isfinite(n) & (n > 0)
    scale = torch.where(good, 1.0 / torch.where(good, n, torch.ones_like(n)), torch.zeros_like(n))
    return torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0) * _bc(scale, d)


def _box(x_adv: torch.Tensor, box) -> torch.Tensor:
    return x_adv if box is None else x_adv.clamp(box[0], box[1])


def _project_ball(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    n = _norms(delta)
    factor = torch.where(n > eps, eps / n.clamp_min(torch.finfo(delta.dtype).tiny), torch.ones_like(n))
    return delta * _bc(factor, delta)


def _logits(model: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    z = model(x)
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != n:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"model must map an (N, ...) batch to (N, C) logits with N={n}, got output {shape}")
    if z.shape[1] < 2:
        raise ValueError(f"model must output at least 2 classes, got {z.shape[1]}")
    return z


def _margin(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """CW-style margin: max_{j≠y} z_j − z_y, or z_target − z_y.  Positive ⇒ y is not the argmax."""
    zy = z.gather(1, y[:, None])[:, 0]
    if target is not None:
        return z.gather(1, target[:, None])[:, 0] - zy
    others = z.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - zy  # (amax: max(dim) is pathologically slow on busy multi-thread CPUs)


def _changed(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True where the model's prediction (argmax) is not y."""
    return z.argmax(dim=1) != y


def competitor_ranking(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Competitors of ``y`` ordered by their first-order (linearised) distance at ``x``.

    For every class j ≠ y the boundary z_j = z_y is approximated by its tangent plane,
    at distance max(z_y − z_j, 0)/‖∇(z_j − z_y)‖; this distance is exact for a linear
    model.  Returns an (N, C−1) LongTensor, closest competitor first.  Costs one
    backward pass per class.
    """
    _check_model(model)
    _check_x("x", x)
    n = x.shape[0]
    with _eval_mode(model):
        xg = x.detach().clone().requires_grad_(True)
        z = _logits(model, xg, n)
        c = z.shape[1]
        y = _check_labels("y", y, n, c)
        zy = z.gather(1, y[:, None])[:, 0]
        dist = torch.empty((n, c), dtype=torch.float64, device=x.device)
        big = torch.finfo(torch.float64).max
        for j in range(c):
            diff = z[:, j] - zy
            (g,) = torch.autograd.grad(diff.sum(), xg, retain_graph=j < c - 1)
            gn = _norms(g).double()
            gap = (-diff.detach()).clamp_min(0).double()
            d = torch.where(gn > 0, gap / gn.clamp_min(1e-300), torch.full_like(gn, big))
            dist[:, j] = torch.nan_to_num(d, nan=big, posinf=big)
        dist.scatter_(1, y[:, None], float("inf"))
        order = torch.sort(dist, dim=1, stable=True).indices
    return order[:, : c - 1]


# ----------------------------------------------------------------------------------------
# PGD
# ----------------------------------------------------------------------------------------

def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, steps: int = 100, restarts: int = 5,
           step_size=None, target: torch.Tensor | None = None, loss: str = "margin",
           clamp=(0.0, 1.0), generator: torch.Generator | None = None,
           multi_targeted: bool = True) -> torch.Tensor:
    """L2 projected gradient ascent; returns the most adversarial point found per sample.

    Args:
        model: module mapping (N, ...) to (N, C) logits (run in eval mode).
        x: clean inputs (N, ...), inside the ``clamp`` box when one is given.
        y: (N,) labels to move away from (the predicted label when checking certificates).
        eps: ball radius, a float or a per-sample (N,) tensor, ≥ 0.
        steps: gradient steps per restart.
        restarts: number of random starts (uniform in the ball).
        step_size: initial step length (float or (N,) tensor, > 0); default 0.5·eps.
            It decays by a cosine schedule to 2 % of its initial value.
        target: optional (N,) class indices; the objective becomes z_target − z_y.
        loss: ``"margin"`` (CW-style; default) or ``"ce"`` (cross-entropy, ascended away
            from y, or descended towards ``target``).  The returned iterate is always the
            one with the largest margin.
        clamp: ``(lo, hi)`` input box (default [0, 1]) or None for unbounded inputs.
        generator: optional ``torch.Generator`` for the random starts.
        multi_targeted: when ``target`` is None and ``restarts > 1``, odd restarts
            1, 3, 5, … aim at the 1st, 2nd, 3rd, … closest competitor in the linearised
            sense (see :func:`competitor_ranking`; cycling), which escapes the local
            maxima of the max-margin objective; even restarts use the plain untargeted
            margin.  The best iterate is still ranked by the untargeted margin
            max_{j≠y} z_j − z_y.

    Returns:
        ``x_adv`` with ‖x_adv − x‖₂ ≤ eps per sample, inside the box.  Whether it is
        adversarial is for the caller to check (``model(x_adv).argmax(1) != y``).
    """
    _check_model(model)
    _check_x("x", x)
    steps = _check_int("steps", steps, 1)
    restarts = _check_int("restarts", restarts, 1)
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
    if not isinstance(multi_targeted, bool):
        raise ValueError(f"multi_targeted must be a bool, got {multi_targeted!r}")
    _check_generator(generator)
    box = _check_clamp(clamp, x)
    eps_t = _per_sample("eps", eps, x)
    alpha0 = 0.5 * eps_t if step_size is None else _per_sample("step_size", step_size, x, allow_zero=False)
    n = x.shape[0]
    x = x.detach()

    with _eval_mode(model):
        with torch.no_grad():
            z0 = _logits(model, x, n)
        c = z0.shape[1]
        y = _check_labels("y", y, n, c)
        if target is not None:
            target = _check_labels("target", target, n, c)
            if bool((target == y).any()):
                raise ValueError("target must differ from y for every sample, got target == y for some samples")
        aims: list[torch.Tensor | None] = [target]
        if target is None and multi_targeted and restarts > 1 and c > 2:
            order = competitor_ranking(model, x, y)
            # interleave: untargeted random restarts alternate with ranked competitors
            aims = []
            for k in range(c - 1):
                aims += [None, order[:, k]]

        best_x = x.clone()
        best_obj = _margin(z0, y, target).detach()
        for r in range(restarts):
            aim = aims[r % len(aims)] if target is None else target
            u = _unit(_randn_like(x, generator))
            dim = x[0].numel()
            radius = eps_t * _rand(n, x, generator).pow(1.0 / dim)
            x_adv = _box(x + u * _bc(radius, x), box)
            for t in range(steps + 1):
                x_adv = x_adv.detach().requires_grad_(True)
                z = _logits(model, x_adv, n)
                obj = _margin(z, y, target).detach()
                better = obj > best_obj
                if bool(better.any()):
                    best_obj = torch.where(better, obj, best_obj)
                    best_x = torch.where(_bc(better, x), x_adv.detach(), best_x)
                if t == steps:
                    break
                if loss == "margin":
                    objective = _margin(z, y, aim)
                elif aim is None:
                    objective = torch.nn.functional.cross_entropy(z, y, reduction="none")
                else:
                    objective = -torch.nn.functional.cross_entropy(z, aim, reduction="none")
                (g,) = torch.autograd.grad(objective.sum(), x_adv)
                decay = 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t / steps))
                stepped = x_adv.detach() + _unit(g) * _bc(alpha0 * decay, x)
                x_adv = _box(x + _project_ball(stepped - x, eps_t), box)
    return best_x.detach()


# ----------------------------------------------------------------------------------------
# minimum-norm attack
# ----------------------------------------------------------------------------------------

def _bisect(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_hi: torch.Tensor, found: torch.Tensor,
            iters: int) -> torch.Tensor:
    """Shrink each adversarial ``x_hi`` (where ``found``) towards ``x`` along the segment,
    keeping the returned point adversarial (verified at every accepted scale)."""
    n = x.shape[0]
    d = x_hi - x
    lo = torch.zeros(n, dtype=x.dtype, device=x.device)
    hi = torch.ones(n, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            adv = _changed(_logits(model, x + _bc(mid, x) * d, n), y) & found
            hi = torch.where(adv, mid, hi)
            lo = torch.where(adv | ~found, lo, mid)
    return x + _bc(hi, x) * d


def _walk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, aim: torch.Tensor | None, steps: int, box,
          generator, active: torch.Tensor, start_norm: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled direction/norm walk for one aim; returns (best adversarial point, found mask).

    Without ``start_norm`` the walk starts on the linearised boundary of the aimed margin;
    with it, it starts in a random direction at that norm (where finite)."""
    n = x.shape[0]
    dim = x[0].numel()
    width = 1.0 if box is None else box[1] - box[0]
    # Start on the linearised boundary of the aimed margin (exact for linear models).
    xg = x.detach().clone().requires_grad_(True)
    m0 = _margin(_logits(model, xg, n), y, aim)
    (g0,) = torch.autograd.grad(m0.sum(), xg)
    gn = _norms(g0)
    usable = torch.isfinite(gn) & (gn > 0)
    direction = torch.where(_bc(usable, x), _unit(g0), _unit(_randn_like(x, generator)))
    default = torch.full_like(gn, 0.1 * width * math.sqrt(dim))
    first = (-m0.detach()).clamp_min(0) / torch.where(usable, gn, torch.ones_like(gn))
    eps = torch.where(usable, first, default)
    eps = torch.where(eps > 0, eps, torch.full_like(eps, 1e-3 * width))
    if start_norm is not None:
        direction = _unit(_randn_like(x, generator))
        eps = torch.where(torch.isfinite(start_norm) & (start_norm > 0), start_norm, eps)
    delta = direction * _bc(eps, x)

    best_norm = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    best_x = x.clone()
    for k in range(steps):
        x_adv = _box(x + delta, box).detach().requires_grad_(True)
        z = _logits(model, x_adv, n)
        adv = _changed(z, y).detach()
        norm = _norms(x_adv.detach() - x)
        better = adv & active & (norm < best_norm)
        if bool(better.any()):
            best_norm = torch.where(better, norm, best_norm)
            best_x = torch.where(_bc(better, x), x_adv.detach(), best_x)
        (g,) = torch.autograd.grad(_margin(z, y, aim).sum(), x_adv)
        c = 0.5 * (1.0 + math.cos(math.pi * k / steps))
        gamma = 0.001 + 0.05 * c
        alpha = 0.005 + 0.3 * c
        eps = torch.where(adv, eps * (1 - gamma), eps * (1 + gamma))
        # never aim above the best adversarial norm already in hand
        eps = torch.where(torch.isfinite(best_norm) & adv, torch.minimum(eps, best_norm * (1 - gamma)), eps)
        delta = x_adv.detach() - x
        dn = _norms(delta)
        delta = delta + _unit(g) * _bc(alpha * dn.clamp_min(1e-12 * width), x)
        delta = _unit(delta) * _bc(eps, x)
    found = torch.isfinite(best_norm)
    return best_x, found


def min_norm_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200, clamp=(0.0, 1.0),
                    generator: torch.Generator | None = None, targets: torch.Tensor | None = None,
                    candidates: int = 2, binary_steps: int = 30, restarts: int = 3
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest L2 perturbation found that changes the prediction away from ``y``.

    For each aim – the untargeted margin, the ``candidates`` competitors closest in the
    linearised sense, and every column of ``targets`` – a decoupled direction/norm walk
    is started on the linearised boundary, and ``restarts − 1`` further untargeted walks
    start in random directions at the best norm found so far.  In each walk the norm
    budget shrinks by a factor (1 − γ)
    after an adversarial iterate and grows by (1 + γ) otherwise, the direction follows
    the normalised margin gradient, and both γ and the angular step decay.  The best
    adversarial point of each walk is then bisected towards ``x`` along the segment
    (``binary_steps`` halvings), and the smallest verified norm over walks is kept.
    Cost: (1 + candidates + K + restarts − 1)·steps forward/backward passes, plus
    C backward passes for the ranking (C classes, K target columns).

    Args:
        targets: optional (N,) or (N, K) class indices to aim at, e.g. the certificate's
            minimising competitor; must differ from ``y``.
        candidates: number of linearised-closest competitors aimed at (0 disables).
        restarts: 1 + the number of random-direction walks.
        binary_steps: bisection iterations along the final segment.

    Returns:
        ``(x_adv, norms)``: ``norms[i] = ‖x_adv[i] − x[i]‖₂`` for a point verified to be
        classified differently from ``y[i]``; ``inf`` (and ``x_adv[i] = x[i]``) where no
        adversarial point was found.  Samples already not predicted as ``y`` get norm 0.
    """
    _check_model(model)
    _check_x("x", x)
    steps = _check_int("steps", steps, 1)
    candidates = _check_int("candidates", candidates, 0)
    restarts = _check_int("restarts", restarts, 1)
    binary_steps = _check_int("binary_steps", binary_steps, 0)
    _check_generator(generator)
    box = _check_clamp(clamp, x)
    n = x.shape[0]
    x = x.detach()

    with _eval_mode(model):
        with torch.no_grad():
            z0 = _logits(model, x, n)
        c = z0.shape[1]
        y = _check_labels("y", y, n, c)
        aims: list[torch.Tensor | None] = [None]
        if candidates > 0 and c > 2:
            order = competitor_ranking(model, x, y)
            aims += [order[:, k] for k in range(min(candidates, c - 1))]
        if targets is not None:
            targets = _check_labels("targets", targets, n, c, allow_2d=True)
            if targets.dim() == 1:
                targets = targets[:, None]
            if bool((targets == y[:, None]).any()):
                raise ValueError("targets must differ from y for every sample, got targets == y for some samples")
            aims += [targets[:, k] for k in range(targets.shape[1])]

        already = _changed(z0, y)
        active = ~already
        best_norm = torch.where(already, torch.zeros(n, dtype=x.dtype, device=x.device),
                                torch.full((n,), float("inf"), dtype=x.dtype, device=x.device))
        best_x = x.clone()
        if bool(active.any()):
            runs = [(aim, False) for aim in aims] + [(None, True)] * (restarts - 1)
            for aim, random_start in runs:
                start = best_norm if random_start else None
                cand, found = _walk(model, x, y, aim, steps, box, generator, active, start)
                if binary_steps:
                    cand = _bisect(model, x, y, cand, found, binary_steps)
                with torch.no_grad():
                    ok = found & _changed(_logits(model, cand, n), y)
                norm = torch.where(ok, _norms(cand - x), torch.full_like(best_norm, float("inf")))
                better = ok & (norm < best_norm)
                best_norm = torch.where(better, norm, best_norm)
                best_x = torch.where(_bc(better, x), cand, best_x)
    return best_x.detach(), best_norm.detach()


# ----------------------------------------------------------------------------------------
# certificate falsification
# ----------------------------------------------------------------------------------------

def attack_certificates(model: nn.Module, x: torch.Tensor, radius, pred: torch.Tensor | None = None,
                        eps_scale: float = 0.999, steps: int = 100, restarts: int = 5,
                        targets: torch.Tensor | None = None, min_norm_steps: int = 200,
                        clamp=(0.0, 1.0), generator: torch.Generator | None = None,
                        rtol: float = 0.0) -> dict:
    """Try to refute certified radii (certification.md §4(4)).

    For every point with ``radius > 0``: PGD-L2 at ``eps_scale·radius`` (untargeted, so
    restart 0 aims at the runner-up and the others at the linearised-closest
    competitors), one targeted PGD run per column of ``targets`` (e.g. the certificate's
    minimising class), and :func:`min_norm_attack` aimed at the same targets.  Every
    adversarial point is re-verified (prediction ≠ ``pred``) before it counts.

    Args:
        radius: (N,) certified radii (≥ 0, finite), or a single number.
        pred: (N,) labels the radii were certified for; default ``model(x).argmax(1)``.
        eps_scale: PGD radius as a fraction of the certified radius, in (0, 1].
        steps, restarts: PGD budget per run.
        targets: optional (N,) or (N, K) competitor indices to aim at as well.
        min_norm_steps: steps of the minimum-norm walk per aim.
        rtol: a point is a violation when its distance is < radius·(1 − rtol).  The
            default 0 is the strict rule; a tiny positive value absorbs the rounding of
            a radius that is exactly tight in exact arithmetic.

    Returns a dict of per-point tensors (N,) – ``pred``, ``radius``, ``attacked`` (radius
    > 0), ``pgd_success``, ``pgd_distance`` and ``min_norm_distance`` (inf where nothing
    was found), ``distance`` (smallest of the two; NaN where not attacked), ``ratio``
    (distance / radius; NaN where not attacked), ``violations`` (bool), ``x_adv`` (the
    closest adversarial point, x where none) – and the ints ``n_attacked`` and
    ``n_violations``.
    """
    _check_model(model)
    _check_x("x", x)
    if isinstance(eps_scale, bool) or not isinstance(eps_scale, (int, float)) or not 0 < eps_scale <= 1:
        raise ValueError(f"eps_scale must be a number in (0, 1], got {eps_scale!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
    steps = _check_int("steps", steps, 1)
    restarts = _check_int("restarts", restarts, 1)
    min_norm_steps = _check_int("min_norm_steps", min_norm_steps, 1)
    _check_generator(generator)
    box = _check_clamp(clamp, x)
    r = _per_sample("radius", radius, x)
    n = x.shape[0]
    x = x.detach()

    with _eval_mode(model):
        with torch.no_grad():
            z0 = _logits(model, x, n)
        c = z0.shape[1]
        pred = z0.argmax(dim=1) if pred is None else _check_labels("pred", pred, n, c)
        if targets is not None:
            targets = _check_labels("targets", targets, n, c, allow_2d=True)
            if targets.dim() == 1:
                targets = targets[:, None]

    inf = float("inf")
    pgd_dist = torch.full((n,), inf, dtype=x.dtype, device=x.device)
    mn_dist = torch.full((n,), inf, dtype=x.dtype, device=x.device)
    best_x = x.clone()
    attacked = r > 0
    idx = attacked.nonzero().flatten()
    if idx.numel():
        xs, ys, rs = x[idx], pred[idx], r[idx]
        runs: list[torch.Tensor | None] = [None]
        ts = None
        if targets is not None:
            ts = targets[idx]
            # a target equal to the label has nothing to aim at; replace it by the runner-up
            runner = z0[idx].scatter(1, ys[:, None], float("-inf")).argmax(dim=1)
            ts = torch.where(ts == ys[:, None], runner[:, None], ts)
            runs += [ts[:, k] for k in range(ts.shape[1])]
        cand_pgd = xs.clone()
        dist_pgd = torch.full((idx.numel(),), inf, dtype=x.dtype, device=x.device)
        for aim in runs:
            xa = pgd_l2(model, xs, ys, eps_scale * rs, steps=steps, restarts=restarts, target=aim,
                        clamp=box, generator=generator)
            with _eval_mode(model), torch.no_grad():
                ok = _changed(_logits(model, xa, idx.numel()), ys)
            d = torch.where(ok, _norms(xa - xs), torch.full_like(dist_pgd, inf))
            better = d < dist_pgd
            dist_pgd = torch.where(better, d, dist_pgd)
            cand_pgd = torch.where(_bc(better, xs), xa, cand_pgd)
        xm, dm = min_norm_attack(model, xs, ys, steps=min_norm_steps, clamp=box, generator=generator,
                                 targets=ts)
        with _eval_mode(model), torch.no_grad():
            okm = _changed(_logits(model, xm, idx.numel()), ys)
        dm = torch.where(okm, dm, torch.full_like(dm, inf))
        pgd_dist[idx] = dist_pgd
        mn_dist[idx] = dm
        use_m = dm < dist_pgd
        best_x[idx] = torch.where(_bc(use_m, xs), xm, cand_pgd)

    nan = torch.full((n,), float("nan"), dtype=x.dtype, device=x.device)
    distance = torch.where(attacked, torch.minimum(pgd_dist, mn_dist), nan)
    ratio = torch.where(attacked, distance / torch.where(attacked, r, torch.ones_like(r)), nan)
    violations = attacked & (distance < r * (1 - rtol))
    pgd_success = attacked & torch.isfinite(pgd_dist)
    return {
        "pred": pred,
        "radius": r,
        "attacked": attacked,
        "pgd_success": pgd_success,
        "pgd_distance": pgd_dist,
        "min_norm_distance": mn_dist,
        "distance": distance,
        "ratio": ratio,
        "violations": violations,
        "x_adv": best_x,
        "n_attacked": int(attacked.sum()),
        "n_violations": int(violations.sum()),
    }
