r"""The explicitly iterative LIF neuron of Wu et al. (AAAI 2019), as pure functions.

Per neuron, step t -> t+1 (PAPER.md §1)::

    u[t+1] = k_tau1 * u[t] * (1 - o[t]) + I[t+1]
    o[t+1] = H(u[t+1] - V_th)            H(x) = 1 if x > 0 else 0   (fires on strict '>')

with u[0] = o[0] = 0. The reset is hard (to zero) through the (1 - o[t]) factor of the *next* step,
and the input current is not decayed.

Backward uses the rectangular surrogate of width ``a``::

    dH/du ~= (1 / a) * 1[|u - V_th| < a / 2]

and the gradient flows through the reset gate (o[t] is not detached in the leak term).

The spike's forward is the plain comparison ``(u > v_th).to(u.dtype)``. The surrogate is attached
only when autograd is recording, so an exported or inference graph contains a ``Greater`` and a
``Cast`` and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "LIFParams",
    "spike",
    "rectangular_surrogate",
    "lif_step",
    "lif_scan",
    "LIF",
]


class LIFParams:
    """Neuron constants shared by every LIF layer of a network.

    Args:
        v_th: firing threshold V_th.
        k_tau1: leak factor of the membrane (0 < k_tau1 <= 1).
        a: width of the rectangular surrogate window.
    """

    __slots__ = ("v_th", "k_tau1", "a")

    def __init__(self, v_th: float = 0.5, k_tau1: float = 0.2, a: float = 1.0):
        self.v_th = float(v_th)
        self.k_tau1 = float(k_tau1)
        self.a = float(a)

    def __repr__(self) -> str:
        return f"LIFParams(v_th={self.v_th}, k_tau1={self.k_tau1}, a={self.a})"


def rectangular_surrogate(u: Tensor, v_th: float, a: float) -> Tensor:
    """The surrogate derivative dH/du = (1/a) * 1[|u - v_th| < a/2], same shape as ``u``."""
    return ((u - v_th).abs() < a / 2).to(u.dtype) / a


class _SpikeWithSurrogate(torch.autograd.Function):
    """Heaviside forward, rectangular surrogate backward. Used only while autograd records."""

    @staticmethod
    def forward(ctx, u: Tensor, v_th: float, a: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        ctx.v_th = v_th
        ctx.a = a
        return (u > v_th).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        return grad_out * rectangular_surrogate(u, ctx.v_th, ctx.a), None, None


def spike(u: Tensor, v_th: float, a: float) -> Tensor:
    """o = H(u - v_th) as 0/1 in ``u``'s dtype; backward is the rectangular surrogate.

    Args:
        u: membrane potential, any shape.
        v_th: threshold (strict '>').
        a: surrogate width.
    """
    if torch.is_grad_enabled() and u.requires_grad:
        return _SpikeWithSurrogate.apply(u, v_th, a)
    return (u > v_th).to(u.dtype)


def lif_step(u: Tensor | None, o: Tensor | None, current: Tensor, p: LIFParams) -> tuple[Tensor, Tensor]:
    """One LIF step: returns (u[t+1], o[t+1]) from (u[t], o[t], I[t+1]); all tensors [B, ...].

    ``u`` and ``o`` None stand for the zero initial state: then u[1] = I[1], since the leak term
    k_tau1 * 0 * (1 - 0) is exactly zero (a current of -0.0 keeps its sign, spikes are the same either
    way). An unrolled graph so saves the first step's four full-size multiply/subtract/add ops."""
    if u is not None:
        u_next = p.k_tau1 * u * (1.0 - o) + current
    elif torch.is_grad_enabled() and current.requires_grad:
        # a tensor of its own while autograd records: the spike keeps u for its surrogate, and a view
        # of a layer-major current would keep the whole [T*B, ...] conv output alive until backward
        u_next = current.clone()
    else:
        u_next = current
    return u_next, spike(u_next, p.v_th, p.a)


def lif_scan(currents: Tensor, p: LIFParams, return_membrane: bool = False):
    """Run the LIF recurrence over time.

    Args:
        currents: input current I, ``[T, B, ...]`` (time-first).
        p: neuron constants.
        return_membrane: also return the membrane potentials.

    Returns:
        spikes ``[T, B, ...]`` (0/1 in the currents' dtype), and with ``return_membrane`` the
        membrane potentials ``[T, B, ...]`` as a second value.
    """
    u = o = None  # the zero initial state
    spikes, membranes = [], []
    for current in currents.unbind(0):  # unbind: one gradient stack in backward, not T scatters
        u, o = lif_step(u, o, current, p)
        spikes.append(o)
        membranes.append(u)
    out = torch.stack(spikes)
    return (out, torch.stack(membranes)) if return_membrane else out


class LIF(nn.Module):
    """Thin module over :func:`lif_step` / :func:`lif_scan` (no parameters, no hidden state)."""

    def __init__(self, params: LIFParams):
        super().__init__()
        self.params = params

    def step(self, u: Tensor, o: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        """One step on ``[B, ...]`` tensors; see :func:`lif_step`."""
        return lif_step(u, o, current, self.params)

    def forward(self, currents: Tensor) -> Tensor:
        """``[T, B, ...]`` currents -> ``[T, B, ...]`` spikes."""
        return lif_scan(currents, self.params)

    def extra_repr(self) -> str:
        p = self.params
        return f"v_th={p.v_th}, k_tau1={p.k_tau1}, a={p.a}"
