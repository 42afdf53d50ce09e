"""liptorch: Lipschitz-bounded neural networks with sound certified robustness."""
from .lipschitz import lipschitz_bound

__version__ = "0.1.0"
__all__ = ["lipschitz_bound", "__version__"]
