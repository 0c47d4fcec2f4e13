"""The `snncompile` command. Every SnnCompileError becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .backends.base import PRECISIONS, RUNNERS, TORCH_FAST_PRECISIONS  # numpy only: the runtimes load lazily
from .config import MAX_STEPS
from .export_options import DEFAULT_OPSET, DEFAULT_SAMPLES, EXPORT_PRECISIONS
from .errors import Interrupted, SnnCompileError, TrainingInterrupted, caused_by_interrupt
from .text import counted, shell_path

__all__ = ["main", "cli"]


def _culprit(e: OSError) -> str:
    """The path an OSError is about. "Not a directory" names the path it could not make, several levels below
    the real cause: the file standing where a folder must be (`--out a/b` where `a` is a file)."""
    import errno
    from pathlib import Path

    path = Path(e.filename)
    if e.errno == errno.ENOTDIR:
        for parent in [path, *path.parents]:
            if parent.is_file():
                return f"{parent} is a file"
    return str(path)


class _Group(click.Group):
    """Turns our errors into one-line messages with the error's exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SnnCompileError as e:
            if caused_by_interrupt(e) and not isinstance(e, Interrupted):
                self._interrupted(ctx)
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            self._interrupted(ctx)
        except OSError as e:  # a folder it cannot create or write (read-only, no permission, full): the path, once
            if caused_by_interrupt(e):
                self._interrupted(ctx)
            where = f": {_culprit(e)}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            ctx.exit(1)
        except click.exceptions.Exit:  # a nested group's (bench) own exit, its message said: not said again
            raise
        except Exception as e:
            if not caused_by_interrupt(e):  # a bug: the traceback is what helps
                raise
            self._interrupted(ctx)

    @staticmethod
    def _interrupted(ctx: click.Context):
        """A Ctrl-C that no command turned into its own message (e.g. while loading, or a library's wrapped one)."""
        command = ctx.invoked_subcommand or "command"
        if ctx.parent is not None:  # a nested group's subcommand: `bench run`, not `run`
            command = f"{ctx.info_name} {command}"
        click.echo(f"error: interrupted: snncompile {command} stopped before it finished (artifacts are written whole "
                   "or not at all; run it again to finish)", err=True)
        ctx.exit(Interrupted.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="snncompile")
def cli() -> None:
    """Train spiking networks (STBP), export them to ONNX, verify runtimes spike by spike."""
    from .host_memory import keep_freed_memory

    keep_freed_memory()  # the process is ours: CPU steps reuse freed memory (SNNCOMPILE_MALLOC=system: off)


