"""bench's results: the file stem each bench writes under, its table, its plot, and the files written (with the
earlier bench's rows of runners not timed again, when they timed the same export in the same environment)."""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import (artifact_as_recorded, atomic_save, atomic_write_text, forget_artifact, interrupts_deferred,
                        record_artifact, write_recorded_json)
from .backends.base import RUNNERS
from .errors import described

__all__ = ["bench_stem", "batch_rows", "runner_entries", "format_table", "bench_figure", "keep_earlier_runners",
           "write_results"]


def write_results(run_dir: Path, stem: str, results: dict, profiles: list[str], echo=print) -> None:
    """``<stem>.json``, ``.md``, ``.png`` and ``_profile.txt`` (when there are profiles), recorded in the manifest;
    interrupts wait until all of them are written, so a bench's files are all this bench's or all the earlier
    one's."""
    with interrupts_deferred():
        if profiles:  # none when every runner was skipped
            atomic_write_text(run_dir / f"{stem}_profile.txt", "\n\n".join(profiles) + "\n")
            record_artifact(run_dir, f"{stem}_profile.txt")
            results["profile_file"] = f"{stem}_profile.txt"
        if _plot_or_forget(run_dir, f"{stem}.png", results, echo):
            results["plot_file"] = f"{stem}.png"
        write_recorded_json(run_dir, f"{stem}.json", results)  # the next bench keeps rows only from the file recorded
        atomic_write_text(run_dir / f"{stem}.md", format_table(results) + "\n")
        record_artifact(run_dir, f"{stem}.md")


def _plot_or_forget(run_dir: Path, name: str, results: dict, echo) -> bool:
    """Draw ``results`` into ``run_dir/name`` and record it; where it cannot be drawn (no matplotlib), remove an
    earlier bench's plot and its manifest entry, which would show figures these results replaced. A plot that
    fails is said in one line: the figures measured are written all the same."""
    try:
        drawn = _plot(results, run_dir / name)
    except Exception as exc:  # noqa: BLE001  matplotlib's own errors: the plot is the least of the outputs
        echo(f"{name} not drawn: {described(exc)}")
        drawn = False
    if drawn:
        record_artifact(run_dir, name)
        return True
    forget_artifact(run_dir, name)
    return False


