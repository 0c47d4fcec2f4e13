r"""Exact arithmetic: a network whose every membrane is the same bits in every fp32 runtime.

Why: two runtimes that sum a convolution's products in different orders round differently, so a
membrane may differ in its last bit, and once in ~10^9 neuron-steps that bit sits on V_th and a
spike flips (README, "Results"). Summation order only matters when a partial sum rounds. If every
product and every partial sum is exactly representable in fp32, any order gives the same, exact,
result, and from then on the LIF and NeuNorm updates are the same elementwise fp32 operations
everywhere.

How (``model.exact = true``):

- every real-valued tensor a conv or linear layer reads is put on a fixed-point grid: the input
  image is clamped to ``±exact_input_max`` and rounded to multiples of 2^-b, NeuNorm's outputs are
  rounded to multiples of 2^-b (``b = model.exact_bits``); spikes are 0/1 already, and a power-of-two
  average pool of grid values is again on a (finer) grid;
- every weight row (one output channel) and its bias are rounded to multiples of 2^-c, with c the
  largest value for which no partial sum can leave fp32's 24-bit significand. For input grid
  2^-g, input bound X and output j::

      S_j = |b_j| + X * sum_i |w_ji|        (the largest |partial sum|, in any order)
      c_j = floor(24 - g - log2(S_j))   =>  every partial sum is an integer multiple of 2^-(g+c_j)
                                            of magnitude <= 2^24: exact in fp32

The quantizers are part of the network (trained through with a straight-through gradient), and
the trainer snaps the weights at the end of every epoch, before evaluating and checkpointing, so
every checkpoint, export and reference is the exact network.

What it needs from a runtime: convolutions and matmuls as fp32 multiply-accumulate (any order, FMA
or not). Not TF32, not Winograd or FFT convolutions (their transforms round), not reduced precision.
The LIF update ``k_tau1 * u * (1 - o) + I`` may be contracted into a fused multiply-add (its last
product, by 0 or 1, is exact); NeuNorm's ``k_tau2 * x + drive`` and ``o - U * x`` must be evaluated as
written (one rounding per op), or a NeuNorm output can cross a rounding boundary of its quantizer.
ONNX Runtime CPU and PyTorch CPU give bit-identical membranes (tests/test_exact.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["Quantize", "quantize", "Grid", "LayerGrid", "input_grids", "snap_to_grid", "grid_violations"]

SIGNIFICAND_BITS = 24  # fp32, with the implicit bit
MIN_WEIGHT_BITS = 4  # fewer fractional bits than this for a weight row is a config error, not a quiet rounding


class _RoundStraightThrough(torch.autograd.Function):
    """round() forward, identity backward: the quantizer's rounding is invisible to the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return grad_out


def quantize(x: Tensor, bits: int, limit: float | None = None) -> Tensor:
    """``x`` (any shape) rounded to the nearest multiple of 2^-bits (ties to even), clamped to ±limit first.

    Scaling by a power of two is exact, so this is ``Clip``, ``Mul``, ``Round``, ``Mul`` in an exported
    graph and the same bits in every runtime. Backward: straight-through (the clamp keeps its gradient)."""
    if limit is not None:
        x = x.clamp(-limit, limit)
    scaled = x * float(2.0**bits)
    if torch.is_grad_enabled() and scaled.requires_grad:
        return _RoundStraightThrough.apply(scaled) * float(2.0**-bits)
    # inference: in place on the one new tensor (half the time of three allocating ops on a large map)
    return scaled.round_().mul_(float(2.0**-bits))


class Quantize(nn.Module):
    """Stateless stage: :func:`quantize` on ``[T*B, ...]`` or ``[B, ...]``.

    Args:
        bits: fractional bits b of the grid (multiples of 2^-b).
        limit: clamp to ±limit first (the input image); None after NeuNorm, whose outputs are bounded
            by construction (:func:`input_grids`).
    """

    def __init__(self, bits: int, limit: float | None = None):
        super().__init__()
        self.bits = int(bits)
        self.limit = None if limit is None else float(limit)

    def forward(self, x: Tensor) -> Tensor:
        return quantize(x, self.bits, self.limit)

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (f", limit={self.limit}" if self.limit is not None else "")


