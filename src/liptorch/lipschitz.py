"""Lipschitz analysis: sound upper bounds (for certificates) and empirical lower
bounds (diagnostics), so that ``lower ≤ true ≤ upper`` brackets the true constant.

The composition rules themselves live in :mod:`liptorch.nn.bounds` (layer floor) so
that models can use them; this module is the analysis-level entry point.
"""
from __future__ import annotations

from .nn.bounds import lipschitz_bound, module_bound, trace_input_sizes

__all__ = ["lipschitz_bound", "module_bound", "trace_input_sizes", "upper_bound"]


def upper_bound(model, input_shape=None) -> float:
    """The sound global bound of ``model`` (float64, rounded up): for zoo classifiers
    the bound of the feature map times that of the head; certificates use exactly the
    feature part (and the head's own pairwise rule where it has one)."""
    if hasattr(model, "feature_bound") and hasattr(model, "head"):
        return model.lipschitz_bound()
    return lipschitz_bound(model, input_shape=input_shape)
