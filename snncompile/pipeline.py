"""`snncompile pipeline`: train -> export -> build (TensorRT, when present) -> verify -> bench.

The engines are built before verify so that verify checks them too.

Resumable per stage: each finished stage records in the manifest a hash of its inputs (the config for
train, the checkpoint for export, the ONNX file for verify/bench, plus the stage's options). Running
the pipeline again redoes only the stages whose inputs changed. The run directory of a config is found
under ``out/<name>/`` by its config hash, or by the hash without the keys that change only how a run executes
(``Config.result_hash``: another frame-cache folder is no reason to train again).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from .artifacts import read_manifest, sha256_file, update_manifest
from .config import Config, load_config
from .errors import ArtifactError, ConfigError, DataError, SnnCompileError, described

__all__ = ["run_pipeline", "find_run", "format_summary"]


def find_run(out_root: Path, cfg: Config) -> Path | None:
    """The newest run dir under ``out_root/<name>`` trained from this config, or from one that differs only in
    how it executes (:data:`~snncompile.config.EXECUTION_KEYS`: frame-cache workers and folder, ...)."""
    from .runs import load_run_config

    base = Path(out_root) / cfg.name
    if not base.is_dir():
        return None
    for run in sorted(base.iterdir(), key=_creation_order, reverse=True):
        try:
            manifest = read_manifest(run)
            untrained = "init" in manifest  # `snncompile init` weights: nothing to resume, never this config's training
            # no checkpoint: a crash in epoch 1, or a run another process is training right now; a Ctrl-C in
            # epoch 1 removes its run dir, so the pipeline leaves none of these behind itself
            if untrained or not (run / "checkpoint.pt").is_file():
                continue
            if manifest.get("config_hash") == cfg.hash() or load_run_config(run).result_hash() == cfg.result_hash():
                return run
        except SnnCompileError as e:
            # this config's run, damaged: training again would hide that (one of an older run format is passed over)
            if not _older_format(run) and _config_of(run) == cfg.result_hash():
                raise ArtifactError(f"{run} is a run of this config but cannot be read ({e}): repair it, or move it "
                                    f"out of {base} to train a new one") from None
            continue  # a damaged run directory of another config
    return None


def _older_format(run: Path) -> bool:
    """Whether ``run``'s manifest is intact but of another run format (written by another snncompile version)."""
    from .artifacts import RUN_FORMAT

    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("run_format") != RUN_FORMAT


def _config_of(run: Path) -> str | None:
    """The result hash of ``run``'s config.toml read on its own (without the manifest), or None."""
    try:
        return load_config(run / "config.toml").result_hash()
    except SnnCompileError:
        return None


def _creation_order(run: Path) -> tuple[str, int]:
    """Run dirs are ``<UTC stamp>`` then ``<stamp>-1``, ``-2``, ... within one second: ``-10`` is newer than ``-9``."""
    stamp, _, n = run.name.rpartition("-") if run.name.count("-") == 2 else (run.name, "", "0")
    return stamp, int(n) if n.isdigit() else 0


def _stage_hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _done(run: Path, stage: str, inputs_hash: str, *outputs: Path) -> bool:
    """Whether ``stage`` finished for exactly these inputs and its ``outputs`` files are all still the ones it
    wrote (another command, e.g. a manual ``snncompile bench`` or ``export --T 2``, may have replaced or
    deleted one since)."""
    if not all(path.is_file() for path in outputs):
        return False
    return read_manifest(run).get("pipeline", {}).get(stage) == _record(inputs_hash, outputs)


def _mark(run: Path, stage: str, inputs_hash: str, *outputs: Path) -> None:
    update_manifest(run, pipeline={stage: _record(inputs_hash, outputs)})


def _record(inputs_hash: str, outputs: tuple[Path, ...]) -> str:
    """The stage's input hash, then a hash of each output file in order (one output: ``inputs:hash``)."""
    return ":".join([inputs_hash, *(sha256_file(path)[:16] for path in outputs)])


