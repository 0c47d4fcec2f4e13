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
need their input split too (``analog=True``). Veltkamp's split, in plain fp32 arithmetic (ONNX has no
bit cast to round in the graph)::

    t = x + x * 2^13,   x_hi = t - (t - x),   x_lo = x - x_hi

gives an ``x_hi`` of at most 11 significant bits (exact in TF32) and an exact remainder ``x_lo`` of at
most 12 (``|x_lo| <= 2^-11 |x|``). Then ``W x = W_hi x_hi + W_lo x_hi + W_hi x_lo`` up to the dropped
``W_lo x_lo`` and the TF32 rounding of ``W_lo`` and ``x_lo`` (at most 2^-22 each): within 2^-20 of
``sum |W||x|`` with exact sums, three tensor-core passes in two calls: ``x_hi`` against the spike
layers' stacked ``[W_hi; W_lo]``, ``x_lo`` against ``W_hi``, and ``hh + (lh + hl)`` summed after. The
product ``x * 2^13`` is exact, so a compiler that contracts ``x + x * 2^13`` into an FMA computes the
same ``t`` (Veltkamp's usual ``x * (2^13 + 1)`` is not safe that way: contracted into the outer
subtraction it leaves ``x_hi`` with more bits than TF32 holds).

Why three accumulators, not one call over ``[x_hi | x_hi | x_lo]`` (the form until 2026-11-27): tensor
cores do not round their sums. Each block of products and the accumulator are aligned to the largest of
them, cut off and added with truncation (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021), so
an accumulator loses up to one unit of its last place at every block, always towards zero. Spike
products ``W_hi * 1`` have 11 bits and their sums mostly fit the accumulator: little is lost. Analog
products ``W_hi x_hi`` have 22, so a long sum of them loses about ``K / block`` units of the
accumulator's last place. One call over all three products makes the accumulator 3 K long; the H200
measured 7.6e-5 against cuDNN fp32's 8.4e-7 on a 256-channel 3x3 conv (README, "Third session").
Separate accumulators make the big one K long and keep the small products' truncation relative to
their own, 2^-11 smaller, sums (``tests/test_split_tf32.py`` emulates such a core). Even so an analog
split is not as accurate as fp32 on the ordinary cores for long K: its error lies between fp32's and
plain TF32's.

torch-fast switches TF32 on for the split layers alone, so it leaves analog layers in plain fp32
(``analog=False``); an ONNX runtime turns TF32 on for a whole session, so the tf32x2 export splits every
layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .torch_settings import tf32_math

__all__ = ["round_to_tf32", "split_input", "SplitTF32", "spike_fed_layers", "apply_split_tf32"]

_DROPPED_BITS = 13  # fp32 stores 23 mantissa bits, TF32 10
_SPLITTER = float(2**_DROPPED_BITS)  # Veltkamp: 24 significant bits - 13 leave 11 in x_hi


def round_to_tf32(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to the nearest TF32 value (ties to even), returned as fp32 (finite inputs)."""
    bits = x.detach().float().contiguous().view(torch.int32)
    half = (1 << (_DROPPED_BITS - 1)) - 1  # 0x0FFF: below half rounds down, above rounds up
    odd = (bits >> _DROPPED_BITS) & 1  # ties go to the even neighbour
    return ((bits + half + odd) & -(1 << _DROPPED_BITS)).view(torch.float32)


def split_input(x: Tensor) -> tuple[Tensor, Tensor]:
    """Veltkamp's split of fp32 ``x`` (any shape): ``(x_hi, x_lo)``, ``x_hi + x_lo == x`` exactly, ``x_hi``
    exact in TF32 (11 significant bits), ``|x_lo| <= 2^-11 |x|`` with at most 12 significant bits (for
    ``|x| < 2^114``). Elementwise fp32
    operations only, so the same ops in an ONNX graph split the same way (module docstring)."""
    t = x + x * _SPLITTER
    x_hi = t - (t - x)
    return x_hi, x - x_hi


class SplitTF32(nn.Module):
    """A frozen copy of a Conv2d/Linear that computes it on TF32 tensor cores to fp32 accuracy (inference):
    ``W_hi x + W_lo x`` for spike input (exact in TF32); with ``analog`` (any input), the input split too,
    ``W_hi x_hi + (W_lo x_hi + W_hi x_lo)`` in three accumulators (module docstring).

    Input and output as the layer's: ``[N, C_in, H, W] -> [N, C_out, H', W']`` or ``[..., F_in] -> [..., F_out]``.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, analog: bool = False):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise ValueError("SplitTF32 handles zero-padded convolutions with numeric padding")
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            # the stacked hi/lo weights would cross the groups' channel blocks
            raise ValueError(f"SplitTF32 handles ungrouped convolutions, got groups={layer.groups}")
        w = layer.weight.detach().float()
        hi = round_to_tf32(w)
        self.analog = analog
        # [2 C_out, C_in, ...]: hi then lo along the output channels, so each has an accumulator of its own
        self.register_buffer("weight", torch.cat([hi, w - hi]))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.out_channels = w.shape[0]
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": 1}

    def forward(self, x: Tensor) -> Tensor:
        y = self.forward_without_bias(x)
        if self.bias is not None:
            y = y + (self.bias if self.conv is None else self.bias.view(1, -1, 1, 1))
        return y

    def forward_without_bias(self, x: Tensor) -> Tensor:
        """``W_hi x + W_lo x`` (analog: ``W_hi x_hi + (W_lo x_hi + W_hi x_lo)``): the layer without its
        bias, which a fused LIF after it adds (the same fp32 addition, in the kernel;
        :func:`snncompile.models._bias_moves_into_lif`)."""
        channels = 1 if self.conv is not None else -1
        x_lo = None
        if self.analog:
            x, x_lo = split_input(x)
        with tf32_math(True):
            hi, lo = self._product(x, self.weight).split(self.out_channels, dim=channels)
            if x_lo is None:
                return hi + lo
            # the small products summed first, then added to the large one
            return hi + (lo + self._product(x_lo, self.weight[: self.out_channels]))

    def _product(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight) if self.conv is None else F.conv2d(x, weight, None, **self.conv)

    def extra_repr(self) -> str:
        split = "weight and input split, 3 products" if self.analog else "weight split hi + lo"
        return f"{'conv2d' if self.conv else 'linear'}, out={self.out_channels}, {split}"


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


def apply_split_tf32(net, analog: bool = False) -> int:
    """Replace ``net``'s spike-fed Conv2d/Linear stages by :class:`SplitTF32` copies, and with ``analog``
    every other Conv2d/Linear stage by one that splits its input too; returns how many were replaced."""
    spike_fed = set(spike_fed_layers(net.stages))
    replaced = 0
    for i, stage in enumerate(net.stages):
        if isinstance(stage, (nn.Conv2d, nn.Linear)) and (i in spike_fed or analog):
            net.stages[i] = SplitTF32(stage, analog=i not in spike_fed)
            replaced += 1
    return replaced
