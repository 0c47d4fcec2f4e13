r"""A network's input convolution, its bias, the LIF after it and an average pool after that, as one Triton
kernel (inference and training).

An SNN's first convolution reads a few input channels (N-MNIST's 2 polarities, an image's 3 colours)
and writes the largest tensor of the network: bench-nmnist's is ``[T*B, 128, 34, 34]``, 606 MB of fp32
at batch 128, written by cuDNN (with a 2-channel reduction, no tensor-core kernel fits it), read back by
the LIF kernel, and in NCHW transposed on the way. Here each program computes its conv outputs directly
from the input, ``I = sum over (ci, kh, kw) of w * x``, term by term in that order from 0, then
``+ bias``, and runs the LIF over T in registers, writing only the (pooled) spikes: the conv output
is never stored. A program takes a tile of 4 or 8 channels by a few hundred positions of one image, so
that each input value it loads serves those channels and each weight several positions
(:func:`conv_tile`); the input is a small fraction of the output and is served from the caches.

The products and sums are fp32 on the ordinary cores (no FMA contraction, like every kernel here), so
the layer is fp32-accurate at any torch-fast precision; cuDNN sums the same terms in another order,
so spikes near the threshold may differ from an unfused run in the last bit, as between any two fp32
convolutions (verify counts them). :func:`conv_lif_reference` computes the kernel's arithmetic in
torch, step by step, for the tests.

In training (:class:`_FusedConvLIF`) nothing of the layer's size is kept for backward either: backward
recomputes the membrane from the input with the same kernel, where the unfused layer keeps its currents
(2 bytes per neuron and step in bf16). That is a trade: the recomputed fp32 membrane is written and read
back (8 bytes per neuron and step) and the conv arithmetic runs twice, against the unfused layer's cuDNN
forward conv and its currents written once and read twice (6 bytes). The weight gradient is cuDNN's. Under bf16
autocast the forward conv is the fp32 one above, not autocast's bf16 conv: the spikes may differ from an
unfused bf16 run's where a bf16-rounded current would have crossed the threshold otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lif import _NO_FMA, INDEX_LIMIT, currents_gradient, pooled_currents_gradient, triton_next_power_of_2

__all__ = ["MAX_TAPS", "conv_fuses_with_lif", "conv_output_numel", "fused_conv_lif", "conv_lif_reference", "grid_fits"]

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
                   out_dtype: torch.dtype = torch.float32, membrane: bool = False, channels_last: bool = False,
                   a: float | None = None):
    """Spikes of ``LIF(conv(x))`` averaged over ``pool`` x ``pool`` windows (1: no pool).

    Args:
        x: the input ``[T, B, C_in, H, W]``, any strides, any float dtype (read as fp32).
        conv: the convolution (:func:`conv_fuses_with_lif`), its bias added in fp32.
        k_tau1, v_th: the LIF's constants; ``a``: its rectangular surrogate's width, needed only to train: without
            it the backward raises (a default of 1 would let a caller that forgot ``model.a`` train at a = 1).
        pool: a power-of-two average pool after the LIF (the pooled outputs are exact in ``out_dtype``).
        out_dtype: the spikes' dtype.
        membrane: also return the membrane ``[T, B, C, H', W']`` fp32 (only without a pool; no autograd).
        channels_last: the outputs' steps in channels_last.

    Returns:
        spikes ``[T, B, C, H'/pool, W'/pool]`` (``H' = H + 2 pad - kh + 1``), and the membrane with ``membrane``.

    With autograd recording and a parameter (or ``x``) that requires grad, the layer is differentiable
    (:class:`_FusedConvLIF`): it keeps only ``x`` for backward, which recomputes the membrane with this
    kernel, runs the LIF (+ pool) backward kernel and takes the weight (and input) gradient from cuDNN.
    """
    _check_fusable(x, conv, pool, membrane)
    weight, bias = conv.weight, conv.bias
    if torch.is_grad_enabled() and not membrane and any(
            t is not None and t.requires_grad for t in (x, weight, bias)):
        return _FusedConvLIF.apply(x, weight, bias, tuple(conv.padding), float(k_tau1), float(v_th), a,
                                   int(pool), out_dtype, bool(channels_last))
    with torch.no_grad():
        return _launch(x, weight, bias, tuple(conv.padding), k_tau1, v_th, pool, out_dtype, channels_last,
                       spikes=True, membrane=membrane)


def _check_fusable(x: Tensor, conv: nn.Module, pool: int, membrane: bool) -> None:
    if not conv_fuses_with_lif(conv):
        raise ValueError(f"the fused input conv computes ungrouped stride-1 zero-padded convolutions of at most "
                         f"{MAX_TAPS} terms per output, got {conv}")
    if pool < 1 or pool & (pool - 1) or (membrane and pool != 1):
        raise ValueError(f"pool must be a power of two (1 with membrane), got {pool}")
    if x.dim() != 5 or x.shape[2] != conv.in_channels:
        raise ValueError(f"input of {x.shape[2] if x.dim() == 5 else '?'} channels (shape {tuple(x.shape)}) "
                         f"for {conv}: [T, B, {conv.in_channels}, H, W] expected")
    largest = max(x.numel(), conv_output_numel(x.shape, conv))
    if largest >= INDEX_LIMIT:
        raise ValueError(f"the fused input conv indexes in 32 bits: {largest} elements >= 2^31")
    if not grid_fits(x.shape, conv):
        raise ValueError(f"the fused input conv launches a program per few hundred outputs of a map: "
                         f"a {tuple(x.shape[3:])} input needs more than CUDA's {_GRID_LIMIT} along one grid axis")


def grid_fits(input_shape, conv: nn.Conv2d) -> bool:
    """Whether the kernel's grid fits CUDA's limits for an input ``[T, B, C, H, W]``. Checked unpooled: the
    tiles (:func:`conv_tile`) cover at least as many conv outputs when pooled."""
    (kh, kw), (pad_h, pad_w) = conv.kernel_size, conv.padding
    positions = (input_shape[3] + 2 * pad_h - kh + 1) * (input_shape[4] + 2 * pad_w - kw + 1)
    return triton_cdiv(positions, conv_tile(conv.out_channels, positions, 1)[1]) <= _GRID_LIMIT


_GRID_LIMIT = 65535  # CUDA's limit on a launch's second and third grid dimensions


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def conv_tile(channels: int, positions: int, pool: int) -> tuple[int, int]:
    """(C_BLOCK, P_BLOCK) of :func:`_triton.conv_lif_forward`: 4 channels by 512 conv outputs (P_BLOCK = 512 /
    pool^2 pooled outputs) with a pool, 8 channels by 256 without; fewer where the layer has fewer. Each input
    value a program loads then serves its C_BLOCK channels, each weight its positions. Chosen from the T
    loop's sm_90 code with the GPU machine's Triton 3.6 (compiled here; instructions per neuron and step, 36
    of them the products and sums for a 2-channel 3x3 conv): 78 for bench-nmnist's 2x2-pooled layer, 85
    unpooled, 121 for 3 channels, no register spills. The first version (1024 neurons in memory order per
    program, each loading its own input and weight for every product) took 115, 200 and 300; 8 x 512
    pooled tiles spilled registers, 32-channel tiles spilled heavily (275)."""
    c_block = min(4 if pool > 1 else 8, triton_next_power_of_2(channels))
    per_program = max(1, 512 // (pool * pool)) if pool > 1 else 256
    return c_block, min(per_program, triton_next_power_of_2(positions))


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], k_tau1: float, v_th: float,
            pool: int, out_dtype: torch.dtype, channels_last: bool, spikes: bool, membrane: bool):
    """Run the kernel: (spikes ``[T, B, C, H'/pool, W'/pool]`` in ``out_dtype`` or None, fp32 membrane
    ``[T, B, C, H', W']`` or None (``membrane`` needs ``pool`` 1)), each step NCHW or channels_last."""
    steps, batch, c_in, height_in, width_in = x.shape
    channels, _, kh, kw = weight.shape
    pad_h, pad_w = padding
    conv_h, conv_w = height_in + 2 * pad_h - kh + 1, width_in + 2 * pad_w - kw + 1
    h_out, w_out = conv_h // pool, conv_w // pool
    shape = (steps, batch, channels, h_out, w_out)

    def allocate(dtype):
        return torch.empty(steps * batch * channels * h_out * w_out, device=x.device, dtype=dtype).as_strided(
            shape, _output_strides(*shape, channels_last))

    mem = allocate(torch.float32) if membrane else None
    out = allocate(out_dtype) if spikes else mem
    weight = weight.detach().float().contiguous()  # [C_out, C_in, kh, kw] in that order, whatever the module's
    c_block, p_block = conv_tile(channels, h_out * w_out, pool)
    grid = (batch, triton_cdiv(channels, c_block), triton_cdiv(h_out * w_out, p_block))
    from . import _triton

    _triton.conv_lif_forward[grid](
        x.detach(), weight, weight if bias is None else bias.detach().float().contiguous(), out,
        out if mem is None else mem, channels, h_out, w_out, height_in, width_in, *x.stride(),
        *(out if mem is None else mem).stride(), *out.stride(), float(k_tau1), float(v_th), T=steps, K=pool,
        C_IN=c_in, KH=kh, KW=kw, PAD_H=pad_h, PAD_W=pad_w, SAVE_U=membrane, STORE_O=spikes,
        HAS_BIAS=bias is not None, C_BLOCK=c_block, P_BLOCK=p_block, **_NO_FMA)
    if not spikes:
        return None, mem
    return (out, mem) if membrane else out


class _FusedConvLIF(torch.autograd.Function):
    """:func:`fused_conv_lif` in training. Forward writes only the (pooled) spikes and keeps ``x`` (a few
    channels: the input layer's) for backward, neither the conv's output nor the membrane. Backward
    recomputes the membrane with the same kernel (same bits), runs the LIF (+ pool) backward kernel for
    the currents' gradient and the bias's, and takes the weight's (and x's, if it needs one) from cuDNN's
    convolution backward. Under bf16 autocast the currents' gradient is written in bf16 and the weight
    gradient computed from bf16 operands, as autocast's conv would; the forward conv stays fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int],  # type: ignore[override]
                k_tau1: float, v_th: float, a: float | None, pool: int, out_dtype: torch.dtype, channels_last: bool):
        spikes = _launch(x, weight, bias, padding, k_tau1, v_th, pool, out_dtype, channels_last, spikes=True,
                         membrane=False)
        ctx.save_for_backward(x, weight, bias)
        kind = x.device.type
        amp = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
        ctx.constants = (padding, k_tau1, v_th, a, pool, channels_last, amp)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: Tensor):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        padding, k_tau1, v_th, a, pool, channels_last, bf16 = ctx.constants
        if a is None:  # a forward with autograd on needs none; the backward does
            raise ValueError("training through the fused input conv needs its LIF's surrogate width a")
        a = float(a)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        _, membrane = _launch(x, weight, bias, padding, k_tau1, v_th, 1, torch.float32, channels_last,
                              spikes=False, membrane=True)
        if pool > 1:
            grad_currents, grad_bias = pooled_currents_gradient(membrane, grad_spikes, pool, k_tau1, v_th, a, bf16,
                                                                bias, bias_grad=need_b)
        else:
            grad_currents, grad_bias = currents_gradient(membrane, grad_spikes, k_tau1, v_th, a, bf16, bias,
                                                         bias_grad=need_b, overwrite=True)
        grad_x = grad_weight = None
        if need_x or need_w:
            dtype = grad_currents.dtype
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_currents.flatten(0, 1), x.detach().flatten(0, 1).to(dtype), weight.detach().to(dtype), None,
                [1, 1], list(padding), [1, 1], False, [0, 0], 1, [need_x, need_w, False])
            grad_x = None if grad_x is None else grad_x.unflatten(0, x.shape[:2]).to(x.dtype)
            grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


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
