"""Fused GPU kernels (Triton), optional. The pure-torch layer-major path stays the CPU path and the
reference these kernels are tested against."""

from .lif import fused_kernels_available, fused_lif, fused_lif_inference, fused_lif_pool

__all__ = ["fused_kernels_available", "fused_lif", "fused_lif_inference", "fused_lif_pool"]
