"""torch's process-wide switches, each set inside a ``with`` block and restored after: TF32, cuDNN's autotuning and
cuDNN itself, and the CPU thread count. Training, export, verify's reference and the benches all set them."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["tf32_math", "no_tf32", "cudnn_autotuning", "cudnn_disabled", "cpu_threads"]


@contextlib.contextmanager
def tf32_math(allowed: bool):
    """TF32 allowed (or not) for cuBLAS matmuls and cuDNN convolutions inside; no effect on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _cudnn_setting(name: str, value: bool):
    """``torch.backends.cudnn.<name>`` set to ``value`` inside, restored after (no effect on the CPU)."""
    saved = getattr(torch.backends.cudnn, name)
    setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        setattr(torch.backends.cudnn, name, saved)


@contextlib.contextmanager
def cpu_threads(count: int):
    """torch's CPU (intra-op) threads set to ``count`` inside (0: left as they are), restored after. On a CPU
    that other work keeps busy, as many threads as free cores: torch's OpenMP threads wait for each other at
    every op, so one descheduled thread stalls them all (README, "Training")."""
    saved = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def cudnn_autotuning(enabled: bool):
    """cuDNN times its algorithms on each new shape and keeps the fastest (``benchmark``) inside, or not."""
    return _cudnn_setting("benchmark", enabled)


def cudnn_disabled():
    """Convolutions without cuDNN inside (PyTorch's own: im2col, then a cuBLAS matrix product, which sums
    products directly). cuDNN's Winograd and FFT algorithms transform their operands first, which rounds,
    so a model whose sums are exact (``model.exact``) would not be."""
    return _cudnn_setting("enabled", False)


def no_tf32():
    """Full fp32 matmuls/convs on CUDA (TF32 would round inputs to 10 mantissa bits)."""
    return tf32_math(False)
