"""The STBP training loop (PAPER.md §5): one readable loop, seeded, resumable, atomic checkpoints.

Per iteration: states start at zero; the network runs over T steps (layer-major by default); the loss
is MSE between the one-hot label and the voted firing rate (or cross-entropy on the same scores);
backprop through time uses the rectangular surrogate; then one optimizer step.

Determinism: the shuffle order and the dropout RNG of epoch e are seeded from (seed, e) at the start of
the epoch, so a run resumed from the checkpoint of epoch e-1 replays epoch e exactly.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .artifacts import (atomic_save, atomic_write_text, environment, new_run_dir, read_manifest, record_artifact,
                        sha256_file, sole_trainer, update_manifest)
from .config import Config, dumps_toml, flat_values, with_absolute_data_paths, with_execution_settings
from .data import Split, batches, load_dataset, to_time_major
from .distributed import DistContext, all_reduce_sum, destroy, init_distributed, shard_indices, stop_on_peer_failure
from .errors import (ArtifactError, ConfigError, OutOfMemory, SnnCompileError, TrainingDiverged, TrainingInterrupted,
                     asked_memory, first_line, out_of_memory)
from .exact import snap_to_grid
from .memory import SavedActivations
from .models import SpikingNetwork, network_from_config
from .runs import (CHECKPOINT, CONFIG, METRICS, load_checkpoint, load_run_config, missing_checkpoint, model_settings,
                   read_metrics, require_trained_config, require_trained_model_settings,
                   stopped_before_first_epoch)
from .scratch import remove_orphans
from .text import shell_path
from .torch_settings import cpu_threads, cudnn_autotuning, cudnn_disabled, no_tf32

__all__ = ["TrainResult", "train", "loss_fn", "evaluate", "resolve_device", "fuses_optimizer"]

LOG_EVERY = 20  # steps between progress-bar metric updates (each one is a host sync)


@dataclass
class TrainResult:
    run_dir: Path | None  # None on ranks other than 0
    epochs_done: int
    test_acc: float
    test_loss: float
    elapsed_s: float


def resolve_device(name: str, option: str | None = "--set train.device=") -> torch.device:
    """``name`` ('auto', 'cpu', 'cuda') as a device; ``option`` is how the user set it, for the one-line error
    (None: a resumed run's config.toml set it, and the device is part of what the run trains)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        if option is None:
            raise ConfigError("this run trains on CUDA (train.device = 'cuda' in its config.toml) and no CUDA GPU is "
                              "visible: resume it on a machine with one")
        raise ConfigError(f"{option}cuda asks for a CUDA GPU, but none is visible: use {option}cpu")
    return torch.device(name)


def loss_fn(scores: Tensor, labels: Tensor, kind: str) -> Tensor:
    """MSE between one-hot labels and scores ``[B, classes]`` (the paper), or cross-entropy.

    The MSE is averaged over the batch and the classes (torch's default reduction; PAPER.md gives no
    normalisation): the scale the zoo's learning rates are set for. A sum over the classes would be 10x the
    gradient, which SGD (cifar10's lr 0.1) feels as a 10x learning rate and Adam does not."""
    if kind == "mse":
        target = F.one_hot(labels, scores.shape[1]).to(scores.dtype)
        return F.mse_loss(scores, target)
    return F.cross_entropy(scores, labels)


def make_optimizer(params, cfg: Config, fused: bool = False) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params``; ``fused``: torch's fused update, one kernel pass over parameter,
    gradient and state per step instead of foreach's several (SGD with momentum: 20 bytes per parameter
    against 32; the 45 M parameters of bench-cifar took 0.42 ms of its eager 10.9 ms step on the H200 with
    foreach)."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused or None)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def fuses_optimizer(cfg: Config, device: torch.device) -> bool:
    """``train.fused_optimizer`` where it applies: on CUDA. The CPU keeps torch's default update, the one its
    figures and tests were made with."""
    return cfg.train.fused_optimizer and device.type == "cuda"


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)``, keeping ``opt``'s own update kernel. torch takes the saved groups'
    ``fused``/``foreach`` flags along with their hyperparameters, so a run resumed on a GPU from a checkpoint
    written on the CPU would otherwise lose the fused update (and one written on a GPU would bring it to a
    CPU). Adam's step counts move to where that kernel wants them: fused, a float32 tensor on the parameter's
    device; else a CPU tensor, as torch makes them."""
    kernels = [{key: group.get(key) for key in ("fused", "foreach")} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, kernel in zip(opt.param_groups, kernels):
        group.update(kernel)
        for param in group["params"]:
            step = opt.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                opt.state[param]["step"] = step.to(dtype=torch.float32,
                                                   device=param.device if kernel["fused"] else "cpu")


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


def _unused_milestones_note(cfg: Config) -> str | None:
    """A note when train.milestones will not act as written. Not an error: shortening a run (`--set
    train.epochs=1` on a config with milestones [35, 70]) or switching its schedule is a normal smoke test, but
    the user should know the run trains at a rate the config does not describe."""
    t = cfg.train
    if not t.milestones:
        return None
    if t.schedule not in ("step", "multistep"):
        return f"note: train.milestones {t.milestones} are not read by train.schedule = {t.schedule!r}"
    # the scheduler steps after each epoch: a milestone at or past the last epoch never changes the rate
    # ('step' decays every milestones[0] epochs and reads no other)
    if (t.milestones[0] if t.schedule == "step" else min(t.milestones)) >= t.epochs:
        return (f"note: train.milestones {t.milestones} are all at or past the last epoch (train.epochs = "
                f"{t.epochs}): the learning rate stays {t.lr:g} for the whole run")
    return None


def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _eval_numerics(device: torch.device, cfg: Config) -> contextlib.AbstractContextManager:
    """The arithmetic of an evaluation: the training precision's, except for an exact model (``model.exact``),
    whose reported accuracy is the exact network's: fp32 without autocast, TF32 off, and convolutions
    without cuDNN (whose transformed algorithms round), as the torch-fast runner computes it."""
    if not cfg.model.exact:
        return _autocast(device, cfg.train.precision)
    stack = contextlib.ExitStack()
    stack.enter_context(no_tf32())
    stack.enter_context(cudnn_disabled())
    return stack


@torch.no_grad()
def evaluate(net: nn.Module, split: Split, cfg: Config, device: torch.device, static: bool = True,
             ctx: DistContext | None = None) -> tuple[float, float]:
    """Mean loss and accuracy (fraction) of ``net`` on ``split`` (sharded over ranks under torchrun)."""
    ctx = ctx or DistContext()
    net.eval()
    if ctx.enabled:
        idx = shard_indices(len(split), ctx)
        split = Split(split.x[idx], split.y[idx])  # this rank's share; sums are all-reduced below
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in batches(split, cfg.data.eval_batch_size):
        x, y = x.to(device).float(), y.to(device)
        with _eval_numerics(device, cfg):
            scores = net(to_time_major(x, cfg.model.T, static)).float()
        total_loss += loss_fn(scores, y, cfg.train.loss).double() * len(y)
        correct += (scores.argmax(1) == y).sum()
    loss_sum, hits, count = all_reduce_sum([total_loss.item(), float(correct.item()), float(len(split))], ctx, device)
    return loss_sum / count, hits / count


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order ``[n]`` of every launch's epoch: DistributedSampler's for one replica (the order
    single-process runs always had, so their resumes replay), which depends on (seed, epoch) alone."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


class _Step(NamedTuple):
    """One rank's share of a global batch."""

    idx: Tensor  # [n_r] training sample indices
    weight: float  # multiplies this rank's mean loss (see _epoch_order)
    counted: int  # samples of idx that count in the metrics: 0 for the stand-in of an empty share


