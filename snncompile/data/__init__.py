"""Datasets as in-memory tensors, batched time-first for the trainer.

Static datasets yield one frame per sample (``[N, C, H, W]``); the trainer repeats it over the T steps
(PAPER.md §3: the encoding layer sees the same image at every step, nothing random in the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..config import EVENT_DATASETS, IMAGE_DATASETS, Config, DataConfig
from ..errors import ConfigError
from .augment import make_augment

__all__ = ["Split", "Dataset", "balanced_subset", "load_dataset", "random_input", "to_time_major", "RELATIVE_ROOT",
           "batches"]


@dataclass
class Split:
    """Samples ``x`` (``[N, C, H, W]`` static or ``[N, T, C, H, W]`` frames) and labels ``y`` ``[N]``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    static: bool = True
    info: dict = field(default_factory=dict)
    # Training-time augmentation ``(x [B, ...], generator) -> x``; None for none.
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None


def _normalise(ds: Dataset, mean: list[float], std: list[float]) -> None:
    if not mean:
        return
    shape = (1, -1, 1, 1)
    m = torch.tensor(mean).view(shape)
    s = torch.tensor(std).view(shape)
    for split in (ds.train, ds.test):
        split.x = (split.x - m) / s
    ds.info.update(mean=list(mean), std=list(std))


# how to point a run at a dataset's folder; a relative root in a model TOML (models/mnist.toml's
# ../shared/data/mnist) is read from the directory the command runs in, not the TOML's
RELATIVE_ROOT = "a relative data.root is read from the working directory, not from the TOML's folder"


# Datasets whose classes a horizontal mirror does not keep: why, for the error.
_NOT_MIRRORABLE = {
    "dvs_gesture": "a mirrored right-hand wave is a left-hand wave (and clockwise counter-clockwise), another class",
    **{name: "a mirrored digit is not that digit (a 2, a 3, a 7 are no digit at all mirrored)"
       for name in ("digits", "mnist", "nmnist")},
}


def _set_augment(ds: Dataset, d: DataConfig, fill: float | list[float]) -> None:
    # 'auto' is what the paper trained with: RandomCrop(32, pad 4) + horizontal flip on CIFAR10 (PAPER.md §5).
    paper_default = "shift-flip" if ds.name == "cifar10" else "none"
    if d.augment == "shift-flip" and ds.name in _NOT_MIRRORABLE:
        raise ConfigError(f"data.augment='shift-flip' on {ds.name}: {_NOT_MIRRORABLE[ds.name]}; use 'shift'")
    ds.augment, ds.info["augment"] = make_augment(d.augment, d.augment_pad, fill, paper_default)


def load_dataset(cfg: Config, progress: bool = True) -> Dataset:
    """Load the dataset named by ``cfg.data`` (in memory, normalised, limited if asked)."""
    d = cfg.data
    if d.name == "digits":
        from .digits import load_digits

        ds = load_digits(d.test_fraction, d.split_seed)
        mean, std = d.mean or [0.5], d.std or [0.5]
    elif d.name == "mnist":
        from .mnist import load_mnist

        ds = load_mnist(d.root)
        mean, std = d.mean or [0.1307], d.std or [0.3081]
    elif d.name == "cifar10":
        from .cifar10 import load_cifar10

        ds = load_cifar10(d.root)
        mean, std = d.mean or [0.4914, 0.4822, 0.4465], d.std or [0.2023, 0.1994, 0.2010]
    elif d.name in EVENT_DATASETS:
        ds = _load_events(cfg, progress)
        _set_augment(ds, d, fill=0.0)  # padding = no events
        return ds
    else:
        raise ConfigError(f"data.name {d.name!r} has no dataset to train on (it is for benchmarks)")
    if d.limit_train:
        ds.train = Split(ds.train.x[: d.limit_train], ds.train.y[: d.limit_train])
    if d.limit_test:
        ds.test = Split(ds.test.x[: d.limit_test], ds.test.y[: d.limit_test])
    _normalise(ds, mean, std)
    _set_augment(ds, d, fill=[-m / s for m, s in zip(mean, std)])  # padding = black, as padding before normalising
    sample_shape = list(ds.train.x.shape[1:] if ds.static else ds.train.x.shape[2:])
    if sample_shape != list(cfg.model.input_shape):
        raise ConfigError(f"model.input_shape is {cfg.model.input_shape} but {d.name} frames are {sample_shape}")
    return ds


