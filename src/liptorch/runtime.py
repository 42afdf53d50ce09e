"""Process-level tuning for CPU training (no other liptorch module is imported here).

PyTorch's CPU tensors come straight from the C library's ``malloc``.  With glibc's
defaults a multi-megabyte block is served by ``mmap`` and, once freed, handed back to
the kernel (``munmap`` or a heap trim), so the next tensor of that size is fresh memory
whose every page faults on first touch.  A training step that creates dozens of such
intermediates (the per-frequency matrices of :class:`~liptorch.nn.SandwichConv2d`, the
Cayley transform, the Horner states of SOC) spends a large share of its time in those
faults: measured on a 2-core VM, 10–25 % of a SandwichConv2d training step (64→64
channels, 16×16, batch 64; 1 and 2 threads), against nothing measurable for a plain
``nn.Conv2d`` step.

:func:`tune_cpu_allocator` raises glibc's mmap threshold to 32 MiB and its trim threshold
to 1 GiB, so freed blocks stay in the heap and are reused without faults.  The price:
memory freed after a peak is kept by the process (as the CUDA caching allocator
does) instead of returned to the system.  The ``liptorch`` command applies it at start
unless ``LIPTORCH_CPU_ALLOCATOR=default`` is set; library users opt in by calling it
(or by exporting ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` before Python
starts, which glibc reads itself).
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_cpu_allocator", "cpu_allocator_state", "ALLOCATOR_ENV"]

#: Environment variable read by the command line: ``default`` leaves the allocator alone.
ALLOCATOR_ENV = "LIPTORCH_CPU_ALLOCATOR"

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
_STATE = {"tuned": False}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it (musl's mallopt is a no-op)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed multi-megabyte blocks in glibc's heap (see the module docstring).

    Both thresholds are set (setting only the trim threshold would freeze glibc's
    dynamic mmap threshold at 128 KiB and make things slower).  Returns True when the
    settings took effect, False where there is no glibc (macOS, Windows, musl) or it
    refused them.  Idempotent; affects the whole process.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise ValueError(f"{name} must be an int in (0, 2**31), got {value!r}")
    mallopt = _glibc()
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    _STATE["tuned"] = _STATE["tuned"] or ok
    return ok


def cpu_allocator_state() -> str:
    """``"tuned"`` after a successful :func:`tune_cpu_allocator` in this process, else
    ``"default"`` (settings made through glibc's environment variables are not seen)."""
    return "tuned" if _STATE["tuned"] else "default"


def tune_from_environment() -> bool:
    """What the command line does at start: tune unless ``LIPTORCH_CPU_ALLOCATOR`` is
    ``default`` (any other value but ``tuned`` or empty is an error)."""
    value = os.environ.get(ALLOCATOR_ENV, "tuned").strip().lower() or "tuned"
    if value not in ("tuned", "default"):
        raise ValueError(f"{ALLOCATOR_ENV} must be 'tuned' or 'default', got {os.environ[ALLOCATOR_ENV]!r}")
    return tune_cpu_allocator() if value == "tuned" else False