@dataclass(frozen=True)
class Grid:
    """What is known of a tensor: every value a multiple of 2^-frac_bits with ``|value| <= bound``."""

    frac_bits: int
    bound: float


@dataclass
class LayerGrid:
    """One conv/linear layer's exactness plan (see the module docstring)."""

    index: int  # position in ``net.stages``
    layer: nn.Module
    input: Grid

    def largest_sum(self) -> Tensor:
        """S_j = |b_j| + X * sum_i |w_ji| per output channel ``[out]`` (float64): the largest |partial sum|."""
        w = self.layer.weight.detach().flatten(1).double()
        b = self.layer.bias.detach().double() if self.layer.bias is not None else torch.zeros_like(w[:, 0])
        return b.abs() + self.input.bound * w.abs().sum(1)

    def weight_bits(self) -> Tensor:
        """c_j per output channel ``[out]`` (int64): the finest weight grid that keeps every partial sum exact."""
        bits = torch.floor(SIGNIFICAND_BITS - self.input.frac_bits - torch.log2(self.largest_sum()))
        return bits.clamp(max=100).to(torch.int64)  # an all-zero row: any grid is exact

    def on_grid(self) -> bool:
        """Every weight and bias a multiple of 2^-c_j for today's c_j (a coarser grid is inside a finer one)."""
        scale = torch.exp2(self.weight_bits().double())
        values = [self.layer.weight.detach().flatten(1).double() * scale[:, None]]
        if self.layer.bias is not None:
            values.append(self.layer.bias.detach().double() * scale)
        return all(torch.equal(torch.round(v), v) for v in values)


def _pool_window(pool: nn.AvgPool2d) -> int:
    k = pool.kernel_size
    return k * k if isinstance(k, int) else k[0] * k[1]


def input_grids(stages: list[nn.Module]) -> list[LayerGrid]:
    """Follow the grid through ``stages`` (a network's :attr:`~snncompile.models.SpikingNetwork.stages`)
    and return the grid every conv/linear layer reads.

    Raises:
        ConfigError: a conv/linear layer reads a tensor that is on no grid (the network was built
            without ``exact``), or a pool would leave the grid (a window that is not a power of two).
    """
    from .models import LIFCell, NeuNormCell, _pools_exactly

    grid: Grid | None = None  # the network input: real-valued until its quantizer
    plan: list[LayerGrid] = []
    for i, stage in enumerate(stages):
        if isinstance(stage, Quantize):
            if stage.limit is not None:
                bound = stage.limit
            elif i > 0 and isinstance(stages[i - 1], NeuNormCell):
                # y = o - U x with 0 <= x < 1/F (x gains (1 - k_tau2)/F^2 per spike, at most F spikes a step,
                # and decays by k_tau2): |y| <= 1 + max|U| / F; 1e-3 of slack for the fp32 rounding of x
                u = stages[i - 1].norm.u_scale.detach()
                bound = (1.0 + float(u.abs().max()) / u.shape[0]) * 1.001
            else:
                raise ConfigError(f"stage {i}: a quantizer without a limit must follow NeuNorm")
            # rounding may move a value by half a grid step past the bound
            grid = Grid(stage.bits, bound + 2.0 ** -(stage.bits + 1))
        elif isinstance(stage, (nn.Conv2d, nn.Linear)):
            if grid is None:
                raise ConfigError(f"stage {i} ({type(stage).__name__}) reads values on no fixed-point grid: "
                                  "exact arithmetic needs the network built with model.exact = true")
            plan.append(LayerGrid(i, stage, grid))
            grid = None
        elif isinstance(stage, LIFCell):
            grid = Grid(0, 1.0)  # spikes
        elif isinstance(stage, NeuNormCell):
            grid = None  # real-valued until the quantizer after it
        elif isinstance(stage, nn.AvgPool2d) and grid is not None:
            if not _pools_exactly(stage, torch.float32):
                raise ConfigError(f"stage {i}: exact arithmetic needs power-of-two pooling windows without padding "
                                  f"(AP2, AP4), got {stage}")
            window = _pool_window(stage)
            if window * grid.bound * 2.0**grid.frac_bits > 2.0**SIGNIFICAND_BITS:
                raise ConfigError(f"stage {i}: a {stage.kernel_size} pool's window sum of values up to {grid.bound:.3g} "
                                  f"on a 2^-{grid.frac_bits} grid is not exact in fp32: lower model.exact_bits")
            # the window sum is exact on the grid; dividing by 2^k adds k fractional bits
            grid = Grid(grid.frac_bits + int(math.log2(window)), grid.bound)
        elif not isinstance(stage, (nn.Flatten, nn.Dropout)):
            grid = None  # anything else: unknown values
    return plan


