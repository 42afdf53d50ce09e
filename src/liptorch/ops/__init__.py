"""Pure math: no modules, no state.  Everything here is a function of tensors."""
from .fft import as_size, center_offset, circular_conv_norm, circular_kernel_spectrum
from .linalg import bjorck, gram_iteration_bound, power_iteration, round_up, spectral_norm

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
