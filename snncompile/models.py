"""Spiking networks built from the paper's architecture notation (PAPER.md §4).

Notation, '-'-separated: ``kCs`` k-channel s x s conv (stride 1, pad s//2) + LIF; ``APn`` n x n
average pooling of spike maps (no LIF after it); ``nFC`` linear + LIF; ``Voting`` the output layer of
classes*G LIF neurons followed by the fixed voting matrix; a bare ``n`` (last only) is a non-spiking
linear readout whose output is averaged over T. ``(Encoding)`` after the first conv is accepted and
ignored: the first conv always is the encoding layer (the image enters it at every step).

A network is a flat list of stages. A stage is either *stateless* (conv, linear, pool, flatten,
dropout: the same map at every step) or a *cell* with a recurrence over time (LIF, NeuNorm). That split
gives the two execution orders of one function (PAPER.md §7):

- step-major (the paper's loop): for t, for stage: stateless on ``[B, ...]``, cell one step;
- layer-major (default): for stage: stateless once on ``[T*B, ...]``, cell scanned over T.

Both call the same per-step cell functions, so they compute the same values. A conv's or linear
layer's currents can differ in the last bit when the library picks another kernel for a batch of B
than for T*B (seen on CPU for B < 8 with oneDNN: linear layers below 8, convs at B = 1, ~1e-7), which is
rounding, not a different function; a spike flips only if a membrane lands within that of V_th (none in
25 M neuron-steps checked at B = 1). From B = 8 on CPU, membranes, spikes and scores agree bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .exact import Quantize
from .kernels.lif import INDEX_LIMIT as _KERNEL_INDEX_LIMIT  # lif.py imports no Triton
from .layers import NeuNorm, Voting
from .memory import mark_spikes
from .neurons import LIFParams, lif_step

__all__ = ["network_from_config", "LayerSpec", "parse_architecture", "SpikingNetwork", "LIFCell", "NeuNormCell"]

ExecutionOrder = Literal["layer", "step"]


@dataclass(frozen=True)
class LayerSpec:
    """One token of the notation: kind in {'conv', 'pool', 'fc', 'voting', 'readout'}."""

    kind: str
    size: int = 0  # channels / features / pool size
    kernel: int = 0


_TOKEN = re.compile(r"^(?:(?P<conv>\d+)C(?P<k>\d+)|AP(?P<pool>\d+)|(?P<fc>\d+)FC|(?P<vote>Voting)|(?P<out>\d+))$")


def parse_architecture(arch: str, width_divisor: int = 1) -> list[LayerSpec]:
    """Parse e.g. ``'128C3(Encoding)-128C3-AP2-1024FC-Voting'`` into layer specs.

    Args:
        arch: the paper's notation.
        width_divisor: divide every conv/FC width by this (minimum 4) for tiny test-size networks;
            1 keeps the widths as written.
    """
    specs: list[LayerSpec] = []
    tokens = [t.strip() for t in arch.split("-")]
    first = tokens[0].removesuffix("(Encoding)")  # the paper's label of the first conv: nothing to build
    if first != tokens[0]:
        m = _TOKEN.match(first)
        if m is None or not m["conv"]:
            raise ConfigError(f"'(Encoding)' labels the first layer, a conv, in {arch!r}; got {tokens[0]!r}")
        tokens[0] = first
    for i, token in enumerate(tokens):
        m = _TOKEN.match(token)
        if m is None:
            raise ConfigError(
                f"architecture token {token!r} not understood in {arch!r} "
                "(expected e.g. 32C3 (channels C kernel), AP2, 256FC, Voting, or a bare 10 readout last; "
                "'(Encoding)' may follow the first conv, spelled so)"
            )
        shrink = lambda n: int(n) if width_divisor == 1 else max(4, int(n) // width_divisor)  # noqa: E731
        sizes = [int(v) for v in (m["conv"], m["k"], m["pool"], m["fc"], m["out"]) if v is not None]
        if any(v < 1 for v in sizes):
            raise ConfigError(f"architecture token {token!r} in {arch!r}: sizes must be >= 1")
        if m["conv"]:
            if int(m["k"]) % 2 == 0:  # 'same' padding (k // 2, the paper's pad 1 for 3x3) needs an odd kernel
                raise ConfigError(f"architecture token {token!r} in {arch!r}: conv kernels must be odd (3, 5, ...)")
            specs.append(LayerSpec("conv", shrink(m["conv"]), int(m["k"])))
        elif m["pool"]:
            specs.append(LayerSpec("pool", int(m["pool"])))
        elif m["fc"]:
            specs.append(LayerSpec("fc", shrink(m["fc"])))
        elif m["vote"]:
            specs.append(LayerSpec("voting"))
        else:
            specs.append(LayerSpec("readout", int(m["out"])))
        if specs[-1].kind in ("voting", "readout") and i != len(tokens) - 1:
            raise ConfigError(f"{token!r} must be the last token of {arch!r}")
    if not specs or specs[0].kind != "conv" and specs[0].kind != "fc":
        raise ConfigError(f"architecture {arch!r} must start with a conv (encoding layer) or FC layer")
    return specs


class LIFCell(nn.Module):
    """Stage with the LIF recurrence; state (u, o), each ``[B, ...]``."""

    is_cell = True

    def __init__(self, params: LIFParams, name: str):
        super().__init__()
        self.params = params
        self.name = name

    def init_state(self, x_t: Tensor) -> tuple[Tensor, ...]:
        """Zeros ``(u, o)``, each shaped as the current ``x_t [B, ...]``."""
        return (torch.zeros_like(x_t), torch.zeros_like(x_t))

    def step(self, state: tuple[Tensor, ...] | None, current: Tensor):
        """``current [B, ...]`` -> (new state ``(u, o)``, spikes ``o``, membrane ``u``), all fp32 ``[B, ...]``;
        ``state`` None is the zero initial state."""
        if current.dtype in (torch.float16, torch.bfloat16):
            # Under autocast the conv/linear currents arrive in reduced precision; the membrane
            # recurrence and the threshold compare stay fp32 so spikes do not flip on rounding.
            current = current.float()
        u, o = lif_step(*(state or (None, None)), current, self.params)
        return (u, o), o, u

    def extra_repr(self) -> str:
        p = self.params
        return f"{self.name}: v_th={p.v_th}, k_tau1={p.k_tau1}, a={p.a}"


class NeuNormCell(nn.Module):
    """Stage with the NeuNorm recurrence; state x ``[B, 1, H, W]``."""

    is_cell = True

    def __init__(self, norm: NeuNorm, name: str):
        super().__init__()
        self.norm = norm
        self.name = name

    def init_state(self, x_t: Tensor) -> tuple[Tensor, ...]:
        return (self.norm.initial_state(x_t),)

    def step(self, state: tuple[Tensor, ...] | None, spikes: Tensor):
        """``spikes [B, F, H, W]`` -> (new state ``(x [B, 1, H, W],)``, normalised output ``[B, F, H, W]``, None);
        ``state`` None is the zero initial state."""
        x, y = self.norm.step(state[0] if state is not None else self.norm.initial_state(spikes), spikes)
        return (x,), y, None


def _bias_moves_into_lif(stage: nn.Module, after: list) -> bool:
    """A conv/linear with a bias whose output goes straight into a LIF: the fused kernel can add the bias.
    Plain ``nn.Conv2d``/``nn.Linear`` (exact types: a subclass computes its own way) and layers that say how
    to run without it (``forward_without_bias``: torch-fast's split-TF32 layers)."""
    hooked = stage._forward_hooks or stage._forward_pre_hooks  # a caller watching this module's calls
    runs_without = type(stage) in (nn.Conv2d, nn.Linear) or hasattr(stage, "forward_without_bias")
    return (runs_without and getattr(stage, "bias", None) is not None and not hooked
            and bool(after) and isinstance(after[0], LIFCell))


def _missing_channels(stage: nn.Module, multiple: int) -> int:
    """How many zero input channels bring a plain conv's up to a multiple of ``multiple`` (0: none, or
    not a plain unhooked ``nn.Conv2d``, whose own call must run)."""
    hooked = stage._forward_hooks or stage._forward_pre_hooks
    if multiple <= 1 or type(stage) is not nn.Conv2d or hooked or stage.groups != 1:
        return 0
    return -stage.in_channels % multiple


def _linear_map(stage: nn.Module, x: Tensor, keep_bias: bool = True, pad_channels: int = 1) -> Tensor:
    """``stage(x)`` for a conv/linear, without its bias unless ``keep_bias``
    (:func:`_bias_moves_into_lif`'s stages), a plain conv's input channels zero-padded to a multiple of
    ``pad_channels`` (:attr:`SpikingNetwork.pad_conv_channels`: zero channels times zero weights add
    exact zeros, so it is the same function; F.pad keeps channels_last)."""
    if not keep_bias and hasattr(stage, "forward_without_bias"):
        return stage.forward_without_bias(x)
    bias = stage.bias if keep_bias else None
    if isinstance(stage, nn.Conv2d):
        weight, missing = stage.weight, _missing_channels(stage, pad_channels)
        if missing:
            # the weight is padded on every call: its gradient flows back to the real channels only
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, missing))
            weight = nn.functional.pad(weight, (0, 0, 0, 0, 0, missing))
        return stage._conv_forward(x, weight, bias)
    return nn.functional.linear(x, stage.weight, bias)


