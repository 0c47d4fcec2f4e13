"""What exports a run has, read from its manifest: the file each export option writes, the reference files it is
verified on, the entry of a current export (or the one-line error that says what to run), and the ``snncompile
export`` command that writes one again. Export itself (:mod:`~snncompile.export_onnx`) writes them; verify, bench,
build and the runners read them here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import read_manifest, sha256_file, sha256_model
from .errors import ArtifactError
from .export_options import DEFAULT_OPSET, DEFAULT_SAMPLES, EXPORT_PRECISIONS
from .runs import CHECKPOINT, load_checkpoint, load_run_config, missing_checkpoint
from .text import shell_path

__all__ = ["STEP_FILE", "unrolled_file", "layers_twin", "TWIN_SETTINGS", "same_graph_settings", "REF_INPUTS",
           "REF_OUTPUTS", "reference_files", "export_reference_paths", "read_reference", "export_command",
           "missing_export", "current_export", "exported_file_changed", "require_current_checkpoint"]

STEP_FILE = "model_step.onnx"


def unrolled_file(order: str = "layer", layers: bool = False, precision: str = "fp32") -> str:
    """``model.onnx``; ``model_per_step.onnx`` for the per-timestep layout; ``_fp16``/``_bf16`` when convs
    and matmuls compute in that type (mixed_precision.py), ``_tf32x2`` when the spike layers' weights are
    split for TF32 (split_tf32.py); ``_layers`` when the graph also outputs every
    LIF layer's spikes and membranes (what verify classifies flips on), e.g. ``model_fp16_layers.onnx``."""
    return ("model" + ("_per_step" if order == "step" else "") + ("" if precision == "fp32" else f"_{precision}")
            + ("_layers" if layers else "") + ".onnx")


def layers_twin(model_file: str) -> str:
    """The ``_layers`` export of the same graph as ``model_file`` (model_fp16.onnx -> model_fp16_layers.onnx),
    on which verify checks every layer's spikes; a ``_layers`` file is its own twin."""
    return model_file if model_file.endswith("_layers.onnx") else model_file.replace(".onnx", "_layers.onnx")


# What a _layers twin must share with its file to compute the same function: a twin at another T (bench --T
# re-exports one) or of older weights checks another network
TWIN_SETTINGS = ("T", "order", "precision", "checkpoint_sha256")


def same_graph_settings(export: dict, twin: dict | None) -> bool:
    """Whether the manifest entry ``twin`` was exported with ``export``'s :data:`TWIN_SETTINGS` (the weights
    themselves are not compared: see bench's ``_is_twin``)."""
    return twin is not None and all(twin.get(k) == export.get(k) for k in TWIN_SETTINGS)


REF_INPUTS = "reference_inputs.npz"
REF_OUTPUTS = "reference_outputs.npz"


def reference_files(steps: int, trained_steps: int, n_random: int = DEFAULT_SAMPLES,
                    n_real: int = DEFAULT_SAMPLES, form: str = "unrolled") -> tuple[str, str]:
    """The reference inputs and outputs an export at T = ``steps`` is verified on: the plain names at
    the T the run was trained with and the default sample counts; ``_T<steps>`` at another T and
    ``_n<random>-<real>`` at other counts, so that each export keeps its own (a later export at the same T
    with fewer samples used to rewrite the shared file, and the earlier export was then verified on fewer).
    The step form's have ``_step`` in their names: its outputs are the streamed module's scores."""
    suffix = ("_step" if form == "step" else "") + ("" if steps == trained_steps else f"_T{steps}")
    if (n_random, n_real) != (DEFAULT_SAMPLES, DEFAULT_SAMPLES):
        suffix += f"_n{n_random}-{n_real}"
    return f"reference_inputs{suffix}.npz", f"reference_outputs{suffix}.npz"


def export_reference_paths(run_dir: Path, export: dict) -> tuple[Path, Path]:
    """Where an export's reference inputs and outputs are (exports recorded before per-T names: the plain ones)."""
    names = export.get("reference_files")
    if not names and export.get("form") == "step":  # written before the step form had references of its own
        raise ArtifactError(f"this step-form export has no reference inputs (it predates them): export again: "
                            f"`{export_command(Path(run_dir), export)}`")
    names = names or (REF_INPUTS, REF_OUTPUTS)
    return Path(run_dir) / names[0], Path(run_dir) / names[1]