def _load_events(cfg: Config, progress: bool) -> Dataset:
    """Event dataset -> cached frames ``[N, T, P, H, W]`` (uint16 counts) per split."""
    from pathlib import Path

    from .events import SOURCES, FrameSpec, list_samples
    from .frame_cache import default_cache_dir, load_frames

    d = cfg.data
    if not d.root:
        raise ConfigError(f"{d.name} needs data.root: --set data.root=/path/to/data")
    source = SOURCES[d.name]
    spec = FrameSpec(cfg.model.T, d.binning, d.bin_us, d.downsample, d.polarity, d.frame_clip)
    shape = list(spec.frame_shape(source))  # known before any frame is built: a wrong shape costs no minutes
    if shape != list(cfg.model.input_shape):
        raise ConfigError(f"model.input_shape is {cfg.model.input_shape} but {d.name} frames are {shape} "
                          f"(data.downsample={d.downsample}, data.polarity={d.polarity})")
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
    splits, info = {}, {"frames": {"T": spec.steps, "binning": spec.binning, "bin_us": spec.bin_us,
                                   "downsample": spec.downsample, "polarity": spec.polarity, "clip": spec.clip},
                        "split_seed": d.split_seed}
    for split, train, limit in (("train", True, d.limit_train), ("test", False, d.limit_test)):
        files = list_samples(d.name, d.root, train, d.split_seed)
        if limit and limit < len(files):
            files = balanced_subset(files, limit, d.split_seed)
        frames, labels, cache_info = load_frames(d.name, split, spec, files, cache, d.split_seed, d.num_workers, progress)
        splits[split] = Split(torch.from_numpy(frames), torch.from_numpy(labels))
        info[f"{split}_cache"] = cache_info
    return Dataset(d.name, splits["train"], splits["test"], list(source.classes), static=False, info=info)


def balanced_subset(samples: list[tuple], limit: int, seed: int) -> list[tuple]:
    """``limit`` of the ``(file, label)`` samples, as even across labels as their counts allow, drawn with a
    seeded permutation and kept in listing order. Event datasets list their files class by class, so the
    first ``limit`` would hold only the first few classes."""
    by_label: dict = {}
    for i in np.random.default_rng(seed).permutation(len(samples)):
        by_label.setdefault(samples[i][1], []).append(int(i))
    keep: list[int] = []
    for depth in range(max(map(len, by_label.values()), default=0)):  # round robin: one of each label per pass
        keep += [q[depth] for q in by_label.values() if depth < len(q)][: limit - len(keep)]
    return [samples[i] for i in sorted(keep)]


def random_input(cfg: Config, batch: int, generator: torch.Generator, steps: int | None = None) -> Tensor:
    """Seeded stand-in inputs ``[T, B, ...]`` (``T = steps``, default model.T) shaped like the dataset's: normal
    per step for image datasets (a stronger test of a graph than one image repeated), binary with density 0.2
    for event data and ``random``."""
    shape = (cfg.model.T if steps is None else steps, batch, *cfg.model.input_shape)
    if cfg.data.name in IMAGE_DATASETS:
        return torch.randn(shape, generator=generator)
    return (torch.rand(shape, generator=generator) < 0.2).float()


def to_time_major(x: Tensor, steps: int, static: bool) -> Tensor:
    """Batch -> ``[T, B, ...]``: a static ``[B, C, H, W]`` is repeated T times (a view, no copy);
    frames ``[B, T, C, H, W]`` are transposed."""
    if static:
        return x.unsqueeze(0).expand(steps, *x.shape)
    if x.shape[1] != steps:
        raise ConfigError(f"frames have {x.shape[1]} steps but model.T is {steps}")
    return x.transpose(0, 1)


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None):
    """Yield ``(x, y)`` mini-batches; shuffled with ``generator`` when given, in order otherwise."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield split.x[idx], split.y[idx]