@cli.command(short_help="Train MODEL_TOML with STBP into a new run directory.")
@click.argument("model_toml", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.lr=0.01.")
@click.option("--out", "out_root", default="export", show_default=True, type=click.Path(file_okay=False, path_type=Path), help="Artifact root.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path),
              help="Continue this run directory from its last checkpoint (--set may change only what leaves the "
                   "weights alone: data.num_workers, data.cache_dir, ...).")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop after this many epochs in total (resumable).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(model_toml, overrides, out_root, resume, stop_after, no_progress) -> None:
    """Train MODEL_TOML (e.g. models/digits.toml: sklearn's digits, no download) into a new run directory under
    --out, or continue a run with --resume RUN_DIR."""
    from .config import apply_overrides, load_config
    from .errors import ConfigError
    from .runs import load_run_config
    from .train import train as run_training

    if resume is None and model_toml is None:
        raise ConfigError("give a model TOML (e.g. models/digits.toml) or --resume RUN_DIR")
    if resume is not None and model_toml is not None:
        raise ConfigError("--resume continues a run with its own config: drop MODEL_TOML")
    if resume is None:
        cfg = load_config(model_toml, list(overrides))
    else:  # the run's own config; --set may change how it executes (checked against the run in train())
        cfg = apply_overrides(load_run_config(resume), list(overrides)) if overrides else None
    result = run_training(cfg, out_root, resume=resume, stop_after=stop_after, progress=not no_progress, echo=click.echo)
    if result.run_dir is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    planned = load_run_config(result.run_dir).train.epochs
    if result.epochs_done < planned:  # --stop-after: not final; say how to go on as well as what to run on it
        click.echo(f"test accuracy {100 * result.test_acc:.2f} % after {result.epochs_done} of {planned} epochs "
                   f"(stopped by --stop-after), {result.elapsed_s:.1f} s wall; run: {result.run_dir}")
        click.echo(f"continue: snncompile train --resume {shell_path(result.run_dir)}")
    else:
        click.echo(f"final test accuracy {100 * result.test_acc:.2f} % after {counted(result.epochs_done, 'epoch')}, "
                   f"{result.elapsed_s:.1f} s wall; run: {result.run_dir}")
    click.echo(f"next: {_next_after_training(result.run_dir)}")


def _next_after_training(run_dir: Path) -> str:
    """The commands after `train`: both exports (verify checks model_layers.onnx, bench times model.onnx),
    then verify and bench; without the exports when both are already of the checkpoint training recorded
    (a finished run resumed: nothing trained, nothing to export again)."""
    from .artifacts import read_manifest
    from .runs import CHECKPOINT

    try:  # a hint only: training has succeeded, and a damaged manifest is for the next command to report
        manifest = read_manifest(run_dir)
        trained = manifest["artifacts"][CHECKPOINT]["sha256"]
        exports = manifest["exports"]
        current = isinstance(trained, str) and all(
            isinstance(exports.get(name), dict) and exports[name].get("checkpoint_sha256") == trained
            and (run_dir / name).is_file() for name in ("model.onnx", "model_layers.onnx"))
    except (SnnCompileError, KeyError, TypeError, AttributeError):
        current = False
    run = shell_path(run_dir)
    verify_bench = f"snncompile verify {run} && snncompile bench {run}"
    return verify_bench if current else f"snncompile export {run} && snncompile export {run} --layers && {verify_bench}"


@cli.command(short_help="Create an untrained run whose every layer spikes.")
@click.argument("model_toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--out", "out_root", default="export", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Initialisation seed.")
@click.option("--no-calibrate", is_flag=True, help="Keep PyTorch's default init (deep layers may not fire).")
def init(model_toml, overrides, out_root, seed, no_calibrate) -> None:
    """Create an untrained run of MODEL_TOML (weights scaled so every layer fires) for export/bench."""
    from .config import load_config
    from .init_run import FIRING_TARGET, init_run

    cfg = load_config(model_toml, list(overrides))
    run, rates = init_run(cfg, out_root, seed, calibrate=not no_calibrate)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
    click.echo(f"initialised {run}" + (f"; firing rates {shown}" if shown else ""))
    low, high = FIRING_TARGET
    outside = [f"{k} {v:.2f}" for k, v in rates.items() if not low <= v <= high]
    if outside:  # the run is still written (it loads and exports); its speed and flip figures are less telling
        click.echo(f"warning: calibration left {', '.join(outside)} outside the {low:g}-{high:g} firing rate it "
                   "aims for: check model.v_th and the layer's input", err=True)


@cli.command(short_help="Export RUN to ONNX, with reference inputs and outputs.")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--T", "steps", type=click.IntRange(1, MAX_STEPS), help="Timesteps to unroll (default: the T it was trained with).")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=click.IntRange(13, 23),
              help="ONNX opset (torch 2.13's exporter writes 15 and later; an opset it cannot write is an error).")
@click.option("--form", type=click.Choice(["unrolled", "step"]), default="unrolled", show_default=True,
              help="unrolled: all T steps in one graph (model.onnx); step: one step with explicit state (model_step.onnx).")
@click.option("--layers", is_flag=True, help="Also output every LIF layer's spikes and membrane (per-layer verify).")
@click.option("--rates", is_flag=True, help="Also output the output layer's firing rates.")
@click.option("--samples", default=DEFAULT_SAMPLES, show_default=True, type=click.IntRange(1), help="Random and real reference inputs (each).")
@click.option("--order", type=click.Choice(["layer", "step"]), default="layer", show_default=True,
              help="layer: each conv once on [T*B, ...] (model.onnx); step: per-timestep unrolling (model_per_step.onnx), for comparison.")
@click.option("--precision", type=click.Choice(EXPORT_PRECISIONS), default="fp32", show_default=True,
              help="fp16/bf16: convs and matmuls in that type, neurons in fp32 (model_fp16.onnx); a strongly typed graph. "
                   "tf32x2: every conv/linear split into TF32 parts (model_tf32x2.onnx): spike layers fp32-accurate under "
                   "TF32, analog ones (input split too) between TF32 and fp32.")
def export(run, steps, opset, form, layers, rates, samples, order, precision) -> None:
    """Export RUN (a run directory or its checkpoint) to ONNX, with reference inputs and outputs."""
    from .export_onnx import export_run

    r = export_run(run, steps=steps, opset=opset, form=form, layers=layers, rates=rates, n_random=samples, n_real=samples,
                   order=order, precision=precision)
    if not r.n_real:  # real samples asked for, none saved (no dataset, T mismatch): why
        from .artifacts import read_manifest

        why = read_manifest(r.path.parent)["exports"][r.path.name]["reference"]
        click.echo(f"note: no real reference inputs ({why.split('no real samples (', 1)[-1].removesuffix(')')})", err=True)
    typed = ""
    if r.precision in ("fp16", "bf16"):
        typed = f", {r.reduced_precision_nodes} convs/matmuls in {r.precision}"
    elif r.precision == "tf32x2":
        typed = f", {r.split_tf32_layers} convs/linears split for TF32"
    references = f"{r.n_random} random + {r.n_real} real reference inputs"
    if r.form == "step":  # what the export itself checked (recorded in its entry)
        from .artifacts import read_manifest

        checked = read_manifest(r.path.parent)["exports"][r.path.name].get("cleaned_vs_raw", "not recorded")
        references += f" (verify and bench stream them, T calls each); cleaned vs raw graph: {checked}"
    click.echo(
        f"exported {r.path} ({r.form}, T={r.steps}, opset {r.opset}{typed}): {r.onnx_bytes / 1e6:.2f} MB, "
        f"{r.nodes_clean} nodes ({r.nodes_raw} before cleaning), ops {', '.join(r.ops)}; {references}; {r.seconds:.1f} s"
    )


@cli.command(short_help="Build a TensorRT engine from RUN's export.")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--batch", default="1:16:128", show_default=True, help="Dynamic batch profile MIN:OPT:MAX.")
@click.option("--workspace", "workspace_mb", default=4096, show_default=True, type=int, help="Builder workspace in MB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), help="Reuse and update this timing cache.")
@click.option("--model", "model_file", default="model.onnx", show_default=True,
              help="Export to build from (model_layers.onnx gives an engine verify can check layer by layer; "
                   "model_step.onnx one step's engine, which verify and bench stream T calls through).")
def build(run, precision, batch, workspace_mb, timing_cache, model_file) -> None:
    """Build a TensorRT engine for this GPU from RUN's export (--model, model.onnx by default; TensorRT-RTX: a
    portable engine, no GPU needed)."""
    from .backends.trt import engine_name
    from .build_engine import build_run

    side = build_run(run, precision, batch, workspace_mb, timing_cache, model_file=model_file)
    typed = (f"{side['reduced_precision_nodes']} convs/matmuls in {precision}, neurons in fp32"
             if precision in ("fp16", "bf16") else f"{precision} throughout")
    target = (f"portable: runs on compute capability {side['compute_capability'].removeprefix('any of ')}, built on "
              f"{side['gpu']}" if side.get("portable") else f"for {side['gpu']} (sm {side['compute_capability']})")
    click.echo(f"built {run / engine_name(model_file, precision)} with {side['tensorrt']}, {target}, in "
               f"{side['build_seconds']:.1f} s: {side['layers']} layers, {typed}, batch {batch}")
    if timing_cache and side.get("portable"):  # TensorRT-RTX: its timing-cache calls do nothing
        click.echo(f"note: no timing cache written to {timing_cache}: {side['tensorrt'].split()[0]} times no tactics "
                   "at build time", err=True)


@cli.command(short_help="Check that a runtime computes PyTorch's spikes.")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--runner", "runners", multiple=True, type=click.Choice(list(RUNNERS)), help="Runner(s) to check (default: every available one but torch and the opt-in torch-loop and "
                   "torch-compile; for model_step.onnx those of them that stream it: ort-cpu, ort-cuda, ov-cpu, trt).")
@click.option("--precision", type=click.Choice(TORCH_FAST_PRECISIONS), default=None,
              help="Tolerance preset, and what torch-fast/trt compute at (default: the export's precision, fp32 unless "
                   "exported with --precision; tf32x2: torch-fast's fp32-accurate split-TF32 spike layers, and the TensorRT engine "
                   "of a tf32x2 export, built with --precision tf32).")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1), help="Inputs per inference call.")
