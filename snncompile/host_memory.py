"""Host memory: keep freed CPU tensor memory in the process instead of handing it back per step.

glibc's malloc serves every block over 32 MiB (its largest mmap threshold) with a fresh ``mmap`` and
returns it with ``munmap`` when freed. A training step on the CPU allocates and frees tensors that
large every step (a layer-major conv output is ``[T*B, C, H, W]``: 40 MiB for mnist-cpu), so every
step faults in and zeroes fresh pages, which shows up as system time and makes every op that first
touches such a tensor slow. :func:`keep_freed_memory` turns that off for this process: blocks come
from the heap and stay there when freed, ready for the next step (mnist-cpu's CPU training step,
measured side by side: README, "CPU memory allocator").

The cost is a peak resident size ~10 % higher (9 % for a mnist-cpu `bench train`), kept until the process ends. The CLI applies it
to its own process (``SNNCOMPILE_MALLOC=keep``, the default); ``SNNCOMPILE_MALLOC=system`` leaves
glibc's defaults. Library users call it themselves. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from .errors import ConfigError

__all__ = ["keep_freed_memory", "OPT_OUT_ENV"]

OPT_OUT_ENV = "SNNCOMPILE_MALLOC"

# mallopt parameters, glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # free memory at the heap's top kept before trimming (mallopt takes an int)


def _glibc():
    """The C library, if it is glibc (the only one whose mallopt parameters these are)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory (glibc; see the module docstring).

    Returns True when applied, False when opted out (``SNNCOMPILE_MALLOC=system``) or not on glibc.
    Idempotent; affects allocations made after the call. Any other value than ``keep`` (the default)
    or ``system`` is a ConfigError: a misspelt opt-out must not pass silently.
    """
    choice = os.environ.get(OPT_OUT_ENV, "keep").strip().lower() or "keep"
    if choice not in ("keep", "system"):
        raise ConfigError(f"{OPT_OUT_ENV} must be 'keep' (the default) or 'system', got {choice!r}")
    if choice == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
