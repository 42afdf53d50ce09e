"""Pure math: no modules, no state.  Everything here is a function of tensors."""
from .fft import as_size, center_offset, circular_conv_norm, circular_kernel_spectrum
from .linalg import gram_iteration_bound, power_iteration, round_up, spectral_norm
from .orthogonalize import bjorck_orthonormalize

bjorck = bjorck_orthonormalize

__all__ = [
    "as_size",
    "center_offset",
    "circular_conv_norm",
    "circular_kernel_spectrum",
    "bjorck",
    "gram_iteration_bound",
    "power_iteration",
    "round_up",
    "spectral_norm",
]
