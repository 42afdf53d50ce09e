"""``LipschitzClassifier``: a feature map with a guaranteed bound followed by a head."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.bounds import module_bound, trace_input_sizes
from ..ops.linalg import round_up

__all__ = ["LipschitzClassifier"]


class LipschitzClassifier(nn.Module):
    """logits = head(features(x)).

    ``features`` maps raw inputs (pixels in [0, 1], normalisation included) to the
    head's input h; its guaranteed Lipschitz bound L_h is composed from its layers at
    their actual input sizes (``feature_bound``).  Heads that carry their own
    certificate (LLN, MLP head) expose ``certified_radius(h, L_h, tau)``; any other head
    is bounded globally and certified with margin / (√2 · L_h · L_head).
    """

    def __init__(self, features: nn.Module, head: nn.Module, input_shape, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        object.__setattr__(self, "_bound_cache", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{getattr(self, 'model_name', type(self).__name__)} expects inputs of shape "
                f"(N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )
        return self.head(self.features(x))

    def _version_key(self) -> tuple:
        return tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in list(self.parameters()) + list(self.buffers()))

    def _bounds(self) -> tuple[float, float | None]:
        key = self._version_key()
        cache = self._bound_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        sizes = trace_input_sizes(self, self.input_shape)
        lf = module_bound(self.features, sizes)
        try:
            lh = module_bound(self.head, sizes)
        except ValueError:
            lh = None
        object.__setattr__(self, "_bound_cache", (self._version_key(), (lf, lh)))
        return lf, lh

    def feature_bound(self) -> float:
        """Guaranteed Lipschitz bound L_h of raw input → head features (float64, rounded up)."""
        return self._bounds()[0]

    def head_has_certificate(self) -> bool:
        return hasattr(self.head, "certified_radius")

    def lipschitz_bound(self, input_size=None, sizes=None) -> float:
        """Guaranteed bound of the whole logit map (feature bound × head bound)."""
        lf, lh = self._bounds()
        if lh is None:
            raise ValueError(f"the head {type(self.head).__name__} has no global Lipschitz bound")
        return round_up(lf * lh)

    def layer_report(self) -> list[dict]:
        """Per-module bounds, in order, with the spatial size each was bounded at.

        Sequential containers (and containers that just run a ``layers`` Sequential,
        like LBDN) are expanded, so each constrained layer gets its own row; the whole
        bound is the product of the rows."""
        sizes = trace_input_sizes(self, self.input_shape)
        rows = []

        def visit(name: str, mod: nn.Module) -> None:
            inner = mod if isinstance(mod, nn.Sequential) else getattr(mod, "layers", None)
            if isinstance(inner, nn.Sequential) and (inner is mod or list(mod.children()) == [inner]):
                for child_name, child in inner.named_children():
                    visit(f"{name}.{child_name}", child)
                return
            try:
                b = module_bound(mod, sizes)
            except ValueError:
                b = math.nan
            rows.append({
                "name": name,
                "type": type(mod).__name__,
                "input_size": sizes.get(mod),
                "bound": b,
                "guarantee": getattr(mod, "guarantee", "bounded"),
                "module": mod,
            })

        visit("features", self.features)
        visit("head", self.head)
        return rows
