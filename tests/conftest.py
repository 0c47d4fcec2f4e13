"""Shared fixtures: tiny zoo networks and small configs that train in seconds."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

import pytest
import torch

from snncompile.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = sorted(glob.glob(str(REPO / "models" / "*.toml")))
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def _distinct_networks(paths: list[str]) -> list[str]:
    """The first config of each distinct [model] table: configs that differ only in data or training
    (mnist-fast is mnist-cpu's network with another schedule) add no network for the zoo tests."""
    seen, kept = set(), []
    for path in paths:
        with open(path, "rb") as f:
            model = repr(sorted(tomllib.load(f)["model"].items()))
        if model not in seen:
            seen.add(model)
            kept.append(path)
    return kept


ZOO = _distinct_networks(MODEL_FILES)  # the network tests run over these; every file still loads and trains a step


def zoo_ids() -> list[str]:
    return [Path(p).stem for p in ZOO]


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test, whatever the process started with: under nohup, or a shell's
    `&`, SIGINT starts ignored and a test's os.kill(SIGINT) would do nothing."""
    import signal

    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, started_with)


@pytest.fixture
def digits_cfg() -> Config:
    """The embedded default, shrunk to train in a couple of seconds."""
    return load_config(
        REPO / "models" / "digits.toml",
        ["train.epochs=2", "data.limit_train=256", "data.limit_test=128", "model.arch='16C3-AP2-32FC-Voting'", "train.lr=3e-3",
         "model.T=3", "train.threads=1"],
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