def _plot_training(run: Path) -> str:
    """training.png in the run; ``done``, or ``skipped: <why>`` in one line. A plot never stops the pipeline:
    without matplotlib (the plot extra), with metrics.jsonl deleted or anything else failing, the stages that
    matter (export, verify, bench) still run."""
    from .plots import plot_training

    metrics = run / "metrics.jsonl"
    inputs_hash = _stage_hash("plot", sha256_file(metrics)) if metrics.is_file() else None
    if inputs_hash is not None and _done(run, "plot", inputs_hash, run / "training.png"):  # the same curves: not drawn again
        return "up to date"
    try:
        plot_training(run)
    except SnnCompileError as e:  # MissingDependencyError, ArtifactError (no metrics.jsonl), ...
        return f"skipped: {e}"
    except Exception as e:  # matplotlib's own errors (a backend, a font, a full disk) are no reason to stop either
        return f"skipped: {described(e)}"
    _mark(run, "plot", inputs_hash, run / "training.png")
    return "done"


def _build_stage(run: Path, onnx_hash: str, trt_unavailable: str | None, stage: str = "build",
                 files: tuple[str, ...] = ("model.onnx", "model_layers.onnx")) -> str:
    """fp32 TensorRT engines of ``files`` (by default model.onnx, for bench, and model_layers.onnx, for verify's
    per-layer spike check; ``step build``: model_step.onnx), rebuilt when the ONNX files, the GPU or the TensorRT
    build change."""
    if trt_unavailable:
        return f"skipped: {trt_unavailable}"
    from .backends.trt import engine_name, gpu_identity, tensorrt_module
    from .build_engine import build_run

    trt = tensorrt_module()
    inputs_hash = _stage_hash(stage, onnx_hash, trt.__name__, trt.__version__, json.dumps(gpu_identity(), sort_keys=True))
    if _done(run, stage, inputs_hash) and all((run / engine_name(f, "fp32")).is_file() for f in files):
        return "up to date"
    for model_file in files:
        build_run(run, "fp32", model_file=model_file)
    _mark(run, stage, inputs_hash)
    return "done"


def run_pipeline(cfg: Config, out_root: Path, batches: tuple[int, ...] = (1, 32), progress: bool = True,
                 echo: Callable[[str], None] = print, stream: bool = False) -> dict:
    """Run every stage that is not already done for these inputs; returns the summary dict. Every stage runs
    on ``cfg.train.threads`` CPU threads (0: torch's default), the verify and bench stages too. ``stream``: the
    step form too (:func:`_stream_stages`)."""
    from .torch_settings import cpu_threads

    with cpu_threads(cfg.train.threads):
        return _run_pipeline(cfg, out_root, batches, progress, echo, stream)