def keep_earlier_runners(path: Path, results: dict) -> list[str]:
    """Add to ``results`` the runners that the earlier bench in ``path`` timed and this one did not, when it
    timed the same export bytes at the same T with the same platform, GPU and versions (``environment()``,
    which names no host): timing one runner again
    refreshes its rows and keeps the others'. Returns their names (each entry keeps its ``measured``
    time). An unreadable or other bench's file is replaced, as before, and so is one edited since bench wrote it
    (its hash is not the manifest's: a made-up row was carried into the new table and its hash recorded again)."""
    if not artifact_as_recorded(path.parent, path.name):
        return []
    try:
        earlier = json.loads(path.read_text())
        same = all(earlier[k] == results[k] for k in ("export_sha256", "T", "environment")) and results["export_sha256"]
        runners = dict(earlier["runners"]) if same else {}
        kept = [name for name in runners if name not in results["runners"]]
        for name in kept:  # read back from JSON in string order ("1", "128", "16"): numerical again
            if "by_batch" in runners[name]:
                runners[name] = {**runners[name], "by_batch": dict(batch_rows(runners[name]))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    if kept:
        results["runners"] = {**runners, **results["runners"]}  # a re-timed runner's new entry replaces its old one
        results["batches"] = sorted({*earlier.get("batches", []), *results["batches"]})
    return kept


def bench_stem(model_file: str, precision: str, cuda_graph: bool = True, cudnn_autotune: bool = True,
               pad_channels: int = 1, channels_last: bool = False, fuse_input_conv: bool = False,
               other_steps: int | None = None) -> str:
    """File stem of a bench's outputs: ``bench``, ``bench_model_per_step``, ``bench_T16`` (``other_steps``:
    an export at another T than the trained one), ``bench_bf16``, ``bench_no_cuda_graph``,
    ``bench_no_autotune``, ... so that timing another file, T, precision or launch mode does not overwrite
    the results of ``model.onnx`` at the trained T, fp32, with graphs and autotuning."""
    parts = (["bench"] + ([Path(model_file).stem] if model_file != "model.onnx" else [])
             + ([f"T{other_steps}"] if other_steps is not None else [])
             + ([precision] if precision != "fp32" else []) + ([] if cuda_graph else ["no_cuda_graph"])
             + ([] if cudnn_autotune else ["no_autotune"]) + ([f"pad{pad_channels}"] if pad_channels > 1 else [])
             + (["channels_last"] if channels_last else []) + (["fused_input_conv"] if fuse_input_conv else []))
    return "_".join(parts)


def batch_rows(entry: dict) -> list[tuple[str, dict]]:
    """A runner entry's ``by_batch`` rows in numerical batch order: bench.json is written with sorted keys, so
    a file read back lists "1", "128", "16"."""
    return sorted(entry.get("by_batch", {}).items(), key=lambda row: int(row[0]))


def runner_entries(results: dict) -> list[tuple[str, dict]]:
    """``results``' runner entries in the runner registry's order (torch, torch-fast, ..., ort-cpu, ort-cuda, ov-cpu, trt),
    whatever order they were timed or kept in: bench.json is written with sorted keys, and a table read back
    from it (pipeline's "up to date") listed them alphabetically."""
    rank = {name: i for i, name in enumerate(RUNNERS)}
    return sorted(results["runners"].items(), key=lambda item: rank.get(item[0], len(rank)))


def format_table(results: dict) -> str:
    """Markdown table: one row per runner and batch size."""
    layout = "streamed, one call per step" if results.get("form") == "step" else f"{results.get('order', 'layer')}-major"
    lines = [f"model {results['model']} ({results.get('file', 'model.onnx')}, {layout}), T = {results['T']}",
             "", "| runner | batch | p50 ms | p90 ms | p99 ms | samples/s | timesteps/s | execution |", "|---|---|---|---|---|---|---|---|"]
    for runner, entry in runner_entries(results):
        name = runner if entry.get("precision", "fp32") == "fp32" else f"{runner} ({entry['precision']})"
        if "skipped" in entry:
            lines.append(f"| {name} | - | skipped: {entry['skipped']} | | | | | |")
            continue
        for batch, s in batch_rows(entry):
            if "failed" in s:
                lines.append(f"| {name} | {batch} | {s['failed']} | | | | | |")
                continue
            lines.append(f"| {name} | {batch} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | "
                         f"{s['samples_per_s']:,.0f} | {s['timesteps_per_s']:,.0f} | {s.get('execution', '')} |")
        if "failed" in entry:  # after its figures: e.g. the profile
            lines.append(f"| {name} | - | {entry['failed']} | | | | | |")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> bool:
    """Latency and throughput against batch per runner (:func:`bench_figure`) as a PNG; False when matplotlib
    is absent."""
    from .errors import MissingDependencyError
    from .plots import pyplot

    try:
        plt = pyplot()
    except MissingDependencyError:
        return False
    fig = bench_figure(results, plt)
    atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True


def bench_figure(results: dict, plt):
    """The bench plot: p50 latency and samples/s against batch, one line per timed runner, both axes
    logarithmic. The batch axis is ticked at the measured sizes only, and numbers read as numbers (2, 30,
    0.5, 20,000) where matplotlib's defaults would write 2x10^1 and put ticks at batch sizes never run."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    from .plots import plain_log_labels

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(10, 4))
    sizes: set[int] = set()
    for name, entry in runner_entries(results):  # lines and legend in the table's order
        if "by_batch" not in entry:
            continue
        timed = {int(k): s for k, s in batch_rows(entry) if "failed" not in s}
        if not timed:
            continue
        sizes.update(timed)
        b = list(timed)
        ax_lat.plot(b, [s["p50_ms"] for s in timed.values()], marker="o", label=name)
        ax_thr.plot(b, [s["samples_per_s"] for s in timed.values()], marker="o", label=name)
    for ax, title, unit in ((ax_lat, "latency (p50)", "ms per batch of T steps"), (ax_thr, "throughput", "samples/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if sizes:
            ax.xaxis.set_major_locator(FixedLocator(sorted(sizes)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_locator(NullLocator())
        plain_log_labels(ax.yaxis)
        ax.set_xlabel("batch")
        ax.set_ylabel(unit)
        ax.set_title(f"{results['model']} T={results['T']}: {title}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:  # every runner was skipped (their reasons are in the table): say so rather than an empty frame
            ax.text(0.5, 0.5, "no runner timed", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    return fig
