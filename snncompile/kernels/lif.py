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
bytes per neuron-step) instead of the fp32 u (4), and backward first recomputes u with the forward
kernel (spikes not written): memory traded for one read of I and a write and read of u.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fused_kernels_available", "fused_lif", "fused_lif_inference"]

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
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def lif_forward(i_ptr, o_ptr, u_ptr, n, k_tau1, v_th, T: tl.constexpr, SAVE_U: tl.constexpr,
                    STORE_O: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        u = tl.zeros((BLOCK,), dtype=tl.float32)
        o = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in tl.static_range(T):
            cur = tl.load(i_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
            u = k_tau1 * u * (1.0 - o) + cur
            o = (u > v_th).to(tl.float32)
            if STORE_O:
                tl.store(o_ptr + t * n + offs, o, mask=mask)
            if SAVE_U:
                tl.store(u_ptr + t * n + offs, u, mask=mask)

    @triton.jit
    def lif_backward(u_ptr, go_ptr, gi_ptr, n, k_tau1, v_th, half_a, inv_a, T: tl.constexpr, GRAD_BF16: tl.constexpr,
                     BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g_next = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(T):
            t = T - 1 - s
            u = tl.load(u_ptr + t * n + offs, mask=mask, other=0.0)
            g_o = tl.load(go_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
            o = (u > v_th).to(tl.float32)
            sg = (tl.abs(u - v_th) < half_a).to(tl.float32) * inv_a
            g_o = g_o - k_tau1 * u * g_next
            g_u = g_o * sg + k_tau1 * (1.0 - o) * g_next
            if GRAD_BF16:
                # bf16 = the top half of the fp32 bits, rounded to nearest even by integer arithmetic (what
                # torch's cast does; a bf16 store's own rounding is the backend's: Triton's interpreter truncates)
                bits = g_u.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                tl.store(gi_ptr + t * n + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
            else:
                tl.store(gi_ptr + t * n + offs, g_u, mask=mask)
            g_next = g_u

    _KERNELS = (lif_forward, lif_backward)
    return _KERNELS


_BLOCK = 1024


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


def _dense(x: Tensor) -> Tensor:
    return x if _time_major_dense(x) else x.contiguous()


def _forward(currents: Tensor, k_tau1: float, v_th: float, out_dtype: torch.dtype, membrane: bool,
             spikes: bool = True):
    """Launch the forward kernel: (spikes in ``out_dtype`` or None, fp32 membrane or None), both shaped
    and laid out like ``currents`` (a channels_last input stays channels_last: no copy either way)."""
    fwd, _ = _kernels()
    steps = currents.shape[0]
    cur = _dense(currents.detach())
    n = cur.numel() // steps
    # the membrane is fp32 whatever the spikes' dtype; an output not written gets the other's pointer
    mem = torch.empty_like(cur, dtype=torch.float32) if membrane else None
    out = torch.empty_like(cur, dtype=out_dtype) if spikes else mem  # empty_like keeps a dense layout's strides
    fwd[_grid(n)](cur, out, mem if membrane else out, n, float(k_tau1), float(v_th), T=steps, SAVE_U=membrane,
                  STORE_O=spikes, BLOCK=_BLOCK)
    return (out if spikes else None), mem


class _FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, currents: Tensor, k_tau1: float, v_th: float, a: float, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        save = ctx.needs_input_grad[0]
        # Currents narrower than the fp32 membrane (bf16/fp16 under autocast) are saved instead of it, and
        # backward recomputes the membrane from them with this same kernel (same bits): half the bytes
        # kept per neuron-step. For fp32 currents both cost the same and the membrane spares backward a pass.
        recompute = save and currents.element_size() < 4
        spikes, membrane = _forward(currents, k_tau1, v_th, out_dtype, membrane=save and not recompute)
        if save:
            ctx.save_for_backward(currents if recompute else membrane)
        ctx.recompute = recompute
        ctx.constants = (k_tau1, v_th, a, currents.dtype)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: Tensor):  # type: ignore[override]
        _, bwd = _kernels()
        (saved,) = ctx.saved_tensors
        k_tau1, v_th, a, dtype = ctx.constants
        membrane = _forward(saved, k_tau1, v_th, dtype, membrane=True, spikes=False)[1] if ctx.recompute else saved
        steps = membrane.shape[0]
        n = membrane.numel() // steps
        grad_out = grad_spikes
        if grad_out.stride() != membrane.stride():  # the kernel pairs elements by memory position
            grad_out = torch.empty_like(membrane, dtype=grad_spikes.dtype).copy_(grad_spikes)
        if dtype == torch.bfloat16:
            # written in bf16 by the kernel, rounded to nearest even: no fp32 gradient written, read and cast
            grad_in = torch.empty_like(membrane, dtype=torch.bfloat16)
            bwd[_grid(n)](membrane, grad_out, grad_in.view(torch.int16), n, k_tau1, v_th, a / 2, 1.0 / a, T=steps,
                          GRAD_BF16=True, BLOCK=_BLOCK)
            return grad_in, None, None, None, None
        # fp32, cast by torch for fp16. A recomputed membrane is ours to overwrite: each program reads u[t]
        # of its neurons before it writes g_I[t] there, so the gradient takes its place and backward
        # allocates one fp32 buffer, not two.
        grad_in = membrane if ctx.recompute else torch.empty_like(membrane)
        bwd[_grid(n)](membrane, grad_out, grad_in, n, k_tau1, v_th, a / 2, 1.0 / a, T=steps, GRAD_BF16=False,
                      BLOCK=_BLOCK)
        return grad_in.to(dtype), None, None, None, None


def fused_lif(currents: Tensor, k_tau1: float, v_th: float, a: float, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Spikes ``[T, B, ...]`` (0/1 in ``out_dtype``) of the LIF recurrence over currents ``[T, B, ...]``,
    fused. Under autocast, spikes in the autocast dtype are what the next conv consumes as is (no cast
    kernel, half the bytes written), and what :mod:`snncompile.memory` can then save as uint8."""
    return _FusedLIF.apply(currents, float(k_tau1), float(v_th), float(a), out_dtype)


def fused_lif_inference(currents: Tensor, k_tau1: float, v_th: float, membrane: bool = False):
    """Inference only (no autograd): spikes ``[T, B, ...]`` fp32 and, with ``membrane``, the membrane
    potentials ``[T, B, ...]`` fp32 as a second value (the per-layer outputs verify compares)."""
    spikes, mem = _forward(currents, k_tau1, v_th, torch.float32, membrane)
    return (spikes, mem) if membrane else spikes
