"""Model zoo: a registry of the seed papers' architectures."""
from . import zoo as _zoo  # noqa: F401  (registers the models)
from .classifier import LipschitzClassifier
from .registry import create_model, list_models, model_description, register_model

__all__ = ["LipschitzClassifier", "create_model", "list_models", "model_description", "register_model"]
