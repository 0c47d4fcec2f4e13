"""verify.json: the keys its reports are filed under, reading the reports that still describe a run, and
printing one report for the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import artifact_as_recorded, read_manifest
from .errors import ArtifactError

__all__ = ["report_key", "current_reports", "read_reports", "format_report"]


def report_key(runner: str, model_file: str = "model_layers.onnx", precision: str = "fp32", inputs: str = "reference") -> str:
    """A report's key in verify.json: ``<runner>[:<file>][/<precision>][@test]``, the file when it is not
    model_layers.onnx and the precision when it is not fp32, so that e.g. a bf16 check of torch-fast (bench
    --precision bf16 runs one) sits beside its fp32 check instead of replacing it."""
    key = runner if model_file == "model_layers.onnx" else f"{runner}:{model_file}"
    key += "" if precision == "fp32" else f"/{precision}"
    return key if inputs == "reference" else f"{key}@test"


def current_reports(run_dir: Path, path: Path | None = None) -> dict:
    """verify.json's reports that still describe the run: those of exports whose file is the one they checked
    (``model_sha256`` equal to the manifest entry's ``sha256``). A report of a file exported again since (it
    said PASSED beside the new file's failure), and every report of a verify.json edited since verify wrote it
    (a made-up ``trt: passed`` survived, its hash recorded again), is dropped; each run of verify writes its own."""
    path = Path(run_dir) / "verify.json" if path is None else path
    reports = read_reports(path)
    if not reports or not artifact_as_recorded(run_dir, path.name):
        return {}
    exports = read_manifest(run_dir).get("exports", {})
    return {key: r for key, r in reports.items() if isinstance(r, dict) and r.get("model_sha256") is not None
            and r["model_sha256"] == exports.get(r.get("model"), {}).get("sha256")}


def read_reports(path: Path) -> dict:
    """verify.json's reports (empty when there is none yet); one line when it is corrupt."""
    if not path.is_file():
        return {}
    try:
        reports = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        reports = None
    if not isinstance(reports, dict):
        raise ArtifactError(f"{path} is corrupt: move it aside (or delete it) and verify again")
    return reports


def _exactness_line(r: dict) -> str:
    """What the membranes say: bit-identical everywhere, or how far apart (and what that means on an exact model)."""
    differing = sum(s.get("membranes_differing", 0) for s in r["layers"].values())
    if not differing:
        return "every membrane bit-identical to torch's" + (" (exact-arithmetic model)" if r.get("exact_model") else "")
    if not r["passed"]:  # not rounding, whatever the model: the reasons below say what
        return f"{differing} membrane values differ from torch's"
    if r.get("exact_model") and r["precision"] != "fp32":
        return f"exact-arithmetic model run at {r['precision']}: {differing} membrane values differ (exact only in fp32)"
    if r.get("exact_model"):
        return (f"exact-arithmetic model, yet {differing} membrane values differ: {r['runner']} does not compute in plain fp32 "
                "here (TF32, Winograd/FFT convolutions, or NeuNorm's multiply-adds fused)")
    if r["precision"] not in ("fp32", "tf32x2"):  # tf32x2 is fp32-accurate; the others round the inputs of each sum
        return (f"{differing} membrane values differ: {r['precision']} arithmetic (model.exact = true makes fp32 runs "
                "bit-identical, not this precision)")
    return (f"{differing} membrane values differ in their last bits (summation order); model.exact = true makes them "
            "bit-identical")


def format_report(r: dict) -> str:
    """Human-readable table for the CLI (the JSON holds everything)."""
    n = sum(r["inputs"].values())
    at = f" (T = {r['T']})" if "T" in r else ""  # reports written before they held T
    lines = [f"verify {r['runner']} on {r['model']}{at} vs torch ({r['precision']}, TF32 off) on {n} inputs "
             f"({', '.join(f'{v} {k}' for k, v in r['inputs'].items())})"]
    if r.get("reference_reproduced") is False:
        lines.append("warning: the torch reference no longer reproduces the scores the export stored (another torch "
                     "build or a changed checkpoint?): re-export to compare against today's reference")
    for name, command in r.get("exports_changed", {}).items():
        lines.append(f"warning: {name}, not checked here, differs from the file its export recorded (sha256 "
                     f"mismatch): `{command}` writes it again")
    lines.append(f"{'output':<10}{'max abs':>12}{'max rel':>12}{'max abs (spike-exact samples)':>32}")
    for name, e in r["outputs"].items():
        exact = f"{e['max_abs_spike_exact']:.3g}" if r["layers_checked"] else "-"
        lines.append(f"{name:<10}{e['max_abs']:>12.3g}{e['max_rel']:>12.3g}{exact:>32}")
    t = r["top1"]
    lines.append(f"top-1 agreement {t['agree']}/{t['total']} ({100 * t['agreement']:.2f} %)"
                 + (f"; {t['samples_diverged']} samples had spike flips" if r["layers_checked"] else "")
                 + f"; judged on {t['judged']} samples with a clear top-1 ({t['judged_agree']} agree)")
    for split, acc in r["accuracy"].items():
        lines.append(f"accuracy on {split} samples: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in acc.items()))
    if r["layers_checked"]:
        lines.append(f"{'layer':<10}{'flips':>8}{'flip rate':>12}{'numerical':>11}{'real':>7}{'propagated':>12}{'first t':>9}"
                     f"{'membranes not bit-equal':>25}")
        for name, s in r["layers"].items():
            first = "-" if s["first_step"] is None else str(s["first_step"])
            differing = s.get("membranes_differing", 0)
            membranes = f"{differing} (max {s['membrane_max_abs']:.2g})" if differing else "0"
            lines.append(f"{name:<10}{s['flips']:>8}{s['flip_rate']:>12.2e}{s['numerical']:>11}{s['real']:>7}{s['propagated']:>12}"
                         f"{first:>9}{membranes:>25}")
        lines.append(_exactness_line(r))
    else:
        lines.append("per-layer spikes not checked: " + r.get("layers_hint", "`snncompile export RUN --layers` adds "
                                                            "model_layers.onnx, on which verify classifies every flip"))
    if r["first_divergence"]:
        fd = r["first_divergence"]
        lines.append(f"first divergence: {fd['layer']} at t={fd['step']}")
    if r["passed"]:
        flips = sum(s["flips"] for s in r["layers"].values())
        numerical = sum(s["numerical"] for s in r["layers"].values())
        spikes = (f"{flips} spike flips in {len(r['layers'])} layers, {numerical} of them numerical at the threshold"
                  if r["layers_checked"] else "layers not checked")
        lines.append(f"PASSED: {r['runner']} matches torch within {r['precision']} tolerances ({spikes}, "
                     f"top-1 {t['agree']}/{t['total']})")
    else:
        failed = "FAILED: " + "; ".join(r["reasons"])
        if not r["layers_checked"] and r["precision"] in ("fp16", "bf16", "tf32"):
            # at 16 bits nearly every sample flips a spike somewhere, and a flip moves a voted score by a quantum
            # or more: held to the score tolerance on every sample, a file without per-layer outputs may fail on
            # flips its _layers twin would count as numerical
            failed += (f" (without per-layer outputs every sample's scores are held to the {r['precision']} tolerance, "
                       "spike flips included: the per-layer check above tells flips from errors)")
        lines.append(failed)
    return "\n".join(lines)
