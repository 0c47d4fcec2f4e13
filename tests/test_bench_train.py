"""`snncompile bench train`: every variant trains the same network and is timed; peers when installed."""

import importlib.util

from click.testing import CliRunner

from conftest import REPO
from snncompile.cli import cli

TINY = ["--set", "model.arch='8C3-AP2-8C3-AP2-16FC-10'", "--T", "3", "--batch", "4", "--steps", "2", "--warmup", "1",
        "--device", "cpu"]


def test_bench_train_prints_every_variant():
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), *TINY, "--peers"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "bench-nmnist: T = 3, batch 4, fp32, cpu, median of 2 steps" in out
    assert "| snncompile (layer-major) |" in out and "| torch loop (step-major) |" in out and "1.00x |" in out
    for peer in ("spikingjelly", "snntorch"):
        if importlib.util.find_spec(peer):
            assert f"| {peer} | " in out and f"| {peer} | skipped" not in out
        else:
            assert f"| {peer} | skipped: not installed" in out


def test_bench_train_on_a_voting_network_with_mse():
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "digits.toml"), "--set",
                                      "model.arch='8C3-AP2-16FC-Voting'", "--T", "2", "--batch", "4", "--steps", "1",
                                      "--warmup", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| snncompile (layer-major) |" in result.output


def test_inference_bench_still_takes_a_run_dir(tmp_path):
    result = CliRunner().invoke(cli, ["bench", str(tmp_path)])
    assert result.exit_code == 1 and "manifest.json is missing" in result.output


def test_bench_train_measures_what_uint8_spikes_save():
    import pytest
    import torch

    from snncompile.bench_train import bench_train
    from snncompile.config import load_config

    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='8C3-AP2-8C3-AP2-16FC-10'", "model.T=3",
                                                               "data.batch_size=4"])
    r = bench_train(cfg, torch.device("cpu"), steps=1, warmup=0, echo=lambda s: None)
    ours = r["variants"]["snncompile (layer-major)"]
    # spikes autograd saves (T=3, B=4): lif1 [8, 34, 34] and lif2 [8, 17, 17] for the pools, lif3 [16]
    # for the readout: (9248 + 2312 + 16) * 12 = 138,912 values, 4 bytes -> 1 byte each
    assert (ours["saved_mib_uncompacted"] - ours["saved_mib"]) * 2**20 == pytest.approx(3 * 138_912)
    assert "saved_mib_uncompacted" not in r["variants"]["torch loop (step-major)"]  # the plain loop keeps fp32