def read_reference(path: Path, run_dir: Path, export: dict) -> dict[str, np.ndarray]:
    """Every array of one of ``export``'s reference npz files, read now: np.load reads an npz lazily, so a cut-short
    file may fail at np.load or only at its first array. A missing or corrupt file is one line naming the export
    command that writes it again."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}
    except MemoryError:  # a whole file that does not fit is not a corrupt one
        raise
    except Exception as e:  # noqa: BLE001  zipfile, numpy's header parser and the file system raise many types
        raise ArtifactError(f"{path} is missing or corrupt ({type(e).__name__}): export again: "
                            f"`{export_command(run_dir, export)}`") from None


def export_command(run_dir: Path, export: dict) -> str:
    """The ``snncompile export`` command that writes the export of manifest entry ``export`` again: the options
    that name its file (see :func:`unrolled_file`), --rates, --T where it is not the trained T, and --opset and
    --samples where they were not the defaults."""
    options = ["--form step"] if export.get("form") == "step" else []
    trained_steps = load_run_config(run_dir).model.T
    if export.get("T", trained_steps) != trained_steps:
        options.append(f"--T {shell_path(export['T'])}")
    # every value quoted: they are read from manifest.json, which a user (or whoever sent the run) can edit, and
    # the command is printed to be pasted into a shell
    options += [f"--opset {shell_path(export['opset'])}"] if export.get("opset", DEFAULT_OPSET) != DEFAULT_OPSET else []
    options += ["--layers"] if export.get("layers") else []
    options += ["--rates"] if export.get("rates") else []
    options += ["--order step"] if export.get("order") == "step" else []
    options += [f"--precision {shell_path(export['precision'])}"] if export.get("precision", "fp32") != "fp32" else []
    n_random = (export.get("reference_samples") or [DEFAULT_SAMPLES])[0]
    options += [f"--samples {shell_path(n_random)}"] if n_random != DEFAULT_SAMPLES else []
    return " ".join(["snncompile export", shell_path(run_dir), *options])


def missing_export(run_dir: Path, model_file: str) -> ArtifactError:
    """The one-line error for an export ``run_dir`` does not have, with the step that makes it: the checkpoint's
    own (:func:`~snncompile.runs.missing_checkpoint`) when there is none to export from, the ``export`` options
    that write ``model_file`` when export can (e.g. ``--precision fp16 --layers`` for model_fp16_layers.onnx),
    else the exports the run has."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        return missing_checkpoint(run_dir)
    # the options whose file name (unrolled_file) this is: the naming rule read backwards, not written twice
    written = [{"order": order, "precision": precision, "layers": layers} for order in ("layer", "step")
               for precision in EXPORT_PRECISIONS for layers in (False, True)
               if unrolled_file(order, layers, precision) == model_file]
    if model_file == STEP_FILE:
        options = {"form": "step"}
    elif written:
        options = written[0]
    else:
        exports = ", ".join(sorted(read_manifest(run_dir).get("exports", {}))) or "none yet"
        return ArtifactError(f"{run_dir} has no export named {model_file} (its exports: {exports})")
    return ArtifactError(f"{run_dir} has no {model_file}: run `{export_command(run_dir, options)}` first")


def current_export(run_dir: Path, model_file: str, file_needed: bool = False) -> dict:
    """The manifest's entry of ``model_file`` (unrolled or step form) when it is an export of the run's current
    checkpoint, else the one-line error that says what to run: for a missing export, what writes it
    (:func:`missing_export`); for older weights, the export again (:func:`require_current_checkpoint`).
    ``file_needed``: the file itself must be there too (build reads it; verify and bench report a missing file
    as its hash)."""
    run_dir = Path(run_dir)
    export = read_manifest(run_dir).get("exports", {}).get(model_file)
    if export is None or export.get("form") not in ("unrolled", "step") or (file_needed and not (run_dir / model_file).is_file()):
        raise missing_export(run_dir, model_file)
    require_current_checkpoint(run_dir, model_file, export)
    return export


def exported_file_changed(run_dir: Path, model_file: str, export: dict) -> str | None:
    """Why ``model_file`` is not the file its export (manifest entry ``export``) wrote, with the command that
    writes it again (another run's file copied in, a truncated copy, edited weights); None when it is."""
    if sha256_model(Path(run_dir) / model_file) == export.get("sha256"):
        return None
    return (f"{model_file} is not the file its export wrote (sha256 mismatch): export it again: "
            f"`{export_command(run_dir, export)}`")


def require_current_checkpoint(run_dir: Path, file_name: str, export: dict) -> None:
    """One line when ``file_name`` (manifest entry ``export``) was exported from another checkpoint than the run's
    current one (e.g. `train --resume` continued since): verify's torch reference is built from the current one,
    so the old weights would fail as real spike mismatches, and bench would time a model that is no longer the run's.

    Exports recorded before their entries held the checkpoint's hash are not checked (nothing to compare with);
    without a checkpoint the command that needs it says so."""
    recorded = export.get("checkpoint_sha256")  # None: an export recorded before entries held it, not checked
    path = Path(run_dir) / CHECKPOINT
    current = sha256_file(path) if recorded is not None and path.is_file() else recorded
    if current == recorded:
        return
    load_checkpoint(path)  # a corrupt checkpoint says so, rather than passing for newer training
    trained = read_manifest(run_dir).get("artifacts", {}).get(CHECKPOINT, {}).get("sha256")
    again = f"`{export_command(run_dir, export)}`"
    if current == trained:
        raise ArtifactError(f"{file_name} was exported from an earlier checkpoint (training continued since): export it "
                            f"again: {again}")
    raise ArtifactError(f"{file_name} was exported from another checkpoint, and {CHECKPOINT} is not the one this "
                        f"run's training recorded in manifest.json (replaced by hand?): restore it, or export again: "
                        f"{again}")
