"""bench's gate: a runner is timed on a file only once verify has passed it, on the file's ``_layers`` twin (every
layer's spikes) and on the timed file itself (its scores off on no more samples than numerical flips explain)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import read_manifest
from .compare import verify_run
from .export_onnx import export_again
from .exports import layers_twin, same_graph_settings
from .onnx_files import require_own_external_data

__all__ = ["gate"]


def gate(run_dir: Path, name: str, numerics: str, options: dict, model_file: str, export: dict,
          reference: dict[str, np.ndarray], echo=print) -> list[str]:
    """Why runner ``name`` may not be timed on ``model_file`` (empty: verified). It checks every layer's spikes
    on the _layers twin of the timed graph (same function, extra outputs), then that the timed file itself
    computes what torch computes.

    The twin is (re-)exported from the run's checkpoint unless it is already the timed file's twin: same T,
    order, precision and checkpoint hash, and the same weights (compared directly, initializer by initializer:
    exports recorded before their entries held the checkpoint's hash have none). Re-exporting is always right
    here because verify's reference is the torch module of the run's checkpoint: a twin of older weights would
    fail on real spike mismatches that the timed file does not have. A timed file of older weights is refused
    before any gate (:func:`~snncompile.bench.bench_run`), or, recorded without the checkpoint's hash, fails its
    own check below.

    The timed file passes when it is the file its export recorded and its scores are off only on as few
    samples as numerical spike flips explain (:func:`_timed_file_reasons`)."""
    if export["form"] == "step":  # streamed, the file reports every layer's spikes itself: it is its own twin
        report = verify_run(run_dir, name, numerics, progress=False, model_file=model_file, options=options,
                            other_exports=False)
        return list(report["reasons"])  # a file its export did not write among them, first
    layers_file = layers_twin(model_file)
    earlier = read_manifest(run_dir).get("exports", {}).get(layers_file)
    if not _is_twin(run_dir, model_file, export, earlier, layers_file):
        # the same reference inputs again (the counts the timed export asked for, so the same files; exports
        # recorded before those counts: the counts its file holds)
        n_random, n_real = export.get("reference_samples") or (
            reference["random"].shape[1], reference["real"].shape[1] if "real" in reference else 0)
        export_again(run_dir, export, layers=True, rates=False, n_random=n_random, n_real=n_real)
        # said: the user's own export of that name is replaced (and verify's default file with it)
        replaced = "" if earlier is None else (f"; it replaces the one at T = {earlier['T']}" if earlier.get("T") != export["T"]
                                               else "; it replaces the earlier one")
        echo(f"exported {layers_file} (T = {export['T']}) to check {model_file} layer by layer{replaced}")
    report = verify_run(run_dir, name, numerics, progress=False, model_file=layers_file, options=options,
                        other_exports=False)
    reasons = list(report["reasons"])
    if layers_file != model_file:
        plain = verify_run(run_dir, name, numerics, progress=False, model_file=model_file, options=options,
                           other_exports=False)
        reasons += _timed_file_reasons(model_file, plain, report)
    return reasons


def _is_twin(run_dir: Path, model_file: str, export: dict, twin: dict | None, layers_file: str) -> bool:
    """Whether ``layers_file`` (its manifest entry ``twin``) is the _layers twin of the timed export: same T,
    order, precision and checkpoint (verify would refuse a twin of another one), and the same weights (every
    ``net.*`` initializer equal, by name and bytes)."""
    if twin is None or layers_file == model_file:
        return twin is not None
    if not same_graph_settings(export, twin):
        return False
    try:
        return _weights(run_dir / model_file) == _weights(run_dir / layers_file) != {}
    except Exception:  # noqa: BLE001  a missing or unreadable file (onnx raises many types): export it again
        return False


def _weights(path: Path) -> dict[str, bytes]:
    """The trained parameters an ONNX file holds: its initializers named after the module's parameters
    (``net.<param>``; the exporter's own constants are numbered per graph, so they cannot be compared)."""
    import onnx

    require_own_external_data(path)  # onnx.load reads the weights' files that the model names
    return {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in onnx.load(str(path)).graph.initializer
            if i.name.startswith("net.")}


def _timed_file_reasons(model_file: str, plain: dict, layers: dict) -> list[str]:
    """Why the timed file fails, given its own verify (``plain``, outputs only) and its twin's (``layers``).

    The timed file runs other kernels than its twin (ONNX Runtime and TensorRT choose per graph), so a
    numerical spike flip may land on other samples in it, and only the twin can show flips. A flip moves the
    scores of its own sample, by a quantum or more, and may change a close prediction. So the timed file may
    have scores off on as many samples as the twin had flips (at least one, twice as many where it had any:
    the same rate of flips lands on other samples), and change no more predictions than that; NaN/inf never.
    A wrong file (other weights, a shifted bias) has scores off on most samples."""
    if not plain["model_matches_export"]:  # the first reason says so, naming the file and the export command
        return plain["reasons"][:1]
    allowed = max(1, 2 * layers["top1"]["samples_diverged"])
    reasons = []
    for out, e in plain["outputs"].items():
        if e["non_finite"]:
            reasons.append(f"{model_file}: {out}: {e['non_finite']} NaN/inf values where torch's are finite")
        if e["samples_off"] > allowed:
            reasons.append(f"{model_file}: {out} differ by up to {e['max_abs']:.3g} (> {plain['tolerance']['score_atol']:g}) "
                           f"on {e['samples_off']} samples, more than the {allowed} that numerical spike flips "
                           f"explain (its _layers twin: {layers['top1']['samples_diverged']} samples with flips)")
    t = plain["top1"]
    changed = t["unambiguous"] - t["unambiguous_agree"]
    if changed > allowed:
        reasons.append(f"{model_file}: {changed} predictions differ, more than the {allowed} that numerical "
                       "spike flips explain")
    return reasons
