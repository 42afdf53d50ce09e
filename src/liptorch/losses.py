"""Losses for certifiably robust training (all with a ``reduction`` argument).

* multi-class hinge with margin m (BCOP paper: m = √2·ε_train·L), PyTorch's
  ``multi_margin_loss`` with p = 1 (divides by the number of classes);
* offset cross-entropy: CE((z − offset·onehot(y)) / T) · T (LBDN, "1-Lipschitz
  layers compared");
* certificate regularisation (ICLR 2022): −γ · mean(ReLU(certificate of the true label)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["hinge_loss", "offset_cross_entropy", "global_certificate", "certificate_regularizer"]


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def hinge_loss(logits: torch.Tensor, y: torch.Tensor, margin: float, reduction: str = "mean") -> torch.Tensor:
    """(1/C) Σ_{j≠y} max(0, m − z_y + z_j)."""
    if margin < 0:
        raise ValueError(f"hinge margin must be >= 0, got {margin}")
    loss = F.multi_margin_loss(logits, y, p=1, margin=margin, reduction="none")
    return _reduce(loss, reduction)


def offset_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, offset: float, temperature: float = 0.25, reduction: str = "mean"
) -> torch.Tensor:
    """T · CE((z − offset·e_y) / T, y)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shifted = logits - offset * F.one_hot(y, logits.shape[1]).to(logits.dtype)
    loss = F.cross_entropy(shifted / temperature, y, reduction="none") * temperature
    return _reduce(loss, reduction)


def global_certificate(logits: torch.Tensor, y: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """(z_y − max_{j≠y} z_j) / (√2 L): differentiable, negative when misclassified."""
    zy = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (zy - other.max(dim=1).values) / (math.sqrt(2.0) * lipschitz)


def certificate_regularizer(cert: torch.Tensor, gamma: float) -> torch.Tensor:
    """−γ · mean(ReLU(cert))."""
    return -gamma * F.relu(cert).mean()
