"""What one training forward keeps for backward, per variant, counted by saved-tensor hooks.

Usage: python scripts/saved_memory.py models/bench-nmnist.toml [--batch 128] [--precision bf16]

The fused-kernel path (the GPU training path) is run in Triton's interpreter on the CPU: its autograd
graph, hence what it saves, is the same on any device. Pure-torch paths and the peers (spikingjelly's
torch backend, snntorch) run as they do on the CPU. Forward only: no timing here (bench train times).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import argparse  # noqa: E402
import contextlib  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from snncompile.bench_train import _decode_peer, _has, _snntorch_step_fn, _spikingjelly_net  # noqa: E402
from snncompile.config import load_config  # noqa: E402
from snncompile.memory import SavedActivations  # noqa: E402
from snncompile.models import network_from_config, parse_architecture  # noqa: E402


def saved_mib(forward, compact: bool, amp) -> float:
    with amp, SavedActivations(compact=compact) as saved:
        out = forward()
    del out
    return saved.saved_bytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_toml")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    cfg = load_config(args.model_toml, [f"data.batch_size={args.batch}"] if args.batch else [])
    m = cfg.model
    x = (torch.rand((m.T, cfg.data.batch_size, *m.input_shape), generator=torch.Generator().manual_seed(0)) < 0.2).float()
    rows = []
    for label, fused, order, compact in (("snncompile, fused LIF kernel, uint8 spikes (GPU training path)", True, "layer", True),
                                         ("snncompile, fused LIF kernel, spikes not compacted", True, "layer", False),
                                         ("snncompile, pure torch layer-major, uint8 spikes (CPU path)", False, "layer", True),
                                         ("torch step loop (same modules)", False, "step", False)):
        net = network_from_config(m)
        net.fused_lif = fused
        t0 = time.perf_counter()
        rows.append((label, saved_mib(lambda: net(x, order), compact, amp), time.perf_counter() - t0))
    specs = parse_architecture(m.arch)
    if _has("spikingjelly"):
        from spikingjelly.activation_based import functional

        sj = _spikingjelly_net(specs, cfg, torch.device("cpu"))
        functional.reset_net(sj)
        rows.append(("spikingjelly (multi-step LIFNode, torch backend)", saved_mib(lambda: _decode_peer(sj(x), m), False, amp), 0.0))
    if _has("snntorch"):
        _, fwd = _snntorch_step_fn(specs, cfg, torch.device("cpu"))
        rows.append(("snntorch (Leaky, step loop)", saved_mib(lambda: _decode_peer(fwd(x), m), False, amp), 0.0))
    print(f"{cfg.name}: T = {m.T}, batch {cfg.data.batch_size}, {args.precision}; MiB autograd saves for backward in one forward")
    print("\n| variant | saved for backward MiB |\n|---|---|")
    for label, mib, _ in rows:
        print(f"| {label} | {mib:,.1f} |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
