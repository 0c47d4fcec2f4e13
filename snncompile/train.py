"""The STBP training loop (PAPER.md §5): one readable loop, seeded, resumable, atomic checkpoints.

Per iteration: states start at zero; the network runs over T steps (layer-major by default); the loss
is MSE between the one-hot label and the voted firing rate (or cross-entropy on the same scores);
backprop through time uses the rectangular surrogate; then one optimizer step.

Determinism: the shuffle order and the dropout RNG of epoch e are seeded from (seed, e) at the start of
the epoch, so a run resumed from the checkpoint of epoch e-1 replays epoch e exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .artifacts import atomic_save, atomic_write_text, environment, new_run_dir, record_artifact, update_manifest
from .config import Config, dumps_toml
from .data import Split, batches, load_dataset, to_time_major
from .errors import ConfigError
from .models import network_from_config
from .runs import CHECKPOINT, CONFIG, METRICS, load_checkpoint, load_run_config

__all__ = ["TrainResult", "train", "loss_fn", "evaluate", "resolve_device"]


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    test_acc: float
    test_loss: float
    elapsed_s: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is visible: use --set train.device=cpu")
    return torch.device(name)


def loss_fn(scores: Tensor, labels: Tensor, kind: str) -> Tensor:
    """MSE between one-hot labels and scores ``[B, classes]`` (the paper), or cross-entropy."""
    if kind == "mse":
        target = F.one_hot(labels, scores.shape[1]).to(scores.dtype)
        return F.mse_loss(scores, target)
    return F.cross_entropy(scores, labels)


def _make_optimizer(net: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: Config):
    """Stepped once per epoch."""
    t = cfg.train
    if t.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=t.milestones, gamma=t.gamma)
    if t.schedule == "step":
        step = t.milestones[0] if t.milestones else max(1, t.epochs // 3)
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=t.gamma)
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)


def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(net: nn.Module, split: Split, cfg: Config, device: torch.device, static: bool = True) -> tuple[float, float]:
    """Mean loss and accuracy (fraction) of ``net`` on ``split``."""
    net.eval()
    total_loss, correct = 0.0, 0
    for x, y in batches(split, cfg.data.eval_batch_size):
        x, y = x.to(device), y.to(device)
        with _autocast(device, cfg.train.precision):
            scores = net(to_time_major(x, cfg.model.T, static)).float()
        total_loss += loss_fn(scores, y, cfg.train.loss).item() * len(y)
        correct += (scores.argmax(1) == y).sum().item()
    return total_loss / len(split), correct / len(split)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def train(
    cfg: Config | None = None,
    out_root: str | Path = "export",
    resume: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` into a new run dir under ``out_root``, or continue ``resume`` (a run dir).

    Args:
        cfg: the resolved config (ignored when resuming: the run's own config.toml is used).
        out_root: artifact root; the run goes to ``out_root/<name>/<run-id>/``.
        resume: run directory to continue from its last checkpoint.
        stop_after: stop after this many epochs in total (the run stays resumable).
        progress: show a tqdm progress bar.
        echo: where per-epoch summaries go.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    state = None
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_run_config(run_dir)
        state = load_checkpoint(run_dir / CHECKPOINT)
    elif cfg is None:
        raise ConfigError("train() needs a config or a run directory to resume")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)

    torch.manual_seed(cfg.train.seed)
    net = network_from_config(cfg.model).to(device)
    net.execution = cfg.train.execution  # type: ignore[assignment]
    opt = _make_optimizer(net, cfg)
    sched = _make_scheduler(opt, cfg)
    data = load_dataset(cfg)
    first_epoch = 1
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        first_epoch = int(state["epoch"]) + 1
        _truncate_metrics(run_dir / METRICS, int(state["epoch"]))
        echo(f"resuming {run_dir} after epoch {state['epoch']}")
    else:
        run_dir = new_run_dir(out_root, cfg.name)
        atomic_write_text(run_dir / CONFIG, dumps_toml(cfg))
        update_manifest(
            run_dir,
            model=cfg.name,
            config_hash=cfg.hash(),
            created_by=f"snncompile {__version__} train",
            environment=environment(),
            dataset={"name": data.name, "train": len(data.train), "test": len(data.test), **data.info},
            classes=data.classes,
        )
        record_artifact(run_dir, CONFIG)

    last_epoch = cfg.train.epochs if stop_after is None else min(stop_after, cfg.train.epochs)
    test_loss, test_acc = float("nan"), float("nan")
    epoch = first_epoch - 1
    for epoch in range(first_epoch, last_epoch + 1):
        net.train()
        torch.manual_seed(_epoch_seed(cfg.train.seed, epoch))  # dropout masks of this epoch
        order = torch.Generator().manual_seed(_epoch_seed(cfg.train.seed, epoch))
        n_batches = -(-len(data.train) // cfg.data.batch_size)
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not progress, leave=False, unit="batch")
        seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
        for x, y in batches(data.train, cfg.data.batch_size, order):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, cfg.train.precision):
                scores = net(to_time_major(x, cfg.model.T, data.static)).float()
            loss = loss_fn(scores, y, cfg.train.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (scores.argmax(1) == y).sum().item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", sps=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        lr = opt.param_groups[0]["lr"]
        sched.step()
        test_loss, test_acc = evaluate(net, data.test, cfg, device, data.static)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            "train_seconds": round(train_seconds, 3),
            "samples_per_s": round(seen / train_seconds, 1),
        }
        _save_checkpoint(run_dir, net, opt, sched, epoch, cfg)
        _append_metrics(run_dir / METRICS, row)
        echo(
            f"epoch {epoch:3d}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  train acc {100 * row['train_acc']:.2f} %  "
            f"test acc {100 * test_acc:.2f} %  {row['samples_per_s']:.0f} samples/s"
        )
    elapsed = time.perf_counter() - start
    if epoch >= first_epoch:
        update_manifest(
            run_dir,
            training={"epochs_done": epoch, "epochs": cfg.train.epochs, "test_acc": test_acc, "test_loss": test_loss,
                      "device": str(device), "last_session_seconds": round(elapsed, 2)},
        )
        record_artifact(run_dir, METRICS)
    return TrainResult(run_dir, epoch, test_acc, test_loss, elapsed)


def _save_checkpoint(run_dir: Path, net, opt, sched, epoch: int, cfg: Config) -> None:
    payload = {
        "format": 1,
        "snncompile_version": __version__,
        "epoch": epoch,
        "config_hash": cfg.hash(),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    atomic_save(run_dir / CHECKPOINT, lambda f: torch.save(payload, f))
    record_artifact(run_dir, CHECKPOINT, epoch=epoch)


def _append_metrics(path: Path, row: dict) -> None:
    # Rewritten whole and atomically: a crash never leaves a torn last line.
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(row) + "\n")


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop rows after ``last_epoch`` (written by a run that died before its next checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["epoch"] <= last_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
