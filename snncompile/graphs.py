"""The two exportable forms of a trained network, as torch modules with named outputs.

Both the ONNX exporter and the torch runner use these, so the reference a runtime is compared with
computes exactly the graph that was exported.

- :class:`UnrolledGraph`: input ``[T, B, ...]`` -> ``scores [B, classes]`` (+ ``rates [B, N]``, + per
  LIF layer ``<name>.spikes`` and ``<name>.membrane`` ``[T, B, ...]`` with ``layers``). T is unrolled
  statically in layer-major order: each conv/linear once on ``[T*B, ...]`` (``order='step'`` unrolls
  the paper's per-timestep loop instead: T separate convs per layer, the layout other tools export).
- :class:`StepGraph`: one timestep for streaming, every state explicit. Inputs ``input [B, ...]``,
  ``output_sum [B, N]`` and the states ``state.<cell>.<u|o|x>``; outputs ``scores``, the new
  ``output_sum`` and the new states (same names with ``next.`` instead of ``state.``). Starting from
  zeros, T calls give the unrolled model's scores exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .models import LIFCell, SpikingNetwork

__all__ = ["UnrolledGraph", "StepGraph"]


class UnrolledGraph(nn.Module):
    """The network over all T steps with stable output names (see :attr:`output_names`)."""

    def __init__(self, net: SpikingNetwork, rates: bool = False, layers: bool = False, order: str = "layer"):
        super().__init__()
        self.net = net
        self.rates = rates
        self.layers = layers
        self.order = order  # 'layer': convs on [T*B, ...] (default); 'step': per-timestep graph, for comparison

    @property
    def output_names(self) -> list[str]:
        names = ["scores"] + (["rates"] if self.rates else [])
        if self.layers:
            for lif in self.net.lif_names():
                names += [f"{lif}.spikes", f"{lif}.membrane"]
        return names

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x [T, B, C, H, W]`` (or ``[T, B, F]``) -> the outputs in :attr:`output_names` order: ``scores
        [B, classes]``, with ``rates`` ``rates [B, N]`` (N: the last layer's width, classes x the voting group),
        with ``layers`` each LIF layer's ``spikes`` and ``membrane``, ``[T, B, ...]`` as that layer's output."""
        record: dict | None = {} if self.layers else None
        outputs = self.net.forward_sequence(x, self.order, record)
        result = [self.net.decode(outputs)]
        if self.rates:
            result.append(outputs.sum(dim=0) / outputs.shape[0])
        if record is not None:
            for lif in self.net.lif_names():
                result += list(record[lif])
        return tuple(result)


class StepGraph(nn.Module):
    """One timestep with explicit state inputs and outputs (streaming inference)."""

    def __init__(self, net: SpikingNetwork, steps: int):
        super().__init__()
        self.net = net
        self.steps = steps

    @property
    def state_input_names(self) -> list[str]:
        return ["output_sum"] + [f"state.{n}" for n in self.net.state_names()]

    @property
    def input_names(self) -> list[str]:
        return ["input"] + self.state_input_names

    @property
    def output_names(self) -> list[str]:
        return ["scores", "next.output_sum"] + [f"next.{n}" for n in self.net.state_names()]

    def zero_states(self, x_t: Tensor) -> list[Tensor]:
        """Zero tensors for every state input, for a ``[B, ...]`` step input."""
        states = self.net.initial_states(x_t)
        with torch.no_grad():
            out, _ = self.net.step(x_t, states)  # only for the width of the last stage
        return [torch.zeros_like(out)] + [t for state in states for t in state]

    def forward(self, x_t: Tensor, output_sum: Tensor, *flat_states: Tensor) -> tuple[Tensor, ...]:
        """One step: ``x_t [B, C, H, W]`` (or ``[B, F]``), ``output_sum [B, N]`` and the states in
        :attr:`state_input_names` order (a LIF layer's ``u`` and ``o``, each ``[B, ...]`` as its output; a
        NeuNorm's ``x [B, 1, H, W]``) -> ``scores [B, classes]``, the new ``output_sum [B, N]`` and the new
        states, of the same shapes and order."""
        states, it = [], iter(flat_states)
        for cell in self.net.cells():
            states.append((next(it), next(it)) if isinstance(cell, LIFCell) else (next(it),))
        out, new_states = self.net.step(x_t, states)
        new_sum = output_sum + out
        scores = self.net.scores_from_sum(new_sum, self.steps)
        return (scores, new_sum, *[t for s in new_states for t in s])
