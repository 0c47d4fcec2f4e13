"""Builders shared by the export/verify/backend tests: tiny trained-shape runs without training."""

from __future__ import annotations

from pathlib import Path

from snncompile.config import Config, load_config
from snncompile.init_run import init_run


def make_run(root: Path, cfg: Config, seed: int = 0) -> Path:
    """A run directory with a freshly initialised checkpoint whose every layer spikes."""
    return init_run(cfg, root, seed)[0]


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
