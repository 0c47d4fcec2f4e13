"""Spike-aware verification of a runner against the torch reference (DESIGN.md rule 4).

The reference is the exported graph's own torch module on the CPU in fp32 with TF32 off. Inputs are the
export's saved reference inputs (seeded random + real test samples). Per output: max abs/rel error and
top-1 agreement. With a ``--layers`` export, per LIF layer and timestep: the spike flip rate and the
first divergent step, and every flip classified:

- *propagated*: the same sample already diverged upstream (an earlier layer at this or an earlier
  step, or this layer at an earlier step), so the flip is a consequence, not a cause;
- *numerical* (primary): the reference membrane lies within ``eps`` of the threshold, where rounding
  in a different runtime or a lower precision can legitimately tip the compare;
- *real* (primary): anything else, i.e. the runtime computed a different function.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .artifacts import (artifact_as_recorded, read_manifest, require_writable, run_dir_lock, sha256_model,
                        write_recorded_json)
from .backends import create_runner
from .backends.base import runner_numerics
from .errors import ArtifactError, ConfigError, DataError
from .export_onnx import (TWIN_SETTINGS, current_export, export_command, export_reference_paths,
                          exported_file_changed, layers_twin, same_graph_settings)
from .references import read_references
from .streaming import streamed
from .text import shell_path
from .runs import load_run_config

__all__ = ["Tolerance", "PRESETS", "verify_run", "verify_runs", "default_model_file", "format_report", "LayerStats",
           "current_reports", "read_reports", "report_key"]


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one precision.

    membrane_eps: a primary flip with |u_ref - V_th| <= eps is numerical.
    score_atol: max abs error allowed on the class scores.
    max_numerical_flip_rate: primary numerical flips / (neurons x steps), over all layers.
    min_top1: top-1 agreement required on samples whose reference top-2 margin exceeds score_atol,
        and, with ``top1_spike_exact`` and per-layer spikes, whose spikes all matched: in fp32 a rare
        numerical flip may move a voted score by one 1/(T*G) quantum, more than score_atol; in reduced
        precision flips are expected in most samples and the wide score_atol margin is the filter.
    """

    membrane_eps: float
    score_atol: float
    max_numerical_flip_rate: float
    min_top1: float
    top1_spike_exact: bool = False


PRESETS = {
    # fp32: no real flip; numerical flips only at the rate of rounding coincidences between two
    # libraries' different summation orders (seen: ~1 in 10-30 M neuron-steps, ORT vs torch CPU);
    # scores equal to rounding on every sample whose spikes all matched.
    "fp32": Tolerance(membrane_eps=1e-4, score_atol=1e-5, max_numerical_flip_rate=1e-6, min_top1=1.0, top1_spike_exact=True),
    "tf32": Tolerance(membrane_eps=1e-2, score_atol=0.05, max_numerical_flip_rate=1e-4, min_top1=0.99),
    "fp16": Tolerance(membrane_eps=2e-2, score_atol=0.10, max_numerical_flip_rate=1e-3, min_top1=0.98),
    "bf16": Tolerance(membrane_eps=1e-1, score_atol=0.15, max_numerical_flip_rate=5e-3, min_top1=0.95),
    # tf32x2 exports (on ORT and TensorRT) and torch-fast's split-TF32 layers claim fp32 accuracy: fp32's tolerances
    "tf32x2": Tolerance(membrane_eps=1e-4, score_atol=1e-5, max_numerical_flip_rate=1e-6, min_top1=1.0, top1_spike_exact=True),
}


@dataclass
class LayerStats:
    """Flip counts of one LIF layer; ``flips_per_step`` is indexed by timestep (0 = t=1)."""

    neurons_per_step: int = 0  # neurons x samples seen, per step
    flips_per_step: list[int] = field(default_factory=list)
    numerical: int = 0
    real: int = 0
    propagated: int = 0
    max_numerical_margin: float = 0.0  # largest |u_ref - V_th| among the numerical flips
    # membrane values that are not the reference's exact bits, and the largest difference: 0 and 0.0 on an
    # exact-arithmetic model (exact.py) in a runtime that sums in plain fp32
    membranes_differing: int = 0
    membrane_max_abs: float = 0.0
    # membranes off by more than membrane_eps (relative to max(1, |u|)) where no spike diverged upstream
    # (earlier layers, earlier steps): a wrong function that happened to flip no spike; NaN/inf where torch's
    # membrane is finite counted apart
    membranes_off: int = 0
    membranes_non_finite: int = 0
    first_real_step: int | None = None  # 1-based first timestep with a real flip (first_step counts every kind)

    def add_step_flips(self, counts: np.ndarray) -> None:
        if not self.flips_per_step:
            self.flips_per_step = [0] * len(counts)
        self.flips_per_step = [a + int(b) for a, b in zip(self.flips_per_step, counts)]

    @property
    def flips(self) -> int:
        return sum(self.flips_per_step)

    @property
    def first_step(self) -> int | None:
        """1-based first timestep with a flip, or None."""
        return next((t + 1 for t, n in enumerate(self.flips_per_step) if n), None)

    def summary(self) -> dict:
        total = self.neurons_per_step * max(1, len(self.flips_per_step))
        return {
            **asdict(self),
            "flips": self.flips,
            "flip_rate": self.flips / total if total else 0.0,
            "flip_rate_per_step": [n / self.neurons_per_step if self.neurons_per_step else 0.0 for n in self.flips_per_step],
            "first_step": self.first_step,
        }


