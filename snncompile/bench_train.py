"""`snncompile bench train`: milliseconds per training step, ours and the SNN libraries users have.

One step = forward over T steps + loss + backward + optimizer step, on random binary input of density
0.2 (the benchmark networks' protocol) with random labels; median of ``steps`` timed steps after
``warmup``. Variants:

- ``snncompile``: layer-major, fused Triton LIF on CUDA (pure torch elsewhere), optional bf16 autocast;
- ``torch loop``: the per-timestep loop over the same modules (the paper's order, what most code does);
- ``spikingjelly`` (multi-step LIFNode) and ``snntorch`` (Leaky, step loop), built layer for layer
  from the same architecture and neuron constants, when installed.

Peers use the same LIF dynamics: spikingjelly's ``LIFNode(decay_input=False, v_reset=0)`` updates
``V*(1 - 1/tau) + X``, so ``tau = 1 / (1 - k_tau1)``; snntorch's ``Leaky(beta=k_tau1,
reset_mechanism='zero')``. Their surrogates are their own (rectangular where the library has one).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .models import LayerSpec, network_from_config, parse_architecture

__all__ = ["bench_train", "format_train_table"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(scores: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(scores, y)
    return F.mse_loss(scores, F.one_hot(y, scores.shape[1]).to(scores.dtype))


def _time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak_mib": peak}


def _spikingjelly_net(specs: list[LayerSpec], cfg: Config, device: torch.device) -> nn.Module:
    from spikingjelly.activation_based import layer, neuron, surrogate

    m = cfg.model

    def lif():
        # Multi-step mode: spikingjelly picks its own fused implementation for the device.
        return neuron.LIFNode(tau=1.0 / (1.0 - m.k_tau1), decay_input=False, v_threshold=m.v_th, v_reset=0.0,
                              surrogate_function=surrogate.Rect(alpha=1.0 / m.a), step_mode="m")

    mods: list[nn.Module] = []
    c, h, w = m.input_shape
    flat = None
    for s in specs:
        if s.kind == "conv":
            mods += [layer.Conv2d(c, s.size, s.kernel, padding=s.kernel // 2, step_mode="m"), lif()]
            c = s.size
        elif s.kind == "pool":
            mods.append(layer.AvgPool2d(s.size, step_mode="m"))
            h, w = h // s.size, w // s.size
        else:
            if flat is None:
                mods.append(layer.Flatten(step_mode="m"))
                flat = c * h * w
            out = m.classes * m.vote_group if s.kind == "voting" else s.size
            mods.append(layer.Linear(flat, out, step_mode="m"))
            flat = out
            if s.kind != "readout":
                mods.append(lif())
    return nn.Sequential(*mods).to(device)


def _snntorch_step_fn(specs: list[LayerSpec], cfg: Config, device: torch.device):
    import snntorch as snn

    m = cfg.model
    mods = nn.ModuleList()
    c, h, w = m.input_shape
    flat = None
    for s in specs:
        if s.kind == "conv":
            mods.append(nn.Conv2d(c, s.size, s.kernel, padding=s.kernel // 2))
            mods.append(snn.Leaky(beta=m.k_tau1, threshold=m.v_th, reset_mechanism="zero"))
            c = s.size
        elif s.kind == "pool":
            mods.append(nn.AvgPool2d(s.size))
            h, w = h // s.size, w // s.size
        else:
            if flat is None:
                mods.append(nn.Flatten())
                flat = c * h * w
            out = m.classes * m.vote_group if s.kind == "voting" else s.size
            mods.append(nn.Linear(flat, out))
            flat = out
            if s.kind != "readout":
                mods.append(snn.Leaky(beta=m.k_tau1, threshold=m.v_th, reset_mechanism="zero"))
    mods = mods.to(device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        mems = {i: mod.init_leaky() for i, mod in enumerate(mods) if isinstance(mod, snn.Leaky)}
        outs = []
        for t in range(x.shape[0]):
            hcur = x[t]
            for i, mod in enumerate(mods):
                if isinstance(mod, snn.Leaky):
                    hcur, mems[i] = mod(hcur, mems[i])
                else:
                    hcur = mod(hcur)
            outs.append(hcur)
        return torch.stack(outs)

    return mods, forward


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def bench_train(cfg: Config, device: torch.device, precision: str = "fp32", steps: int = 20, warmup: int = 5,
                peers: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Time a training step of ``cfg``'s network per variant; returns {variant: stats or skip reason}."""
    from .kernels import fused_kernels_available

    m = cfg.model
    batch, steps_t = cfg.data.batch_size, m.T
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand((steps_t, batch, *m.input_shape), generator=gen) < 0.2).float().to(device)
    y = torch.randint(0, m.classes, (batch,), generator=gen).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    results: dict = {}

    def ours(order: str, fused: bool) -> dict:
        torch.manual_seed(0)
        net = network_from_config(m).to(device)
        net.fused_lif = fused
        opt = torch.optim.SGD(net.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)

        def step():
            with amp:
                scores = net(x, order).float()
            loss = _loss(scores, y, cfg.train.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return _time_steps(step, device, steps, warmup)

    fused = device.type == "cuda" and fused_kernels_available()
    results["snncompile" + (" (fused LIF)" if fused else " (layer-major)")] = ours("layer", fused)
    echo(f"done: snncompile")
    results["torch loop (step-major)"] = ours("step", False)
    echo("done: torch loop")
    if peers:
        specs = parse_architecture(m.arch)
        if _has("spikingjelly"):
            from spikingjelly.activation_based import functional

            torch.manual_seed(0)
            sj = _spikingjelly_net(specs, cfg, device)
            opt = torch.optim.SGD(sj.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)

            def sj_step():
                functional.reset_net(sj)
                with amp:
                    out = sj(x)
                scores = _decode_peer(out.float(), m)
                loss = _loss(scores, y, cfg.train.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            results["spikingjelly"] = _time_steps(sj_step, device, steps, warmup)
            echo("done: spikingjelly")
        else:
            results["spikingjelly"] = "not installed (pip install spikingjelly)"
        if _has("snntorch"):
            torch.manual_seed(0)
            mods, fwd = _snntorch_step_fn(specs, cfg, device)
            opt = torch.optim.SGD(mods.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)

            def snt_step():
                with amp:
                    out = fwd(x)
                scores = _decode_peer(out.float(), m)
                loss = _loss(scores, y, cfg.train.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            results["snntorch"] = _time_steps(snt_step, device, steps, warmup)
            echo("done: snntorch")
        else:
            results["snntorch"] = "not installed (pip install snntorch)"
    return {"model": cfg.name, "T": steps_t, "batch": batch, "precision": precision, "device": str(device),
            "steps": steps, "variants": results}


def _decode_peer(out: torch.Tensor, m) -> torch.Tensor:
    """Time-averaged output, voted in groups of G when the net ends in a voting layer."""
    rate = out.mean(0)
    if rate.shape[1] == m.classes * m.vote_group and m.vote_group > 1:
        return rate.unflatten(1, (m.classes, m.vote_group)).mean(-1)
    return rate


def format_train_table(r: dict) -> str:
    lines = [f"{r['model']}: T = {r['T']}, batch {r['batch']}, {r['precision']}, {r['device']}, median of {r['steps']} steps",
             "", "| variant | ms / step | samples/s | peak MiB | vs snncompile |", "|---|---|---|---|---|"]
    base = next(v["median_ms"] for v in r["variants"].values() if isinstance(v, dict))
    for name, v in r["variants"].items():
        if not isinstance(v, dict):
            lines.append(f"| {name} | skipped: {v} | | | |")
            continue
        peak = "-" if v["peak_mib"] is None else f"{v['peak_mib']:.0f}"
        lines.append(f"| {name} | {v['median_ms']:.1f} | {r['batch'] / (v['median_ms'] / 1e3):,.0f} | {peak} | "
                     f"{v['median_ms'] / base:.2f}x |")
    return "\n".join(lines)
