"""A registry of named architectures (in the spirit of timm's)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["ModelSpec", "register_model", "create_model", "list_models", "model_description"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    family: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, family: str, description: str = ""):
    """Decorator: register ``builder(in_channels, image_size, num_classes, **kwargs)``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, fn, description or (fn.__doc__ or "").strip().splitlines()[0], family)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].family, _natural_key(n)))


def _natural_key(name: str):
    parts = name.rsplit("-", 1)
    if len(parts) == 2 and parts[1].isdigit():
        return (parts[0], int(parts[1]))
    return (name, 0)


def model_description(name: str) -> str:
    return _spec(name).description


def _spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, in_channels: int, image_size, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for images of ``in_channels`` × ``image_size``
    with ``num_classes`` outputs.  Extra keyword arguments are architecture options."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = tuple(int(s) for s in image_size)
    if in_channels < 1 or num_classes < 2 or min(image_size) < 1:
        raise ValueError(
            f"create_model needs in_channels >= 1, num_classes >= 2 and a positive image size; "
            f"got in_channels={in_channels}, num_classes={num_classes}, image_size={image_size}"
        )
    model = _spec(name).builder(in_channels, image_size, num_classes, **kwargs)
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model
