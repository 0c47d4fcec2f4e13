r"""The LIF scan over T as one Triton kernel forward and one backward.

Forward, per neuron n (one program handles BLOCK neurons, looping over t in registers)::

    u[t] = k_tau1 * u[t-1] * (1 - o[t-1]) + I[t];   o[t] = (u[t] > V_th)

writing the spikes (and, when autograd records, the membrane: the only thing backward needs, since
o[t] = u[t] > V_th is recomputed from it). Backward runs the recurrence in reverse::

    g_o'   = g_o[t] - k_tau1 * u[t] * g_u[t+1]          (through the reset gate o[t] of u[t+1])
    g_u[t] = g_o' * sg(u[t]) + k_tau1 * (1 - o[t]) * g_u[t+1]
    g_I[t] = g_u[t]                                       sg(u) = 1[|u - V_th| < a/2] / a

so a layer's whole LIF costs one read of I and one write of o forward, one read of u and g_o and one
write of g_I backward, instead of ~6 elementwise kernels per step. Arithmetic is fp32 whatever the
input dtype (membrane state stays fp32 under bf16 autocast). When I is bf16/fp16, autograd keeps I (2
bytes per neuron-step) instead of the fp32 u (4), and the backward kernel first reruns the forward
recurrence from I, keeping the T membranes of its neurons in registers: backward reads I (2 bytes) where
it would read u (4), and no u is ever written.

A LIF whose spikes go straight into a power-of-two average pool runs as :func:`fused_lif_pool`: the same
recurrence for the K*K neurons of each pooled output, writing only their mean; backward feeds each of
them g_o[t] = g_pooled[t] / K^2 (avg_pool2d's backward). The kernels live in ``_triton.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fused_kernels_available", "fused_lif", "fused_lif_inference", "fused_lif_pool", "INDEX_LIMIT",
           "currents_gradient", "pooled_currents_gradient", "triton_next_power_of_2"]

_KERNELS = None


def fused_kernels_available() -> bool:
    """Triton importable (GPU runs need CUDA; tests run the same kernels in Triton's interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    """Compile lazily: importing snncompile never imports Triton."""
    global _KERNELS
    if _KERNELS is None:
        from . import _triton

        _KERNELS = (_triton.lif_forward, _triton.lif_backward, _triton.lif_pool_forward, _triton.lif_pool_backward)
    return _KERNELS


_BLOCK = 1024

# Every launch compiles without FMA contraction. With it, the compiler may fuse a product into the
# following add (one rounding instead of two) or not, per kernel and per constexpr: on an H200 the LIF +
# 4x4 pool backward and the LIF backward then the pool's disagreed in the last bits of the gradient. Without
# it each kernel performs exactly the pure-torch path's operations, each rounded once, on every GPU and in
# Triton's interpreter alike. (The forward's bits do not change: its one fusable product, k_tau1 * u times
# the 0/1 reset gate, is exact.) The kernels are bound by memory traffic, not by these few instructions.
_NO_FMA = {"enable_fp_fusion": False}


def _grid(n: int):
    return ((n + _BLOCK - 1) // _BLOCK,)


def _time_major_dense(x: Tensor) -> bool:
    """True when ``x`` ``[T, ...]`` is stored as T dense blocks one after another, whatever the layout
    inside a block (contiguous, or a channels_last ``[T, B, C, H, W]`` from channels_last convolutions):
    the kernels index memory as ``t * N + i`` and only need every tensor they pair in the same layout."""
    if x.is_contiguous():
        return True
    step = x[0]
    return (x.dim() == 5 and x.stride(0) == step.numel()
            and step.is_contiguous(memory_format=torch.channels_last))


# The kernels index t * N + i with 32-bit integers: a tensor of 2^31 or more elements (8 GiB of fp32
# currents, e.g. a 128x64x64 map at T = 8 and batch 512) would read and write wrong memory.
INDEX_LIMIT = 2**31


def _dense(x: Tensor) -> Tensor:
    """``x`` in a layout the kernels index (copied if needed); a ValueError past their 32-bit indexing."""
    if x.numel() >= INDEX_LIMIT:
        raise ValueError(f"the fused LIF kernels index in 32 bits: {x.numel()} elements >= 2^31 "
                         "(use the pure-torch scan, as SpikingNetwork does for such layers)")
    return x if _time_major_dense(x) else x.contiguous()


def _channel_geometry(x: Tensor) -> tuple[int, int]:
    """(chan_div, channels): step index i of ``x`` ``[T, B, C, ...]`` belongs to channel
    ``(i // chan_div) % channels``, in its per-step layout (channels_last: the channel varies fastest)."""
    channels = x.shape[2]
    return (1 if _is_channels_last(x) else x[0, 0, 0].numel()), channels


def _check_bias(bias: Tensor | None, currents: Tensor) -> None:
    """A bias needs currents ``[T, B, C, ...]`` and one value per channel C."""
    if bias is not None and (currents.dim() < 3 or bias.dim() != 1 or bias.numel() != currents.shape[2]):
        raise ValueError(f"bias of shape {tuple(bias.shape)} for currents {tuple(currents.shape)}: "
                         f"one value per channel (dimension 2) expected")


def _forward(currents: Tensor, k_tau1: float, v_th: float, out_dtype: torch.dtype, membrane: bool,
             bias: Tensor | None = None):
    """Launch the forward kernel: (spikes in ``out_dtype``, fp32 membrane or None), both shaped and laid
    out like ``currents`` (a channels_last input stays channels_last: no copy either way). ``bias``
    ``[C]``: added to every step's currents of channel c (dimension 2) as they are read, in fp32."""
    fwd = _kernels()[0]
    steps = currents.shape[0]
    cur = _dense(currents.detach())
    n = cur.numel() // steps
    chan_div, channels = _channel_geometry(cur) if bias is not None else (1, 1)
    mem = torch.empty_like(cur, dtype=torch.float32) if membrane else None  # fp32 whatever the spikes' dtype
    out = torch.empty_like(cur, dtype=out_dtype)  # empty_like keeps a dense layout's strides
    fwd[_grid(n)](cur, out, out if mem is None else mem, cur if bias is None else bias.detach().contiguous(), n,
                  chan_div, channels, float(k_tau1), float(v_th), T=steps, SAVE_U=membrane,
                  HAS_BIAS=bias is not None, BLOCK=_BLOCK, **_NO_FMA)
    return out, mem


def recompute_block(steps: int, window: int = 1) -> int:
    """Neurons per program of a backward kernel that recomputes the membrane (``RECOMPUTE``), in pooled
    outputs of ``window`` neurons each: the T membranes of a thread's neurons stay in registers, 32 per
    thread at 4 warps (sm_90, Triton 3.6: 80 registers at T = 8, 156 at T = 16, no spills; 1024 neurons at
    T = 8 took 168 and spilled)."""
    return max(1, 4096 // (triton_next_power_of_2(steps) * window))


RECOMPUTE_MAX_T = 32


def recomputes_in_registers(steps: int) -> bool:
    """Whether the backward kernels rerun the recurrence for ``steps`` in registers. Past 32 (T rounded up
    to a power of two) a program holds fewer neurons than its 128 threads, the T rows spread across warps
    and the compiled code moves them through shared memory with a barrier per row (sm_90 at 64: 255
    barriers, 101 s to compile): there autograd keeps the fp32 membrane instead."""
    return triton_next_power_of_2(steps) <= RECOMPUTE_MAX_T


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _bias_sums(bias: Tensor | None, n: int, like: Tensor) -> Tensor | None:
    """The fp32 buffer ``[n]`` a backward kernel writes each neuron's (or pooled output's) gradient summed
    over T into, when there is a bias whose gradient is wanted; else None."""
    return torch.empty(n, device=like.device, dtype=torch.float32) if bias is not None else None


def _bias_gradient(sums: Tensor | None, channels: int, chan_div: int, bias: Tensor | None) -> Tensor | None:
    """d loss / d bias ``[C]`` from a backward kernel's per-neuron sums over T (``sums[i]`` of channel
    ``(i // chan_div) % channels``): the rest of the sum over every dimension but the channel, in fp32."""
    if sums is None:
        return None
    return sums.view(-1, channels, chan_div).sum(dim=(0, 2)).to(bias.dtype)


class _FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, currents: Tensor, bias: Tensor | None, k_tau1: float, v_th: float, a: float,  # type: ignore[override]
                out_dtype: torch.dtype) -> Tensor:
        save = any(ctx.needs_input_grad[:2])
        # Currents narrower than the fp32 membrane (bf16/fp16 under autocast) are saved instead of it, and
        # the backward kernel recomputes the membrane from them (same bits) in registers: half the bytes
        # kept per neuron-step, and no membrane written or read (up to T = 32: recomputes_in_registers).
        # For fp32 currents both cost the same to keep and the membrane spares backward the recurrence.
        recompute = save and currents.element_size() < 4 and recomputes_in_registers(currents.shape[0])
        spikes, membrane = _forward(currents, k_tau1, v_th, out_dtype, membrane=save and not recompute, bias=bias)
        if save:
            ctx.save_for_backward(currents if recompute else membrane, bias)
        ctx.recompute = recompute
        ctx.constants = (k_tau1, v_th, a, currents.dtype)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: Tensor):  # type: ignore[override]
        saved, bias = ctx.saved_tensors
        k_tau1, v_th, a, dtype = ctx.constants
        grad_in, bias_grad = currents_gradient(saved, grad_spikes, k_tau1, v_th, a, dtype == torch.bfloat16, bias,
                                               bias_grad=ctx.needs_input_grad[1], recompute=ctx.recompute)
        return grad_in.to(dtype), bias_grad, None, None, None, None


def currents_gradient(saved: Tensor, grad_spikes: Tensor, k_tau1: float, v_th: float, a: float, bf16: bool,
                      bias: Tensor | None = None, bias_grad: bool = False, recompute: bool = False,
                      overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
    """The backward kernel over ``saved`` ``[T, B, ...]``: the fp32 membrane, or with ``recompute`` the
    currents it came from (plus ``bias`` ``[C]`` per channel, as the forward added it), from which the
    kernel recomputes it. Returns (d loss / d currents, shaped and laid out like ``saved``; bf16 with
    ``bf16``, else fp32) and with ``bias_grad`` the bias's gradient (the currents' summed over every
    dimension but the channel, in fp32), else None. ``overwrite``: the fp32 membrane is the caller's to
    overwrite, and an fp32 gradient takes its place: each program reads u[t] of its neurons before it
    writes g_I[t] there, so backward allocates one fp32 buffer, not two."""
    bwd = _kernels()[1]
    saved = _dense(saved.detach())
    steps = saved.shape[0]
    n = saved.numel() // steps
    sums = _bias_sums(bias if bias_grad else None, n, saved)
    grad_out = grad_spikes
    if grad_out.stride() != saved.stride():  # the kernel pairs elements by memory position
        grad_out = torch.empty_like(saved, dtype=grad_spikes.dtype).copy_(grad_spikes)
    # bf16: written in bf16 by the kernel, rounded to nearest even: no fp32 gradient written, read and cast
    grad_in = (torch.empty_like(saved, dtype=torch.bfloat16) if bf16
               else saved if overwrite and not recompute else torch.empty_like(saved, dtype=torch.float32))
    add_bias = recompute and bias is not None
    chan_div, channels = _channel_geometry(saved) if sums is not None or add_bias else (1, 1)
    block = recompute_block(steps) if recompute else _BLOCK
    bias_in = bias.detach().contiguous() if add_bias else saved  # the kernel indexes it as b_ptr + channel
    bwd[((n + block - 1) // block,)](saved, grad_out, grad_in.view(torch.int16) if bf16 else grad_in,
                                     saved if sums is None else sums, bias_in, n, chan_div, channels, k_tau1, v_th,
                                     a / 2, 1.0 / a, T=steps,
                                     T_POW2=triton_next_power_of_2(steps), GRAD_BF16=bf16, SUM_T=sums is not None,
                                     RECOMPUTE=recompute, HAS_BIAS=add_bias, BLOCK=block, **_NO_FMA)
    return grad_in, _bias_gradient(sums, channels, chan_div, bias)


def fused_lif(currents: Tensor, k_tau1: float, v_th: float, a: float, out_dtype: torch.dtype = torch.float32,
              bias: Tensor | None = None) -> Tensor:
    """Spikes ``[T, B, ...]`` (0/1 in ``out_dtype``) of the LIF recurrence over currents ``[T, B, ...]``,
    fused. Under autocast, spikes in the autocast dtype are what the next conv consumes as is (no cast
    kernel, half the bytes written), and what :mod:`snncompile.memory` can then save as uint8.
    ``bias`` ``[C]`` (the conv/linear's, which then runs without it): added per channel (dimension 2) in
    fp32 as the kernel reads the currents, sparing the full-size read and write of a separate bias add;
    its gradient is the currents' summed over all other dimensions."""
    _check_bias(bias, currents)
    currents, bias = _outside_autograd(currents, bias)
    return _FusedLIF.apply(currents, bias, float(k_tau1), float(v_th), float(a), out_dtype)


def _outside_autograd(currents: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Under ``no_grad``/``inference_mode``, the inputs detached. A bias Parameter still requires grad
    there, and ``Function.apply`` sets ``needs_input_grad`` from that alone (forward cannot ask: grad mode
    is always off inside it): inference would write a full-size fp32 membrane no backward ever reads."""
    if torch.is_grad_enabled():
        return currents, bias
    return currents.detach(), None if bias is None else bias.detach()


def _pool_geometry(cur: Tensor, pool: int):
    """(pooled shape ``[T, N, C, H/p, W/p]``, its strides in the currents' per-step layout, outputs per step)."""
    steps, batch, channels, height, width = cur.shape
    h_out, w_out = height // pool, width // pool
    n_out = batch * channels * h_out * w_out
    if _is_channels_last(cur):  # per step [N, C, H, W] with channels last, like the convolution that made it
        step_strides = (h_out * w_out * channels, 1, w_out * channels, channels)
    else:
        step_strides = (channels * h_out * w_out, h_out * w_out, w_out, 1)
    return (steps, batch, channels, h_out, w_out), (n_out, *step_strides), n_out


class _FusedLIFPool(torch.autograd.Function):
    """The LIF then ``avg_pool2d(pool)``: forward writes only the pooled spikes; backward spreads each pooled
    gradient / pool^2 over its window inside the reverse recurrence (avg_pool2d's backward, fused). What it
    keeps for backward follows :class:`_FusedLIF`: 16-bit currents (membrane recomputed) or the fp32 membrane."""

    @staticmethod
    def forward(ctx, currents: Tensor, bias: Tensor | None, k_tau1: float, v_th: float, a: float,  # type: ignore[override]
                pool: int, out_dtype: torch.dtype) -> Tensor:
        fwd = _kernels()[2]
        cur = _dense(currents.detach())
        shape, strides, n_out = _pool_geometry(cur, pool)
        out = torch.empty(shape[0] * n_out, device=cur.device, dtype=out_dtype).as_strided(shape, strides)
        save = any(ctx.needs_input_grad[:2])
        recompute = save and cur.element_size() < 4 and recomputes_in_registers(cur.shape[0])
        membrane = torch.empty_like(cur, dtype=torch.float32) if save and not recompute else None
        block = pool_block(pool)
        last = _is_channels_last(cur)
        fwd[((n_out + block - 1) // block,)](cur, out, membrane if membrane is not None else out,
                                              cur if bias is None else bias.detach().contiguous(), n_out, shape[2],
                                              shape[3], shape[4], *cur.stride(), *out.stride(), float(k_tau1),
                                              float(v_th), T=shape[0], K=pool, SAVE_U=membrane is not None,
                                              CHANNELS_LAST=last, HAS_BIAS=bias is not None,
                                              BLOCK=block, num_warps=pool_forward_warps(last), **_NO_FMA)
        if save:
            ctx.save_for_backward(cur if recompute else membrane, bias)
        ctx.recompute = recompute
        ctx.constants = (k_tau1, v_th, a, pool, currents.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_pooled: Tensor):  # type: ignore[override]
        saved, bias = ctx.saved_tensors
        k_tau1, v_th, a, pool, dtype = ctx.constants
        grad_in, bias_grad = pooled_currents_gradient(saved, grad_pooled, pool, k_tau1, v_th, a,
                                                      dtype == torch.bfloat16, bias,
                                                      bias_grad=ctx.needs_input_grad[1], recompute=ctx.recompute)
        return grad_in.to(dtype), bias_grad, None, None, None, None, None


def pooled_currents_gradient(saved: Tensor, grad_pooled: Tensor, pool: int, k_tau1: float, v_th: float, a: float,
                             bf16: bool, bias: Tensor | None = None, bias_grad: bool = False,
                             recompute: bool = False) -> tuple[Tensor, Tensor | None]:
    """The pooled backward kernel: as :func:`currents_gradient` over ``saved`` ``[T, N, C, H, W]`` (the fp32
    membrane, or with ``recompute`` the currents), from ``grad_pooled`` ``[T, N, C, H/pool, W/pool]`` of any
    strides."""
    bwd = _kernels()[3]
    shape, _, n_out = _pool_geometry(saved, pool)
    # neurons in rows/columns the pool's floor drops get no gradient: zeros, written only where they exist
    dropped = saved.shape[3] % pool or saved.shape[4] % pool
    allocate = torch.zeros_like if dropped else torch.empty_like
    grad_in = allocate(saved, dtype=torch.bfloat16 if bf16 else torch.float32)
    block = recompute_block(shape[0], pool * pool) if recompute else pool_block(pool)
    last = _is_channels_last(saved)
    sums = _bias_sums(bias if bias_grad else None, n_out, saved)
    add_bias = recompute and bias is not None
    bias_in = bias.detach().contiguous() if add_bias else saved  # the kernel indexes it as b_ptr + channel
    bwd[((n_out + block - 1) // block,)](saved, grad_pooled, grad_in.view(torch.int16) if bf16 else grad_in,
                                          saved if sums is None else sums, bias_in, n_out, shape[2], shape[3],
                                          shape[4], *saved.stride(), *grad_pooled.stride(),
                                          float(k_tau1), float(v_th), a / 2, 1.0 / a, T=shape[0],
                                          T_POW2=triton_next_power_of_2(shape[0]), K=pool, GRAD_BF16=bf16,
                                          CHANNELS_LAST=last, SUM_T=sums is not None, RECOMPUTE=recompute,
                                          HAS_BIAS=add_bias, BLOCK=block, **_NO_FMA)
    # the sums follow pool_windows' order of the pooled outputs: c fastest in channels_last, wo in NCHW
    return grad_in, _bias_gradient(sums, shape[2], 1 if last else shape[3] * shape[4], bias)


def fused_lif_pool(currents: Tensor, k_tau1: float, v_th: float, a: float, pool: int,
                   out_dtype: torch.dtype = torch.float32, bias: Tensor | None = None) -> Tensor:
    """The LIF over currents ``[T, N, C, H, W]`` followed by ``avg_pool2d(pool)`` (floor, no padding), fused
    -> ``[T, N, C, H // pool, W // pool]`` in ``out_dtype``, laid out like the currents (channels_last stays
    channels_last). The spikes themselves are never written: one read of the currents and a write of a
    pool^2 times smaller tensor, where the LIF then the pool write the spikes and read them back (and, in
    training, write and read their gradient). Neurons in rows/columns the floor drops feed nothing: the
    kernels skip them and their gradient is zero. ``pool`` must be a power of two: the mean of 0/1 spikes
    is then exact, so the result and the gradients are those of the LIF then the pool. ``bias``: as in
    :func:`fused_lif`."""
    if pool < 1 or pool & (pool - 1):
        raise ValueError(f"fused LIF + pool needs a power-of-two window, got {pool}")
    _check_bias(bias, currents)
    currents, bias = _outside_autograd(currents, bias)
    return _FusedLIFPool.apply(currents, bias, float(k_tau1), float(v_th), float(a), int(pool), out_dtype)


def pool_block(pool: int) -> int:
    """Pooled outputs per program of the fused LIF + pool kernels: 1024 neurons (their windows) whatever
    the pool, which holds registers per thread at ptxas's count for 2x2 (56-80 on sm_90, no spills); a
    fixed 256 outputs gave 4x4 pools 208-221, a quarter of the resident warps. At least one: a window
    past 32x32 is a program's alone."""
    return max(1, 1024 // (pool * pool))


def pool_forward_warps(channels_last: bool) -> int:
    """Warps per program of the fused LIF + pool forward. Channels-last: one, so that a window's K*K
    neurons stay in one warp. There Triton lays the ``[BLOCK, K*K]`` tile out with the contiguous channels
    along the lanes (16-byte loads), and with Triton's default of four warps and ``pool_block``'s rows, one
    warp's lanes already span the rows: the other warps went along the window axis. The pooling sum then
    crossed warps through shared memory at every step (sm_90 code of the bf16 2x2 kernel: 83 barriers
    against 17 in NCHW, none with one warp; 80-128 registers, no spills, in every variant). On an H200 that
    kernel took 830-900 us per call, 6.75x its NCHW twin on bench-nmnist (README, "Third session"). NCHW: Triton's default."""
    return 1 if channels_last else 4


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 5 and not x.is_contiguous() and x[0].is_contiguous(memory_format=torch.channels_last)


def fused_lif_inference(currents: Tensor, k_tau1: float, v_th: float, membrane: bool = False):
    """Inference only (no autograd): spikes ``[T, B, ...]`` fp32 and, with ``membrane``, the membrane
    potentials ``[T, B, ...]`` fp32 as a second value (the per-layer outputs verify compares)."""
    spikes, mem = _forward(currents, k_tau1, v_th, torch.float32, membrane)
    return (spikes, mem) if membrane else spikes
