"""Spike-aware verification of a runner against the torch reference (DESIGN.md rule 4).

The reference is the exported graph's own torch module on the CPU in fp32 with TF32 off. Inputs are the
export's saved reference inputs (seeded random + real test samples) or the run's whole test split. Each batch
runs on the reference and every candidate runner; :mod:`~snncompile.flips` counts and classifies the spike flips
(numerical, real, propagated) and judges the outputs, and the reports are filed in verify.json
(:mod:`~snncompile.verify_report`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from .artifacts import read_manifest, require_writable, run_dir_lock, sha256_model, write_recorded_json
from .backends import create_runner
from .backends.base import runner_numerics
from .errors import ArtifactError, ConfigError, DataError
from .exports import (TWIN_SETTINGS, current_export, export_command, export_reference_paths,
                          exported_file_changed, layers_twin, same_graph_settings)
from .flips import PRESETS, Tally
from .references import read_references
from .streaming import streamed
from .runs import load_run_config
from .text import shell_path
from .verify_report import current_reports, read_reports, report_key

__all__ = ["verify_run", "verify_runs", "default_model_file", "layers_hint"]


class _ReferenceInputs:
    """The export's saved inputs per split (``random``, ``real``), ``[T, N, ...]``, with the torch scores
    the export stored for them (so verify can confirm the reference still reproduces them)."""

    def __init__(self, run_dir: Path, export: dict):
        self._inputs, self._stored = read_references(run_dir, export)
        self.sizes = {s: int(self._inputs[s].shape[1]) for s in ("random", "real") if s in self._inputs}

    def batches(self, split: str, batch: int):
        """Yield ``(x [T, b, ...] float32, labels [b] | None, stored scores [b, classes])``."""
        x_all = self._inputs[split]
        labels = self._inputs["real_labels"] if split == "real" else None
        for start in range(0, x_all.shape[1], batch):
            stop = start + batch
            yield (np.ascontiguousarray(x_all[:, start:stop]), None if labels is None else labels[start:stop],
                   self._stored[f"{split}/scores"][start:stop])


class _TestSet:
    """The run's whole test split read from its dataset, time-major over the export's T steps."""

    def __init__(self, cfg, steps: int, progress: bool):
        from .data import load_dataset

        try:
            self._ds = load_dataset(cfg, progress=progress)
        except DataError as e:
            raise DataError(f"verify on the test set needs the run's dataset: {e}") from None
        if not self._ds.static and self._ds.test.x.shape[1] != steps:
            raise ConfigError(f"the test frames have {self._ds.test.x.shape[1]} steps but the export has T = {steps}")
        self._steps = steps
        self.sizes = {"test": len(self._ds.test)}

    def batches(self, split: str, batch: int):
        """Yield ``(x [T, b, ...] float32, labels [b], None)``."""
        from .data import batches, to_time_major

        for x, y in batches(self._ds.test, batch):
            yield to_time_major(x.float(), self._steps, self._ds.static).contiguous().numpy(), y.numpy(), None


def layers_hint(run_dir: Path, exports: dict, model_file: str) -> str:
    """How to check ``model_file``'s spikes layer by layer: verify its ``_layers`` twin where one was exported at
    the same T from the same checkpoint, else the export command that writes that twin (with ``model_file``'s
    own T, order, precision)."""
    twin = layers_twin(model_file)
    export, twin_export = exports.get(model_file, {}), exports.get(twin)
    if twin == model_file:  # a _layers export whose layer outputs are not the run's: not the file export wrote
        return (f"{model_file}'s layer outputs are not this run's network's (another run's file?): "
                f"`{export_command(run_dir, {**export, 'layers': True})}` writes it again")
    if same_graph_settings(export, twin_export):
        return f"`snncompile verify {shell_path(run_dir)} --model {twin}` checks them"
    command = export_command(run_dir, {**export, "layers": True})
    if twin_export is None:
        return f"`{command}` adds {twin}, on which verify classifies every flip"
    # exported at another T, order, precision or from another checkpoint: another network than this file's
    differing = ", ".join("another checkpoint" if k == "checkpoint_sha256" else f"{k} = {twin_export.get(k)}"
                          for k in TWIN_SETTINGS if twin_export.get(k) != export.get(k))
    return (f"`{command}` writes {twin} (now {differing}) again as this file's twin, on which verify classifies "
            "every flip")


def _changed_exports(run_dir: Path, exports: dict, checked: str) -> dict[str, str]:
    """The run's other unrolled exports whose file is there but no longer the one export wrote (another run's
    model.onnx copied in: verify passed on model_layers.onnx without a word about the file users deploy), each
    with the command that writes it again."""
    changed = {}
    for name, entry in sorted(exports.items()):
        path = run_dir / name
        if name != checked and entry.get("form") == "unrolled" and path.is_file() and sha256_model(path) != entry.get("sha256"):
            changed[name] = export_command(run_dir, entry)
    return changed


def default_model_file(exports: dict) -> str:
    """The export verify checks unless told otherwise: ``model_layers.onnx`` (per-layer spikes) when the
    manifest's ``exports`` has it as ``model.onnx``'s twin (or has no ``model.onnx``), else ``model.onnx``: a
    ``model_layers.onnx`` left at another T (``export --T 8`` and back) passing would say nothing of the file
    users deploy."""
    twin = exports.get("model_layers.onnx")
    plain = exports.get("model.onnx")
    if twin is not None and (plain is None or same_graph_settings(plain, twin)):
        return "model_layers.onnx"
    return "model.onnx"


def verify_run(run_dir: str | Path, runner: str = "ort-cpu", precision: str = "fp32", batch: int = 64,
               model_file: str | None = None, progress: bool = False, inputs: str = "reference",
               options: dict | None = None, other_exports: bool = True) -> dict:
    """Compare one runner with the torch reference: :func:`verify_runs` for ``{runner: options}``."""
    return verify_runs(run_dir, {runner: options}, precision, batch, model_file, progress, inputs, other_exports)[runner]


def verify_runs(run_dir: str | Path, runners: dict[str, dict | None], precision: str = "fp32", batch: int = 64,
                model_file: str | None = None, progress: bool = False, inputs: str = "reference",
                other_exports: bool = True, skip=None) -> dict[str, dict]:
    """Compare each runner with the torch reference in one pass over the inputs (the reference runs once per
    batch, the dataset is read once); returns ``{runner: report}``, each also merged into ``verify.json``
    (under :func:`report_key`).

    ``runners``: name -> the runner's constructor options (see ``backends.runner_options``; None = defaults).
    ``inputs``: ``"reference"`` = the export's saved inputs (seeded random + real test samples);
    ``"test"`` = the run's whole test split, read from the dataset (e.g. all 10,000 MNIST images).

    ``precision``: what the runners that take one compute at (torch-fast, trt); each runner is judged at its own
    numerics (:func:`~.backends.base.runner_numerics`: ONNX Runtime and OpenVINO the file's precision, the torch loops fp32).

    ``model_file`` defaults to ``model_layers.onnx`` when it was exported as ``model.onnx``'s twin (per-layer
    spike checks; :func:`default_model_file`), else ``model.onnx`` (outputs only). Keys in verify.json:
    :func:`report_key`. ``other_exports``: also name the run's other unrolled exports whose file changed since
    export (``exports_changed``; hashes each one). ``skip``: ``skip(runner, reason)`` is told of each runner
    whose runtime cannot load the file, which then has no report (None: that is an error), so that verify with
    the default runners checks a bf16 file on torch-fast and ov-cpu though ONNX Runtime's CPU provider cannot run it."""
    from tqdm.auto import tqdm

    if precision not in PRESETS:
        raise ConfigError(f"--precision must be one of {', '.join(PRESETS)}, got {precision!r}")
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    require_writable(run_dir, "verify.json")  # before the comparison, not after it: its result would be lost
    manifest = read_manifest(run_dir)
    if model_file is None:
        model_file = default_model_file(manifest.get("exports", {}))
    export = current_export(run_dir, model_file)
    # each runner judged at what it computes: ONNX Runtime and OpenVINO run the file's own precision whatever was asked
    numerics = {name: runner_numerics(name, precision, export.get("precision", "fp32")) for name in runners}
    inputs_path, outputs_path = export_reference_paths(run_dir, export)
    if not inputs_path.is_file() or not outputs_path.is_file():
        raise ArtifactError(f"{run_dir}: the reference inputs and outputs of {model_file} are gone: run "
                            f"`{export_command(run_dir, export)}` again")
    read_reports(run_dir / "verify.json")  # a corrupt one is reported now, not after the whole comparison
    # a file that is not the one its export wrote fails, its reason first: verify vouches for the run's export,
    # and another run's file copied in failed on "real spike mismatches", as if the runtime were wrong
    changed_file = exported_file_changed(run_dir, model_file, export) if (run_dir / model_file).is_file() else (
        f"{model_file} is gone: export it again: `{export_command(run_dir, export)}`")
    # False for bench's gates: it checks the timed file's own hash, and hashing every export twice per runner
    # costs seconds on a large network
    changed = _changed_exports(run_dir, manifest.get("exports", {}), model_file) if other_exports else {}
    if inputs == "reference":
        source = _ReferenceInputs(run_dir, export)
    elif inputs == "test":
        source = _TestSet(cfg, int(export["T"]), progress)
    else:
        raise ConfigError(f"inputs must be 'reference' or 'test', got {inputs!r}")

    reference = streamed(create_runner("torch", run_dir, model_file), export)  # a step-form file: T calls
    layers = [n[: -len(".spikes")] for n in reference.output_names if n.endswith(".spikes")]
    tallies = {name: Tally(name, [n for n in reference.output_names if "." not in n]) for name in runners}
    reproduced = True
    candidates = {}
    bar = None
    try:
        for name, options in runners.items():
            try:
                candidates[name] = streamed(create_runner(name, run_dir, model_file, **(options or {})), export)
            except ArtifactError as e:  # this runtime cannot load the file (ORT CPU has no bf16 Conv kernel)
                if skip is None:
                    raise
                skip(name, str(e))
        if not candidates:
            raise ArtifactError(f"no runner could load {model_file}: see the lines above")
        # after the runners open: one that cannot (no GPU, say) then errors without a bar left at 0
        bar = tqdm(total=sum(source.sizes.values()), desc=f"verify {', '.join(candidates)}", unit="sample",
                   disable=not progress, leave=False)
        for split in source.sizes:
            for x, labels, stored_scores in source.batches(split, batch):
                feed = {"input": x}
                ref = reference.infer(feed)
                if stored_scores is not None:
                    reproduced &= bool(np.array_equal(ref["scores"], stored_scores))
                for name, candidate in candidates.items():
                    tallies[name].add(split, ref, candidate.infer(feed), labels, layers, cfg.model.v_th,
                                      PRESETS[numerics[name]])
                bar.update(x.shape[1])
    except Exception:  # noqa: BLE001 - re-raised unless the export changed under it
        # an export of this file committed meanwhile: its new file met the inputs read before it (a runtime's
        # shape error, in its own exception type), which says nothing of what happened
        _require_export_unchanged(run_dir, model_file, export)
        raise
    finally:
        if bar is not None:
            bar.close()
        for runner in (reference, *candidates.values()):
            runner.close()

    checked = {  # what every runner's report says of the comparison itself
        "model": model_file,
        "T": export["T"],
        "model_matches_export": changed_file is None,
        "model_sha256": export.get("sha256"),  # the export checked: a report of an earlier one is dropped
        "exports_changed": changed,
        "reference": "torch fp32 on CPU, TF32 off (the exported graph's own module)",
        # None on the test set: only the export's reference inputs have stored torch outputs
        "reference_reproduced": reproduced if inputs == "reference" else None,
        "inputs": dict(source.sizes),
        "exact_model": cfg.model.exact,
    }
    reports = {}
    for name in candidates:  # those skipped could not load the file: no report
        tol = PRESETS[numerics[name]]
        report = reports[name] = {"runner": name, "precision": numerics[name], "tolerance": asdict(tol), **checked,
                                  **tallies[name].report(tol)}
        if changed_file is not None:
            report["reasons"].insert(0, changed_file)
            report["passed"] = False
        if not report["layers_checked"]:
            report["layers_hint"] = layers_hint(run_dir, manifest.get("exports", {}), model_file)
    _record_reports(run_dir, model_file, export, reports, inputs)
    return reports