def _pools_exactly(module: nn.Module, dtype: torch.dtype) -> bool:
    """An average pool whose every output, on 0/1 spikes, is exact in ``dtype``: a k x k window with
    k^2 a power of two and no padding gives m / k^2 (m <= k^2 ones), which needs log2(k^2) significand
    bits (bf16 has 8, fp16 11, fp32 24), so pooling in ``dtype`` equals pooling in fp32 and casting after."""
    if (not isinstance(module, nn.AvgPool2d) or module.padding not in (0, (0, 0)) or module.ceil_mode
            or module.divisor_override is not None):
        return False
    k = module.kernel_size
    window = k * k if isinstance(k, int) else k[0] * k[1]
    significand_bits = {torch.bfloat16: 8, torch.float16: 11}.get(dtype, 24)
    return window & (window - 1) == 0 and window <= 2**significand_bits


def _fuses_into_lif(pool: nn.Module | None, dtype: torch.dtype) -> bool:
    """An average pool the fused LIF kernel can apply itself (:func:`~snncompile.kernels.fused_lif_pool`):
    a square power-of-two window, stride = window, no padding, exact in ``dtype``."""
    return (_pools_exactly(pool, dtype) and isinstance(pool.kernel_size, int)
            and pool.stride in (pool.kernel_size, (pool.kernel_size, pool.kernel_size)))


