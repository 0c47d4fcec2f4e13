"""`snncompile bench`: verified latency and throughput of every runner available here.

Each runner is verified first, at the precision it runs (``runner_numerics``), on the export's reference
inputs (on its ``_layers`` twin, then the timed file), and skipped with the reason if it fails. Then, per
batch size: inputs made once and placed where the runner computes (``Runner.prepare``), warm-up calls,
then timed calls (``Runner.run_prepared`` returns only once the result is complete: CUDA runners
synchronize) -> p50/p90/p99 latency, samples/s and timesteps/s.
Results go to ``bench.json``, ``bench.md`` and (with matplotlib) ``bench.png`` in the run dir; a bench of
some runners keeps the others' earlier rows when they timed the same export in the same environment. A bench
that timed no runner at all is a one-line error and writes nothing: the earlier results stay.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import numpy as np

from .artifacts import environment, read_manifest, require_writable, run_dir_lock
from .backends import available_runners, create_runner, default_runners, runner_options
from .backends.base import runner_numerics
from .bench_gate import gate
from .bench_report import batch_rows, bench_stem, format_table, keep_earlier_runners, write_results
from .errors import ArtifactError, ConfigError, SnnCompileError, described
from .export_onnx import export_again
from .exports import current_export, export_command, exported_file_changed
from .references import read_references
from .runs import load_run_config
from .streaming import STREAM_RUNNERS, streamed
from .torch_settings import cpu_threads

__all__ = ["batch_rows", "batch_sizes", "bench_run", "bench_stem", "format_table", "percentiles", "failure_row"]


def percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def _reference_inputs(run_dir: Path, export: dict) -> dict[str, np.ndarray]:
    """The export's saved reference inputs (``random`` ``[T, N, ...]``, and ``real`` when it had the dataset).
    Its stored torch outputs, which every runner's gate (verify) reads, are checked too: missing, corrupt or of the
    wrong shape, one line now rather than every runner skipped with it."""
    return read_references(run_dir, export)[0]


def _bench_input(reference: dict[str, np.ndarray], batch: int, seed: int = 0) -> np.ndarray:
    """``[T, batch, ...]`` float32 drawn like the export's random reference inputs (same distribution)."""
    ref = reference["random"]
    idx = np.random.default_rng(seed).integers(0, ref.shape[1], batch)
    try:
        return np.ascontiguousarray(ref[:, idx])
    except MemoryError:
        raise ConfigError(f"--batch {batch}: not enough memory for its {ref[:, :1].nbytes * batch / 2**30:.1f} GiB "
                          "of inputs") from None


def batch_sizes(batches) -> tuple[int, ...]:
    """The batch sizes to time, each once (a repeated size would overwrite its own results), in the order given
    (``--profile`` profiles the last); one line when one is below 1. The pipeline calls it before training, so a
    bad list fails before any stage runs."""
    if any(b < 1 for b in batches):
        raise ConfigError(f"--batch sizes must be >= 1, got {','.join(map(str, batches))}")
    return tuple(dict.fromkeys(batches))


