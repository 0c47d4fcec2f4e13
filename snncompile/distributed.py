"""torchrun / DistributedDataParallel support: detect the launch, set up the process group, shard.

A launch is distributed when torchrun's variables are present (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), or when the caller already started the default process group (which stays
theirs). Backend of a group started here: NCCL on CUDA, gloo on CPU. The global batch is the per-process
``data.batch_size`` times the world size; the learning rate is used as configured (scale it yourself
if you scale the global batch).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import signal
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Imported before any process group exists, so at import of snncompile (a caller who starts their own group
# imports us first): DistributedDataParallel's constructor imports torch.distributed.nn, whose functions
# default to ``group=group.WORLD``, evaluated at import. Imported after init, ten defaults hold the group
# forever, destroy_process_group cannot free it, and gloo's worker threads live on into interpreter shutdown,
# where one still releasing a finished all-reduce's tensor takes the GIL and aborts the process ("terminate
# called without an active exception"). Imported first, the defaults are None.
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

from .errors import ConfigError, SnnCompileError, first_line

__all__ = ["DistContext", "init_distributed", "all_reduce_sum", "shard_indices", "stop_on_peer_failure",
           "PeerFailureError", "destroy"]


class PeerFailureError(SnnCompileError):
    """Another rank died (torchrun stopped this one, or a collective lost its peer)."""

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    owns_group: bool = False  # init_distributed created the process group (so destroy() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistContext:
    """Initialise the default process group when launched by torchrun, or use the caller's; a no-op otherwise.

    A group the caller started is used (and left running) with or without torchrun's variables: without
    them, rank and world size are the group's, and the CUDA device the current one (the caller chose it).

    Raises a one-line :class:`ConfigError` when some but not all rendezvous variables are set.
    """
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        if not (dist.is_available() and dist.is_initialized()):
            return DistContext()
        _warn_if_defaults_hold_the_group()
        local = torch.cuda.current_device() if device_type == "cuda" else 0
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owns_group=False)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(
            f"incomplete distributed launch: {', '.join(present)} set but {', '.join(missing)} missing "
            "(launch with torchrun, or unset them for a single-process run)"
        )
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    owns_group = not dist.is_initialized()  # a group the caller set up stays theirs, alive after training
    if owns_group:
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    else:
        _warn_if_defaults_hold_the_group()
    return DistContext(rank, world, local, backend if owns_group else dist.get_backend(), owns_group)


def _warn_if_defaults_hold_the_group() -> None:
    """Warn about a caller's group that torch.distributed.nn captured (started before snncompile was imported)."""
    if _defaults_hold_a_group():
        warnings.warn("the process group was started before snncompile was imported, so torch.distributed.nn's "
                      "default arguments hold it and its threads outlive destroy_process_group (the process may "
                      "abort at exit): import snncompile before init_process_group", RuntimeWarning, stacklevel=3)


def _defaults_hold_a_group() -> bool:
    """Whether torch.distributed.nn was imported while a group existed (see the import at the top)."""
    functions = vars(torch.distributed.nn.functional).values()
    return any(isinstance(d, dist.ProcessGroup) for f in functions for d in getattr(f, "__defaults__", None) or ())


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum plain numbers over all ranks (one collective; identity without a process group)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard_indices(n: int, ctx: DistContext) -> torch.Tensor:
    """Rank-strided evaluation shard of ``range(n)`` (no padding, so no sample counts twice)."""
    return torch.arange(ctx.rank, n, ctx.world_size)


def destroy(ctx: DistContext) -> None:
    """End the process group :func:`init_distributed` started (one the caller started is left to them)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def stop_on_peer_failure(ctx: DistContext):
    """Turn torchrun's SIGTERM and a collective's lost-peer error into one line on this rank.

    Checkpoints are written atomically by rank 0 between epochs, so the last complete one survives.
    """
    if not ctx.enabled:
        yield
        return

    def on_sigterm(signum, frame):
        raise PeerFailureError(f"rank {ctx.rank} stopped by the launcher (another rank failed); "
                               "the last complete checkpoint is intact: continue with --resume RUN_DIR")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except RuntimeError as e:
        # DDP's gradient all-reduce surfaces a dead peer as a plain RuntimeError from gloo/NCCL.
        text = str(e)
        if not isinstance(e, dist.DistError) and not any(k in text for k in ("gloo", "NCCL", "closed by peer")):
            raise
        first = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e, limit=10**6))[:120]  # without gloo's "[file:line]"
        raise PeerFailureError(f"rank {ctx.rank}: a collective failed, another rank probably crashed ({first}); "
                               "the last complete checkpoint is intact: continue with --resume RUN_DIR") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
