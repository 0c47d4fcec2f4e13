"""`snncompile init`: a run directory with freshly initialised weights, calibrated so every layer fires.

For benchmarking and export checks without training: a network at default init barely spikes past
its first layers, which would make speed and equivalence figures meaningless. Calibration walks the
weighted layers in order and scales each one's weights and bias (x1.5 or /1.5 steps) until the LIF
right after it fires at a rate inside ``target`` on random input drawn like the export's reference inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from .artifacts import atomic_save, atomic_write_text, environment, new_run_dir, record_artifact, update_manifest
from .config import Config, dumps_toml, with_absolute_data_paths
from .data import random_input
from .exact import snap_to_grid
from .models import LIFCell, NeuNormCell, SpikingNetwork, network_from_config
from .runs import CHECKPOINT, CONFIG, model_settings

__all__ = ["calibrate_firing", "init_run", "FIRING_TARGET"]

FIRING_TARGET = (0.05, 0.3)  # the firing rate calibration brings every LIF layer to


@torch.no_grad()
def calibrate_firing(net: SpikingNetwork, x: torch.Tensor, target: tuple[float, float] = FIRING_TARGET,
                     max_steps: int = 40) -> dict[str, float]:
    """Scale each weighted layer so the LIF after it fires within ``target``; returns final rates.

    Layer by layer: the input of the layer being scaled is computed once from the (already fixed)
    layers before it, so each trial runs one conv/linear and one LIF scan, not the whole network.
    """
    stages = list(net.stages)
    rates: dict[str, float] = {}
    h, done = x, 0  # h = output of stages[:done]
    for i, stage in enumerate(stages):
        if not isinstance(stage, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        if i + 1 >= len(stages) or not isinstance(stages[i + 1], LIFCell):
            continue  # the non-spiking readout: nothing to calibrate
        lif = stages[i + 1]
        h = net.run_stages(h, stages[done:i])
        done = i
        for _ in range(max_steps):
            rate = float(net.run_stages(h, [stage, lif]).mean())
            if target[0] <= rate <= target[1]:
                break
            # The whole affine map, bias included: a bias that alone drives the LIF past the target would
            # otherwise shrink the weights towards zero (1.5^-40) while the rate stays where it was.
            factor = 1.5 if rate < target[0] else 1 / 1.5
            stage.weight.mul_(factor)
            if stage.bias is not None:
                stage.bias.mul_(factor)
        rates[lif.name] = rate
    return rates


def init_run(cfg: Config, out_root: str | Path, seed: int = 0, calibrate: bool = True, batch: int = 8) -> tuple[Path, dict]:
    """Write ``out_root/<name>/<run-id>/`` with an untrained (calibrated) checkpoint; returns (run, rates)."""
    cfg = with_absolute_data_paths(cfg)  # the run's config.toml must find the data from any directory
    torch.manual_seed(seed)
    net = network_from_config(cfg.model).eval()
    rates: dict[str, float] = {}
    with torch.no_grad():
        for stage in net.stages:
            if isinstance(stage, NeuNormCell):
                stage.norm.u_scale.uniform_(-0.5, 0.5)  # exercise the recurrence, not the zero init
    if calibrate:
        rates = calibrate_firing(net, random_input(cfg, batch, torch.Generator().manual_seed(seed)))
    if cfg.model.exact:
        snap_to_grid(list(net.stages))
    run = new_run_dir(out_root, cfg.name)
    atomic_write_text(run / CONFIG, dumps_toml(cfg))
    update_manifest(run, model=cfg.name, config_hash=cfg.hash(), created_by=f"snncompile {__version__} init",
                    environment=environment(), classes=[str(i) for i in range(cfg.model.classes)],
                    init={"seed": seed, "calibrated_rates": rates, "trained": False})
    payload = {"format": 1, "epoch": 0, "snncompile_version": __version__, "config_hash": cfg.hash(),
               "model_settings": model_settings(cfg),
               "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    atomic_save(run / CHECKPOINT, lambda f: torch.save(payload, f))
    record_artifact(run, CONFIG)
    record_artifact(run, CHECKPOINT)
    return run, rates
