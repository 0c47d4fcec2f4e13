r"""A network's input convolution, its bias, the LIF after it and an average pool after that, as one Triton
kernel (inference).

An SNN's first convolution reads a few input channels (N-MNIST's 2 polarities, an image's 3 colours)
and writes the largest tensor of the network: bench-nmnist's is ``[T*B, 128, 34, 34]``, 606 MB of fp32
at batch 128, written by cuDNN (with a 2-channel reduction, no tensor-core kernel fits it), read back by
the LIF kernel, and in NCHW transposed on the way. Here each program computes its conv outputs directly
from the input, ``I = sum over (ci, kh, kw) of w * x``, term by term in that order from 0, then
``+ bias``, and runs the LIF over T in registers, writing only the (pooled) spikes: the conv output
is never stored. The sums take 18 (2 channels, 3x3) or 27 (3 channels) loads of the input per neuron
and step, served from the caches: the input is a small fraction of the output.

The products and sums are fp32 on the ordinary cores (no FMA contraction, like every kernel here), so
the layer is fp32-accurate at any torch-fast precision; cuDNN sums the same terms in another order,
so spikes near the threshold may differ from an unfused run in the last bit, as between any two fp32
convolutions (verify counts them). :func:`conv_lif_reference` computes the kernel's arithmetic in
torch, step by step, for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lif import _NO_FMA, INDEX_LIMIT, pool_block, pool_forward_warps

__all__ = ["MAX_TAPS", "conv_fuses_with_lif", "conv_output_numel", "fused_conv_lif", "conv_lif_reference"]

MAX_TAPS = 32  # input channels x kernel height x kernel width: each is a load per neuron and step


def conv_fuses_with_lif(conv: nn.Module) -> bool:
    """A plain, unhooked ``nn.Conv2d`` the kernel computes: ungrouped, stride 1, no dilation, numeric zero
    padding, at most :data:`MAX_TAPS` terms per output."""
    if type(conv) is not nn.Conv2d or conv._forward_hooks or conv._forward_pre_hooks:
        return False
    taps = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return (conv.groups == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and taps <= MAX_TAPS)


def conv_output_numel(input_shape, conv: nn.Conv2d) -> int:
    """Elements of ``conv``'s output (stride 1) over an input ``[T, B, C_in, H, W]``."""
    steps, batch, _, height, width = input_shape
    (kh, kw), (pad_h, pad_w) = conv.kernel_size, conv.padding
    return steps * batch * conv.out_channels * (height + 2 * pad_h - kh + 1) * (width + 2 * pad_w - kw + 1)


def _output_strides(steps: int, batch: int, channels: int, height: int, width: int, channels_last: bool):
    """Strides of a ``[T, B, C, H, W]`` tensor stored as T dense blocks, each NCHW or channels_last."""
    step = batch * channels * height * width
    if channels_last:
        return step, height * width * channels, 1, width * channels, channels
    return step, channels * height * width, height * width, width, 1