def _classify_flips(ref: dict, run: dict, layers: list[str], v_th: float, eps: float, stats: dict[str, LayerStats]) -> np.ndarray:
    """Count flips per layer/step and split them into numerical, real and propagated (module doc).

    Returns a ``[B]`` mask of the samples with any flip."""
    flips = [ref[f"{n}.spikes"] != run[f"{n}.spikes"] for n in layers]  # each [T, B, ...]
    steps, batch = flips[0].shape[:2]
    any_flip = np.stack([f.reshape(steps, batch, -1).any(-1).T for f in flips], axis=1)  # [B, L, T]
    seen_by_t = np.logical_or.accumulate(any_flip, axis=2)  # diverged at this or an earlier step
    earlier_layers = np.zeros_like(seen_by_t)
    earlier_layers[:, 1:] = np.logical_or.accumulate(seen_by_t, axis=1)[:, :-1]
    earlier_steps = np.zeros_like(any_flip)
    earlier_steps[:, :, 1:] = seen_by_t[:, :, :-1]
    upstream = earlier_layers | earlier_steps  # [B, L, T]
    for li, name in enumerate(layers):
        f = flips[li].reshape(steps, batch, -1)
        s = stats.setdefault(name, LayerStats())
        s.neurons_per_step += batch * f.shape[2]
        s.add_step_flips(f.sum(axis=(1, 2)))
        up = upstream[:, li, :].T[:, :, None]  # [T, B, 1]
        ref_membrane = ref[f"{name}.membrane"].reshape(steps, batch, -1)
        run_membrane = run[f"{name}.membrane"].reshape(steps, batch, -1)
        differing = ref_membrane != run_membrane
        s.membranes_differing += int(differing.sum())
        if differing.any():
            gap = np.abs(ref_membrane[differing].astype(np.float64) - run_membrane[differing])
            s.membrane_max_abs = max(s.membrane_max_abs, float(np.nan_to_num(gap, nan=np.inf).max()))
            broken = ~np.isfinite(run_membrane) & np.isfinite(ref_membrane)
            s.membranes_non_finite += int(broken.sum())
            far = np.abs(ref_membrane.astype(np.float64) - run_membrane) > eps * np.maximum(1.0, np.abs(ref_membrane))
            s.membranes_off += int((far & ~broken & ~up).sum())
        margin = np.abs(ref_membrane - v_th)
        near = margin <= eps
        numerical = f & ~up & near
        s.propagated += int((f & up).sum())
        s.numerical += int(numerical.sum())
        real = f & ~up & ~near
        s.real += int(real.sum())
        real_steps = np.flatnonzero(real.any(axis=(1, 2)))
        if len(real_steps):
            s.first_real_step = min(s.first_real_step or steps, int(real_steps[0]) + 1)
        if numerical.any():
            s.max_numerical_margin = max(s.max_numerical_margin, float(margin[numerical].max()))
    return any_flip.any(axis=(1, 2))


