"""Typed run configuration: one TOML file per model, `--set section.key=value` overrides.

A config has three sections, each a dataclass below. Unknown keys, wrong types and values outside a
field's allowed set raise :class:`~snncompile.errors.ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "Config", "load_config", "apply_overrides", "dumps_toml",
           "with_absolute_data_paths", "EVENT_DATASETS", "EXECUTION_KEYS", "IMAGE_DATASETS", "MAX_STEPS",
           "flat_values", "with_execution_settings"]


@dataclass
class ModelConfig:
    """Network and neuron constants (PAPER.md §1-§4)."""

    arch: str = "32C3-AP2-64C3-AP2-256FC-Voting"
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])  # one frame, [C, H, W]
    T: int = 8
    classes: int = 10
    vote_group: int = 10
    v_th: float = 0.5
    k_tau1: float = 0.2
    a: float = 1.0
    neunorm: bool = False
    neunorm_before_fc: bool = False
    k_tau2: float = 0.9
    neunorm_u_init: float = 0.0  # every entry of NeuNorm's U at the start (PAPER.md: unverified; 0 = identity)
    dropout: float = 0.0
    # exact arithmetic (snncompile/exact.py): every membrane the same bits in every fp32 runtime
    exact: bool = False
    exact_bits: int = 8  # fractional bits of the input and NeuNorm outputs (multiples of 2^-exact_bits)
    # the input is clamped to +-this before it is quantized: 4 holds normalised images (MNIST's reach 2.8,
    # CIFAR10's 2.1); event counts above it are cut, and training says how many
    exact_input_max: float = 4.0


@dataclass
class DataConfig:
    """Dataset and batching. ``root`` is the folder holding the dataset's files (unused for digits)."""

    name: str = "digits"
    root: str = ""
    batch_size: int = 64
    eval_batch_size: int = 256
    test_fraction: float = 0.2  # digits only: held-out share of the seeded split
    split_seed: int = 0
    mean: list[float] = field(default_factory=list)  # per channel; empty = dataset default
    std: list[float] = field(default_factory=list)
    limit_train: int = 0  # 0 = all; >0 keeps the first N (quick runs, tests)
    limit_test: int = 0
    num_workers: int = 0  # processes building the event-frame cache; 0 = one per CPU
    # Event datasets (nmnist, dvs_cifar10, dvs_gesture): how events become T frames.
    binning: str = "count"  # 'count': T equal-duration bins per sample; 'window': bins of bin_us
    bin_us: int = 10_000
    downsample: int = 1  # integer spatial factor
    polarity: str = "split"  # 'split': 2 channels; 'merge': 1
    frame_clip: int = 0  # 0 = event counts; n = clip counts at n (1 = binary frames)
    cache_dir: str = ""  # frame cache; empty = $XDG_CACHE_HOME/snncompile/frames
    # Training batches: 'auto' = what the paper did on the dataset (CIFAR10 shift-flip, others none),
    # 'none', 'shift' (pad by augment_pad, crop back at a random offset), 'shift-flip' (+ mirror half).
    augment: str = "auto"
    augment_pad: int = 4


@dataclass
class TrainConfig:
    """Optimisation, schedule and execution settings."""

    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "none"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    loss: str = "mse"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    execution: str = "layer"
    kernels: str = "auto"  # LIF scan: 'auto' = fused Triton kernel on CUDA when Triton imports; 'triton'; 'torch'
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    # conv weights (hence activations) in channels_last: what tensor-core convolutions read natively
    channels_last: bool = False
    # convs whose input channels are not a multiple of this run on zero-padded copies of input and weight
    # (the same function; 1 = off): cuDNN's bf16 tensor-core kernels want 8 (SpikingNetwork.pad_conv_channels)
    pad_conv_channels: int = 1
    # with the fused LIF kernels: the input conv (few input channels), its LIF and the pool after them as one
    # kernel, forward and backward (snncompile.kernels.input_conv; SpikingNetwork.fuse_input_conv)
    fuse_input_conv: bool = False
    # on CUDA: the optimizer's update as torch's fused kernel (one pass over parameters, gradients and
    # state) rather than its default foreach kernels (several passes); the same update up to rounding
    fused_optimizer: bool = True
    # the spikes autograd keeps for backward stored as uint8 (exact; 1 byte per element less than bf16, 3 less
    # than fp32) at the price of a copy in forward and one in backward (snncompile.memory.SavedActivations)
    compact_spikes: bool = True
    # cuDNN times its convolution algorithms on the first call of each input shape and keeps the
    # fastest (torch.backends.cudnn.benchmark); training shapes are fixed, so the search pays for itself.
    # Off: cuDNN's heuristic pick, the same algorithm every run (bit-reproducible GPU training).
    cudnn_benchmark: bool = True


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("digits", "mnist", "cifar10", "nmnist", "dvs_cifar10", "dvs_gesture", "random"),
    "data.binning": ("count", "window"),
    "data.polarity": ("split", "merge"),
    "data.augment": ("auto", "none", "shift", "shift-flip"),
    "train.optimizer": ("adam", "sgd"),
    "train.schedule": ("none", "step", "multistep", "cosine"),
    "train.loss": ("mse", "ce"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16"),
    "train.execution": ("layer", "step"),
    "train.kernels": ("auto", "triton", "torch"),
}


