"""`snncompile bench train`: milliseconds per training step, ours and the SNN libraries users have.

One step = forward over T steps + loss + backward + optimizer step, on random binary input of density
0.2 (the benchmark networks' protocol) with random labels; median of ``steps`` timed steps after
``warmup``. Variants:

- ``snncompile``: layer-major, fused Triton LIF on CUDA (pure torch elsewhere), optional bf16 autocast;
- ``snncompile ... CUDA graph`` (CUDA only): the same step, forward + backward + optimizer, captured
  once in a CUDA graph and replayed (one launch per step instead of one per kernel); once more with the
  conv weights, hence activations, in channels_last (``train.channels_last``); both once more with the
  saved spikes not packed to uint8 (``train.compact_spikes``; packed, where the config turns packing off);
  both once more with the input conv, its LIF and pool as one Triton kernel (``train.fuse_input_conv``).
  On CUDA our variants update the weights with torch's fused SGD kernel (``train.fused_optimizer``);
- ``torch loop``: the per-timestep loop over the same modules (the paper's order, what most code does),
  with torch's default optimizer update;
- with ``compiled=True``, both of the above under ``torch.compile`` (Inductor; the fused kernel is left
  out there, the compiler fuses the pure-torch LIF scan itself): the loop so compiled is the fastest
  plain-PyTorch setup users have, and ours so compiled shows whether the compiler adds anything. The
  first calls compile (warm-up, untimed, can take minutes); saved-for-backward bytes are not measured
  inside compiled code (its saved tensors are the compiler's);
- ``spikingjelly`` (multi-step LIFNode) and ``snntorch`` (Leaky, step loop), built layer for layer
  from the same architecture and neuron constants, when installed.

Peers use the same LIF dynamics: spikingjelly's ``LIFNode(decay_input=False, v_reset=0)`` updates
``V*(1 - 1/tau) + X``, so ``tau = 1 / (1 - k_tau1)``; snntorch's ``Leaky(beta=k_tau1,
reset_mechanism='zero')``. Their surrogates are their own (rectangular where the library has one).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import Config
from .errors import ConfigError, asked_memory, out_of_memory
from .memory import SavedActivations
from .models import LIFCell, network_from_config
from .profiling import profile_calls
from .text import counted
from .torch_settings import cpu_threads, cudnn_autotuning
from .train import fuses_optimizer, loss_fn

__all__ = ["bench_train", "format_train_table", "plot_train_bench"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak_mib": peak}


def _layers(m) -> list[tuple]:
    """The architecture as plain layer tuples for the peer builders, read off our own network's stages, so the
    peers get our shapes by construction: ('conv', c_in, c_out, k), ('pool', k), ('flatten',),
    ('linear', n_in, n_out, spiking). Only what the peers build: NeuNorm, dropout and exact arithmetic's
    quantizers are ours alone (the benchmark networks have none)."""
    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        stages = list(network_from_config(m).stages)
    out: list[tuple] = []
    for i, stage in enumerate(stages):
        if isinstance(stage, nn.Conv2d):
            out.append(("conv", stage.in_channels, stage.out_channels, stage.kernel_size[0]))
        elif isinstance(stage, nn.AvgPool2d):
            out.append(("pool", stage.kernel_size))
        elif isinstance(stage, nn.Flatten):
            out.append(("flatten",))
        elif isinstance(stage, nn.Linear):
            spiking = i + 1 < len(stages) and isinstance(stages[i + 1], LIFCell)
            out.append(("linear", stage.in_features, stage.out_features, spiking))
    return out


def _spikingjelly_net(cfg: Config, device: torch.device) -> nn.Module:
    from spikingjelly.activation_based import layer, neuron, surrogate

    m = cfg.model

    def lif():
        # Multi-step mode: spikingjelly picks its own fused implementation for the device.
        return neuron.LIFNode(tau=1.0 / (1.0 - m.k_tau1), decay_input=False, v_threshold=m.v_th, v_reset=0.0,
                              surrogate_function=surrogate.Rect(alpha=1.0 / m.a), step_mode="m")

    mods: list[nn.Module] = []
    for kind, *args in _layers(m):
        if kind == "conv":
            mods += [layer.Conv2d(args[0], args[1], args[2], padding=args[2] // 2, step_mode="m"), lif()]
        elif kind == "pool":
            mods.append(layer.AvgPool2d(args[0], step_mode="m"))
        elif kind == "flatten":
            mods.append(layer.Flatten(step_mode="m"))
        else:
            mods.append(layer.Linear(args[0], args[1], step_mode="m"))
            mods += [lif()] if args[2] else []
    return nn.Sequential(*mods).to(device)


def _snntorch_step_fn(cfg: Config, device: torch.device):
    import snntorch as snn

    m = cfg.model

    def lif():
        return snn.Leaky(beta=m.k_tau1, threshold=m.v_th, reset_mechanism="zero")

    mods = nn.ModuleList()
    for kind, *args in _layers(m):
        if kind == "conv":
            mods += [nn.Conv2d(args[0], args[1], args[2], padding=args[2] // 2), lif()]
        elif kind == "pool":
            mods.append(nn.AvgPool2d(args[0]))
        elif kind == "flatten":
            mods.append(nn.Flatten())
        else:
            mods.append(nn.Linear(args[0], args[1]))
            mods += [lif()] if args[2] else []
    mods = mods.to(device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        mems = {i: mod.init_leaky() for i, mod in enumerate(mods) if isinstance(mod, snn.Leaky)}
        outs = []
        for x_t in x.unbind(0):
            h = x_t
            for i, mod in enumerate(mods):
                if isinstance(mod, snn.Leaky):
                    h, mems[i] = mod(h, mems[i])
                else:
                    h = mod(h)
            outs.append(h)
        return torch.stack(outs)

    return mods, forward


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def bench_train(cfg: Config, device: torch.device, precision: str = "fp32", steps: int = 20, warmup: int = 5,
                peers: bool = False, echo: Callable[[str], None] = print, compiled: bool = False,
                profile: bool = False) -> dict:
    """Time a training step of ``cfg``'s network per variant; returns the settings (model, T, batch, precision,
    device, steps, threads, ...) with ``"variants"``: {variant: stats, or the skip or ``failed: ...`` reason}.

    ``profile``: also profile our first (eager, layer-major) variant after timing it, and on CUDA the
    channels_last ones (their steps run eagerly for the profile); the tables of where each step's time
    goes are returned under ``"profiles"``, by variant. Every variant, peers included, runs
    under ``cfg.train.cudnn_benchmark`` (cuDNN autotuning, on by default as in training), so each one
    picks its convolution algorithms the same way, and on ``cfg.train.threads`` CPU threads (0: torch's default)."""
    with cpu_threads(cfg.train.threads), cudnn_autotuning(cfg.train.cudnn_benchmark):
        threads = torch.get_num_threads()
        result = _bench_train(cfg, device, precision, steps, warmup, peers, echo, compiled, profile)
    return {**result, "cudnn_benchmark": cfg.train.cudnn_benchmark, "threads": threads}


def _bench_train(cfg: Config, device: torch.device, precision: str, steps: int, warmup: int, peers: bool,
                 echo: Callable[[str], None], compiled: bool, profile: bool) -> dict:
    from .kernels import fused_kernels_available

    bench = _StepBench(cfg, device, *_random_batch(cfg, device), precision == "bf16", steps, warmup)
    results: dict = {}
    fused = device.type == "cuda" and fused_kernels_available()
    for name, options in _variants(cfg, device, fused, compiled, profile):
        moot = _packing_moot(results) if "compact_spikes" in options else None
        results[name] = moot or _attempt(lambda: bench.ours(**options))
        echo(f"done: {name}")
    if peers:
        for peer, time_peer in (("spikingjelly", bench.spikingjelly), ("snntorch", bench.snntorch)):
            if not _has(peer):
                results[peer] = f"not installed (pip install {peer})"
                continue
            results[peer] = _attempt(time_peer)
            echo(f"done: {peer}")
    profiles = {name: stats.pop("profile") for name, stats in results.items()
                if isinstance(stats, dict) and "profile" in stats}
    extra = {"profiles": profiles} if profiles else {}
    if fuses_optimizer(cfg, device):
        extra["optimizer_update"] = _attempt(lambda: optimizer_update_ms(cfg, device, steps, warmup))
    return {"model": cfg.name, "T": cfg.model.T, "batch": cfg.data.batch_size, "precision": precision,
            "device": str(device), "steps": steps, "variants": results, **extra}


def _random_batch(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's input ``x [T, B, ...]``, random binary of density 0.2, and labels ``y [B]``, seeded, on
    ``device``; one line when the input does not fit in memory."""
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    try:
        x = (torch.rand((m.T, cfg.data.batch_size, *m.input_shape), generator=gen) < 0.2).float().to(device)
    except Exception as e:  # --batch 100000000: the allocator's traceback before any variant ran
        if not out_of_memory(e):
            raise
        raise ConfigError(f"--batch {cfg.data.batch_size}: not enough memory for its inputs "
                          f"({asked_memory(e)})") from None
    y = torch.randint(0, m.classes, (cfg.data.batch_size,), generator=gen).to(device)
    return x, y


@dataclass(frozen=True)
class _StepBench:
    """What every timed variant shares: the config, the device, one batch (``x [T, B, ...]``, ``y [B]``), bf16
    autocast or not, and how many steps are timed after how many warm-up steps."""

    cfg: Config
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor
    bf16: bool
    steps: int
    warmup: int

    def autocast(self, cached: bool = True):
        """bf16 autocast (or none); a CUDA graph replays the casts it captured, so its step's autocast must not
        keep a weight-cast cache that outlives the capture (``cached=False``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=cached)

    def timed(self, params, forward: Callable[[], torch.Tensor], compact: bool = False, graph: bool = False,
              compiled: bool = False, profiled: bool = False, fused_update: bool = False) -> dict:
        """Time SGD training steps of ``forward`` (-> class scores ``[B, classes]``) over ``params``; ``compact``:
        keep saved spikes as uint8, as our trainer does by default; ``fused_update``: torch's fused SGD kernel, as
        our trainer uses on CUDA (else torch's default, what the loop and the peers get); ``graph``: replay the
        step from a CUDA graph; ``compiled``: ``forward`` runs torch.compile'd code (at least 2 warm-up steps:
        forward and backward compile on the first). Adds ``saved_mib``, what autograd keeps for backward in one
        forward (measured on any device, after compaction; None for compiled code)."""
        cfg, device = self.cfg, self.device
        params = list(params)
        opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                              weight_decay=cfg.train.weight_decay, fused=fused_update or None)
        amp = self.autocast(cached=not graph)

        def forward_backward_update():
            with amp, SavedActivations() if compact else contextlib.nullcontext():
                scores = forward().float()
            loss_fn(scores, self.y, cfg.train.loss).backward()
            opt.step()

        def step():
            opt.zero_grad(set_to_none=True)
            forward_backward_update()

        if device.type == "cuda":
            if torch.backends.cudnn.benchmark:
                # cuDNN autotuning times every algorithm on a shape's first call, trying workspaces as large
                # as free memory allows: a one-off that grows with what is free, not what training needs.
                # One step before the peak counts, for every variant alike (a peer timed after ours would
                # otherwise find our shapes already tuned). On the H200, fp32: 5,537 MiB peak for our eager
                # bench-nmnist step, which tuned first, and 1,539 MiB for the graphed one, which did not.
                step()
            # the peak from here on, capture and warm-up included: a graphed step's activations live in
            # its private pool, allocated during capture and never again during replays
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        stats = _time_steps(_cuda_graphed(forward_backward_update, opt, device) if graph else step,
                            device, self.steps, max(self.warmup, 2) if compiled else self.warmup)
        if profiled:  # the eager step: a replayed graph would profile as one launch
            stats["profile"] = profile_calls(step, device.type == "cuda", what="steps")
        stats["saved_mib"] = None if compiled else _saved_mib(forward, self.autocast(), compact)
        if compact:
            stats["saved_mib_uncompacted"] = _saved_mib(forward, self.autocast(), False)
        return stats

    def ours(self, order: str, fused: bool, graph: bool = False, channels_last: bool = False, compiled: bool = False,
             profiled: bool = False, fuse_input_conv: bool | None = None, compact_spikes: bool | None = None) -> dict:
        """Our network's step in ``order`` (``"step"`` is the torch loop: plain PyTorch, torch's default optimizer
        update and nothing packed), built inside this call so that the next variant's peak memory does not
        carry it."""
        cfg = self.cfg
        torch.manual_seed(0)
        net = network_from_config(cfg.model).to(self.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        net.fused_lif = fused
        net.pad_conv_channels = cfg.train.pad_conv_channels
        net.fuse_input_conv = cfg.train.fuse_input_conv if fuse_input_conv is None else fuse_input_conv
        if compiled:
            # a fresh compiler: code compiled for earlier networks (the same LIF step at other shapes)
            # would count against Dynamo's per-function recompile limit and fall back to eager
            torch.compiler.reset()
        run = torch.compile(net) if compiled else net
        compact = cfg.train.compact_spikes if compact_spikes is None else compact_spikes
        return self.timed(net.parameters(), lambda: run(self.x, order),
                          compact=compact and order == "layer" and not compiled, graph=graph, compiled=compiled,
                          profiled=profiled, fused_update=order == "layer" and fuses_optimizer(cfg, self.device))

    def spikingjelly(self) -> dict:
        """The same network built from spikingjelly's layers, timed as the loop is."""
        # imported here, inside the attempt: a broken install costs this row, not the figures timed
        from spikingjelly.activation_based import functional

        torch.manual_seed(0)
        net = _spikingjelly_net(self.cfg, self.device)

        def forward():
            functional.reset_net(net)
            return _decode_peer(net(self.x), self.cfg.model)

        return self.timed(net.parameters(), forward)

    def snntorch(self) -> dict:
        """The same network built from snntorch's layers, stepped over T, timed as the loop is."""
        torch.manual_seed(0)
        mods, forward = _snntorch_step_fn(self.cfg, self.device)
        return self.timed(mods.parameters(), lambda: _decode_peer(forward(self.x), self.cfg.model))


def _packing_moot(results: dict) -> str | None:
    """Why a variant that only packs or unpacks the saved spikes would time nothing new: the reason when
    packing changes under 1 % of what our first timed variant saved for backward (every spike tensor pooled,
    hence not 0/1), else None (also when no timed variant measured both)."""
    first = next((v for v in results.values() if isinstance(v, dict) and "saved_mib_uncompacted" in v), None)
    if first is None:
        return None
    packed, unpacked = first["saved_mib"], first["saved_mib_uncompacted"]
    if unpacked - packed >= 0.01 * unpacked:
        return None
    return f"packing keeps only {unpacked - packed:.1f} of {unpacked:.1f} MiB less here (pooled spikes stay as they are)"


def optimizer_update_ms(cfg: Config, device: torch.device, steps: int = 20, warmup: int = 5) -> dict:
    """The SGD update alone on the network's parameters (random gradients), torch's fused kernel and its
    default side by side: {"parameters": count, "fused_ms": median, "default_ms": median}. What the fused
    update changes in a step, measured apart from the step's other kernels; eagerly, so the default's figure
    includes launch overhead that a CUDA-graphed step does not pay."""
    torch.manual_seed(0)
    params = [p.detach().clone().requires_grad_() for p in network_from_config(cfg.model).to(device).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    medians = {}
    for kind, fused in (("fused", True), ("default", None)):
        opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                              weight_decay=cfg.train.weight_decay, fused=fused)
        medians[f"{kind}_ms"] = _time_steps(opt.step, device, steps, max(warmup, 1))["median_ms"]
    return {"parameters": sum(p.numel() for p in params), **medians}


def _variants(cfg: Config, device: torch.device, fused: bool, compiled: bool, profile: bool) -> list[tuple[str, dict]]:
    """(table row, ``ours`` options) of every variant of ours and the plain loop, in timing order."""
    label = " (fused LIF" if fused else " (layer-major"
    variants = [(f"snncompile{label})", dict(order="layer", fused=fused, profiled=profile))]
    if device.type == "cuda":
        graphed = dict(order="layer", fused=fused, graph=True)
        # the channels_last profile: whether cuDNN's NCHW<->NHWC transposes (a fifth of the NCHW step's
        # GPU time on the H200) are gone there
        last = {**graphed, "channels_last": True, "profiled": profile}
        variants += [(f"snncompile{label}, CUDA graph)", graphed),
                     (f"snncompile{label}, CUDA graph, channels_last)", last)]
        # the same two with the spikes autograd keeps packed to uint8 (train.compact_spikes) or not, whichever
        # the config does not do: packing is a copy in forward and one in backward of every saved 0/1 spike
        # tensor (3 + 3 bytes per element: 0.71 GB per bench-cifar bf16 step, whose packing keeps 113 MiB less)
        # for 1 byte per element less memory (3 in fp32). Pooled spikes are not 0/1 and stay as they are, so
        # where every spike tensor is pooled (bench-nmnist: 0.2 MiB packed) the twins are skipped at run time.
        # (The two with the input channels padded to 8 that stood here gained nothing in the third H200
        # session; the config's train.pad_conv_channels still pads every variant.)
        packs = not cfg.train.compact_spikes
        kept = ", spikes saved as uint8" if packs else ", spikes saved unpacked"
        variants += [(f"snncompile{label}, CUDA graph{kept})", {**graphed, "compact_spikes": packs}),
                     (f"snncompile{label}, CUDA graph, channels_last{kept})", {**last, "compact_spikes": packs,
                                                                              "profiled": False})]
        # the same two with the input conv, its LIF and pool as one kernel (forward and backward), where the
        # network has such a conv and the config does not already fuse it; the NCHW one profiled: the input
        # conv's cuDNN kernels (the legacy implicit_convolve_sgemm, 551 us of bench-nmnist's NCHW step on the
        # H200) should be gone from it
        if fused and not cfg.train.fuse_input_conv and network_from_config(cfg.model).fuses_an_input_conv():
            fuse = ", input conv fused"
            variants += [(f"snncompile{label}, CUDA graph{fuse})", {**graphed, "fuse_input_conv": True,
                                                                     "profiled": profile}),
                         (f"snncompile{label}, CUDA graph, channels_last{fuse})", {**last, "fuse_input_conv": True,
                                                                                   "profiled": False})]
    variants.append(("torch loop (step-major)", dict(order="step", fused=False)))
    if compiled:
        variants += [("snncompile (layer-major, torch.compile)", dict(order="layer", fused=False, compiled=True)),
                     ("torch loop (step-major), torch.compile", dict(order="step", fused=False, compiled=True))]
    return variants


def _attempt(measure: Callable[[], dict]) -> dict | str:
    """A variant's stats, or ``'failed: <error>'``: one broken variant (a kernel that does not compile
    on this GPU, out of memory) costs its own row of the table, not the other variants' figures."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - reported in the table, one line
        from .bench import failure_row

        return failure_row(exc)


def _cuda_graphed(forward_backward_update: Callable[[], None], opt: torch.optim.Optimizer,
                  device: torch.device) -> Callable[[], None]:
    """Capture one training step in a CUDA graph and return its replay.

    PyTorch's whole-network recipe: a few eager steps on a side stream first (Triton compiles its
    kernels, the optimizer creates its momentum buffers), then gradients set to None and the step
    captured, so backward allocates the gradients from the graph's own memory pool and every replay
    rewrites them in place of zeroing them.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            forward_backward_update()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        forward_backward_update()
    return graph.replay


def _saved_mib(forward: Callable[[], torch.Tensor], amp, compact: bool) -> float:
    """MiB autograd saves for backward in one forward (counted by saved-tensor hooks, untimed)."""
    with amp, SavedActivations(compact=compact) as saved:
        out = forward()
    del out
    return saved.saved_bytes / 2**20


def _decode_peer(out: torch.Tensor, m) -> torch.Tensor:
    """Time-averaged output, voted in groups of G when the net ends in a voting layer."""
    rate = out.float().mean(0)
    if rate.shape[1] == m.classes * m.vote_group and m.vote_group > 1:
        return rate.unflatten(1, (m.classes, m.vote_group)).mean(-1)
    return rate


def format_train_table(r: dict) -> str:
    autotune = ", cuDNN autotuning" if r.get("cudnn_benchmark") and r["device"].startswith("cuda") else ""
    threads = f" ({counted(r['threads'], 'thread')})" if r["device"] == "cpu" and r.get("threads") else ""
    lines = [f"{r['model']}: T = {r['T']}, batch {r['batch']}, {r['precision']}, {r['device']}{threads}{autotune}, "
             f"median of {counted(r['steps'], 'step')}",
             ""]
    # the ratios are to the first of OUR variants that was timed, named in the header: where the default one
    # failed, another variant of ours (never the torch loop or a peer) is 1.00x, and where none of ours was
    # timed there is no ratio at all
    base_name = next((name for name, v in r["variants"].items() if name.startswith("snncompile") and isinstance(v, dict)),
                     None)
    base = r["variants"][base_name]["median_ms"] if base_name else None
    lines += [f"| variant | ms / step | samples/s | peak MiB | saved for backward MiB | "
              f"{'vs ' + base_name if base_name else 'vs snncompile (none timed)'} |", "|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        if not isinstance(v, dict):
            lines.append(f"| {name} | {v if v.startswith('failed: ') else 'skipped: ' + v} | | | | |")
            continue
        peak = "-" if v["peak_mib"] is None else f"{v['peak_mib']:.0f}"
        saved = "-" if v["saved_mib"] is None else f"{v['saved_mib']:.1f}"
        if "saved_mib_uncompacted" in v:
            saved += f" ({v['saved_mib_uncompacted']:.1f} without uint8 spikes)"
        lines.append(f"| {name} | {v['median_ms']:.1f} | {r['batch'] / (v['median_ms'] / 1e3):,.0f} | {peak} | {saved} | "
                     f"{'-' if base is None else format(v['median_ms'] / base, '.2f') + 'x'} |")
    update = r.get("optimizer_update")
    if isinstance(update, dict):
        lines += ["", f"SGD update alone ({update['parameters']:,} parameters, eager): fused {update['fused_ms']:.3f} ms "
                      f"(our variants), torch's default {update['default_ms']:.3f} ms (the loop's and the peers', "
                      f"so their ratios include it), {update['fused_ms'] / update['default_ms']:.2f}x"]
    elif update is not None:
        lines += ["", f"SGD update alone: {update}"]
    return "\n".join(lines)


def plot_train_bench(r: dict, path: Path) -> Path:
    """:func:`bench_train`'s result as a PNG (:func:`train_bench_figure`). Needs matplotlib (the ``plot``
    extra)."""
    from .artifacts import atomic_save
    from .plots import pyplot

    plt = pyplot()
    fig = train_bench_figure(r, plt)
    atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def train_bench_figure(r: dict, plt):
    """ms per step and memory per variant, as bars: peak GPU memory, or on a CPU (no peak measured) what
    autograd saves for backward; the variants that were not timed are named below the chart."""
    timed = {name: v for name, v in r["variants"].items() if isinstance(v, dict)}
    untimed = [f"{name}: {v}" for name, v in r["variants"].items() if not isinstance(v, dict)]
    names = list(timed)[::-1]  # barh draws bottom-up: the table's first row on top
    fig, (ax_ms, ax_mem) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * max(len(names), 1)), sharey=True)
    ms = [timed[n]["median_ms"] for n in names]
    ax_ms.barh(names, ms, color="tab:blue")
    ax_ms.set_xlabel("ms per training step (median)")
    memory = [timed[n]["peak_mib"] for n in names]
    memory_label = "peak GPU memory, MiB"
    if all(m is None for m in memory):  # a CPU run: no peak GPU memory; what autograd keeps for backward, measured
        memory = [timed[n].get("saved_mib") for n in names]
        memory_label = "saved for backward, MiB (peak memory: CUDA only)"
    ax_mem.barh(names, [0 if m is None else m for m in memory], color="tab:orange")
    ax_mem.set_xlabel(memory_label)
    for ax, values, fmt in ((ax_ms, ms, "{:.1f}"), (ax_mem, memory, "{:.0f}")):
        for y, value in enumerate(values):
            if value is not None:
                ax.text(0, y, " " + fmt.format(value), va="center", ha="left", fontsize=8, color="white")
        ax.grid(True, axis="x", alpha=0.3)
    if not names:
        ax_ms.text(0.5, 0.5, "no variant timed", transform=ax_ms.transAxes, ha="center", va="center")
    if names and all(m is None for m in memory):  # e.g. only compiled variants, whose saved tensors are not counted
        ax_mem.set_xticks([])
        ax_mem.text(0.5, 0.5, "not measured", transform=ax_mem.transAxes, ha="center", va="center")
    fig.suptitle(f"{r['model']}: T = {r['T']}, batch {r['batch']}, {r['precision']}, {r['device']}")
    if untimed:
        fig.text(0.01, 0.01, "not timed: " + "; ".join(untimed)[:200], fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if untimed else 0, 1, 1))
    return fig
