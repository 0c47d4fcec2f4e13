"""`snncompile init`: untrained runs whose every layer fires (for export and benchmarks)."""

import json

from click.testing import CliRunner

from conftest import REPO
from helpers import tiny_zoo_config
from snncompile.cli import cli
from snncompile.config import load_config
from snncompile.data import random_input
from snncompile.init_run import calibrate_firing, init_run
from snncompile.models import network_from_config
from snncompile.runs import load_network

import torch


def test_calibration_brings_every_layer_into_range():
    cfg = tiny_zoo_config(REPO / "models" / "cifar10.toml")
    net = network_from_config(cfg.model)
    x = random_input(cfg, 4, torch.Generator().manual_seed(0))
    record: dict = {}
    with torch.no_grad():
        net.forward_sequence(x, "layer", record)
    before = {k: float(v[0].mean()) for k, v in record.items()}
    assert min(before.values()) < 0.05  # default init: deep layers (nearly) silent
    rates = calibrate_firing(net, x)
    assert set(rates) == set(net.lif_names())
    assert all(0.05 <= r <= 0.3 for r in rates.values()), rates


def test_init_run_is_loadable_and_recorded(tmp_path):
    cfg = tiny_zoo_config(REPO / "models" / "bench-nmnist.toml")
    run, rates = init_run(cfg, tmp_path)
    loaded_cfg, net = load_network(run)
    assert loaded_cfg == cfg and not net.training
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["init"]["trained"] is False and manifest["init"]["calibrated_rates"] == rates


def test_init_cli(tmp_path):
    result = CliRunner().invoke(cli, ["init", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path),
                                      "--set", "model.arch='8C3-AP2-16FC-Voting'"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("initialised ") and "firing rates lif1" in result.output


def test_calibration_scales_the_bias_with_the_weights():
    """A bias that alone drives a LIF past the target: scaling only the weights shrank them towards 1.5^-40
    (about 1e-7 of their init) while the layer kept firing above it; the whole affine map brings it in."""
    cfg = load_config(REPO / "models" / "digits.toml", ["model.v_th=0.02"])
    net = network_from_config(cfg.model)
    first = next(s for s in net.stages if isinstance(s, torch.nn.Conv2d))
    assert first.bias is not None
    before = float(first.weight.detach().abs().max())
    rates = calibrate_firing(net, random_input(cfg, 4, torch.Generator().manual_seed(0)))
    assert all(0.05 <= r <= 0.3 for r in rates.values()), rates
    assert float(first.weight.detach().abs().max()) > 1e-3 * before


def test_init_cli_warns_when_calibration_cannot_reach_the_target(tmp_path):
    result = CliRunner().invoke(cli, ["init", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path),
                                      "--set", "model.arch='8C3-AP2-16FC-Voting'", "--set", "model.v_th=1e12"])
    assert result.exit_code == 0, result.output  # the run is written: it loads and exports
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "lif1 0.00" in warning[0] and "0.05-0.3" in warning[0]