def _record_reports(run_dir: Path, model_file: str, export: dict, reports: dict[str, dict], inputs: str) -> None:
    """Merge ``reports`` into verify.json (each under :func:`report_key`), beside the reports that still describe
    the run, unless ``model_file`` was exported again since verify started."""
    with run_dir_lock(run_dir):  # another verify (or bench's) may merge its reports into the same file
        # under the lock export commits under: a file exported again from here on waits for this record
        _require_export_unchanged(run_dir, model_file, export)
        existing = current_reports(run_dir, run_dir / "verify.json")
        for name, report in reports.items():
            existing[report_key(name, model_file, report["precision"], inputs)] = report
        # recorded before the lock goes, and announced before the rename: the next merge keeps reports only from
        # the file as recorded
        write_recorded_json(run_dir, "verify.json", existing)


def _require_export_unchanged(run_dir: Path, model_file: str, export: dict) -> None:
    """One line when ``model_file``'s manifest entry is no longer ``export``, the one verify started from: an
    export of it committed while verify ran, and what was compared (the file, the reference inputs, the hash a
    report is filed under) may mix the two exports."""
    if read_manifest(run_dir).get("exports", {}).get(model_file) != export:
        raise ArtifactError(f"{run_dir / model_file} was exported again while verify ran (by another command): "
                            "nothing was recorded; verify it again")