def snap_to_grid(stages: list[nn.Module]) -> list[dict]:
    """Round every conv/linear weight row and bias, in place, to its exactness grid 2^-c_j.

    Returns one dict per layer: ``stage``, ``input_bits`` (g), ``weight_bits`` (min and max c_j) and
    ``max_rel_change`` (largest weight change / largest |weight|).

    Raises:
        ConfigError: a layer would keep fewer than :data:`MIN_WEIGHT_BITS` fractional weight bits
            (lower ``model.exact_bits`` or ``model.exact_input_max``).
    """
    report = []
    with torch.no_grad():
        for lg in input_grids(stages):
            layer = lg.layer
            before = layer.weight.detach().clone()
            for _ in range(4):  # rounding can grow sum|w| past a power of two: then once more, one bit coarser
                bits = lg.weight_bits()
                if int(bits.min()) < MIN_WEIGHT_BITS:
                    raise ConfigError(_too_few_bits(lg, int(bits.min())))
                scale = torch.exp2(bits.to(layer.weight.dtype)).to(layer.weight.device)
                per_row = scale.view(-1, *[1] * (layer.weight.dim() - 1))
                layer.weight.copy_(torch.round(layer.weight * per_row) / per_row)
                if layer.bias is not None:
                    layer.bias.copy_(torch.round(layer.bias * scale) / scale)
                if lg.on_grid():
                    break
            else:
                raise RuntimeError(f"exact arithmetic: stage {lg.index} did not settle on a grid")
            largest = float(before.abs().max())
            report.append({
                "stage": lg.index, "input_bits": lg.input.frac_bits,
                "weight_bits": [int(bits.min()), int(bits.max())],
                "max_rel_change": float((layer.weight.detach() - before).abs().max()) / largest if largest else 0.0,
            })
    return report


def _too_few_bits(lg: LayerGrid, bits: int) -> str:
    """Why ``lg`` cannot be snapped, and what would help: fewer input bits, unless it has none to give."""
    head = (f"exact arithmetic: stage {lg.index} ({type(lg.layer).__name__}) would keep only {bits} fractional "
            f"weight bits next to {lg.input.frac_bits} input bits")
    if lg.input.frac_bits > 0:
        return f"{head}: lower model.exact_bits"
    # spikes (or sums of them) carry no fractional bits: only the weights' own size is left to blame
    return (f"{head}: its weights are too large for fp32 (sum of |w| per output up to "
            f"{float(lg.largest_sum().max()):.3g}); did training diverge?")


def grid_violations(stages: list[nn.Module]) -> list[str]:
    """Why ``stages`` would not compute exactly (empty: every conv/linear sum is exact in fp32)."""
    problems = []
    try:
        plan = input_grids(stages)
    except ConfigError as e:
        return [str(e)]
    for lg in plan:
        if not lg.on_grid():
            problems.append(f"stage {lg.index} ({type(lg.layer).__name__}): weights are not on their exactness grid")
    return problems