def _spike_dtype(currents: Tensor, after: list[nn.Module]) -> torch.dtype:
    """The dtype the fused kernel writes spikes in: autocast's when it is on and the spikes go into a
    conv/linear (which would cast them to it anyway), directly or through average pools that are exact
    in that dtype (:func:`_pools_exactly`: half the bytes written, pooled and read, and no cast kernel,
    same bits); fp32 otherwise, so that NeuNorm's channel sums, other pools and the output counts stay
    exact."""
    kind = currents.device.type
    if not torch.is_autocast_enabled(kind):
        return torch.float32
    dtype = torch.get_autocast_dtype(kind)
    consumer = next((m for m in after if not isinstance(m, nn.Flatten) and not _pools_exactly(m, dtype)), None)
    return dtype if isinstance(consumer, (nn.Conv2d, nn.Linear)) else torch.float32


def _spikes_as_consumed(spikes: Tensor, after) -> Tensor:
    """The pure-torch path's spikes (fp32) in :func:`_spike_dtype`'s dtype, registered for uint8 saving.
    Under autocast the conv/linear after them would cast them itself, and autograd would save that
    unregistered 16-bit copy in full; cast here (exact for 0/1), the copy saved is the registered one."""
    mark_spikes(spikes)
    return mark_spikes(spikes.to(_spike_dtype(spikes, after)))