@dataclass
class Config:
    """A whole run: model, data and training sections plus a name."""

    name: str = "model"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """SHA-256 of the canonical JSON of the resolved config (first 16 hex digits)."""
        return _digest(self.to_dict())

    def result_hash(self) -> str:
        """:meth:`hash` without the :data:`EXECUTION_KEYS`: equal for two configs that train the same weights
        (the pipeline finds a finished run by it, so another cache folder does not mean training again)."""
        values = self.to_dict()
        for key in EXECUTION_KEYS:
            *sections, leaf = key.split(".")
            table = values
            for section in sections:
                table = table[section]
            del table[leaf]
        return _digest(values)


# Keys that change how a run executes or what it is called, not the weights it trains. Not train.threads: on a CPU
# the thread count changes the order of floating-point sums, and a spiking network's training carries such
# last-bit differences on to other weights (1 and 2 threads gave 53.8 % and 57.7 % after one digits epoch).
EXECUTION_KEYS = ("description", "data.num_workers", "data.cache_dir", "data.eval_batch_size",
                  "train.compact_spikes")  # packing saved spikes to uint8 is exact: the same weights either way


def _digest(values: dict[str, Any]) -> str:
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
MAX_STEPS = 4096  # model.T: far past any SNN's window, and short of sizes torch cannot allocate
EVENT_DATASETS = ("nmnist", "dvs_cifar10", "dvs_gesture")
IMAGE_DATASETS = ("digits", "mnist", "cifar10")  # static images, shown at every step


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the dataclass field type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        # --set parses TOML: model.arch=10 is the integer 10, and only quotes make it the text the key expects
        quote = f" (quoted: --set {key}='{value}')" if tp is str and isinstance(value, (int, float, bool)) else ""
        raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__}){quote}")
    if tp is float and not math.isfinite(value):
        # no key means anything by nan or inf, and range checks written `x <= 0` let nan through (model.a = nan
        # trained at chance with exit 0)
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    if tp is str and any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        # e.g. undecodable bytes in a --set argument: config.toml (UTF-8) could not hold it
        raise ConfigError(f"config key {key!r} is not valid Unicode text: {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] in ("name", "description"):
        setattr(cfg, parts[0], _coerce(dotted, value, str))
        return
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise ConfigError(f"unknown config key {dotted!r} (sections: {', '.join(_SECTIONS)}; e.g. train.lr)")
    section, key = parts
    types_ = _field_types(_SECTIONS[section])
    if key not in types_:
        elsewhere = [s for s, cls in _SECTIONS.items() if key in _field_types(cls)]
        hint = f"it is a [{elsewhere[0]}] key: {elsewhere[0]}.{key}; " if elsewhere else ""
        raise ConfigError(f"unknown config key {dotted!r} ({hint}known in [{section}]: {', '.join(types_)})")
    value = _coerce(dotted, value, types_[key])
    if dotted in _CHOICES and value not in _CHOICES[dotted]:
        raise ConfigError(f"config key {dotted!r} must be one of {', '.join(_CHOICES[dotted])}, got {value!r}")
    setattr(getattr(cfg, section), key, value)


def _validate(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    if cfg.name.strip() in ("", ".", "..") or re.search(r"[/\\\x00]", cfg.name):  # runs go to <out>/<name>/
        raise ConfigError(f"name must be one directory name (no '/', '\\', '.' or '..'), got {cfg.name!r}")
    if not 1 <= m.T <= MAX_STEPS:  # a huge T overflowed torch's expand() with a traceback
        raise ConfigError(f"model.T must be between 1 and {MAX_STEPS}, got {m.T}")
    # [C, H, W] only: every dataset gives frames, and a flat [F] passed here, then failed building the network
    if len(m.input_shape) != 3 or any(s < 1 for s in m.input_shape):
        raise ConfigError(f"model.input_shape must be [C, H, W] with positive sizes, got {m.input_shape}")
    if not 0.0 < m.k_tau1 <= 1.0 or not 0.0 <= m.k_tau2 < 1.0:
        raise ConfigError(f"need 0 < model.k_tau1 <= 1 and 0 <= model.k_tau2 < 1, got {m.k_tau1}, {m.k_tau2}")
    if m.a <= 0 or not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"need model.a > 0 and 0 <= model.dropout < 1, got {m.a}, {m.dropout}")
    if not 0 <= m.exact_bits <= 16 or not m.exact_input_max > 0:
        raise ConfigError(f"need 0 <= model.exact_bits <= 16 and model.exact_input_max > 0, got {m.exact_bits}, "
                          f"{m.exact_input_max}")
    if d.batch_size < 1 or d.eval_batch_size < 1:
        raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
    if d.augment_pad < 0:
        raise ConfigError(f"data.augment_pad must be >= 0, got {d.augment_pad}")
    if d.augment in ("shift", "shift-flip") and d.augment_pad > min(m.input_shape[1:]) // 2:
        raise ConfigError(f"data.augment_pad {d.augment_pad} would shift {m.input_shape[1]}x{m.input_shape[2]} images "
                          f"mostly out of frame: at most {min(m.input_shape[1:]) // 2}")
    for key in ("mean", "std"):
        values = getattr(d, key)
        if values and d.name in EVENT_DATASETS:
            raise ConfigError(f"data.{key} normalises images; {d.name} frames are event counts and are not "
                              "normalised: remove it")
        if values and len(values) != m.input_shape[0]:
            raise ConfigError(f"data.{key} has {len(values)} values for the {m.input_shape[0]} channel(s) of "
                              f"model.input_shape {m.input_shape}: one per channel")
    if d.downsample < 1 or d.bin_us < 1 or d.frame_clip < 0:
        raise ConfigError(f"need data.downsample >= 1, data.bin_us >= 1, data.frame_clip >= 0; got "
                          f"{d.downsample}, {d.bin_us}, {d.frame_clip}")
    t = cfg.train
    if t.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {t.epochs}")
    if t.schedule == "multistep" and not t.milestones:
        raise ConfigError("train.schedule = 'multistep' needs train.milestones (the epochs after which the learning "
                          "rate is multiplied by train.gamma), e.g. [30, 60]")
    if cfg.train.pad_conv_channels < 1:
        raise ConfigError(f"train.pad_conv_channels must be >= 1 (1: no padding), got {cfg.train.pad_conv_channels}")
    _check_ranges(cfg)


_SEEDS = 1 << 32  # torch and numpy both take these; larger ones overflow once mixed with the epoch (train.py)


def _check_ranges(cfg: Config) -> None:
    """The numeric keys the checks above leave out (nan and inf never get here: _coerce refuses them). Out of
    range, each failed later with a traceback (test_fraction 0: a division by zero after the first epoch) or
    quietly did something else (a negative data.limit_train dropped samples from the end)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    checks = [
        ("model.classes", m.classes, m.classes >= 1, ">= 1"),
        # at or below 0 every neuron fires at every step, whatever its input: nothing is learned
        ("model.v_th", m.v_th, m.v_th > 0.0, "> 0"),
        ("model.vote_group", m.vote_group, m.vote_group >= 1, ">= 1"),
        ("data.test_fraction", d.test_fraction, 0.0 < d.test_fraction < 1.0, "between 0 and 1 (exclusive)"),
        ("data.split_seed", d.split_seed, 0 <= d.split_seed < _SEEDS, "in [0, 2^32)"),
        ("data.std", d.std, all(0.0 < v < math.inf for v in d.std), "positive finite numbers"),
        ("data.limit_train", d.limit_train, d.limit_train >= 0, ">= 0 (0: all)"),
        ("data.limit_test", d.limit_test, d.limit_test >= 0, ">= 0 (0: all)"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0 (0: one per CPU)"),
        ("train.lr", t.lr, 0.0 < t.lr < math.inf, "a positive finite number"),
        ("train.momentum", t.momentum, 0.0 <= t.momentum < 1.0, "in [0, 1) (SGD diverges from 1 up)"),
        ("train.weight_decay", t.weight_decay, 0.0 <= t.weight_decay < math.inf, ">= 0 and finite"),
        ("train.gamma", t.gamma, 0.0 < t.gamma <= 1.0, "in (0, 1] (the schedules decay the learning rate by it)"),
        ("train.milestones", t.milestones, all(e >= 1 for e in t.milestones), "epochs >= 1"),
        ("train.seed", t.seed, 0 <= t.seed < _SEEDS, "in [0, 2^32)"),
        ("train.threads", t.threads, t.threads >= 0, ">= 0 (0: torch's default)"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a validated :class:`Config` from nested plain values (a parsed TOML document)."""
    cfg = Config()
    try:
        for top, value in raw.items():
            if top in _SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"[{top}] must be a table")
                for key, v in value.items():
                    _set(cfg, f"{top}.{key}", v)
            else:
                _set(cfg, top, value)
        _validate(cfg)
    except ConfigError as e:  # the file it is in: a run's config.toml edited by hand said only the key
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=0.01'`` -> ``('train.lr', 0.01)``; the value is read as a TOML literal, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as sgd or ~/data
    return key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``--set`` overrides in order and re-validate."""
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a model TOML, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8 whatever the locale's encoding
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    raw.setdefault("name", path.stem)
    model = raw.get("model", {})
    named = isinstance(model, dict) and "arch" in model or any(o.split("=", 1)[0].strip() == "model.arch"
                                                               for o in overrides or [])
    if not named:  # an empty file, or one without [model], trained a default network nobody chose
        raise ConfigError(f'{path}: no [model] arch: a model TOML names its network, e.g. arch = '
                          f'"32C3-AP2-64C3-AP2-256FC-Voting" (the files in models/ are examples)')
    cfg = from_dict(raw, str(path))
    return with_absolute_data_paths(apply_overrides(cfg, overrides or []))


def with_execution_settings(run_cfg: Config, cfg: Config) -> Config:
    """The config a resumed run trains on: ``run_cfg`` (its config.toml) with the :data:`EXECUTION_KEYS` of
    ``cfg`` (this machine's data.num_workers, say). Any other difference is an error: a resume continues the same
    training, so ``cfg`` must train the same weights."""
    cfg = with_absolute_data_paths(cfg)
    theirs, ours = flat_values(run_cfg), flat_values(cfg)
    changed = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k) and k not in RESUME_KEYS)
    if changed:
        raise ConfigError(f"a resumed run keeps its own config; only {', '.join(RESUME_KEYS)} may differ, not "
                          f"{', '.join(changed)}")
    return cfg


# What `train --resume --set` may change: how the run executes, and where its dataset now is (moved; the
# checkpoint's own config check lets data.root differ too). The run's config.toml keeps the root it was made
# with: a later resume is given the new one again, and verify --test-set reads config.toml's (edit it there).
RESUME_KEYS = (*EXECUTION_KEYS, "data.root")


def flat_values(cfg: Config) -> dict[str, Any]:
    """``{"name": ..., "model.T": 8, ...}``: a config's values by dotted key."""
    flat = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def with_absolute_data_paths(cfg: Config) -> Config:
    """``cfg`` with a relative ``data.root`` and ``data.cache_dir`` made absolute (a copy; ``cfg`` itself when
    there is nothing to do).

    Why: a run's config.toml must find the data and its frame cache from any directory; a relative root stored
    as given broke `train --resume` and `verify --test-set` elsewhere (--resume cannot change data.root), a relative
    cache folder rebuilt the frames wherever a command ran. Relative to the working directory, as the loaders
    always read them; ``~`` means the same everywhere. load_config does it, and so do train() and init_run()
    for a Config built in Python."""
    paths = {key: os.path.abspath(value) for key in ("root", "cache_dir")
             if (value := getattr(cfg.data, key)) and not value.startswith("~") and not os.path.isabs(value)}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths)) if paths else cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string in ASCII. Not ``json.dumps``: JSON writes a character beyond U+FFFF (an emoji) as a
    surrogate pair, which TOML rejects, and leaves DEL raw, which TOML forbids; TOML has ``\\UXXXXXXXX``."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}")
    return '"' + "".join(out) + '"'


def dumps_toml(cfg: Config) -> str:
    """The resolved config as TOML (round-trips through :func:`load_config`)."""
    d = cfg.to_dict()
    lines = [f"name = {_toml_value(d.pop('name'))}", f"description = {_toml_value(d.pop('description'))}"]
    for section, values in d.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