@click.option("--model", "model_file", default=None, help="Which export of RUN to check (default: model_layers.onnx if exported as model.onnx's twin, else model.onnx; model_step.onnx streams T calls).")
@click.option("--test-set", is_flag=True, help="Check on the run's whole test split (read from its dataset) instead of the export's reference inputs.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def verify(run, runners, precision, batch, model_file, test_set, no_progress) -> None:
    """Check that RUN's exported model computes PyTorch's spikes and outputs on a runtime."""
    from .artifacts import read_manifest
    from .backends import default_runners, runner_options
    from .compare import default_model_file, verify_runs
    from .verify_report import format_report

    exports = read_manifest(run).get("exports", {})
    defaulted = not runners
    if not runners:
        runners = tuple(default_runners(reference=False))
        if exports.get(model_file or "", {}).get("form") == "step":  # the runners that stream it
            from .streaming import STREAM_RUNNERS

            runners = tuple(n for n in runners if n in STREAM_RUNNERS)
    checked = model_file or default_model_file(exports)
    typed = exports.get(checked, {}).get("precision", "fp32")  # the export's
    if precision is not None:
        _say_what_ignores_precision(runners, precision, typed, checked)
    precision = precision or typed
    options = {name: runner_options(name, precision, model_precision=typed) for name in runners}
    # the default runners are those installed: one that cannot load this file is skipped with its reason, as
    # bench does; one asked for by name is an error
    skipped = (lambda name, reason: click.echo(f"{name}: skipped ({reason})")) if defaulted else None
    reports = verify_runs(run, options, precision, batch, model_file=model_file, progress=not no_progress,
                          inputs="test" if test_set else "reference", skip=skipped)
    failed = []
    for name, report in reports.items():
        click.echo(format_report(report))
        if not report["passed"]:
            failed.append(name)
    click.echo(f"report: {run / 'verify.json'}")
    if failed:
        sys.exit(1)


def _say_what_ignores_precision(runners: tuple[str, ...], precision: str, typed: str, model_file: str) -> None:
    """A note naming the runners that do not compute at ``--precision`` (ONNX Runtime and OpenVINO run the file
    as exported, the torch loops in fp32): each is judged at what it computes, not at the looser preset."""
    from .backends.base import GRAPH_RUNNERS, PRECISION_RUNNERS, runner_numerics

    own = {name: runner_numerics(name, precision, typed) for name in runners}
    others = [f"{name} at {numerics}" for name, numerics in own.items() if numerics != precision]
    if not others:
        return
    hint = ""
    if precision in ("fp16", "bf16") and any(name in GRAPH_RUNNERS for name in own):
        runtimes = sorted({"OpenVINO" if name == "ov-cpu" else "ONNX Runtime" for name in own if name in GRAPH_RUNNERS})
        hint = (f" ({' and '.join(runtimes)} {'compute' if len(runtimes) > 1 else 'computes'} in {precision} on "
                f"`snncompile export RUN --precision {precision}`'s file)")
    click.echo(f"note: --precision {precision} sets what {' and '.join(PRECISION_RUNNERS)} compute; {model_file} is "
               f"checked on {', '.join(others)}, as they compute it{hint}")


class _BenchGroup(_Group):
    """``bench RUN_DIR`` times inference; ``bench train MODEL.toml`` times training steps."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]  # the default subcommand: inference on a run directory
        return super().parse_args(ctx, args)


@cli.group(cls=_BenchGroup, short_help="Time inference (bench RUN) or training (bench train).")
def bench() -> None:
    """Benchmarks: `bench RUN_DIR` (inference, every runner; the same as `bench run RUN_DIR`, whose options
    `snncompile bench run --help` lists) or `bench train MODEL.toml` (training steps)."""


@bench.command("train")
@click.argument("model_toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--T", "steps_t", type=click.IntRange(1, MAX_STEPS), help="Timesteps (default: the model's).")
@click.option("--batch", type=click.IntRange(1), help="Batch size (default: the model's data.batch_size).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1), help="Timed training steps.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0))
@click.option("--peers", is_flag=True, help="Also time spikingjelly and snntorch on the same network when installed.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compile", "compiled", is_flag=True,
              help="Also time ours and the step loop under torch.compile (compiles during warm-up: minutes).")
@click.option("--profile", is_flag=True,
              help="Also print where our layer-major step's time goes (eager; on CUDA also the channels_last "
                   "variants'): torch.profiler's top 20 GPU kernels (CPU operators on a CPU) by self time over 3 steps.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as a PNG bar chart (ms per step and peak GPU memory per variant, on a CPU the "
                   "memory saved for backward; needs matplotlib).")
def bench_train_cmd(model_toml, overrides, steps_t, batch, precision, steps, warmup, peers, device, compiled,
                    profile, plot_path) -> None:
    """Median ms per training step (forward + backward + optimizer) of MODEL_TOML's network."""
    from .bench_train import bench_train, format_train_table, plot_train_bench
    from .config import load_config
    from .plots import pyplot
    from .train import resolve_device

    if plot_path is not None:
        pyplot()  # matplotlib missing: the one-line error now, not after minutes of timing

    extra = [f"model.T={steps_t}"] if steps_t else []
    extra += [f"data.batch_size={batch}"] if batch else []
    cfg = load_config(model_toml, [*overrides, *extra])
    result = bench_train(cfg, resolve_device(device, "--device "), precision, steps, warmup, peers, echo=lambda s: None,
                         compiled=compiled, profile=profile)
    click.echo(format_train_table(result))
    for variant, table in result.get("profiles", {}).items():
        click.echo(f"\n{variant}, eager: {table}")
    if plot_path is not None:  # drawn even with nothing timed: the chart names each variant's reason
        click.echo(f"wrote {plot_train_bench(result, plot_path)}")
    if not any(isinstance(stats, dict) for stats in result["variants"].values()):  # as bench: nothing measured
        click.echo("error: no variant could be timed: the table says why", err=True)
        sys.exit(1)


@bench.command("run")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--runners", default="", help="Comma-separated runners (default: every available one but the opt-in "
                                             "torch-loop and torch-compile, which compiles per input shape; for "
                                             "model_step.onnx those of them that stream it).")
@click.option("--batch", "batches", default="1,16,128", show_default=True, help="Comma-separated batch sizes.")
@click.option("--iters", default=50, show_default=True, type=click.IntRange(1), help="Timed calls per batch size.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0),
              help="Untimed calls first; with 0 the first timed call carries a runtime's lazy set-up (ONNX Runtime's "
                   "first run, cuDNN autotuning) into p90/p99.")
@click.option("--model", "model_file", default="model.onnx", show_default=True, help="Which export to time (model_step.onnx: T streamed calls per batch).")
@click.option("--T", "steps_t", type=click.IntRange(1, MAX_STEPS),
              help="Time at this T (default: the export's). A file exported at another T is exported again at this "
                   "one first, with its other options, and replaces it; outputs bench_T<N>.* off the trained T.")
@click.option("--precision", type=click.Choice(TORCH_FAST_PRECISIONS), default="fp32",
              show_default=True, help="For torch-fast and trt (verified at that precision's tolerances); ONNX "
                                      "Runtime and OpenVINO run the file at its own precision, the torch loops fp32. tf32x2: torch-fast only, fp32-accurate spike layers on TF32.")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="torch-fast, torch-compile, ort-cuda and trt replay a captured CUDA graph; off: kernel-by-kernel launches "
                   "(bench_no_cuda_graph.*), to see what the graphs save.")
