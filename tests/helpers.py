"""Builders shared by the export/verify/backend tests: tiny trained-shape runs without training."""

from __future__ import annotations

from pathlib import Path

import torch

from snncompile import __version__
from snncompile.artifacts import atomic_save, atomic_write_text, new_run_dir, record_artifact, update_manifest
from snncompile.config import Config, dumps_toml, load_config
from snncompile.models import NeuNormCell, network_from_config
from snncompile.runs import CHECKPOINT, CONFIG


def make_run(root: Path, cfg: Config, gain: float = 3.0, seed: int = 0) -> Path:
    """A run directory with a freshly initialised checkpoint whose every layer spikes."""
    torch.manual_seed(seed)
    net = network_from_config(cfg.model)
    with torch.no_grad():
        for stage in net.stages:
            if isinstance(stage, (torch.nn.Conv2d, torch.nn.Linear)):
                stage.weight.mul_(gain)
            if isinstance(stage, NeuNormCell):
                stage.norm.u_scale.uniform_(-0.5, 0.5)
    run = new_run_dir(root, cfg.name)
    atomic_write_text(run / CONFIG, dumps_toml(cfg))
    update_manifest(run, model=cfg.name, config_hash=cfg.hash(), created_by=f"snncompile {__version__} tests",
                    classes=[str(i) for i in range(cfg.model.classes)])
    payload = {"format": 1, "epoch": 0, "model": net.state_dict(), "snncompile_version": __version__}
    atomic_save(run / CHECKPOINT, lambda f: torch.save(payload, f))
    record_artifact(run, CHECKPOINT)
    return run


def tiny_zoo_config(path: str | Path) -> Config:
    """A zoo entry at 1/16 width, T = 4, real data off (seeded random references only)."""
    cfg = load_config(path)
    from snncompile.models import parse_architecture

    specs = parse_architecture(cfg.model.arch, width_divisor=16)
    tokens = []
    for s in specs:
        tokens.append({"conv": f"{s.size}C{s.kernel}", "pool": f"AP{s.size}", "fc": f"{s.size}FC",
                       "voting": "Voting", "readout": str(s.size)}[s.kind])
    cfg.model.arch = "-".join(tokens)
    cfg.model.T = 4
    return cfg