def _epoch_order(n: int, cfg: Config, epoch: int, ctx: DistContext) -> list[_Step]:
    """This rank's steps of ``epoch``: its share of each global batch, with the weight of its loss.

    Global batches are W*B consecutive indices of the epoch's permutation and rank r takes every W-th of
    each (``batch[r::W]``), so W ranks x batch B train exactly the samples 1 rank x batch W*B trains, step
    for step, each once (DistributedSampler's padding trained some twice when W did not divide n). DDP
    averages gradients over the W ranks, so for the last global batch, of m < W*B samples, a rank with n_r
    of them scales its mean loss by W*n_r/m: the average is then the gradient of the mean over the m.
    Full batches have weight exactly 1. A rank with no sample there (m < W) still has to join DDP's
    all-reduce: it trains one real sample at weight 0, counted in no metric. Every rank takes
    ceil(n / (W*B)) steps.
    """
    world, batch = ctx.world_size, cfg.data.batch_size
    steps = []
    for global_batch in _epoch_permutation(n, cfg.train.seed, epoch).split(world * batch):
        share = global_batch[ctx.rank :: world]
        if len(share):
            steps.append(_Step(share, world * len(share) / len(global_batch), len(share)))
        else:
            steps.append(_Step(global_batch[:1], 0.0, 0))
    return steps