def _run_pipeline(cfg: Config, out_root: Path, batches: tuple[int, ...], progress: bool,
                  echo: Callable[[str], None], stream: bool) -> dict:
    from .backends import available_runners, default_runners
    from .bench import batch_sizes
    from .export_onnx import export_run
    from .exports import reference_files
    from .train import train

    batches = batch_sizes(batches)  # a bad list fails now, not after training, export and verify
    summary: dict = {"stages": {}}
    run = find_run(out_root, cfg)
    train_inputs = _stage_hash("train", cfg.result_hash())
    if run is not None and _done(run, "train", train_inputs):
        summary["stages"]["train"] = "up to date"
    else:
        # An unfinished run of this config continues (with this call's frame-cache workers); otherwise a new one starts.
        result = train(cfg, out_root, resume=run, progress=progress, echo=echo)
        run = result.run_dir
        _mark(run, "train", train_inputs)
        summary["stages"]["train"] = "done"
    summary["stages"]["plot"] = _plot_training(run)

    export_inputs = _stage_hash("export", sha256_file(run / "checkpoint.pt"), "plain+layers")
    # Every file verify and bench read: e.g. `snncompile export RUN --T 2` rewrites model.onnx, and a deleted
    # reference file would only fail in verify; either way the export is redone.
    exported = [run / "model.onnx", run / "model_layers.onnx", *(run / f for f in reference_files(cfg.model.T, cfg.model.T))]
    if _done(run, "export", export_inputs, *exported):
        summary["stages"]["export"] = "up to date"
    else:
        export_run(run)
        export_run(run, layers=True)
        _mark(run, "export", export_inputs, *exported)
        summary["stages"]["export"] = "done"

    onnx_hash = sha256_file(run / "model.onnx") + sha256_file(run / "model_layers.onnx")
    available = available_runners()
    summary["stages"]["build"] = _build_stage(run, onnx_hash, available.get("trt"))

    # Each runner is checked on the export's reference inputs and, when the dataset is at hand, on the
    # whole test split (``<runner>@test``): identical predictions on every test image, flips counted.
    # The runners present and the engines built are inputs too: one installed (or an engine built) since the
    # last run is verified and benched, not skipped as up to date.
    runners = default_runners(reference=False)
    engines = read_manifest(run).get("pipeline", {}).get("build", "")
    state, reports = _verify_stage(run, "verify", _stage_hash("verify", onnx_hash, ",".join(runners), engines,
                                                              "reference+test"), runners, "model_layers.onnx", progress)
    summary["stages"]["verify"] = state

    # the sizes as a set: --batch 2,1 times what 1,2 timed (the table lists them in numerical order either way)
    bench_inputs = _stage_hash("bench", onnx_hash, ",".join(runners), engines, ",".join(map(str, sorted(batches))))
    summary["stages"]["bench"], bench = _bench_stage(run, "bench", bench_inputs, "model.onnx", batches, cfg.train.threads)

    if stream:  # the step form too: what a streaming deployment runs, verified streamed and timed streamed
        reports.update(_stream_stages(run, cfg, batches, progress, summary))

    manifest = read_manifest(run)
    summary.update(
        run=str(run),
        test_acc=manifest.get("training", {}).get("test_acc"),
        verify={n: {"passed": r["passed"], "flips": sum(s["flips"] for s in r["layers"].values()),
                    "real": sum(s["real"] for s in r["layers"].values()), "top1": r["top1"]["agreement"],
                    # None for a report written before verify counted them
                    "membranes_differing": (sum(s["membranes_differing"] for s in r["layers"].values())
                                            if all("membranes_differing" in s for s in r["layers"].values()) else None),
                    "samples": sum(r["inputs"].values()),
                    # labelled inputs: the real samples among the reference inputs, or the test split
                    "accuracy": r["accuracy"].get("test", r["accuracy"].get("real", {}))} for n, r in reports.items()},
        bench=bench,
        artifacts=sorted(manifest.get("artifacts", {})),
    )
    return summary


def _verify_stage(run: Path, stage: str, inputs_hash: str, runners: list[str], model_file: str,
                  progress: bool) -> tuple[str, dict]:
    """Verify ``runners`` on ``model_file`` against the torch reference, on the export's reference inputs and the
    whole test split when the dataset is at hand; (the stage's state, its reports by verify.json key). Marked
    done only when complete and passed, so that a failure is checked again on the next run."""
    from .compare import verify_runs
    from .verify_report import current_reports, report_key

    own_reports = [report_key(name, model_file, inputs=split) for name in runners for split in ("reference", "test")]
    # the reports as verify recorded them, of the export as it is (one line when corrupt): an edited verify.json,
    # or one whose reports of this stage are gone, is verified again rather than shown as up to date
    saved = current_reports(run) if _done(run, stage, inputs_hash) else {}
    if saved and all(report_key(name, model_file) in saved for name in runners):
        return "up to date", {name: saved[name] for name in own_reports if name in saved}  # not other commands' entries
    test_set = None  # why the test split is not checked, if it is not
    complete = True
    reports = verify_runs(run, dict.fromkeys(runners), "fp32", model_file=model_file, progress=progress)
    reports = {report_key(name, model_file): report for name, report in reports.items()}
    try:
        on_test = verify_runs(run, dict.fromkeys(runners), "fp32", model_file=model_file, progress=progress, inputs="test")
        reports.update({report_key(name, model_file, inputs="test"): report for name, report in on_test.items()})
    except DataError as e:  # the dataset is not at hand: the stage is redone once it is
        test_set, complete = str(e), False
    except ConfigError as e:  # none to test on (e.g. random data): complete without it
        test_set = str(e)
    reports = {name: reports[name] for name in own_reports if name in reports}  # as an up-to-date rerun lists them
    if complete and all(r["passed"] for r in reports.values()):
        _mark(run, stage, inputs_hash)
    return ("done" if test_set is None else f"done (reference inputs only: {test_set})"), reports