@click.option("--cudnn-autotune/--no-cudnn-autotune", default=True, show_default=True,
              help="torch-fast times cuDNN's algorithms per convolution shape and keeps the fastest; off: cuDNN's "
                   "heuristic pick, PyTorch's default (bench_no_autotune.*), to see what autotuning saves.")
@click.option("--profile", is_flag=True,
              help="Also profile 3 calls of each runner at the last batch size (torch.profiler's top 20 GPU kernels, "
                   "CPU operators without CUDA; ort-cpu and ov-cpu: their runtime's own profiler, 10 calls, each node's "
                   "median) into <stem>_profile.txt, and print it. With --no-cuda-graph the kernels show as launched one by one.")
@click.option("--pad-channels", default=1, show_default=True, type=click.IntRange(1),
              help="torch-fast runs convs whose input channel count is not a multiple of N on zero-padded copies (the "
                   "same function; cuDNN's tensor-core kernels want 8), written to bench_pad<N>.*.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="CPU threads for torch, ONNX Runtime and OpenVINO (0: torch's default, the others one per usable CPU). On a CPU "
                   "other work keeps busy, the free cores: threads that wait for a busy core stall every op.")
@click.option("--channels-last", is_flag=True,
              help="torch-fast keeps conv weights and activations in channels_last, the layout cuDNN's tensor-core "
                   "convolutions compute in (NCHW: a transpose before and after each), written to "
                   "bench_channels_last.*.")
@click.option("--fuse-input-conv", is_flag=True,
              help="torch-fast runs the input conv (a few channels), its LIF and the pool after it as one kernel "
                   "that never writes the conv's output, the network's largest tensor; bench_fused_input_conv.*.")
@click.option("--no-progress", is_flag=True,
              help="No line per runner and batch size as each is timed (failures are still said); the table follows.")
def bench_run_cmd(run, runners, batches, iters, warmup, model_file, steps_t, precision, cuda_graph, cudnn_autotune,
                  profile, pad_channels, threads, channels_last, fuse_input_conv, no_progress) -> None:
    """Verify, then time every runner on RUN's export; writes bench.json, bench.md, bench.png."""
    from .bench import bench_run
    from .bench_report import format_table

    sizes = _batch_sizes(batches)
    names = [n.strip() for n in runners.split(",") if n.strip()] or None
    results = bench_run(run, names, sizes, warmup=warmup, iters=iters, echo=click.echo, model_file=model_file,
                        precision=precision, cuda_graph=cuda_graph, cudnn_autotune=cudnn_autotune, profile=profile,
                        pad_channels=pad_channels, threads=threads, channels_last=channels_last,
                        fuse_input_conv=fuse_input_conv, steps=steps_t, progress=not no_progress)
    click.echo(format_table(results))
    if "profile_file" in results:
        click.echo("\n" + (run / results["profile_file"]).read_text())
    stem = results["stem"]
    # what this bench wrote, not what exists: a bench.png left by an earlier run is not this one's (bench_run
    # removes it when it draws none)
    written = [f"{stem}.md"] + [name for name in (results.get("plot_file"), results.get("profile_file")) if name]
    click.echo(f"wrote {run / (stem + '.json')}, {', '.join(written)}")


@cli.command(short_help="Train, export, build, verify, bench; resumable.")
@click.argument("model_toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--out", "out_root", default="export", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--batch", "batches", default="1,32", show_default=True, help="Benchmark batch sizes.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--stream", is_flag=True,
              help="Also the step form (model_step.onnx, one call per timestep, what a streaming deployment runs): "
                   "exported, verified streamed, layer by layer at every step, and benched streamed.")
def pipeline(model_toml, overrides, out_root, batches, no_progress, stream) -> None:
    """Train, export, build (TensorRT, where present), verify and benchmark MODEL_TOML; stages already done for the
    same inputs are skipped."""
    from .config import load_config
    from .pipeline import format_summary, run_pipeline

    sizes = _batch_sizes(batches)
    cfg = load_config(model_toml, list(overrides))
    try:
        summary = run_pipeline(cfg, out_root, sizes, progress=not no_progress, echo=click.echo, stream=stream)
    except TrainingInterrupted as e:  # not train's own next step: the pipeline goes on from the checkpoint itself
        raise TrainingInterrupted(f"pipeline {e.survived}", "run the same `snncompile pipeline` command again to "
                                  "go on from there") from None
    click.echo(format_summary(summary))
    if not all(v["passed"] for v in summary["verify"].values()):
        sys.exit(1)


@cli.command(short_help="Plot the training curves of one or more runs.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write (one run: its training.png; several: training_comparison.png in the current folder).")
@click.option("--label", "labels", multiple=True, help="Curve labels, one per run (default: the config keys the runs differ in).")
def plot(runs, out, labels) -> None:
    """Training curves of one run, or of several runs side by side (e.g. NeuNorm on vs off)."""
    from .plots import plot_runs, plot_training

    if labels and len(labels) != len(runs):
        raise click.UsageError(f"--label given {counted(len(labels), 'time')} for {counted(len(runs), 'run')}")
    if len(runs) == 1 and not labels:
        path = plot_training(runs[0], out)
    else:
        # not beside the runs: a shell glob over them (`plot runs/mnist/*`) would catch it the next time
        path = plot_runs(list(runs), out or Path("training_comparison.png"), list(labels) or None)
    click.echo(f"wrote {path}")


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch 1,16,128`` -> (1, 16, 128); the sizes themselves are checked where they are used (bench.batch_sizes)."""
    from .errors import ConfigError

    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--batch expects comma-separated integers, got {text!r}") from None


@cli.group()
def data() -> None:
    """Event datasets: download them, pre-build their frame cache."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["nmnist", "dvs_cifar10", "dvs_gesture"]))
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to download into (use it as data.root).")
def data_fetch(name, root) -> None:
    """Download NAME with checksums into ROOT (needs network and the data extra)."""
    from .data.fetch import fetch

    folder = fetch(name, root)
    click.echo(f"{name} ready in {folder}: train with --set data.root={root}")


@data.command("prepare")
@click.argument("model_toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def data_prepare(model_toml, overrides, no_progress) -> None:
    """Load MODEL_TOML's dataset once (building the frame cache if needed) and report throughput."""
    import time

    from .config import load_config
    from .data import load_dataset

    cfg = load_config(model_toml, list(overrides))
    t0 = time.perf_counter()
    ds = load_dataset(cfg, progress=not no_progress)
    seconds = time.perf_counter() - t0
    n = len(ds.train) + len(ds.test)
    status = ", ".join(f"{k.split('_')[0]} {v['status']}" for k, v in ds.info.items() if k.endswith("_cache")) or "in memory"
    click.echo(f"{cfg.data.name}: {len(ds.train)} train + {len(ds.test)} test samples {tuple(ds.train.x.shape[1:])} "
               f"in {seconds:.2f} s = {n / seconds:.0f} samples/s ({status})")


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    # A SIGTERM (timeout, kill, a cluster scheduler's preemption) stops a command as Ctrl-C does: the same cleanup
    # of staging folders and half-written files, the same one line. Python's default dies at once and left an
    # export's staging folder, the size of the model twice, in the run directory.
    # Not under torchrun: it stops the other ranks with SIGTERM when one fails, which distributed.py turns into
    # their own one-line error (a handler here could answer a late second SIGTERM with "interrupted" instead).
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and "RANK" not in os.environ:
        signal.signal(signal.SIGTERM, _terminated)
    cli(prog_name="snncompile")


if __name__ == "__main__":
    sys.exit(main())
