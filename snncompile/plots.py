"""Training curves as PNG: one run's loss and accuracy per epoch, or several runs side by side.

Runs are compared by their own records (``metrics.jsonl``, ``config.toml``); a curve is labelled by the
config keys in which its run differs from the others (e.g. ``model.neunorm=false``), so a plot of an
ablation explains itself. Needs matplotlib (the ``plot`` extra); PNGs are written atomically.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .artifacts import MANIFEST, atomic_save, read_manifest, record_artifact
from .errors import ArtifactError, MissingDependencyError
from .config import EXECUTION_KEYS, flat_values
from .runs import METRICS, load_run_config, read_metrics

__all__ = ["pyplot", "plot_training", "plot_runs", "run_labels", "plain_log_labels"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or a one-line error naming the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot") from None
    return plt


def plain_log_labels(axis) -> None:
    """Label a logarithmic ``axis`` (``ax.yaxis``) with plain numbers (0.002, 30, 20,000) at the ticks
    matplotlib chooses to label, where its own labels read 2x10^-3 and 3x10^1."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return (f"{x:,.0f}" if x >= 1000 else f"{x:g}") if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _metrics(run: Path) -> list[dict]:
    """One row per finished epoch, or a one-line error naming the run."""
    if not run.is_dir():
        raise ArtifactError(f"run directory not found: {run}")
    rows = read_metrics(run / METRICS)
    if not rows and (run / MANIFEST).is_file() and "init" in read_manifest(run):
        raise ArtifactError(f"{run} holds untrained weights (from `snncompile init`): there are no curves to draw")
    if not rows:
        raise ArtifactError(f"{run} has no finished epoch ({METRICS} is missing or empty)")
    return rows


def _save(fig, plt, path: Path, layout: bool = True) -> Path:
    """``layout``: tight_layout here (False: the caller laid the figure out; the saved image still takes in
    everything drawn, e.g. a legend below the axes)."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    if layout:
        fig.tight_layout()
    atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_training(run: Path, out: Path | None = None) -> Path:
    """Loss and accuracy per epoch of one run (train and test) as ``training.png`` in the run (recorded in its
    manifest), or at ``out``."""
    plt = pyplot()
    rows = _metrics(run)
    if out is None:
        read_manifest(run)  # a corrupt manifest fails now, not after training.png was replaced
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in rows], label=split)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in rows], label=split)
    best = max(rows, key=lambda r: r["test_acc"])  # the first epoch that reached it
    ax_acc.set_title(f"test: {100 * rows[-1]['test_acc']:.2f} % at the end, best {100 * best['test_acc']:.2f} % "
                     f"(epoch {best['epoch']})", fontsize=10)
    if all(r[f"{split}_loss"] > 0 for r in rows for split in ("train", "test")):
        ax_loss.set_yscale("log")  # losses fall by orders of magnitude: on a linear axis the later epochs are flat
        plain_log_labels(ax_loss.yaxis)
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole: no 0.95 ... 1.05 ticks
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_loss.legend()
    ax_acc.legend(loc="lower right")  # accuracy curves rise at the left, then run along the top
    fig.suptitle(f"{run.parent.name} / {run.name}")
    if out is not None:
        return _save(fig, plt, out)
    _save(fig, plt, run / "training.png")
    record_artifact(run, "training.png")  # an artifact of the run, hashed in its manifest like the others
    return run / "training.png"


def run_labels(runs: list[Path]) -> list[str]:
    """A label per run: the config keys whose values differ between the runs (``key=value, ...``; not the
    :data:`~snncompile.config.EXECUTION_KEYS`), or the run id where the configs are identical (e.g. the same config
    trained twice)."""
    flats = [flat_values(load_run_config(r)) for r in runs]
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    labels = []
    for run, f in zip(runs, flats):
        # not the keys that change only how a run executes (cache folder, workers, ...): they crowded the legend
        parts = [f"{k}={f.get(k)}" for k in differing if k != "name" and k not in EXECUTION_KEYS]
        labels.append(", ".join(parts) if parts else f"{run.parent.name}/{run.name}")
    if len(set(labels)) < len(labels):  # same differing values (or none): the run ids tell them apart
        labels = [f"{label} ({run.name})" for label, run in zip(labels, runs)]
    return labels


def plot_runs(runs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Test accuracy and training loss per epoch of several runs on shared axes, written to ``out``."""
    seen: dict[Path, Path] = {}
    for run in runs:  # one run twice would draw one curve over the other under the same label
        if run.resolve() in seen:
            raise ArtifactError(f"the same run is given twice: {seen[run.resolve()]} and {run}")
        seen[run.resolve()] = run
    plt = pyplot()
    rows = [_metrics(r) for r in runs]
    labels = labels or run_labels(runs)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    legend = []
    for r, label in zip(rows, labels):
        epochs = [row["epoch"] for row in r]
        best = max(row["test_acc"] for row in r)
        ax_acc.plot(epochs, [100 * row["test_acc"] for row in r], marker="o")
        ax_loss.plot(epochs, [row["train_loss"] for row in r], marker="o")
        legend.append(textwrap.fill(f"{label}: {100 * best:.2f} % best", 70))
    ax_acc.set_ylabel("test accuracy (%)")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    plain_log_labels(ax_loss.yaxis)
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole: no 0.95 ... 1.05 ticks
        ax.grid(True, which="both", alpha=0.3)
    # one legend below both plots, long labels wrapped: inside the axes, the labels of runs that differ in
    # many keys covered the curves (and tight_layout gave up with a warning)
    fig.suptitle(", ".join(sorted({r.parent.name for r in runs})))
    fig.tight_layout()
    fig.legend(ax_acc.get_lines(), legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8,
               ncol=1 if max(len(line) for text in legend for line in text.splitlines()) > 50 else 2)
    return _save(fig, plt, out, layout=False)
