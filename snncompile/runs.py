"""Reading a run directory back: its config, checkpoint and network."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .artifacts import MANIFEST, read_manifest
from .config import EXECUTION_KEYS, Config, flat_values, load_config
from .errors import ArtifactError, first_line
from .models import SpikingNetwork, network_from_config
from .text import shell_path

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "load_checkpoint", "load_run_config", "load_network", "model_settings",
           "read_metrics", "require_trained_model_settings", "require_trained_config", "missing_checkpoint",
           "stopped_before_first_epoch"]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per finished epoch (none when it is missing), or a one-line error
    when a line is not a JSON row with its epoch, losses and accuracies."""
    import json

    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        # what every row training writes holds, and the plots read (a row edited to {"epoch": 21} was a KeyError)
        numbers = ("train_loss", "train_acc", "test_loss", "test_acc")
        if not all(isinstance(row, dict) and isinstance(row.get("epoch"), int)
                   and all(isinstance(row.get(k), (int, float)) for k in numbers) for row in rows):
            raise ValueError
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path} is corrupt (not one JSON row per line): move it aside (the curves of the "
                            "epochs so far are then lost) and try again") from None
    return rows


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was trained with (its manifest is checked first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory not found: {run_dir}")
    read_manifest(run_dir)
    return load_config(run_dir / CONFIG)


def stopped_before_first_epoch(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run ``train`` made that has no checkpoint because no epoch of it finished (a
    crash or a Ctrl-C in epoch 1): ``train --resume`` starts it again at epoch 1. Not an init run, nor a trained
    one whose checkpoint was deleted: those lost weights, and starting over would overwrite their records."""
    if (run_dir / CHECKPOINT).is_file():
        return False
    manifest = read_manifest(run_dir)
    made_by_train = "init" not in manifest and str(manifest.get("created_by", "")).endswith(" train")
    return made_by_train and "training" not in manifest and not read_metrics(run_dir / METRICS)


def missing_checkpoint(run_dir: Path) -> ArtifactError:
    """The one-line error for a run without a checkpoint, with the step that fits it."""
    if stopped_before_first_epoch(run_dir):
        return ArtifactError(f"{run_dir} has no checkpoint: it was stopped before its first epoch ended; "
                             f"`snncompile train --resume {shell_path(run_dir)}` starts it again")
    return ArtifactError(f"{run_dir / CHECKPOINT} is missing: restore it from a copy, or `snncompile train {shell_path(run_dir / CONFIG)}` "
                         "again into a new run")


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain values only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        if path.name == CHECKPOINT and (path.parent / MANIFEST).is_file():  # a run's: say what fits that run
            raise missing_checkpoint(path.parent)
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's "Detected pickle protocol 4" lines before the error
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any file torch cannot read (a text file raises KeyError); weights_only stays on
        raise ArtifactError(f"{path} is corrupt or not an snncompile checkpoint ({_first_clause(e)}): restore it "
                            f"from a copy, or `snncompile train {shell_path(path.parent / CONFIG)}` again into a new run") from None
    if not isinstance(state, dict) or "model" not in state or state.get("format") != 1:
        raise ArtifactError(f"{path} is not an snncompile checkpoint (format 1 expected)")
    # what the commands use, checked before they do (a hand-made one was an AttributeError or ValueError traceback)
    model, epoch = state["model"], state.get("epoch", 0)
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise ArtifactError(f"{path} is not an snncompile checkpoint (its model is not a dict of named tensors)")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ArtifactError(f"{path} is not an snncompile checkpoint (epoch {epoch!r} is not a count)")
    if not all(isinstance(state.get(key, {}), dict) for key in ("optimizer", "scheduler")):
        raise ArtifactError(f"{path} is not an snncompile checkpoint (its optimizer or scheduler state is not a dict)")
    return state


def _first_clause(error: Exception, limit: int = 120) -> str:
    """An exception's first sentence, cut at a word and marked when longer than ``limit`` (torch's reader
    errors run on for a paragraph)."""
    text = first_line(error, limit=10**6).split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def model_settings(cfg: Config) -> dict:
    """The ``[model]`` section as plain JSON values: what a checkpoint records of the network it holds."""
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg.model)))


def require_trained_model_settings(run_dir: Path, cfg: Config, state: dict) -> None:
    """A config.toml whose ``[model]`` was edited after training (v_th 0.5 -> 0.3) would export and verify the
    edited network on the trained weights, and pass: torch and the runtime compute the same wrong model.
    Checkpoints written before they recorded their settings are not checked."""
    trained = state.get("model_settings")
    if not isinstance(trained, dict):
        return
    now = model_settings(cfg)
    changed = [f"{key} = {now.get(key)!r} (trained with {trained.get(key)!r})"
               for key in sorted(set(trained) | set(now)) if trained.get(key) != now.get(key)]
    if changed:
        raise ArtifactError(f"{run_dir / CONFIG}: [model] is not what the checkpoint was trained with: "
                            f"{'; '.join(changed[:4])}. Put it back, or train the changed config into a new run")


def require_trained_config(run_dir: Path, cfg: Config, state: dict) -> None:
    """The checkpoint must have been trained with the run's config.toml, [train] and [data] included. Edited since
    (train.lr, train.epochs), `train --resume` trained nothing new: the optimizer and the schedule come back from
    the checkpoint (a finished cosine schedule trains at rate 0), while the manifest kept the old config. A
    checkpoint copied in from another run (another seed) exported and verified as this run's, under its
    accuracy. The execution settings, data.root (the data moved) and the run's name may differ, and only the keys
    the checkpoint recorded are compared (a key a later version adds is not a difference). Checkpoints written
    before they recorded their config are not checked."""
    trained = state.get("trained_config")
    if not isinstance(trained, dict):
        return
    free = {*EXECUTION_KEYS, "data.root", "name"}
    now = flat_values(cfg)
    changed = [f"{key} = {now.get(key)!r} (trained with {trained[key]!r})"
               for key in sorted(trained) if key not in free and trained[key] != now.get(key)]
    if changed:
        raise ArtifactError(f"{run_dir / CHECKPOINT} was not trained with {run_dir / CONFIG}: {'; '.join(changed[:4])} "
                          f"(config.toml edited since, or the checkpoint copied from another run?). A run keeps the "
                          f"config it trained with: put back what changed, or train the config into a new run "
                          f"(`snncompile train {shell_path(run_dir / CONFIG)}`)")


def load_network(run_dir: str | Path) -> tuple[Config, SpikingNetwork]:
    """Rebuild a run's network with its trained weights, in eval mode on the CPU."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT)
    require_trained_model_settings(run_dir, cfg, state)
    require_trained_config(run_dir, cfg, state)
    net = network_from_config(cfg.model)
    expected, got = net.state_dict(), state["model"]
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ArtifactError(
            f"{run_dir}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}): was it written by another snncompile version?"
        )
    net.load_state_dict(got)
    return cfg, net.eval()