def _unambiguous(scores: np.ndarray, margin: float) -> np.ndarray:
    top2 = np.sort(scores, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > margin


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


class _Tally:
    """What one candidate runner did on every batch, against the reference's outputs on the same inputs."""

    def __init__(self, runner: str, plain: list[str]):
        self.runner = runner
        # max_abs_spike_exact: over the samples whose every spike matched (layers checked only)
        # non_finite: NaN/inf where the reference is finite (a NaN difference would slip through max())
        # samples_off: samples with a value off by more than score_atol (or not finite)
        self.errors = {n: {"max_abs": 0.0, "max_rel": 0.0, "max_abs_spike_exact": 0.0, "non_finite": 0, "samples_off": 0}
                       for n in plain}
        self.stats: dict[str, LayerStats] = {}
        # unambiguous: the reference's top-2 margin exceeds score_atol; *_exact: samples whose spikes all
        # matched (a numerical flip may legitimately move a voted score by one 1/(T*G) quantum).
        self.top1 = {"agree": 0, "total": 0, "unambiguous_agree": 0, "unambiguous": 0, "exact_agree": 0, "exact": 0,
                     "samples_diverged": 0}
        self.correct: dict[str, dict[str, int]] = {}  # split -> {"reference": n, runner: n, "labelled": n}

    def add(self, split: str, ref: dict, run: dict, labels: np.ndarray | None, layers: list[str], v_th: float,
            tol: Tolerance) -> None:
        """One batch: ``ref``/``run`` map output names to arrays (``scores`` ``[b, classes]``, per-layer
        ``<layer>.spikes``/``.membrane`` ``[T, b, ...]`` on a layers export)."""
        flipped = np.zeros(ref["scores"].shape[0], bool)
        if layers and all(f"{n}.spikes" in run for n in layers):
            eps = tol.membrane_eps * max(1.0, abs(v_th))
            flipped = _classify_flips(ref, run, layers, v_th, eps, self.stats)
        for n, e in self.errors.items():
            diff = np.abs(ref[n].astype(np.float64) - run[n])
            broken = ~np.isfinite(diff)
            e["non_finite"] += int((broken & np.isfinite(ref[n])).sum())
            e["samples_off"] += int(((diff > tol.score_atol) | broken).reshape(len(diff), -1).any(1).sum())
            diff[broken] = 0.0  # counted above; the maxima describe the finite values
            e["max_abs"] = max(e["max_abs"], float(diff.max(initial=0.0)))
            e["max_abs_spike_exact"] = max(e["max_abs_spike_exact"], float(diff[~flipped].max(initial=0.0)))
            # relative to the reference values the score tolerance resolves: a voted score is often exactly 0, and
            # a 1e-8 rounding over a 1e-12 floor printed "max rel 1.25e+11", which says nothing
            resolved = np.abs(ref[n]) >= tol.score_atol
            rel = diff[resolved] / np.abs(ref[n][resolved])
            e["max_rel"] = max(e["max_rel"], float(rel.max(initial=0.0)))
        same = ref["scores"].argmax(1) == run["scores"].argmax(1)
        clear = _unambiguous(ref["scores"], tol.score_atol)
        t = self.top1
        t["agree"] += int(same.sum())
        t["total"] += len(same)
        t["unambiguous_agree"] += int((same & clear).sum())
        t["unambiguous"] += int(clear.sum())
        t["exact_agree"] += int((same & clear & ~flipped).sum())
        t["exact"] += int((clear & ~flipped).sum())
        t["samples_diverged"] += int(flipped.sum())
        if labels is not None:
            c = self.correct.setdefault(split, {"reference": 0, self.runner: 0, "labelled": 0})
            c["labelled"] += len(labels)
            c["reference"] += int((ref["scores"].argmax(1) == labels).sum())
            c[self.runner] += int((run["scores"].argmax(1) == labels).sum())

    def report(self, tol: Tolerance) -> dict:
        """The runner's part of the verify report (see :func:`verify_runs`)."""
        stats, top1 = self.stats, self.top1
        layer_report = {n: s.summary() for n, s in stats.items()}
        first = next(({"layer": n, "step": r["first_step"]} for n, r in layer_report.items() if r["flips"]), None)
        neuron_steps = sum(s.neurons_per_step * len(s.flips_per_step) for s in stats.values())
        numerical_rate = sum(s.numerical for s in stats.values()) / neuron_steps if neuron_steps else 0.0
        reasons = _failures(tol, self.errors, top1, stats, numerical_rate)
        judged_agree, judged = _top1_judged(tol, top1, bool(stats))
        accuracy = {split: {k: v / c["labelled"] for k, v in c.items() if k != "labelled"}
                    for split, c in self.correct.items() if c["labelled"]}
        return {
            "outputs": self.errors,
            "top1": {**top1, "agreement": top1["agree"] / max(1, top1["total"]), "judged": judged,
                     "judged_agree": judged_agree},
            "accuracy": accuracy,
            "layers": layer_report,
            "layers_checked": bool(stats),
            "numerical_flip_rate": numerical_rate,
            "first_divergence": first,
            "passed": not reasons,
            "reasons": reasons,
        }


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
    tallies = {name: _Tally(name, [n for n in reference.output_names if "." not in n]) for name in runners}
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

    reports = {}
    for name, tally in tallies.items():
        if name not in candidates:  # skipped: it could not load the file
            continue
        tol = PRESETS[numerics[name]]
        reports[name] = {
            "runner": name,
            "precision": numerics[name],
            "tolerance": asdict(tol),
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
            **tally.report(tol),
        }
        if changed_file is not None:
            reports[name]["reasons"].insert(0, changed_file)
            reports[name]["passed"] = False
        if not reports[name]["layers_checked"]:
            reports[name]["layers_hint"] = layers_hint(run_dir, manifest.get("exports", {}), model_file)
    path = run_dir / "verify.json"
    with run_dir_lock(run_dir):  # another verify (or bench's) may merge its reports into the same file
        # under the lock export commits under: a file exported again from here on waits for this record
        _require_export_unchanged(run_dir, model_file, export)
        existing = current_reports(run_dir, path)
        for name, report in reports.items():
            existing[report_key(name, model_file, report["precision"], inputs)] = report
        # recorded before the lock goes, and announced before the rename: the next merge keeps reports only from
        # the file as recorded
        write_recorded_json(run_dir, "verify.json", existing)
    return reports


def _require_export_unchanged(run_dir: Path, model_file: str, export: dict) -> None:
    """One line when ``model_file``'s manifest entry is no longer ``export``, the one verify started from: an
    export of it committed while verify ran, and what was compared (the file, the reference inputs, the hash a
    report is filed under) may mix the two exports."""
    if read_manifest(run_dir).get("exports", {}).get(model_file) != export:
        raise ArtifactError(f"{run_dir / model_file} was exported again while verify ran (by another command): "
                            "nothing was recorded; verify it again")


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


def _top1_judged(tol: Tolerance, top1: dict, layers_checked: bool) -> tuple[int, int]:
    """(agreeing, judged) samples for the top-1 criterion (see :class:`Tolerance`)."""
    if layers_checked and tol.top1_spike_exact:
        return top1["exact_agree"], top1["exact"]
    return top1["unambiguous_agree"], top1["unambiguous"]


def _failures(tol: Tolerance, errors: dict, top1: dict, stats: dict[str, LayerStats], numerical_rate: float) -> list[str]:
    reasons = []
    # With per-layer spikes, score rounding is judged on the samples whose spikes all matched (flips are
    # judged below, by kind: a flip moves scores by a quantum or more); without them every sample counts.
    # At 16 bits nearly every sample has a flip, so there the flip bounds and top-1 decide: on all samples
    # a correct bf16 network's scores can be as far from fp32's as a slightly wrong one's.
    key = "max_abs_spike_exact" if stats else "max_abs"
    for name, e in errors.items():  # every plain output: scores, and rates when exported
        if e["non_finite"]:
            reasons.append(f"{name}: {e['non_finite']} NaN/inf values where torch's are finite")
        if e[key] > tol.score_atol:
            reasons.append(f"{name} differ by {e[key]:.3g} > {tol.score_atol:g}")
    agree, judged = _top1_judged(tol, top1, bool(stats))
    # No judged sample (every reference top-2 margin within score_atol): top-1 says nothing either way;
    # the spikes (classified above) and the score error still decide.
    if judged and agree / judged < tol.min_top1:
        reasons.append(f"top-1 agreement {100 * agree / judged:.2f} % < {100 * tol.min_top1:.2f} % "
                       f"(on {judged} samples with a clear top-1)")
    real = [n for n, s in stats.items() if s.real]
    if real:
        first = real[0]
        reasons.append(f"{sum(stats[n].real for n in real)} real spike mismatches, first in {first} at t={stats[first].first_real_step}")
    if numerical_rate > tol.max_numerical_flip_rate:
        reasons.append(f"numerical flip rate {numerical_rate:.2e} > {tol.max_numerical_flip_rate:.0e}")
    broken = [n for n, s in stats.items() if s.membranes_non_finite]
    if broken:
        reasons.append(f"{sum(stats[n].membranes_non_finite for n in broken)} NaN/inf membranes where torch's are "
                       f"finite, first in {broken[0]}")
    # at a spike-exact precision a membrane off by more than rounding, with every spike upstream equal, is a
    # wrong function even where no spike flipped (16-bit membranes drift as far in their own right)
    off = [n for n, s in stats.items() if s.membranes_off] if tol.top1_spike_exact else []
    if off:
        reasons.append(f"{sum(stats[n].membranes_off for n in off)} membranes off by more than {tol.membrane_eps:g} "
                       f"(x max(1, |u|)) where every spike before them matched, first in {off[0]}")
    return reasons


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