class SpikingNetwork(nn.Module):
    """A feed-forward SNN over T steps.

    Args:
        arch: architecture string (see module docstring).
        input_shape: ``(C, H, W)`` of one frame.
        lif: neuron constants.
        classes: number of classes.
        vote_group: G, output neurons per class of the voting layer.
        neunorm: insert NeuNorm after the LIF of every conv that feeds another conv.
        neunorm_before_fc: also after the last conv (before the first FC).
        k_tau2: NeuNorm decay.
        neunorm_u_init: the value NeuNorm's U starts at.
        dropout: dropout probability on the spikes of hidden FC layers (new mask every step).
        width_divisor: shrink widths for tiny test networks.
        exact: exact arithmetic (see :mod:`snncompile.exact`): quantize the input and NeuNorm's outputs
            to multiples of 2^-exact_bits (the input clamped to ±exact_input_max first), so that with
            weights on their grid (:func:`~snncompile.exact.snap_to_grid`) every conv/linear sum is exact.

    Input ``[T, B, C, H, W]``; output class scores ``[B, classes]``.
    """

    def __init__(
        self,
        arch: str,
        input_shape: tuple[int, int, int],
        lif: LIFParams,
        classes: int = 10,
        vote_group: int = 10,
        neunorm: bool = False,
        neunorm_before_fc: bool = False,
        k_tau2: float = 0.9,
        dropout: float = 0.0,
        width_divisor: int = 1,
        exact: bool = False,
        exact_bits: int = 8,
        exact_input_max: float = 4.0,
        neunorm_u_init: float = 0.0,
    ):
        super().__init__()
        self.arch = arch
        self.input_shape = tuple(int(s) for s in input_shape)
        self.classes = classes
        self.execution: ExecutionOrder = "layer"
        # Layer-major LIF scans through the fused Triton kernel (snncompile.kernels) when set; the
        # trainer turns it on for CUDA when Triton is importable; the torch-fast runner for inference,
        # where the kernel also writes the membranes a layer-recording run asks for.
        self.fused_lif = False
        # Layer-major convs whose input channels are not a multiple of this run on zero-padded copies of
        # their input and weight (1: never). cuDNN's bf16/fp16 tensor-core kernels want a multiple of 8; in
        # the H200 profile of a bench-nmnist bf16 step one conv, most likely the 2-channel input conv, ran a
        # legacy kernel (implicit_convolve_sgemm, 12 % of the step). Set by the trainer
        # (train.pad_conv_channels), bench train and torch-fast (bench --pad-channels).
        self.pad_conv_channels = 1
        # With fused_lif: a conv of few input channels followed by a LIF (the input layer) runs as one kernel
        # with it and the pool after it (snncompile.kernels.input_conv), its output never written, in
        # inference and training alike. Set by torch-fast (bench --fuse-input-conv), the trainer
        # (train.fuse_input_conv) and bench train.
        self.fuse_input_conv = False
        specs = parse_architecture(arch, width_divisor)

        stages: list[nn.Module] = [Quantize(exact_bits, exact_input_max)] if exact else []
        c, h, w = self.input_shape
        flat: int | None = None  # features once flattened
        n_lif = 0
        self.head: str = "none"
        for i, spec in enumerate(specs):
            nxt = next((s for s in specs[i + 1 :] if s.kind != "pool"), None)
            if spec.kind == "conv":
                if flat is not None:
                    raise ConfigError(f"conv after FC in {arch!r}")
                stages.append(nn.Conv2d(c, spec.size, spec.kernel, padding=spec.kernel // 2))
                c = spec.size
                n_lif += 1
                stages.append(LIFCell(lif, f"lif{n_lif}"))
                if neunorm and nxt is not None and (nxt.kind == "conv" or neunorm_before_fc):
                    stages.append(NeuNormCell(NeuNorm(c, h, w, k_tau2, neunorm_u_init), f"neunorm{n_lif}"))
                    if exact:  # NeuNorm's outputs are real-valued: back onto the grid before they are summed
                        stages.append(Quantize(exact_bits))
            elif spec.kind == "pool":
                if flat is not None:
                    raise ConfigError(f"pooling after FC in {arch!r}")
                if exact and spec.size & (spec.size - 1):
                    raise ConfigError(f"AP{spec.size} in {arch!r}: exact arithmetic needs power-of-two pooling (AP2, AP4)")
                if h < spec.size or w < spec.size:
                    raise ConfigError(f"AP{spec.size} needs maps of at least {spec.size}x{spec.size}, got {h}x{w} in {arch!r}")
                # Floor like the paper's N-MNIST net: 34 -> 17 -> 8.
                stages.append(nn.AvgPool2d(spec.size))
                h, w = h // spec.size, w // spec.size
            else:
                if flat is None:
                    stages.append(nn.Flatten())
                    flat = c * h * w
                out = {"fc": spec.size, "voting": classes * vote_group, "readout": spec.size}[spec.kind]
                stages.append(nn.Linear(flat, out))
                flat = out
                if spec.kind == "readout":
                    self.head = "readout"
                    if out != classes:
                        raise ConfigError(f"readout width {out} != classes {classes} in {arch!r}")
                    continue
                n_lif += 1
                stages.append(LIFCell(lif, f"lif{n_lif}"))
                if spec.kind == "voting":
                    self.head = "voting"
                elif dropout > 0:
                    stages.append(nn.Dropout(dropout))
        if self.head == "none":
            raise ConfigError(f"architecture {arch!r} must end with Voting or a bare class-count readout")
        self.stages = nn.ModuleList(stages)
        self.voting = Voting(classes, vote_group) if self.head == "voting" else None

    # -- introspection -------------------------------------------------------------------------
    def lif_names(self) -> list[str]:
        """Names of the LIF stages in order ('lif1', 'lif2', ...)."""
        return [s.name for s in self.stages if isinstance(s, LIFCell)]

    def pads_conv_channels(self, multiple: int) -> bool:
        """Whether ``pad_conv_channels = multiple`` would pad any conv's input channels."""
        return any(_missing_channels(s, multiple) for s in self.stages)

    def cells(self) -> list[nn.Module]:
        return [s for s in self.stages if getattr(s, "is_cell", False)]

    # -- execution -----------------------------------------------------------------------------
    def _layer_major(self, x: Tensor, record: dict | None) -> Tensor:
        return self.run_stages(x, self.stages, record)

    def run_stages(self, x: Tensor, stages, record: dict | None = None) -> Tensor:
        """Layer-major over a slice of :attr:`stages`: ``[T, B, ...]`` in, ``[T, B, ...]`` out."""
        steps, batch = x.shape[:2]
        h = x
        stages = list(stages)
        done: set[int] = set()  # stages a fused kernel before them has already applied (a pool, a LIF)
        bias = None  # a conv/linear's bias the fused LIF after it adds (the conv ran without it)
        for i, stage in enumerate(stages):
            if i in done:
                continue
            if self._fuses_input_conv(stage, stages[i + 1 :], h, record):
                h, fused_stages = self._input_conv_lif(h, stages[i:], record)
                done.update(range(i + 1, i + fused_stages))
                continue
            # past the kernels' 32-bit indexing, the pure-torch scan
            fused = (self.fused_lif and isinstance(stage, LIFCell) and (record is None or not torch.is_grad_enabled())
                     and h.numel() < _KERNEL_INDEX_LIMIT)
            if bias is not None and not fused:  # the kernel cannot take it after all (past its indexing)
                h = h + bias.to(h.dtype).view(1, 1, -1, *[1] * (h.dim() - 3))
                bias = None
            if fused:
                from .kernels import fused_lif, fused_lif_inference, fused_lif_pool

                p = stage.params
                lif_bias, bias = bias, None
                pool = stages[i + 1] if i + 1 < len(stages) else None
                out_dtype = _spike_dtype(h, stages[i + 1 :])
                if record is None and _fuses_into_lif(pool, out_dtype):
                    # the pool inside the LIF kernel: the full-size spikes (and their gradient) never written
                    h = fused_lif_pool(h, p.k_tau1, p.v_th, p.a, pool.kernel_size, out_dtype, bias=lif_bias)
                    done.add(i + 1)
                elif record is None:
                    h = mark_spikes(fused_lif(h, p.k_tau1, p.v_th, p.a, out_dtype, bias=lif_bias))
                else:  # inference that reports every layer (verify): the kernel writes the membrane too
                    h, membrane = fused_lif_inference(h, p.k_tau1, p.v_th, membrane=True)
                    record[stage.name] = (h, membrane)
            elif isinstance(stage, NeuNormCell):
                if self.fused_lif and record is None and h.numel() < _KERNEL_INDEX_LIMIT:
                    from .kernels.neunorm import fused_neunorm

                    h = fused_neunorm(h, stage.norm)  # the same bits; ~40 % of the full-size traffic
                else:
                    h = stage.norm(h)  # vectorised over T; bit-identical to its step form
            elif getattr(stage, "is_cell", False):
                state = None  # zeros: the first step skips the leak of a zero membrane
                outs, mems = [], []
                # unbind, not h[t]: backward then stacks the T step gradients once, where T
                # indexing views would each scatter into a zero tensor of the full [T, B, ...] size.
                for h_t in h.unbind(0):
                    state, y, mem = stage.step(state, h_t)
                    outs.append(y)
                    mems.append(mem)
                h = torch.stack(outs)
                if isinstance(stage, LIFCell):
                    if record is not None:
                        record[stage.name] = (h, torch.stack(mems))
                    h = _spikes_as_consumed(h, stages[i + 1 :])
            elif self.fused_lif and record is None and _bias_moves_into_lif(stage, stages[i + 1 :]):
                # cuDNN adds a conv's bias in a kernel of its own, a full read and write of the largest
                # tensor (15 % of a bench-nmnist bf16 step's GPU time on the H200): the LIF kernel reads
                # these currents anyway and adds it there
                h = _linear_map(stage, h.flatten(0, 1), False, self.pad_conv_channels).unflatten(0, (steps, batch))
                bias = stage.bias
            elif _missing_channels(stage, self.pad_conv_channels):
                h = _linear_map(stage, h.flatten(0, 1), True, self.pad_conv_channels).unflatten(0, (steps, batch))
            else:
                h = stage(h.flatten(0, 1))
                h = h.unflatten(0, (steps, batch))
        return h

    def _fuses_input_conv(self, stage: nn.Module, after: list, h: Tensor, record: dict | None) -> bool:
        """Whether ``stage`` and the LIF after it run as :func:`~snncompile.kernels.input_conv.fused_conv_lif`:
        with :attr:`fuse_input_conv` and :attr:`fused_lif` set, on ``[T, B, C, H, W]``; a layer-recording run
        (verify) only without autograd, as the fused LIF."""
        if not (self.fused_lif and self.fuse_input_conv) or h.dim() != 5:
            return False
        if record is not None and torch.is_grad_enabled():
            return False
        from .kernels.input_conv import conv_fuses_with_lif, conv_output_numel, grid_fits

        return (conv_fuses_with_lif(stage) and bool(after) and isinstance(after[0], LIFCell)
                # past the kernels' 32-bit indexing, the unfused path (whose LIF falls back to the torch scan)
                and max(h.numel(), conv_output_numel(h.shape, stage)) < _KERNEL_INDEX_LIMIT
                and grid_fits(h.shape, stage))

    def fuses_an_input_conv(self) -> bool:
        """Whether a stage :attr:`fuse_input_conv` would fuse exists: a conv the kernel computes, then a LIF."""
        from .kernels.input_conv import conv_fuses_with_lif

        stages = list(self.stages)
        return any(conv_fuses_with_lif(s) and isinstance(n, LIFCell) for s, n in zip(stages, stages[1:]))

    def _channels_last(self) -> bool:
        """Whether the convs run in channels_last (``to(memory_format=torch.channels_last)``): some conv weight
        is unambiguously so. A weight of one input channel is contiguous both ways and says nothing."""
        return any(type(s) is nn.Conv2d and s.weight.is_contiguous(memory_format=torch.channels_last)
                   and not s.weight.is_contiguous() for s in self.stages)

    def _input_conv_lif(self, x: Tensor, stages: list, record: dict | None) -> tuple[Tensor, int]:
        """``stages[0]`` (the conv), ``stages[1]`` (its LIF) and, unless ``record`` asks for the LIF's spikes
        and membrane, a pool after them the kernel can apply: (output ``[T, B, ...]``, stages applied)."""
        from .kernels import input_conv

        conv, lif = stages[0], stages[1]
        pool = stages[2] if len(stages) > 2 else None
        out_dtype = _spike_dtype(x, stages[2:]) if record is None else torch.float32
        pooled = record is None and _fuses_into_lif(pool, out_dtype)
        layout = self._channels_last()  # as the unfused conv's output would be
        p = lif.params
        if record is not None:
            spikes, membrane = input_conv.fused_conv_lif(x, conv, p.k_tau1, p.v_th, membrane=True, channels_last=layout)
            record[lif.name] = (spikes, membrane)
            return spikes, 2
        spikes = input_conv.fused_conv_lif(x, conv, p.k_tau1, p.v_th, pool.kernel_size if pooled else 1, out_dtype,
                                           channels_last=layout, a=p.a)
        if pooled:
            return spikes, 3
        return mark_spikes(spikes), 2  # 0/1 values the next conv keeps for backward: uint8 in training

    def initial_states(self, x_t: Tensor) -> list[tuple[Tensor, ...]]:
        """Zero states of every cell for one step's input ``[B, ...]`` (u[0] = o[0] = x[0] = 0)."""
        states = []
        h = x_t
        with torch.no_grad():
            for stage in self.stages:
                if getattr(stage, "is_cell", False):
                    states.append(stage.init_state(h))
                else:
                    h = stage(h)
        return states

    def state_names(self) -> list[str]:
        """Stable names of the flattened state tensors, in the order :meth:`step` takes them."""
        names = []
        for stage in self.cells():
            names += [f"{stage.name}.u", f"{stage.name}.o"] if isinstance(stage, LIFCell) else [f"{stage.name}.x"]
        return names

    def step(self, x_t: Tensor, states: list[tuple[Tensor, ...]] | None, record: dict | None = None):
        """One timestep of every stage: input ``[B, ...]``, states from :meth:`initial_states` or a
        previous step (None on the first step: every cell starts from zeros shaped like its input).

        Returns (last-stage output ``[B, N]``, new states). With ``record``, appends each LIF's
        (spikes, membrane) of this step to ``record[name]``.
        """
        h = x_t
        new_states = []
        cells = iter(states) if states is not None else None
        for i, stage in enumerate(self.stages):
            if getattr(stage, "is_cell", False):
                state = next(cells) if cells is not None else None
                state, h, mem = stage.step(state, h)
                new_states.append(state)
                if isinstance(stage, LIFCell):
                    if record is not None:
                        record.setdefault(stage.name, []).append((h, mem))
                    h = _spikes_as_consumed(h, self.stages[i + 1 :])
            else:
                h = stage(h)
        return h, new_states

    def _step_major(self, x: Tensor, record: dict | None) -> Tensor:
        states = None  # zero states created lazily on the first step, without an extra forward
        per_step: dict[str, list] = {}
        outs = []
        for x_t in x.unbind(0):
            out, states = self.step(x_t, states, per_step if record is not None else None)
            outs.append(out)
        if record is not None:
            for name, pairs in per_step.items():
                record[name] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        return torch.stack(outs)

    def forward_sequence(self, x: Tensor, order: ExecutionOrder | None = None, record: dict | None = None) -> Tensor:
        """Run all stages: ``[T, B, C, H, W]`` -> last stage's output ``[T, B, N]``.

        With ``record`` (a dict), fills ``record[lif_name] = (spikes, membrane)``, each ``[T, B, ...]``.
        """
        order = order or self.execution
        if order == "layer":
            return self._layer_major(x, record)
        if order == "step":
            return self._step_major(x, record)
        raise ConfigError(f"execution order must be 'layer' or 'step', got {order!r}")

    def decode(self, outputs: Tensor) -> Tensor:
        """Last-stage outputs ``[T, B, N]`` -> class scores ``[B, classes]``.

        Voting head: firing rate (spikes summed over T, divided by T) through the voting matrix, so
        scores lie in [0, 1]. Readout head: the linear outputs averaged over T.
        """
        # Summed step by step, in the order a streaming (one step at a time) model accumulates, so
        # both give bit-identical scores; in fp32: a readout's 16-bit outputs under autocast summed in their
        # own dtype would lose ~1e-3 of the scores
        if outputs.dtype in (torch.float16, torch.bfloat16):
            outputs = outputs.float()
        steps = outputs.unbind(0)
        total = steps[0]
        for out_t in steps[1:]:
            total = total + out_t
        return self.scores_from_sum(total, outputs.shape[0])

    def scores_from_sum(self, output_sum: Tensor, steps: int) -> Tensor:
        """Class scores ``[B, classes]`` from the last stage's outputs summed over ``steps``."""
        if self.voting is not None:
            return self.voting.from_counts(output_sum, steps)
        return output_sum / steps

    def forward(self, x: Tensor, order: ExecutionOrder | None = None) -> Tensor:
        """``[T, B, C, H, W]`` -> class scores ``[B, classes]``."""
        return self.decode(self.forward_sequence(x, order))


def network_from_config(model_cfg, width_divisor: int = 1) -> SpikingNetwork:
    """Build the network a :class:`~snncompile.config.ModelConfig` describes."""
    m = model_cfg
    return SpikingNetwork(
        m.arch,
        tuple(m.input_shape),
        LIFParams(m.v_th, m.k_tau1, m.a),
        classes=m.classes,
        vote_group=m.vote_group,
        neunorm=m.neunorm,
        neunorm_before_fc=m.neunorm_before_fc,
        k_tau2=m.k_tau2,
        neunorm_u_init=m.neunorm_u_init,
        dropout=m.dropout,
        width_divisor=width_divisor,
        exact=m.exact,
        exact_bits=m.exact_bits,
        exact_input_max=m.exact_input_max,
    )
