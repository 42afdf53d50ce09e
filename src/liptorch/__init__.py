"""liptorch: Lipschitz-bounded neural networks with sound certified robustness.

Floors, lowest first (a floor never imports a higher one):
``ops`` (pure math) → ``nn`` (layers) → ``models`` (zoo) → ``certify`` / ``lipschitz``
(analysis) → ``train`` / ``data`` (engine) → ``cli``.  ``runtime`` (process-level CPU
tuning) imports nothing of liptorch.
"""
from .certify import certified_accuracy, certified_radius
from .nn.bounds import lipschitz_bound
from .runtime import tune_cpu_allocator

__version__ = "0.1.0"


def export(model):
    """A plain-PyTorch copy of ``model`` (standard nn modules, cached operators); see liptorch.exporting."""
    from .exporting import export as _export

    return _export(model)


def load_checkpoint(path_or_run_dir):
    """Rebuild a trained model from a run directory or checkpoint file, in eval mode."""
    from .train import load_checkpoint as _load

    return _load(path_or_run_dir)


__all__ = [
    "certified_accuracy", "certified_radius", "export", "lipschitz_bound", "load_checkpoint", "tune_cpu_allocator",
    "__version__",
]
