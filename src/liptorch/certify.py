"""Sound certified radii (certification.md §2–3).

``certified_radius(model, x)`` returns, for each input, the predicted label and a radius
r such that no perturbation of ℓ2 norm < r changes the prediction:

* zoo classifiers whose head carries its own certificate (LLN, MLP head): the head's
  pairwise rule over ALL competitors with L_h = the feature map's guaranteed bound;
* any other model: the global rule r = (margin − τ) / (√2 · L), L = a guaranteed
  Lipschitz bound of the whole logit map.

τ is the logit rounding slack of certification.md §3.3: 2 × (largest |F_fp32 − F_fp64|
on a calibration batch) × 10.  ``exact=True`` instead evaluates the model in float64
(rigorous up to fp64 rounding; for small models).  TF32 and reduced precision are
refused during certification.
"""
from __future__ import annotations

import contextlib
import copy
import math
from fractions import Fraction
from typing import Iterable, Sequence

import torch
from torch import nn

from .nn.bounds import lipschitz_bound
from .ops.linalg import round_up

__all__ = [
    "certified_radius",
    "certified_accuracy",
    "logit_rounding_slack",
    "parse_eps",
    "STANDARD_EPS",
]

SQRT2 = math.sqrt(2.0)
STANDARD_EPS = ("36/255", "72/255", "108/255", "0.5", "1.0", "1.58")


def parse_eps(spec: str | float | Iterable) -> list[float]:
    """Parse radii such as ``"0.1,36/255,1.58"`` (fractions are evaluated exactly, then
    rounded to the nearest float64)."""
    if isinstance(spec, (int, float)):
        items: Sequence = [spec]
    elif isinstance(spec, str):
        items = [s for s in spec.replace(" ", "").split(",") if s]
    else:
        items = list(spec)
    out = []
    for item in items:
        try:
            val = float(Fraction(str(item))) if not isinstance(item, float) else item
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot parse radius {item!r}: use numbers or fractions like 36/255") from None
        if not (val >= 0 and math.isfinite(val)):
            raise ValueError(f"radii must be finite and >= 0, got {item!r}")
        out.append(val)
    if not out:
        raise ValueError("no radius given")
    return out


@contextlib.contextmanager
def _strict_precision():
    """Disable TF32 for matmuls and cuDNN convolutions for the duration."""
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
        torch.backends.cudnn.allow_tf32 = old_cudnn


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


def _check_precision(model: nn.Module) -> None:
    dtype = _model_dtype(model)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"certification needs float32 or float64 weights, the model is {dtype}")
    if torch.is_autocast_enabled():
        raise ValueError("certification refuses to run under autocast (fp16/bf16 logits are not certifiable)")


def _features_and_logits(model: nn.Module, x: torch.Tensor):
    if hasattr(model, "features") and hasattr(model, "head") and hasattr(model, "feature_bound"):
        h = model.features(x)
        return h, model.head(h)
    return None, model(x)


def logit_rounding_slack(model: nn.Module, x: torch.Tensor, safety: float = 10.0) -> float:
    """τ = 2 × max |F_model(x) − F_fp64(x)| × ``safety`` on the calibration batch ``x``.

    The float64 reference is a deep copy of the model in float64 (its operators are
    rebuilt from the same parameters in float64).  A float64 model gets a slack from
    the float64 unit round-off instead.  A practical safeguard, not a proof
    (certification.md §3.3); ``certified_radius(..., exact=True)`` is the rigorous mode.
    """
    model_dtype = _model_dtype(model)
    with torch.no_grad(), _strict_precision():
        z = model(x.to(model_dtype)).double()
        if model_dtype == torch.float64:
            return 2.0 * safety * 64 * torch.finfo(torch.float64).eps * (1.0 + float(z.abs().max()))
        ref = copy.deepcopy(model).double().eval()
        z64 = ref(x.double())
    return 2.0 * float((z - z64).abs().max()) * safety


def _global_radius(logits: torch.Tensor, lip: float, tau: float):
    z = logits.double()
    top2 = z.topk(2, dim=1)
    pred = top2.indices[:, 0]
    margin = top2.values[:, 0] - top2.values[:, 1] - tau
    radius = (margin / (SQRT2 * lip)).clamp_min(0.0)
    return pred, radius


def certified_radius(
    model: nn.Module,
    x: torch.Tensor,
    tau: float | None = None,
    exact: bool = False,
    batch_size: int = 512,
    calibration: torch.Tensor | None = None,
    lipschitz: float | None = None,
):
    """Per-sample sound certified radius around the predicted label.

    Returns ``(pred, radius)`` (int64 and float64 tensors on CPU).  ``tau`` overrides the
    logit rounding slack (default: calibrated on the first 64 inputs, or on
    ``calibration``); ``exact=True`` evaluates a float64 copy of the model.
    ``lipschitz`` overrides the bound of the global rule (for testing only — must be
    a guaranteed bound).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"certified_radius expects a batch tensor (N, ...), got {getattr(x, 'shape', x)}")
    _check_precision(model)
    was_training = model.training
    model.eval()
    try:
        if exact:
            work = copy.deepcopy(model).double().eval()
        else:
            work = model
        dtype = _model_dtype(work)
        device = next(iter(work.parameters())).device if any(True for _ in work.parameters()) else x.device
        if tau is None:
            calib = calibration if calibration is not None else x[:64]
            tau = logit_rounding_slack(work, calib.to(device))
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        has_head_cert = hasattr(work, "head") and hasattr(work.head, "certified_radius") and hasattr(work, "feature_bound")
        if has_head_cert:
            lip_f = work.feature_bound()
        else:
            input_shape = getattr(work, "input_shape", tuple(x.shape[1:]))
            lip = lipschitz if lipschitz is not None else (
                work.lipschitz_bound() if hasattr(work, "feature_bound") else lipschitz_bound(work, input_shape=input_shape)
            )
        preds, radii = [], []
        with torch.no_grad(), _strict_precision():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(device=device, dtype=dtype)
                if has_head_cert:
                    h = work.features(xb)
                    p, r = work.head.certified_radius(h, lip_f, tau=tau)
                else:
                    p, r = _global_radius(work(xb), lip, tau)
                preds.append(p.cpu())
                radii.append(r.double().cpu())
        return torch.cat(preds), torch.cat(radii)
    finally:
        model.train(was_training)


def certified_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | str | Iterable = STANDARD_EPS,
    **kwargs,
) -> dict:
    """Clean accuracy and certified accuracy (correct AND radius > ε, strict) at each ε.

    Returns ``{"clean_accuracy", "certified_accuracy": {eps_label: acc}, "median_radius",
    "n"}``; accuracies are fractions in [0, 1].
    """
    labels = [str(e) for e in (eps.split(",") if isinstance(eps, str) else (eps if isinstance(eps, Iterable) else [eps]))]
    values = parse_eps(labels)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    pred, radius = certified_radius(model, x, **kwargs)
    correct = pred == y.cpu()
    n = max(int(x.shape[0]), 1)
    cert = {lab: float((correct & (radius > v)).sum()) / n for lab, v in zip(labels, values)}
    r_correct = torch.where(correct, radius, torch.zeros_like(radius))
    return {
        "clean_accuracy": float(correct.sum()) / n,
        "certified_accuracy": cert,
        "median_radius": float(r_correct.median()) if x.shape[0] else 0.0,
        "n": int(x.shape[0]),
        "pred": pred,
        "radius": radius,
    }