def bench_run(run_dir: str | Path, runners: list[str] | None = None, batches: tuple[int, ...] = (1, 16, 128),
              warmup: int = 10, iters: int = 50, progress: bool = True,
              echo=print, model_file: str = "model.onnx", precision: str = "fp32", cuda_graph: bool = True,
              cudnn_autotune: bool = True, profile: bool = False, pad_channels: int = 1, threads: int = 0,
              channels_last: bool = False, fuse_input_conv: bool = False, steps: int | None = None) -> dict:
    """Verify, then time every requested runner at every batch size (default: every available one but
    the opt-in ``torch-compile`` and ``torch-loop``).

    ``precision`` applies to the runners that take one (torch-fast, trt; see ``PRECISION_RUNNERS``),
    which are then verified with that precision's tolerances. ONNX Runtime and OpenVINO run the file as written:
    at fp32, or at the export's precision for a mixed-precision ``model_fp16.onnx``/``model_bf16.onnx``.
    ``cuda_graph=False``: torch-fast, torch-compile, ort-cuda and trt launch kernel by kernel (what the
    graphs save). ``cudnn_autotune=False``: torch-fast keeps cuDNN's heuristic algorithms, PyTorch's default
    (what autotuning saves). ``pad_channels > 1``: torch-fast runs convs whose input channels are not a
    multiple of it on zero-padded copies (``bench_pad8``). ``channels_last``: torch-fast's conv weights and
    activations in channels_last (``bench_channels_last``). ``fuse_input_conv``: torch-fast's input conv, its
    LIF and pool as one kernel (``bench_fused_input_conv``). ``profile``: after timing each runner, profile
    3 calls at the last batch size (torch.profiler: for a GPU runner every CUDA kernel of the process, ONNX
    Runtime's too; for ort-cpu and ov-cpu, whose work torch's profiler does not see, their runtime's own
    profiler over 10 calls: :data:`RUNTIME_PROFILERS`) into ``<stem>_profile.txt``; with ``cuda_graph=False``
    the kernels show one by one. ``threads``: CPU threads for torch, ONNX Runtime and OpenVINO (0: torch's
    default, the others one per usable core); on a CPU that other work keeps busy, the free cores. ``steps``:
    time at that T; a timed file unrolled (or referenced, the step form) over another T is exported again at
    it first, with its other settings, and replaces the earlier file (said; its outputs get a ``_T<N>`` stem
    where N is not the trained T)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    # the timed file of older weights: one line, not every runner failing its gate (torch is the current checkpoint)
    export = current_export(run_dir, model_file, file_needed=True)
    # before the gates: a missing or replaced timed file re-exported the user's _layers twin, then failed anyway
    if (changed := exported_file_changed(run_dir, model_file, export)) is not None:
        raise ArtifactError(changed)
    require_writable(run_dir, "the bench table, plot and json")  # before minutes of timing, not after
    batches = batch_sizes(batches)
    if iters < 1 or warmup < 0:
        raise ConfigError("--iters must be >= 1, --warmup >= 0")
    if steps is not None and steps != export["T"]:  # after the checks above: they take no minutes
        export = _export_at(run_dir, model_file, export, steps, echo)
    reference = _reference_inputs(run_dir, export)  # before any runner is timed: a missing file is one line, at once
    avail = available_runners()
    names = list(runners) if runners else default_runners()
    if export["form"] == "step" and not runners:  # the ones that can run it, streamed (T calls per batch)
        names = [n for n in names if n in STREAM_RUNNERS]
    unknown = [n for n in names if n not in avail]
    if unknown:
        raise ConfigError(f"unknown runner(s) {', '.join(unknown)} (known: {', '.join(avail)})")
    results: dict = {"model": manifest.get("model"), "file": model_file, "export_sha256": export.get("sha256"),
                     "form": export["form"], "order": export.get("order", "layer"), "T": export["T"], "batches": list(batches),
                     "cuda_graph": cuda_graph, "cudnn_autotune": cudnn_autotune, "pad_channels": pad_channels,
                     "channels_last": channels_last, "fuse_input_conv": fuse_input_conv,
                     "environment": environment(), "runners": {}}
    measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    profiles: list[str] = []
    with cpu_threads(threads):  # torch's runners; ONNX Runtime's and OpenVINO's get theirs in their options
        for name in names:
            numerics = runner_numerics(name, precision, export.get("precision", "fp32"))
            options = runner_options(name, numerics, cuda_graph, cudnn_autotune, pad_channels,
                                     model_precision=export.get("precision", "fp32"), threads=threads,
                                     channels_last=channels_last, fuse_input_conv=fuse_input_conv)
            entry: dict = {"precision": numerics, "measured": measured}
            results["runners"][name] = entry
            if avail[name] is not None:
                entry["skipped"] = avail[name]
                echo(f"{name}: skipped ({avail[name]})")
                continue
            if name != "torch":  # torch is the reference itself
                try:
                    reasons = gate(run_dir, name, numerics, options, model_file, export, reference, echo)
                    skipped = "verify failed: " + "; ".join(reasons) if reasons else None
                except SnnCompileError as e:  # e.g. an engine of the timed file but not of its _layers twin
                    skipped = f"cannot verify: {e}"
                entry["verified"] = skipped is None
                if skipped:
                    entry["skipped"] = skipped
                    echo(f"{name}: skipped ({skipped})")
                    continue
                reference = _reference_inputs(run_dir, export)  # rewritten if the gate exported the _layers twin
            profiled = _time_runner(name, run_dir, model_file, options, export, reference, batches, warmup, iters,
                                    entry, profile, progress, echo)
            profiles += [profiled] if profiled else []
    _require_timed(results["runners"])  # nothing measured: the earlier bench's files stay, not a table of skips
    other_steps = export["T"] if export["T"] != load_run_config(run_dir).model.T else None
    stem = bench_stem(model_file, precision, cuda_graph, cudnn_autotune, pad_channels, channels_last, fuse_input_conv,
                      other_steps)
    results["stem"] = stem
    with run_dir_lock(run_dir):  # the read of the earlier rows to the record of the new file: a bench beside it waits
        kept = keep_earlier_runners(run_dir / f"{stem}.json", results)
        if kept:
            echo(f"kept from the earlier bench of this export: {', '.join(kept)} (time them again with --runners)")
        write_results(run_dir, stem, results, profiles, echo)
    return results


def _time_runner(name: str, run_dir: Path, model_file: str, options: dict, export: dict,
                 reference: dict[str, np.ndarray], batches: tuple[int, ...], warmup: int, iters: int, entry: dict,
                 profile: bool, progress: bool, echo=print) -> str | None:
    """Time the verified runner ``name`` at every batch size into ``entry["by_batch"]``; with ``profile``, its
    profile at the last batch size, which this returns. A runner that cannot be created (or profiled) gets the
    reason in ``entry``: ``failed`` beside the figures measured, ``skipped`` when there are none."""
    try:
        with streamed(create_runner(name, run_dir, model_file, **options), export) as runner:
            entry["by_batch"] = {}
            for batch in batches:
                stats = _time_batch(runner, reference, batch, warmup, iters, export["T"])
                handle = stats.pop("handle", None)
                entry["by_batch"][str(batch)] = stats
                if progress or "failed" in stats:
                    said = stats.get("failed", f"p50 {stats.get('p50_ms', 0):.3f} ms")
                    echo(f"{name} batch {batch}: {said}")
            if not profile or handle is None:  # profiled at the last batch size, when it ran
                return None
            head = f"{name} ({entry['precision']}), batch {batch}, {stats['execution']}"
            if name in RUNTIME_PROFILERS:  # torch's profiler sees none of their CPU work: their own does
                return _runtime_profile(name, run_dir, model_file, options, export, reference, batch, head)
            return _profile(runner, handle, head, stats["execution"])
    except Exception as exc:  # noqa: BLE001  the runner could not be created (or profiled): its row says why
        failure = failure_row(exc)
        if entry.get("by_batch"):  # the figures measured stand
            entry["failed"] = failure
        else:
            entry.pop("by_batch", None)
            entry["skipped"] = failure
        echo(f"{name}: {failure}")
        return None


def _require_timed(runners: dict[str, dict]) -> None:
    """One line when no runner of this bench was timed at any batch size, with each one's reason, shortened: the
    full reasons were said as each runner was skipped."""
    if any("failed" not in stats for entry in runners.values() for stats in entry.get("by_batch", {}).values()):
        return
    reasons = "; ".join(f"{name}: {_brief(_why_untimed(entry))}" for name, entry in runners.items())
    raise ArtifactError(f"no runner was timed ({reasons}): earlier results left as they were")


def _why_untimed(entry: dict) -> str:
    """Why a runner entry has no timed row: skipped, or every batch size failed (the first one's error)."""
    if "skipped" in entry:
        return entry["skipped"]
    rows = batch_rows(entry)
    return rows[0][1]["failed"] if rows else entry.get("failed", "not timed")


def _brief(reason: str, limit: int = 200) -> str:
    """``reason`` on one line: its first clause (a failed verify lists every reason, separated by "; "), cut to
    ``limit`` characters."""
    first, *more = " ".join(reason.split()).split("; ")
    first += " ..." if more else ""
    return first if len(first) <= limit else first[: limit - 4] + " ..."


def _time_batch(runner, reference: dict[str, np.ndarray], batch: int, warmup: int, iters: int, steps: int) -> dict:
    """One runner at one batch size: percentiles, samples/s and timesteps/s (and the prepared ``handle``, for
    the profile), or ``{"failed": "failed: <error>"}``: one size that does not fit (out of memory) costs its own
    row, not the figures already measured nor the other runners'."""
    try:
        handle = runner.prepare({"input": _bench_input(reference, batch)})
        for _ in range(warmup):
            runner.run_prepared(handle)
        times: list[float] = []
        for _ in range(iters):
            t0 = time.perf_counter()
            runner.run_prepared(handle)
            times.append(time.perf_counter() - t0)
        stats = percentiles(times)
        stats.update(iters=len(times), samples_per_s=batch / (stats["p50_ms"] / 1e3),
                     timesteps_per_s=batch * steps / (stats["p50_ms"] / 1e3), execution=runner.timing_mode(handle))
    except Exception as exc:  # noqa: BLE001  any runtime's error (ORT, TensorRT, CUDA OOM), reported in one line
        return {"failed": failure_row(exc)}
    return {**stats, "handle": handle}


def failure_row(exc: Exception) -> str:
    """A benchmark table's ``failed: <Type>: <first line>``, after giving back the CUDA memory a failed
    allocation may have left cached (the next batch size, runner or variant gets it)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"failed: {described(exc)}"


def _profile(runner, handle, head: str, execution: str) -> str:
    """torch.profiler's table of 3 calls of ``runner`` on ``handle`` (the last batch size), after ``head``."""
    import torch

    from .profiling import profile_calls

    # the rows of a runner that computes on the CPU say so ("CPU, N threads"): its operators, not kernels
    on_gpu = torch.cuda.is_available() and not execution.startswith("CPU")
    table = profile_calls(lambda: runner.run_prepared(handle), on_gpu, what="batches")
    return f"{head}: {table}"


# CPU runtimes profiled by their own profilers: ONNX Runtime's (JSON trace events), OpenVINO's performance counters
RUNTIME_PROFILERS = ("ort-cpu", "ov-cpu")


def _runtime_profile(name: str, run_dir: Path, model_file: str, options: dict, export: dict, reference: dict,
                     batch: int, head: str) -> str:
    """Runner ``name``'s runtime's own profile at ``batch`` (one of :data:`RUNTIME_PROFILERS`): 10 calls after
    2 warm-up calls, on a runner of its own with profiling on (it slows every run: the timed runner has it
    off), after ``head``."""
    from .profiling import ort_profile_table, ov_profile_table

    calls, warmup = 10, 2
    with streamed(create_runner(name, run_dir, model_file, **options, profile=True), export) as runner:
        handle = runner.prepare({"input": _bench_input(reference, batch)})
        for _ in range(warmup + calls):
            runner.run_prepared(handle)
        inner = getattr(runner, "inner", runner)  # a stream's step runner has the sessions
        runs = calls * (int(export["T"]) if export["form"] == "step" else 1)
        table = (ort_profile_table(inner.profiled_events(), runs, f"{calls} batches") if name == "ort-cpu"
                 else ov_profile_table(inner.profiled_runs(), runs, f"{calls} batches"))
    return f"{head}: {table}"


def _export_at(run_dir: Path, model_file: str, export: dict, steps: int, echo=print) -> dict:
    """``model_file`` exported again at T = ``steps`` with the other settings of its manifest entry ``export``;
    its new entry. Reference inputs of that T are drawn with it (``reference_inputs_T<T>.npz``)."""
    echo(f"exporting {model_file} at T = {steps} (it is at T = {export['T']}; "
         f"`{export_command(run_dir, export)}` writes that one again)")
    export_again(run_dir, export, steps=steps)
    return current_export(run_dir, model_file, file_needed=True)