def fused_conv_lif(x: Tensor, conv: nn.Conv2d, k_tau1: float, v_th: float, pool: int = 1,
                   out_dtype: torch.dtype = torch.float32, membrane: bool = False, channels_last: bool = False):
    """Spikes of ``LIF(conv(x))`` averaged over ``pool`` x ``pool`` windows (1: no pool), inference only.

    Args:
        x: the input ``[T, B, C_in, H, W]``, any strides, any float dtype (read as fp32).
        conv: the convolution (:func:`conv_fuses_with_lif`), its bias added in fp32.
        k_tau1, v_th: the LIF's constants.
        pool: a power-of-two average pool after the LIF (the pooled outputs are exact in ``out_dtype``).
        out_dtype: the spikes' dtype.
        membrane: also return the membrane ``[T, B, C, H', W']`` fp32 (only without a pool).
        channels_last: the outputs' steps in channels_last.

    Returns:
        spikes ``[T, B, C, H'/pool, W'/pool]`` (``H' = H + 2 pad - kh + 1``), and the membrane with ``membrane``.
    """
    if not conv_fuses_with_lif(conv):
        raise ValueError(f"the fused input conv computes ungrouped stride-1 zero-padded convolutions of at most "
                         f"{MAX_TAPS} terms per output, got {conv}")
    if pool < 1 or pool & (pool - 1) or (membrane and pool != 1):
        raise ValueError(f"pool must be a power of two (1 with membrane), got {pool}")
    steps, batch, c_in, height_in, width_in = x.shape
    if c_in != conv.in_channels:
        raise ValueError(f"input of {c_in} channels for {conv}")
    (kh, kw), (pad_h, pad_w) = conv.kernel_size, conv.padding
    conv_h, conv_w = height_in + 2 * pad_h - kh + 1, width_in + 2 * pad_w - kw + 1
    h_out, w_out, channels = conv_h // pool, conv_w // pool, conv.out_channels
    largest = max(x.numel(), conv_output_numel(x.shape, conv))
    if largest >= INDEX_LIMIT:
        raise ValueError(f"the fused input conv indexes in 32 bits: {largest} elements >= 2^31")
    shape = (steps, batch, channels, h_out, w_out)
    out = torch.empty(steps * batch * channels * h_out * w_out, device=x.device, dtype=out_dtype).as_strided(
        shape, _output_strides(*shape, channels_last))
    mem = None
    if membrane:
        mem = torch.empty(out.numel(), device=x.device, dtype=torch.float32).as_strided(
            shape, _output_strides(*shape, channels_last))
    weight = conv.weight.detach().float().contiguous()  # [C_out, C_in, kh, kw] in that order, whatever the module's
    bias = conv.bias
    n_out = batch * channels * h_out * w_out
    block = pool_block(pool)
    from . import _triton

    _triton.conv_lif_forward[((n_out + block - 1) // block,)](
        x, weight, weight if bias is None else bias.detach().float().contiguous(), out, out if mem is None else mem,
        n_out, channels, h_out, w_out, height_in, width_in, *x.stride(), *(out if mem is None else mem).stride(),
        *out.stride(), float(k_tau1), float(v_th), T=steps, K=pool, C_IN=c_in, KH=kh, KW=kw, PAD_H=pad_h,
        PAD_W=pad_w, SAVE_U=membrane, CHANNELS_LAST=channels_last, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=pool_forward_warps(channels_last and pool > 1), **_NO_FMA)
    return (out, mem) if membrane else out


def conv_lif_reference(x: Tensor, conv: nn.Conv2d, k_tau1: float, v_th: float, pool: int = 1):
    """The kernel's arithmetic in torch, for tests: each conv output summed term by term in (ci, kh, kw)
    order from 0 in fp32, plus the bias, then the LIF from a zero membrane (``u = k u (1 - o) + I`` at every
    step) and the pool. Returns (spikes, membrane), ``[T, B, C, ...]`` fp32, the membrane unpooled."""
    steps, batch = x.shape[:2]
    kh, kw = conv.kernel_size
    cols = F.unfold(x.flatten(0, 1).float(), (kh, kw), padding=conv.padding)  # [T*B, C_in*kh*kw, L], same order
    weight = conv.weight.detach().float().flatten(1)  # [C_out, C_in*kh*kw]
    acc = torch.zeros(cols.shape[0], weight.shape[0], cols.shape[2])
    for j in range(weight.shape[1]):
        acc = acc + weight[:, j, None] * cols[:, None, j]
    if conv.bias is not None:
        acc = acc + conv.bias.detach().float()[:, None]
    height = x.shape[3] + 2 * conv.padding[0] - kh + 1
    currents = acc.unflatten(2, (height, -1)).unflatten(0, (steps, batch))
    u = o = torch.zeros_like(currents[0])
    spikes, membranes = [], []
    for current in currents:
        u = k_tau1 * u * (1.0 - o) + current
        o = (u > v_th).float()
        spikes.append(o)
        membranes.append(u)
    spikes, membranes = torch.stack(spikes), torch.stack(membranes)
    if pool > 1:
        spikes = F.avg_pool2d(spikes.flatten(0, 1), pool).unflatten(0, (steps, batch))
    return spikes, membranes
