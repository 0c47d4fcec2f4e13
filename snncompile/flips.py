"""Spike flips between a runner's outputs and the torch reference's, counted and classified, and what passes.

Pure numpy, no I/O: :func:`~snncompile.compare.verify_runs` feeds it batches. With a ``--layers`` export, per LIF
layer and timestep: the spike flip rate and the first divergent step, and every flip classified:

- *propagated*: the same sample already diverged upstream (an earlier layer at this or an earlier
  step, or this layer at an earlier step), so the flip is a consequence, not a cause;
- *numerical* (primary): the reference membrane lies within ``eps`` of the threshold, where rounding
  in a different runtime or a lower precision can legitimately tip the compare;
- *real* (primary): anything else, i.e. the runtime computed a different function.

Per plain output (scores, rates): max abs/rel error and top-1 agreement; :class:`Tolerance` says what passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["Tolerance", "PRESETS", "LayerStats", "classify_flips", "Tally"]


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


def classify_flips(ref: dict, run: dict, layers: list[str], v_th: float, eps: float, stats: dict[str, LayerStats]) -> np.ndarray:
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


class Tally:
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
            flipped = classify_flips(ref, run, layers, v_th, eps, self.stats)
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
        """The runner's part of the verify report (see :func:`~snncompile.compare.verify_runs`)."""
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
