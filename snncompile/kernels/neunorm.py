r"""NeuNorm (PAPER.md §2) layer-major with its full-size passes as Triton kernels.

:class:`snncompile.layers.NeuNorm` computes, for spikes o ``[T, B, F, H, W]``::

    x[t] = k_tau2 * x[t-1] + (v/F) * sum_f o_f[t]        [T, B, 1, H, W], small
    y_f[t] = o_f[t] - U_f * x[t]                           [T, B, F, H, W]

In torch the output is two full-size kernels (the broadcast product ``U * x`` written, then read back by
the subtraction), and autograd's backward about six: the product's gradient negated, its two broadcast
gradients each a full-size product and a reduction, and the channel sum's broadcast gradient added to the
output's. That is some 64 bytes of fp32 traffic per neuron and step against the LIF kernel's 10-16. Here:

- forward: the channel sums and the x recurrence stay torch's (:meth:`NeuNorm.states`, the same bits), and
  ``y`` is one kernel, reading o and writing y (8 bytes; the same two roundings, so the same bits);
- backward: one kernel sums ``g * U`` over the channels for each (t, b, position) (4 bytes), torch runs
  the reverse recurrence on those ``[T, B, H*W]`` sums, and one kernel writes the spikes' gradient
  ``g + (v/F) * dL/dx[t]`` and sums each image's ``g * x`` for U's gradient (8 bytes, plus 8/T for those
  ``[B, F, H, W]`` shares written and summed: about 24 + 8/T bytes in all).

Nothing of full size is kept for backward: x ``[T, B, 1, H, W]`` and U. Gradients equal autograd's through
:meth:`NeuNorm.forward` to fp32 summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .lif import _NO_FMA, INDEX_LIMIT, _time_major_dense, triton_next_power_of_2

__all__ = ["fused_neunorm", "tile_shape"]

_KERNELS = None


def _kernels():
    """Compile lazily: importing snncompile never imports Triton."""
    global _KERNELS
    if _KERNELS is None:
        from . import _triton

        _KERNELS = (_triton.neunorm_forward, _triton.neunorm_channel_dot, _triton.neunorm_backward)
    return _KERNELS


def tile_shape(channels: int, positions: int, values: int = 2048) -> tuple[int, int]:
    """(F_BLOCK, P_BLOCK) of a program's channels x positions tile: ``values`` of them (2048: 16 per thread at
    4 warps), positions first (NCHW reads them contiguously), at most the map's size rounded up to a power of
    two. The backward kernel, which also holds U's gradient for its tile, takes 1024: at 2048 it needed 192
    registers on sm_90 (Triton 3.6), at 1024 64-96, no spills."""
    p_block = min(128, triton_next_power_of_2(positions))
    return min(max(1, values // p_block), triton_next_power_of_2(channels)), p_block


def _dense(x: Tensor) -> Tensor:
    if x.numel() >= INDEX_LIMIT:
        raise ValueError(f"the fused NeuNorm kernels index in 32 bits: {x.numel()} elements >= 2^31")
    return x if _time_major_dense(x) else x.contiguous()


class _FusedNeuNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spikes: Tensor, u_scale: Tensor, norm) -> Tensor:  # type: ignore[override]
        forward_kernel = _kernels()[0]
        spikes = _dense(spikes)
        steps, batch, channels, height, width = spikes.shape
        positions = height * width
        x = norm.states(spikes).reshape(steps * batch, positions).contiguous()  # [T*B, H*W], fp32
        u = u_scale.detach().reshape(channels, positions).contiguous()
        y = torch.empty_like(spikes)
        f_block, p_block = tile_shape(channels, positions)
        grid = (steps * batch, -(-channels // f_block), -(-positions // p_block))
        forward_kernel[grid](spikes, u, x, y, batch, channels, positions, width, *spikes.stride(),
                             F_BLOCK=f_block, P_BLOCK=p_block, **_NO_FMA)
        ctx.save_for_backward(x, u)
        ctx.layout = spikes.stride()  # the spikes' gradient comes out in their layout (the LIF kernel's)
        ctx.geometry = (steps, batch, channels, height, width)
        ctx.constants = (norm.k_tau2, (1.0 - norm.k_tau2) / (channels * channels), u_scale.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        _, channel_dot, backward_kernel = _kernels()
        x, u = ctx.saved_tensors
        k_tau2, v_over_f, u_dtype = ctx.constants
        steps, batch, channels, height, width = ctx.geometry
        positions = height * width
        g = grad_out.to(torch.float32)
        if g.stride() != ctx.layout:  # expanded (a sum's gradient), or another layout: one copy, into the spikes'
            g = torch.empty_strided(g.shape, ctx.layout, device=g.device, dtype=torch.float32).copy_(g)
        strides = g.stride()  # (s_t, s_b, s_f, s_h, s_w)
        u_grad = ctx.needs_input_grad[1]
        f_block, p_block = tile_shape(channels, positions)
        f_blocks = -(-channels // f_block)
        dot = torch.empty(steps * batch, positions, device=g.device, dtype=torch.float32)
        channel_dot[(steps * batch, -(-positions // p_block))](g, u, dot, batch, channels, positions, width, *strides,
                                                               F_BLOCKS=f_blocks, F_BLOCK=f_block, P_BLOCK=p_block,
                                                               **_NO_FMA)
        # d loss / d x[t] = -(sum_f g U)[t] + k_tau2 * d loss / d x[t+1]: the reverse recurrence, on [B, H*W]
        dot = dot.view(steps, batch, positions)
        grad_x = torch.empty_like(dot)
        carry = torch.zeros_like(dot[0])
        for t in range(steps - 1, -1, -1):
            carry = k_tau2 * carry - dot[t]
            grad_x[t] = carry
        grad_spikes = torch.empty_like(g)
        shares = torch.empty(batch, channels, positions, device=g.device, dtype=torch.float32) if u_grad else x
        f_block, p_block = tile_shape(channels, positions, values=1024)
        backward_kernel[(batch, -(-channels // f_block), -(-positions // p_block))](
            g, x, grad_x, grad_spikes, shares, v_over_f, batch, channels, positions, width, *strides, T=steps,
            U_GRAD=u_grad, F_BLOCK=f_block, P_BLOCK=p_block, **_NO_FMA)
        grad_u = (-shares.sum(dim=0)).view(channels, height, width).to(u_dtype) if u_grad else None
        return grad_spikes, grad_u, None


def fused_neunorm(spikes: Tensor, norm) -> Tensor:
    """``norm(spikes)`` (:class:`snncompile.layers.NeuNorm`, fp32 spikes ``[T, B, F, H, W]``, as the LIF
    before it writes them) with the full-size work in the kernels above: the same output bits, gradients to
    fp32 summation order. Other dtypes run ``norm`` itself (its type promotion is not the kernels')."""
    if spikes.dtype != torch.float32 or norm.u_scale.dtype != torch.float32 or spikes.dim() != 5:
        return norm(spikes)
    return _FusedNeuNorm.apply(spikes, norm.u_scale, norm)