def _bench_stage(run: Path, stage: str, inputs_hash: str, model_file: str, batches: tuple[int, ...],
                 threads: int) -> tuple[str, dict]:
    """Bench every available runner of ``model_file`` (its defaults); (the stage's state, the bench's results)."""
    from .bench import bench_run
    from .bench_report import bench_stem

    results_file = run / f"{bench_stem(model_file, 'fp32')}.json"
    if _done(run, stage, inputs_hash, results_file):
        return "up to date", json.loads(results_file.read_text())
    bench = bench_run(run, None, batches, echo=lambda s: None, threads=threads, model_file=model_file)
    _mark(run, stage, inputs_hash, results_file)
    return "done", bench


def _stream_stages(run: Path, cfg: Config, batches: tuple[int, ...], progress: bool, summary: dict) -> dict:
    """``pipeline --stream``: the step form exported, verified streamed (every layer at every step, on the runners
    that stream it) and benched streamed; returns its verify reports. Stages ``step export``, ``step build``,
    ``step verify``, ``step bench`` in ``summary``; the bench under ``summary["step_bench"]``."""
    from .backends import available_runners, default_runners
    from .export_onnx import export_run
    from .exports import reference_files
    from .streaming import STREAM_RUNNERS

    step = run / "model_step.onnx"
    inputs = _stage_hash("step export", sha256_file(run / "checkpoint.pt"))
    exported = [step, *(run / f for f in reference_files(cfg.model.T, cfg.model.T, form="step"))]
    if _done(run, "step export", inputs, *exported):
        summary["stages"]["step export"] = "up to date"
    else:
        export_run(run, form="step")
        _mark(run, "step export", inputs, *exported)
        summary["stages"]["step export"] = "done"
    step_hash = sha256_file(step)
    summary["stages"]["step build"] = _build_stage(run, step_hash, available_runners().get("trt"), "step build",
                                                   (step.name,))
    runners = [name for name in default_runners(reference=False) if name in STREAM_RUNNERS]
    engine = read_manifest(run).get("pipeline", {}).get("step build", "")  # one built since: verified and benched
    summary["stages"]["step verify"], reports = _verify_stage(
        run, "step verify", _stage_hash("step verify", step_hash, ",".join(runners), engine, "reference+test"), runners,
        step.name, progress)
    bench_inputs = _stage_hash("step bench", step_hash, ",".join(runners), engine, ",".join(map(str, sorted(batches))))
    summary["stages"]["step bench"], summary["step_bench"] = _bench_stage(run, "step bench", bench_inputs, step.name,
                                                                          batches, cfg.train.threads)
    return reports


def format_summary(summary: dict) -> str:
    from .bench_report import format_table

    lines = [f"run: {summary['run']}"]
    lines += [f"  {stage:<7} {state}" for stage, state in summary["stages"].items()]
    if summary["test_acc"] is not None:
        lines.append(f"test accuracy (torch): {100 * summary['test_acc']:.2f} %")
    for name, v in summary["verify"].items():
        # the reference first (verify.json is written with sorted keys: a rerun read them in another order)
        accuracies = sorted(v["accuracy"].items(), key=lambda item: item[0] != "reference")
        acc = ", ".join(f"{k} {100 * a:.2f} %" for k, a in accuracies)
        lines.append(f"verify {name}: {'PASSED' if v['passed'] else 'FAILED'} on {v['samples']} inputs, {v['flips']} spike flips "
                     f"({v['real']} real)"
                     + (f", {v['membranes_differing']} membrane values not bit-equal" if v.get("membranes_differing") is not None else "")
                     + f", top-1 agreement {100 * v['top1']:.2f} %" + (f"; accuracy {acc}" if acc else ""))
    lines.append(format_table(summary["bench"]))
    if "step_bench" in summary:  # --stream
        lines.append(format_table(summary["step_bench"]))
    lines.append("artifacts: " + ", ".join(summary["artifacts"]))
    return "\n".join(lines)