def train(
    cfg: Config | None = None,
    out_root: str | Path = "export",
    resume: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` into a new run dir under ``out_root``, or continue ``resume`` (a run dir).

    Under torchrun every rank calls this; rank 0 alone writes the run directory and prints.

    Args:
        cfg: the resolved config. When resuming: None for the run's own config.toml, or that config with other
            execution settings (:func:`~snncompile.config.with_execution_settings`: frame-cache workers, ...).
        out_root: artifact root; the run goes to ``out_root/<name>/<run-id>/``.
        resume: run directory to continue from its last checkpoint.
        stop_after: stop after this many epochs in total (the run stays resumable).
        progress: show a tqdm progress bar.
        echo: where per-epoch summaries go.
    """
    with contextlib.ExitStack() as lock:  # held until training ends: one process trains a run at a time
        return _locked_train(lock, cfg, out_root, resume, stop_after, progress, echo)


def _main_process() -> bool:
    """Rank 0 of a torchrun launch (its RANK variable; init_distributed checks it later), or a plain process."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _locked_train(lock: contextlib.ExitStack, cfg: Config | None, out_root, resume, stop_after, progress,
                  echo) -> TrainResult:
    """:func:`train`, with ``lock`` holding :func:`sole_trainer` of the run once it has one (a resumed run's before
    its checkpoint is read, so that it is not read while another process replaces it)."""
    start = time.perf_counter()
    state = None
    if resume is not None:
        stored = load_run_config(resume)
        if _main_process():
            lock.enter_context(sole_trainer(Path(resume)))
        cfg = stored if cfg is None else with_execution_settings(stored, cfg)
        if (Path(resume) / CHECKPOINT).is_file():
            state = load_checkpoint(Path(resume) / CHECKPOINT)
            require_trained_model_settings(Path(resume), cfg, state)  # not another network on these weights
            require_trained_config(Path(resume), cfg, state)  # nor another training on them
            if not all(k in state for k in ("optimizer", "scheduler", "epoch")):
                raise ArtifactError(f"{resume} holds untrained weights (from `snncompile init`), not a training "
                                    "checkpoint: train the config into a new run instead of resuming")
        elif not stopped_before_first_epoch(Path(resume)):  # else it starts again at epoch 1 in the same directory
            raise missing_checkpoint(Path(resume))
    elif cfg is None:
        raise ConfigError("train() needs a config or a run directory to resume")
    else:
        cfg = with_absolute_data_paths(cfg)  # what config.toml records must find the data from anywhere
    ctx = DistContext()  # until init_distributed returns: nothing to destroy if the setup fails before
    try:
        with cpu_threads(cfg.train.threads):  # restored after: a pipeline's later stages keep the machine's
            device = resolve_device(cfg.train.device, None if resume is not None else "--set train.device=")
            ctx = init_distributed(device.type)
            if ctx.enabled and device.type == "cuda":
                device = torch.device("cuda", ctx.local_rank)
            with stop_on_peer_failure(ctx), cudnn_autotuning(cfg.train.cudnn_benchmark):
                return _train(cfg, device, ctx, out_root, resume, state, stop_after, progress, echo, start, lock)
    finally:
        destroy(ctx)


def _configured_network(cfg: Config, device: torch.device, say) -> SpikingNetwork:
    """The network of ``cfg.model`` on ``device``, freshly initialised from ``train.seed`` (the same weights on
    every rank), set to execute as ``[train]`` says (layer-major or per step, the fused LIF where it runs,
    channels_last, padded or fused input convs)."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    net = network_from_config(cfg.model).to(device)
    if cfg.train.channels_last:  # in place: the parameters stay the same objects, only their strides change
        net.to(memory_format=torch.channels_last)
    net.execution = cfg.train.execution  # type: ignore[assignment]
    net.fused_lif = _use_fused_lif(cfg, device)
    net.pad_conv_channels = cfg.train.pad_conv_channels
    net.fuse_input_conv = cfg.train.fuse_input_conv
    if (note := _unfused_input_conv_note(cfg, net)) is not None:
        say(note)
    return net


def _restore_training(state: dict, net: SpikingNetwork, opt: torch.optim.Optimizer, sched, run_dir: Path) -> None:
    """Load a checkpoint's network, optimizer and scheduler states; one line when they do not fit."""
    try:
        net.load_state_dict(state["model"])
        load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # a hand-made or damaged one: torch's traceback
        raise ArtifactError(f"{run_dir / CHECKPOINT} does not fit this run's network and optimizer "
                            f"({first_line(e, 120)}): restore it from a copy") from None


def _new_run(out_root, cfg: Config, data) -> Path:
    """A new run directory under ``out_root`` with its ``config.toml`` and the manifest's first entries."""
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
    return run_dir


def _train(cfg: Config, device: torch.device, ctx: DistContext, out_root, resume, state, stop_after, progress, echo,
           start: float, lock: contextlib.ExitStack) -> TrainResult:
    main = ctx.is_main
    say = echo if main else (lambda s: None)
    data = load_dataset(cfg, progress=progress and main)
    if device.type == "cuda":
        _keep_on_device(data, device)
    _check_trainable(data, cfg, ctx)
    if cfg.model.exact:
        _say_clipped_inputs(data.train.x, cfg.model.exact_input_max, say)
    if (note := _unused_milestones_note(cfg)) is not None:
        say(note)
    net = _configured_network(cfg, device, say)
    opt = make_optimizer(net.parameters(), cfg, fused=fuses_optimizer(cfg, device))
    sched = _make_scheduler(opt, cfg)
    first_epoch = 1
    run_dir = Path(resume) if resume is not None else None
    if state is not None:
        _restore_training(state, net, opt, sched, run_dir)
        first_epoch = int(state["epoch"]) + 1
        if main:
            _truncate_metrics(run_dir / METRICS, int(state["epoch"]))
        if first_epoch <= cfg.train.epochs:  # else it says below that there is nothing to train
            say(f"resuming {run_dir} after epoch {state['epoch']}")
    elif run_dir is not None:  # resuming a run interrupted before its first checkpoint
        if main:
            _truncate_metrics(run_dir / METRICS, 0)
            say(f"starting {run_dir} again at epoch 1 (it was stopped before any epoch finished)")
    elif main:
        run_dir = _new_run(out_root, cfg, data)
        lock.enter_context(sole_trainer(run_dir))  # a `train --resume` of it meanwhile is refused
    last_epoch = cfg.train.epochs if stop_after is None else min(stop_after, cfg.train.epochs)
    if main and first_epoch <= last_epoch:  # a finished run resumed writes nothing (it may be on a read-only mount)
        remove_orphans(run_dir)  # a checkpoint half-written by a training killed outright (SIGKILL, power loss)
        update_manifest(run_dir, distributed={"world_size": ctx.world_size, "backend": ctx.backend,
                                              "global_batch": ctx.world_size * cfg.data.batch_size})
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else net

    test_loss, test_acc = float("nan"), float("nan")
    if first_epoch > last_epoch and main:  # resuming a run that already has its epochs: report it
        test_loss, test_acc = _summarise_finished(run_dir, cfg, first_epoch - 1)
        say(f"{run_dir} already has {first_epoch - 1} of {cfg.train.epochs} epochs: nothing to train")
    epoch = first_epoch - 1
    try:
        for epoch in range(first_epoch, last_epoch + 1):
            g_loss, g_correct, g_seen, train_seconds = _train_epoch(model, opt, data, cfg, epoch, ctx, device,
                                                                    progress)
            if not _finite(g_loss, net):  # a NaN checkpoint would export, and even verify, as a valid network
                if not main:  # every rank sees the same loss and weights: rank 0 says the rest
                    raise TrainingDiverged(f"training diverged in epoch {epoch}")
                _stop_diverged(run_dir, epoch, g_loss, made_here=resume is None)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            if cfg.model.exact:  # every checkpoint, and the accuracy reported for it, is the exact network's
                exact_layers = snap_to_grid(list(net.stages))
            test_loss, test_acc = evaluate(net, data.test, cfg, device, data.static, ctx)
            row = {
                "epoch": epoch,
                "train_loss": g_loss / g_seen,
                "train_acc": g_correct / g_seen,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": lr,
                "train_seconds": round(train_seconds, 3),
                "samples_per_s": round(g_seen / train_seconds, 1),
            }
            if main:
                # The row first: a crash before the checkpoint leaves a row that resume truncates and writes again;
                # the other order lost the row of an epoch whose checkpoint was saved (a gap in the curves).
                _append_metrics(run_dir / METRICS, row)
                _save_checkpoint(run_dir, net, opt, sched, epoch, cfg)
                # The summary follows every checkpoint, not the session's end: a run killed now still reports
                # this epoch's accuracy, and its manifest hashes the metrics it has.
                _record_training(run_dir, epoch, cfg, test_acc, test_loss, device=str(device),
                                 last_session_seconds=round(time.perf_counter() - start, 2))
                if cfg.model.exact:
                    update_manifest(run_dir, exact={"input_bits": cfg.model.exact_bits, "layers": exact_layers})
            say(
                f"epoch {epoch:3d}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
                f"train acc {100 * row['train_acc']:.2f} %  "
                f"test acc {100 * test_acc:.2f} %  {row['samples_per_s']:.0f} samples/s"
            )
    except KeyboardInterrupt:
        if not main:
            raise
        if resume is None and not (run_dir / CHECKPOINT).is_file():
            # this call's run dir, before its first checkpoint: nothing in it is worth keeping, and left behind
            # it would be one more run without weights after every early Ctrl-C
            shutil.rmtree(run_dir, ignore_errors=True)
            raise TrainingInterrupted(f"interrupted in epoch {epoch}, before the first checkpoint: {run_dir} is "
                                      "removed", "run the same command again") from None
        raise TrainingInterrupted(*_interrupted_message(run_dir, epoch)) from None
    except Exception as e:
        if not main:
            raise
        made_here = resume is None and not (run_dir / CHECKPOINT).is_file()
        if made_here:  # as after a Ctrl-C: a run without weights, left behind by every failed first epoch
            shutil.rmtree(run_dir, ignore_errors=True)
        if out_of_memory(e):
            kept = (f"{run_dir} is removed" if made_here
                    else f"{run_dir} keeps its checkpoints" if (run_dir / CHECKPOINT).is_file()
                    else "no checkpoint is written")
            raise OutOfMemory(f"out of memory in epoch {epoch} ({asked_memory(e)}): lower data.batch_size (now "
                              f"{cfg.data.batch_size}) or the network's size; {kept}") from None
        if made_here and isinstance(e, SnnCompileError) and not isinstance(e, TrainingDiverged):  # that says it
            raise type(e)(f"{e}; {run_dir} is removed") from None
        raise  # a bug's traceback is what helps; the run directory it made is gone
    elapsed = time.perf_counter() - start
    if main and epoch >= first_epoch and cfg.model.exact:
        bits = [b for layer in exact_layers for b in layer["weight_bits"]]
        say(f"exact arithmetic: weights on grids of 2^-{min(bits)} to 2^-{max(bits)}, largest change "
            f"{max(layer['max_rel_change'] for layer in exact_layers):.1e} of a layer's largest weight")
    return TrainResult(run_dir, epoch, test_acc, test_loss, elapsed)


def _check_trainable(data, cfg: Config, ctx: DistContext) -> None:
    """One-line errors for data this config cannot train on, before any weights are made or epoch is run."""
    if len(data.test) == 0:  # evaluate() divides by it, after a whole epoch of training
        raise ConfigError(f"{data.name}'s test split is empty: raise data.test_fraction or data.limit_test")
    if len(data.classes) > cfg.model.classes:  # one_hot would fail at the first batch holding a label past it
        raise ConfigError(f"{data.name} has {len(data.classes)} classes but model.classes = {cfg.model.classes}: "
                          f"set model.classes = {len(data.classes)}")
    if len(data.train) < ctx.world_size * cfg.data.batch_size:
        raise ConfigError(
            f"{len(data.train)} training samples cannot feed {ctx.world_size} ranks x data.batch_size "
            f"{cfg.data.batch_size}: lower the batch size or the number of processes"
        )


def _train_epoch(model: nn.Module, opt, data, cfg: Config, epoch: int, ctx: DistContext, device: torch.device,
                 progress: bool) -> tuple[float, float, float, float]:
    """One epoch of STBP over this rank's share of ``data.train`` (inputs ``[B, ...]`` made ``[T, B, ...]`` by
    :func:`to_time_major`): the loss sum, correct count and samples summed over all ranks, and this rank's
    seconds of training."""
    from tqdm.auto import tqdm

    model.train()
    # Dropout masks of this epoch: seeded per (seed, epoch, rank) so a resumed epoch replays exactly.
    torch.manual_seed(_epoch_seed(cfg.train.seed, epoch) + 7919 * ctx.rank)
    steps = _epoch_order(len(data.train), cfg, epoch, ctx)
    augment_rng = torch.Generator().manual_seed(_epoch_seed(cfg.train.seed, epoch) + 104729 * ctx.rank)
    n_batches = len(steps)  # the same on every rank
    global_batch = ctx.world_size * cfg.data.batch_size
    bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not (progress and ctx.is_main),
               leave=False, unit="batch")
    # Accumulated on the device: no host sync per step (the bar reads them every LOG_EVERY steps).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, t0 = 0, time.perf_counter()
    for i, (idx, weight, counted) in enumerate(steps):
        x = data.train.x[idx].to(device, non_blocking=True).float()  # event frames are stored as uint16
        if data.augment is not None:
            x = data.augment(x, augment_rng)
        y = data.train.y[idx].to(device, non_blocking=True)
        # SavedActivations: the spikes autograd keeps for backward are stored as uint8 (exact), unless
        # train.compact_spikes is off
        with _autocast(device, cfg.train.precision), SavedActivations(compact=cfg.train.compact_spikes):
            scores = model(to_time_major(x, cfg.model.T, data.static)).float()
        loss = loss_fn(scores, y, cfg.train.loss)
        opt.zero_grad(set_to_none=True)
        # Scaled only when the weight is not 1 (a last, smaller global batch): full batches keep their
        # arithmetic.
        (loss if weight == 1.0 else loss * weight).backward()
        opt.step()
        if counted:  # a weight-0 stand-in is in no metric: over all ranks each sample counts once
            seen += counted
            loss_sum += loss.detach().double() * counted
            correct += (scores.detach().argmax(1) == y).sum()
        bar.update(1)
        if ctx.is_main and progress and (i % LOG_EVERY == 0 or i == n_batches - 1):
            # Rank 0 has a sample in every global batch, so seen > 0; the rate is all ranks' samples.
            done = min((i + 1) * global_batch, len(data.train))
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}",
                            sps=f"{done / (time.perf_counter() - t0):.0f}")
    bar.close()
    train_seconds = time.perf_counter() - t0
    g_loss, g_correct, g_seen = all_reduce_sum([loss_sum.item(), float(correct.item()), float(seen)], ctx, device)
    return g_loss, g_correct, g_seen, train_seconds


def _finite(loss: float, net: nn.Module) -> bool:
    """Whether an epoch's mean loss and every weight after it are finite (one check per parameter per epoch)."""
    return loss == loss and abs(loss) != float("inf") and all(bool(torch.isfinite(p).all()) for p in net.parameters())


def _stop_diverged(run_dir: Path, epoch: int, loss: float, made_here: bool) -> None:
    """Raise :class:`TrainingDiverged` for ``epoch``, whose weights are not saved. A run this call made and no
    epoch of which finished is removed, as after a Ctrl-C: nothing in it is worth keeping."""
    finite_loss = loss == loss and abs(loss) != float("inf")
    cause = f"training diverged in epoch {epoch} ({'weights became inf or nan' if finite_loss else f'mean loss {loss:g}'})"
    fix = "lower train.lr (or use train.optimizer = 'adam')"
    if (run_dir / CHECKPOINT).is_file():
        saved = load_checkpoint(run_dir / CHECKPOINT)["epoch"]
        raise TrainingDiverged(f"{cause}: not saved, {run_dir} keeps the checkpoint of epoch {saved}; {fix} in a new run")
    if made_here:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise TrainingDiverged(f"{cause}: {run_dir} is removed; {fix}")
    raise TrainingDiverged(f"{cause}: no checkpoint is written; {fix}")


def _interrupted_message(run_dir: Path, epoch: int) -> tuple[str, str]:
    """What survived a Ctrl-C in ``epoch`` (checkpoints are written atomically between epochs) and what to run."""
    if not (run_dir / CHECKPOINT).is_file():  # a run started again by --resume: it goes on where it is
        return (f"interrupted in epoch {epoch}, before any checkpoint",
                f"start it again with `snncompile train --resume {shell_path(run_dir)}`")
    saved = load_checkpoint(run_dir / CHECKPOINT)["epoch"]
    return (f"interrupted in epoch {epoch}: {run_dir} keeps the checkpoint of epoch {saved}",
            f"continue with `snncompile train --resume {shell_path(run_dir)}`")


def _record_training(run_dir: Path, epoch: int, cfg: Config, test_acc: float, test_loss: float, **extra) -> None:
    """The manifest's ``training`` summary as of the checkpoint of ``epoch``, and the hash of metrics.jsonl."""
    update_manifest(run_dir, training={"epochs_done": epoch, "epochs": cfg.train.epochs, "test_acc": test_acc,
                                       "test_loss": test_loss, **extra})
    record_artifact(run_dir, METRICS)


def _summarise_finished(run_dir: Path, cfg: Config, epoch: int) -> tuple[float, float]:
    """Test loss and accuracy of a run whose checkpoint (of ``epoch``) already has every epoch to train.

    Read from the checkpointed epoch's row of metrics.jsonl, and written into the manifest when its summary
    is behind: a run killed between its checkpoint and the summary's update reports them all the same.
    """
    done = read_manifest(run_dir).get("training", {})
    test_loss, test_acc = done.get("test_loss", float("nan")), done.get("test_acc", float("nan"))
    path = run_dir / METRICS
    rows = read_metrics(path)
    last = next((row for row in reversed(rows) if row.get("epoch") == epoch), None)
    if last is not None:
        test_loss, test_acc = last["test_loss"], last["test_acc"]
        edited = [f"{key.replace('_', ' ')} {value!r}, but training recorded {done.get(key)!r}"
                  for key, value in (("test_acc", test_acc), ("test_loss", test_loss)) if done.get(key) != value]
        if done.get("epochs_done") == epoch and edited:
            # training recorded this epoch's summary from this very row: the row was edited since (recording it
            # again made an edited accuracy the run's own, hash and all)
            raise ArtifactError(f"{path}: epoch {epoch}'s row says {'; '.join(edited)}: the file was edited since; "
                                f"restore it from a copy")
        stale = done.get("epochs_done") != epoch
        recorded = read_manifest(run_dir).get("artifacts", {}).get(METRICS, {}).get("sha256")
        if stale or recorded != sha256_file(path):
            _record_training(run_dir, epoch, cfg, test_acc, test_loss)
    return test_loss, test_acc


def _say_clipped_inputs(x: Tensor, limit: float, say: Callable[[str], None]) -> None:
    """Exact arithmetic clamps the input to +-limit (exact.py): say so when that cuts training data (event
    counts, or normalised images, beyond it), since the network then never sees those values."""
    clipped, largest = 0, 0.0
    # a float copy of ~16 M values at a time: event frames are uint16 and can be GBs (one sync per chunk)
    rows = max(1, (1 << 24) // max(1, x[:1].numel()))
    for chunk in x.split(rows):
        magnitude = chunk.float().abs()
        clipped += int((magnitude > limit).sum())
        largest = max(largest, float(magnitude.max()))
    if clipped:
        say(f"note: model.exact_input_max = {limit:g} clips {clipped} of {x.numel()} training input values "
            f"({100 * clipped / x.numel():.2g} %, largest |x| {largest:g}): raise it to keep them")


def _unfused_input_conv_note(cfg: Config, net) -> str | None:
    """Why ``train.fuse_input_conv`` changes nothing for this run, if it does not."""
    if not cfg.train.fuse_input_conv:
        return None
    if not net.fused_lif:
        return ("note: train.fuse_input_conv needs the fused LIF kernels (CUDA and Triton, train.kernels "
                "'auto' or 'triton', layer-major execution): the input conv runs unfused")
    if not net.fuses_an_input_conv():
        from .kernels.input_conv import MAX_TAPS

        return (f"note: train.fuse_input_conv: {cfg.model.arch!r} has no stride-1 conv of at most {MAX_TAPS} "
                "terms per output followed by a LIF: nothing to fuse")
    return None


def _use_fused_lif(cfg: Config, device: torch.device) -> bool:
    from .kernels import fused_kernels_available

    choice = cfg.train.kernels
    if choice == "torch" or cfg.train.execution == "step":
        return False
    if choice == "triton":
        if device.type != "cuda" or not fused_kernels_available():
            raise ConfigError("train.kernels='triton' needs a CUDA device and Triton installed (pip install triton)")
        return True
    return device.type == "cuda" and fused_kernels_available()


def _keep_on_device(data, device: torch.device, budget: float = 0.25) -> None:
    """Move the in-memory dataset to the GPU when it takes under ``budget`` of its memory: batches are
    then gathered on the device and nothing crosses PCIe per step."""
    size = sum(t.numel() * t.element_size() for s in (data.train, data.test) for t in (s.x, s.y))
    if size < budget * torch.cuda.get_device_properties(device).total_memory:
        for split in (data.train, data.test):
            split.x, split.y = split.x.to(device), split.y.to(device)


def _save_checkpoint(run_dir: Path, net, opt, sched, epoch: int, cfg: Config) -> None:
    payload = {
        "format": 1,
        "snncompile_version": __version__,
        "epoch": epoch,
        "config_hash": cfg.hash(),
        "model_settings": model_settings(cfg),  # load_network refuses a config.toml whose [model] was edited since
        "trained_config": flat_values(cfg),  # and train --resume one whose [train] or [data] was
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    try:
        atomic_save(run_dir / CHECKPOINT, lambda f: torch.save(payload, f))
    except RuntimeError as e:  # torch's zip writer says a failed write (a full disk) as "unexpected pos N vs M"
        kept = "the previous checkpoint is kept" if (run_dir / CHECKPOINT).is_file() else "no epoch is saved"
        raise ArtifactError(f"could not write {run_dir / CHECKPOINT} ({first_line(e, 120)}): is the disk full? "
                            f"{kept}") from None
    record_artifact(run_dir, CHECKPOINT, epoch=epoch)


def _append_metrics(path: Path, row: dict) -> None:
    # Rewritten whole and atomically: a crash never leaves a torn last line.
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(row) + "\n")


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop rows after ``last_epoch`` (written by a run that died before its next checkpoint)."""
    if not path.exists():
        return
    rows = read_metrics(path)
    keep = [row for row in rows if row["epoch"] <= last_epoch]
    if len(keep) < len(rows):  # untouched otherwise: a finished run resumed on a read-only mount failed writing it
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
