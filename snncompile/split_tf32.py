r"""fp32-accurate convolutions and linears of spikes on TF32 tensor cores: torch-fast's ``tf32x2``.

TF32 keeps 10 of fp32's 23 stored mantissa bits; a GPU's fp32 convolution without it runs on the
ordinary cores at a fraction of the tensor cores' rate. In an SNN most weighted layers read spikes, and
spikes (0 or 1) and their 2x2 average pools (k/4) are exact in TF32: only the weights lose bits. So
split each weight::

    W_hi = tf32(W)          (round to nearest even, 10 stored bits)
    W_lo = W - W_hi         (exact in fp32; |W_lo| <= 2^-11 |W|)
    W s  = W_hi s + W_lo s

``W_hi s`` is exact term by term (exact operands, products exact, fp32 accumulation) and ``W_lo s``
loses at most 2^-11 of ``W_lo``, i.e. 2^-22 of ``W``: four units of fp32 rounding of each weight, the
same order as the summation error any fp32 convolution makes. The layer stays fp32-accurate (verify
checks it at the fp32 preset) for two tensor-core passes, done in one call: the two weights stacked
along the output channels (``[2 C_out, ...]``) and the halves summed after, then the bias.

Layers whose input is not spikes (the first layer's analog input, a NeuNorm output, a 3x3 average)
are left as they are, in full fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.pt import tf32_math

__all__ = ["round_to_tf32", "SplitTF32", "spike_fed_layers", "apply_split_tf32"]

_DROPPED_BITS = 13  # fp32 stores 23 mantissa bits, TF32 10


def round_to_tf32(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to the nearest TF32 value (ties to even), returned as fp32 (finite inputs)."""
    bits = x.detach().float().contiguous().view(torch.int32)
    half = (1 << (_DROPPED_BITS - 1)) - 1  # 0x0FFF: below half rounds down, above rounds up
    odd = (bits >> _DROPPED_BITS) & 1  # ties go to the even neighbour
    return ((bits + half + odd) & -(1 << _DROPPED_BITS)).view(torch.float32)


class SplitTF32(nn.Module):
    """A frozen copy of a Conv2d/Linear that computes it as ``W_hi x + W_lo x`` under TF32 (inference).

    Input and output as the layer's: ``[N, C_in, H, W] -> [N, C_out, H', W']`` or ``[N, F_in] -> [N, F_out]``.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise ValueError("SplitTF32 handles zero-padded convolutions with numeric padding")
        w = layer.weight.detach().float()
        hi = round_to_tf32(w)
        self.register_buffer("weight", torch.cat([hi, w - hi]))  # [2 C_out, ...]: hi then lo
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.out_channels = w.shape[0]
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": layer.groups}

    def forward(self, x: Tensor) -> Tensor:
        y = self.forward_without_bias(x)
        if self.bias is not None:
            y = y + (self.bias if self.conv is None else self.bias.view(1, -1, 1, 1))
        return y

    def forward_without_bias(self, x: Tensor) -> Tensor:
        """``W_hi x + W_lo x``: the layer without its bias, which a fused LIF after it adds (the same
        fp32 addition, in the kernel; :func:`snncompile.models._bias_moves_into_lif`)."""
        with tf32_math(True):
            y = F.linear(x, self.weight) if self.conv is None else F.conv2d(x, self.weight, None, **self.conv)
        hi, lo = y.split(self.out_channels, dim=1)
        return hi + lo

    def extra_repr(self) -> str:
        return f"{'conv2d' if self.conv else 'linear'}, out={self.out_channels}, weight split hi + lo"


def _keeps_spikes_exact(stage: nn.Module) -> bool:
    """Stages between a LIF and a weighted layer that keep its values exact in TF32."""
    if isinstance(stage, (nn.Flatten, nn.Dropout, nn.Identity)):
        return True
    if isinstance(stage, nn.AvgPool2d):
        k = stage.kernel_size if isinstance(stage.kernel_size, tuple) else (stage.kernel_size,) * 2
        area = k[0] * k[1]
        padding = stage.padding if isinstance(stage.padding, tuple) else (stage.padding,)
        # a sum of at most 2^10 spikes over a power-of-two area: exact with 10 stored bits
        return area & (area - 1) == 0 and area <= 1024 and not any(padding) and stage.divisor_override is None
    return False


def spike_fed_layers(stages) -> list[int]:
    """Indices of the Conv2d/Linear stages whose input is LIF spikes (through exact stages only)."""
    from .models import LIFCell

    stages = list(stages)
    found = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, (nn.Conv2d, nn.Linear)):
            continue
        j = i - 1
        while j >= 0 and _keeps_spikes_exact(stages[j]):
            j -= 1
        if j >= 0 and isinstance(stages[j], LIFCell):
            found.append(i)
    return found


def apply_split_tf32(net) -> int:
    """Replace ``net``'s spike-fed Conv2d/Linear stages by :class:`SplitTF32` copies; returns how many."""
    indices = spike_fed_layers(net.stages)
    for i in indices:
        net.stages[i] = SplitTF32(net.stages[i])
    return len(indices)
