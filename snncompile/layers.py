r"""NeuNorm and the voting decoder (PAPER.md §2-§3).

NeuNorm keeps one auxiliary neuron per spatial position (i, j) of a layer with F channels, shared
over the channels::

    x[t+1](i,j) = k_tau2 * x[t](i,j) + (v / F) * sum_f o_f[t+1](i,j),   k_tau2 + v * F = 1
               => v / F = (1 - k_tau2) / F**2
    y[t+1] = o[t+1] - U (.) x[t+1]                                      U learnable, [F, H, W]

with x[0] = 0 per sample. It uses no batch statistics, so training and inference compute the same
function and the recurrence exports unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NeuNorm", "neunorm_step", "voting_matrix", "Voting"]


def neunorm_step(x: Tensor, spikes: Tensor, u_scale: Tensor, k_tau2: float) -> tuple[Tensor, Tensor]:
    """One NeuNorm step.

    Args:
        x: auxiliary state x[t], ``[B, 1, H, W]``.
        spikes: o[t+1], ``[B, F, H, W]``.
        u_scale: the learnable U, ``[F, H, W]``.
        k_tau2: decay of the auxiliary neuron.

    Returns:
        (x[t+1] ``[B, 1, H, W]``, normalised output ``[B, F, H, W]``).
    """
    channels = spikes.shape[1]
    v_over_f = (1.0 - k_tau2) / (channels * channels)
    x_next = k_tau2 * x + v_over_f * spikes.sum(dim=1, keepdim=True)
    return x_next, spikes - u_scale * x_next


class NeuNorm(nn.Module):
    """Neuron normalisation after the LIF of a conv layer.

    Args:
        channels: F.
        height, width: spatial size of the maps it normalises.
        k_tau2: decay of the auxiliary neuron (PAPER.md: 0.9 default, unverified).
        u_init: the value every entry of U starts at (PAPER.md: unverified). The default 0 starts NeuNorm as
            the identity and lets it learn how much to subtract.
    """

    def __init__(self, channels: int, height: int, width: int, k_tau2: float = 0.9, u_init: float = 0.0):
        super().__init__()
        self.k_tau2 = float(k_tau2)
        self.u_scale = nn.Parameter(torch.full((channels, height, width), float(u_init)))

    def initial_state(self, spikes_t: Tensor) -> Tensor:
        """x[0] = 0 for a ``[B, F, H, W]`` step input -> ``[B, 1, H, W]``."""
        return torch.zeros_like(spikes_t[:, :1])

    def step(self, x: Tensor, spikes: Tensor) -> tuple[Tensor, Tensor]:
        """See :func:`neunorm_step`."""
        return neunorm_step(x, spikes, self.u_scale, self.k_tau2)

    def forward(self, spikes: Tensor) -> Tensor:
        """``[T, B, F, H, W]`` spikes -> ``[T, B, F, H, W]`` normalised maps, layer-major.

        The channel sums of all T steps in one reduction and the output in one broadcast; only the
        recurrence on x (F times smaller than the maps) loops over T. Every element goes through the
        same operations as in :func:`neunorm_step` (sums of 0/1 spikes are exact integers), so both
        forms give the same bits.
        """
        return spikes - self.u_scale * self.states(spikes)

    def states(self, spikes: Tensor) -> Tensor:
        """The auxiliary neurons' x[1..T] ``[T, B, 1, H, W]`` for ``[T, B, F, H, W]`` spikes: the channel sums
        in one reduction, then the recurrence over T (shared with the fused kernel's path, so both have
        these bits)."""
        channels = spikes.shape[2]
        v_over_f = (1.0 - self.k_tau2) / (channels * channels)
        drive = v_over_f * spikes.sum(dim=2, keepdim=True)  # [T, B, 1, H, W]
        x = torch.zeros_like(drive[0])
        states = []
        for drive_t in drive.unbind(0):
            x = self.k_tau2 * x + drive_t
            states.append(x)
        return torch.stack(states)

    def extra_repr(self) -> str:
        f, h, w = self.u_scale.shape
        return f"channels={f}, size=({h}, {w}), k_tau2={self.k_tau2}"


def voting_matrix(classes: int, group: int) -> Tensor:
    """Fixed ``[classes * group, classes]`` matrix: neuron j votes 1/group for class j // group."""
    v = torch.zeros(classes * group, classes)
    for c in range(classes):
        v[c * group : (c + 1) * group, c] = 1.0 / group
    return v


class Voting(nn.Module):
    """Average each class's group of output firing rates: ``[B, classes*G]`` -> ``[B, classes]``.

    The product with the fixed voting matrix (:func:`voting_matrix`) is computed as a sum over each
    class's G neurons followed by one division. On spike counts the sum is an exact integer, so the
    only rounding is that final division and every runtime gives the same bits. (A MatMul with the
    1/G matrix would not: ONNX Runtime, for one, folds a MatMul and a following scalar Div into one
    scaled GEMM.)
    """

    def __init__(self, classes: int, group: int):
        super().__init__()
        self.classes = classes
        self.group = group

    def forward(self, rates: Tensor) -> Tensor:
        return rates.unflatten(-1, (self.classes, self.group)).sum(-1) / self.group

    def from_counts(self, counts: Tensor, steps: int) -> Tensor:
        """Scores from output spike counts ``[B, classes*G]`` summed over ``steps``: group sum / (steps*G)."""
        return counts.unflatten(-1, (self.classes, self.group)).sum(-1) / (steps * self.group)

    def extra_repr(self) -> str:
        return f"classes={self.classes}, group={self.group}"
