"""Spike flips counted and classified by hand (numerical, real, propagated), and what passes at each precision:
the pure-numpy core of verify (snncompile.flips), without a runtime."""

import numpy as np
import pytest

from snncompile.flips import PRESETS, LayerStats, Tally, _failures, classify_flips


def test_flip_classification_by_hand():
    # Two layers, T = 3, one sample, two neurons each. v_th = .5, eps = .01.
    zeros = np.zeros((3, 1, 2), np.float32)
    ref = {"a.spikes": zeros.copy(), "a.membrane": np.full((3, 1, 2), 0.2, np.float32),
           "b.spikes": zeros.copy(), "b.membrane": np.full((3, 1, 2), 0.2, np.float32)}
    run = {k: v.copy() for k, v in ref.items()}
    run["a.spikes"][1, 0, 0] = 1          # layer a, t=2: membrane .505 -> numerical
    ref["a.membrane"][1, 0, 0] = 0.505
    run["a.spikes"][2, 0, 1] = 1          # layer a, t=3: after a flip at t=2 -> propagated
    run["b.spikes"][0, 0, 1] = 1          # layer b, t=1: nothing upstream, membrane .2 -> real
    run["b.spikes"][1, 0, 0] = 1          # layer b, t=2: a flipped at t=2 -> propagated
    stats: dict[str, LayerStats] = {}
    flipped = classify_flips(ref, run, ["a", "b"], 0.5, 0.01, stats)
    assert flipped.tolist() == [True]
    a, b = stats["a"].summary(), stats["b"].summary()
    assert (a["numerical"], a["real"], a["propagated"], a["first_step"]) == (1, 0, 1, 2)
    assert (b["numerical"], b["real"], b["propagated"], b["first_step"]) == (0, 1, 1, 1)
    assert a["max_numerical_margin"] == pytest.approx(0.005, abs=1e-6)
    assert (a["first_real_step"], b["first_real_step"]) == (None, 1)
    assert a["flips_per_step"] == [0, 1, 1] and a["flip_rate_per_step"] == [0.0, 0.5, 0.5]


def test_verify_reports_membranes_that_are_not_bit_equal():
    ref = {"a.spikes": np.zeros((2, 1, 3), np.float32), "a.membrane": np.array([[[0.1, 0.2, 0.3]], [[0.1, 0.2, 0.3]]], np.float32)}
    run = {k: v.copy() for k, v in ref.items()}
    run["a.membrane"][1, 0, 2] = np.nextafter(np.float32(0.3), np.float32(1))
    stats: dict[str, LayerStats] = {}
    classify_flips(ref, run, ["a"], 0.5, 0.01, stats)
    assert stats["a"].membranes_differing == 1
    assert stats["a"].membrane_max_abs == pytest.approx(float(np.spacing(np.float32(0.3))))


def test_top1_is_judged_only_on_samples_with_a_clear_top1():
    errors = {"scores": {"max_abs": 0.1, "max_rel": 1.0, "max_abs_spike_exact": 0.0, "non_finite": 0}}
    top1 = {"agree": 5, "total": 8, "unambiguous_agree": 0, "unambiguous": 0, "exact_agree": 0, "exact": 0}
    stats = {"lif1": LayerStats(neurons_per_step=100, flips_per_step=[3, 0], numerical=3)}
    # bf16: no sample is clear of the 0.15 margin -> top-1 decides nothing (the flips were judged)
    assert _failures(PRESETS["bf16"], errors, top1, stats, 3 / 200 / 10) == []
    # one clear sample that disagrees -> fails, naming how many were judged
    top1.update(unambiguous=1)
    assert _failures(PRESETS["bf16"], errors, top1, stats, 3 / 200 / 10) == ["top-1 agreement 0.00 % < 95.00 % (on 1 samples with a clear top-1)"]
    # fp32 judges the spike-exact clear samples only
    top1.update(unambiguous=8, unambiguous_agree=5, exact=2, exact_agree=2)
    assert not [r for r in _failures(PRESETS["fp32"], {"scores": {**errors["scores"], "max_abs_spike_exact": 0.0}}, top1, stats, 0.0) if "top-1" in r]


def test_every_runner_precision_has_a_tolerance_preset():
    from snncompile.backends.base import TORCH_FAST_PRECISIONS

    assert tuple(PRESETS) == TORCH_FAST_PRECISIONS  # PRECISIONS (every precision runner's) + torch-fast's tf32x2
    assert PRESETS["tf32x2"] == PRESETS["fp32"]  # it claims fp32 accuracy


def test_real_mismatch_reason_names_the_first_real_flip_not_the_first_flip():
    """Sample 0: a numerical flip in a at t=1 propagates to b at t=1; sample 1: a real flip in b at t=4.
    The reason must point at t=4, where the real one is."""
    ref = {n: np.zeros((4, 2, 1), np.float32) for n in ("a.spikes", "b.spikes")}
    ref.update({n: np.full((4, 2, 1), 0.2, np.float32) for n in ("a.membrane", "b.membrane")})
    run = {k: v.copy() for k, v in ref.items()}
    ref["a.membrane"][0, 0, 0] = 0.5001
    run["a.spikes"][0, 0, 0] = 1  # numerical
    run["b.spikes"][0, 0, 0] = 1  # propagated
    run["b.spikes"][3, 1, 0] = 1  # real
    stats: dict[str, LayerStats] = {}
    classify_flips(ref, run, ["a", "b"], 0.5, 0.01, stats)
    assert (stats["b"].real, stats["b"].propagated, stats["b"].first_step, stats["b"].first_real_step) == (1, 1, 1, 4)
    errors = {"scores": {"max_abs": 0.0, "max_rel": 0.0, "max_abs_spike_exact": 0.0, "non_finite": 0}}
    top1 = {"exact_agree": 1, "exact": 1, "unambiguous_agree": 1, "unambiguous": 1}
    assert "1 real spike mismatches, first in b at t=4" in _failures(PRESETS["fp32"], errors, top1, stats, 0.0)


def _tally_reasons(run_scores, run_rates):
    ref = {"scores": np.array([[3.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), "rates": np.array([[0.5, 0.25], [0.0, 1.0]])}
    tally = Tally("candidate", ["scores", "rates"])
    tally.add("random", ref, {"scores": np.asarray(run_scores), "rates": np.asarray(run_rates)}, None, [], 0.5,
              PRESETS["fp32"])
    return tally.report(PRESETS["fp32"])["reasons"]


def test_every_output_is_judged_not_only_the_scores():
    ok_scores, ok_rates = [[3.0, 1.0, 0.0], [0.0, 3.0, 1.0]], [[0.5, 0.25], [0.0, 1.0]]
    assert _tally_reasons(ok_scores, ok_rates) == []
    assert _tally_reasons(ok_scores, [[1.5, 0.75], [0.0, 3.0]]) == ["rates differ by 2 > 1e-05"]


def test_nan_outputs_fail_verify():
    """max() keeps its first argument against a NaN, and argmax picks the NaN: both hid NaN outputs."""
    reasons = _tally_reasons([[np.nan] * 3, [0.0, np.nan, 1.0]], [[0.5, 0.25], [0.0, np.nan]])
    assert "scores: 4 NaN/inf values where torch's are finite" in reasons
    assert "rates: 1 NaN/inf values where torch's are finite" in reasons


def _layer_tally_reasons(precision: str, change) -> list[str]:
    """One layer 'a' (T = 2, 2 samples, 3 neurons, membranes 0.2 under v_th 0.5, no spike) and scores, as
    torch gave them; ``change(run)`` alters the candidate's copy; the reasons verify gives at ``precision``."""
    ref = {"a.spikes": np.zeros((2, 2, 3), np.float32), "a.membrane": np.full((2, 2, 3), 0.2, np.float32),
           "scores": np.array([[3.0, 1.0], [0.0, 3.0]], np.float32)}
    run = {k: v.copy() for k, v in ref.items()}
    change(run)
    tally = Tally("candidate", ["scores"])
    tally.add("random", ref, run, None, ["a"], 0.5, PRESETS[precision])
    return tally.report(PRESETS[precision])["reasons"]


def test_nan_membranes_fail_verify_at_any_precision():
    def nan_membrane(run):
        run["a.membrane"][1, 0, 2] = np.nan

    for precision in ("fp32", "bf16"):
        assert _layer_tally_reasons(precision, nan_membrane) == ["1 NaN/inf membranes where torch's are finite, first in a"]


def test_membranes_off_without_a_flip_fail_at_fp32_not_at_16_bits():
    """+0.3 on every membrane, still under V_th: no spike flips, yet not the function. fp32 (and tf32x2)
    fails it; at bf16, whose membranes drift by themselves, it is only counted."""
    def shifted(run):
        run["a.membrane"] += 0.3

    assert _layer_tally_reasons("fp32", shifted) == [
        "12 membranes off by more than 0.0001 (x max(1, |u|)) where every spike before them matched, first in a"]
    assert _layer_tally_reasons("bf16", shifted) == []

    def rounding(run):  # a last-bit difference is rounding
        run["a.membrane"][0, 0, 0] = np.nextafter(np.float32(0.2), np.float32(1))

    assert _layer_tally_reasons("fp32", rounding) == []


def test_max_rel_is_over_the_reference_values_the_tolerance_resolves():
    """A voted score is often exactly 0: a rounding of 1e-8 there over a 1e-12 floor printed "max rel 1e+04" (and
    1.25e+11 on a real run), which says nothing. The relative error is taken where |reference| >= score_atol."""
    tally = Tally("ort-cpu", ["scores"])
    ref = {"scores": np.array([[0.0, 0.5], [0.25, 0.0]], np.float32)}
    run = {"scores": np.array([[1e-8, 0.5 + 1e-6], [0.25, 0.0]], np.float32)}
    tally.add("random", ref, run, None, [], 0.5, PRESETS["fp32"])
    errors = tally.report(PRESETS["fp32"])["outputs"]["scores"]
    assert errors["max_rel"] == pytest.approx(float(np.float32(0.5 + 1e-6) - np.float32(0.5)) / 0.5)
    assert errors["max_abs"] == pytest.approx(float(np.float32(0.5 + 1e-6) - np.float32(0.5)))


def _layers(steps: int, batch: int, neurons: int, names=("a",), membrane: float = 0.2) -> dict[str, np.ndarray]:
    """torch's outputs of LIF layers ``names`` that never spike: spikes 0, every membrane ``membrane`` (under v_th
    0.5), each ``[steps, batch, neurons]``."""
    out = {}
    for name in names:
        out[f"{name}.spikes"] = np.zeros((steps, batch, neurons), np.float32)
        out[f"{name}.membrane"] = np.full((steps, batch, neurons), membrane, np.float32)
    return out


def test_a_flip_is_propagated_after_any_earlier_divergence_upstream():
    """Three layers, T = 3, one sample, one neuron each, v_th 0.5, eps 0.01. Each flip below is downstream of a's
    numerical flip at t=1 by another path, and must be counted propagated, not real (nor numerical):
    a at t=3 (a itself diverged two steps before, not one), b at t=2 (a diverged at an earlier step, not this
    one), c at t=1 (two layers up, with b between them equal) with its membrane near the threshold."""
    ref = _layers(3, 1, 1, ("a", "b", "c"))
    run = {k: v.copy() for k, v in ref.items()}
    ref["a.membrane"][0, 0, 0] = 0.505
    run["a.spikes"][0, 0, 0] = 1  # numerical
    run["a.spikes"][2, 0, 0] = 1  # membrane 0.2: real, were it not downstream
    run["b.spikes"][1, 0, 0] = 1
    ref["c.membrane"][0, 0, 0] = 0.503
    run["c.spikes"][0, 0, 0] = 1  # near the threshold, but downstream: propagated
    stats: dict[str, LayerStats] = {}
    assert classify_flips(ref, run, ["a", "b", "c"], 0.5, 0.01, stats).tolist() == [True]
    counts = {name: (s.numerical, s.real, s.propagated, s.first_step, s.first_real_step) for name, s in stats.items()}
    assert counts == {"a": (1, 0, 1, 1, None), "b": (0, 0, 1, 2, None), "c": (0, 0, 1, 1, None)}


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # inf - inf, torch's inf vs the runner's
def test_membranes_off_count_only_finite_ones_with_nothing_diverged_upstream():
    """Layer a, T = 2, two samples, three neurons, membranes 0.2 (v_th 0.5, eps 0.01, relative to max(1, |u|)).
    Counted off: sample 0's 0.2 -> 0.5 at t=1. Not off: a membrane of 3.0 read as 3.02 (0.02 <= 0.01 x 3.0), one
    of 0.2 read as 0.205 (0.005 <= 0.01 x 1);
    sample 1's 0.2 -> 0.5 at t=2, after its numerical flip at t=1; an inf and a NaN where torch's membrane is
    finite (counted apart, and the largest difference is then inf); an inf where torch's is inf too."""
    ref = _layers(2, 2, 3)
    ref["a.membrane"][0, 0, 1] = 3.0
    ref["a.membrane"][1, 0, 2] = np.inf
    ref["a.membrane"][0, 1, 0] = 0.505
    run = {k: v.copy() for k, v in ref.items()}
    run["a.membrane"][0, 0, 0] = 0.5
    run["a.membrane"][0, 0, 1] = 3.02
    run["a.membrane"][0, 0, 2] = 0.205
    run["a.spikes"][0, 1, 0] = 1
    run["a.membrane"][1, 1, 1] = 0.5
    run["a.membrane"][1, 0, 0] = np.inf
    run["a.membrane"][1, 0, 1] = np.nan
    stats: dict[str, LayerStats] = {}
    classify_flips(ref, run, ["a"], 0.5, 0.01, stats)
    s = stats["a"]
    assert (s.membranes_off, s.membranes_non_finite, s.numerical, s.real) == (1, 2, 1, 0)
    assert s.membrane_max_abs == np.inf


def test_first_real_step_and_largest_numerical_margin_hold_across_batches():
    """A real flip at t=1 in the first batch and at t=3 in the second: the first real step stays 1. Numerical
    margins 0.008 then 0.002: the largest stays 0.008."""
    stats: dict[str, LayerStats] = {}
    for real_step, membrane in ((0, 0.508), (2, 0.502)):
        ref = _layers(3, 1, 2)
        run = {k: v.copy() for k, v in ref.items()}
        run["a.spikes"][real_step, 0, 0] = 1
        ref["a.membrane"][real_step, 0, 1] = membrane
        run["a.spikes"][real_step, 0, 1] = 1
        classify_flips(ref, run, ["a"], 0.5, 0.01, stats)
    assert stats["a"].first_real_step == 1
    assert stats["a"].max_numerical_margin == pytest.approx(0.008, abs=1e-6)


def test_flip_rates_are_over_neuron_steps():
    """10 neurons x samples per step, T = 2, one flip at each step: 2 of 20 neuron-steps."""
    summary = LayerStats(neurons_per_step=10, flips_per_step=[1, 1]).summary()
    assert summary["flip_rate"] == pytest.approx(0.1) and summary["flip_rate_per_step"] == [0.1, 0.1]


def test_a_threshold_margin_of_exactly_eps_is_numerical():
    """|u_ref - V_th| <= eps (Tolerance's definition): 0.75 against 0.5 with eps 0.25, all exact in binary."""
    ref = _layers(1, 1, 1)
    ref["a.membrane"][0, 0, 0] = 0.75
    run = {k: v.copy() for k, v in ref.items()}
    run["a.spikes"][0, 0, 0] = 1
    stats: dict[str, LayerStats] = {}
    classify_flips(ref, run, ["a"], 0.5, 0.25, stats)
    assert (stats["a"].numerical, stats["a"].real) == (1, 0)


def _tally(ref: dict, run: dict, layers: list[str], precision: str = "fp32", v_th: float = 0.5,
           labels=None) -> dict:
    tally = Tally("candidate", ["scores"])
    tally.add("real", ref, run, labels, layers, v_th, PRESETS[precision])
    return tally.report(PRESETS[precision])


def test_fp32_judges_scores_and_top1_on_the_samples_whose_spikes_all_matched():
    """Three samples; samples 0 and 2 have a numerical flip (membrane 0.50001) in the second layer only, which
    moves sample 0's scores by a voting quantum (0.5) and changes its prediction, and leaves sample 2's prediction
    as it was. fp32 judges scores and top-1 on sample 1 alone: neither fails (the only reason is the rate of
    numerical flips, 2 in 12 neuron-steps here), two samples diverged, first divergence in b."""
    ref = {**_layers(2, 3, 1, ("a", "b")), "scores": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)}
    ref["b.membrane"][1, 0::2, 0] = 0.50001
    run = {k: v.copy() for k, v in ref.items()}
    run["b.spikes"][1, 0::2, 0] = 1
    run["scores"][0] = [0.5, 1.0]
    report = _tally(ref, run, ["a", "b"])
    assert report["reasons"] == ["numerical flip rate 1.67e-01 > 1e-06"]
    assert report["outputs"]["scores"]["max_abs"] == 1.0 and report["outputs"]["scores"]["max_abs_spike_exact"] == 0.0
    t = report["top1"]
    assert (t["samples_diverged"], t["exact"], t["exact_agree"], t["judged"], t["agree"]) == (2, 1, 1, 1, 2)
    assert report["first_divergence"] == {"layer": "b", "step": 2}
    assert report["numerical_flip_rate"] == pytest.approx(2 / 12)  # 2 of 2 layers x 3 samples x 2 steps


def test_membrane_eps_scales_with_the_threshold():
    """v_th 2.0: eps is 1e-4 x max(1, |v_th|) = 2e-4, so a flip at a margin of 1.5e-4 is numerical (with eps 1e-4
    it would be a real mismatch)."""
    ref = {**_layers(1, 1, 1, membrane=1.0), "scores": np.array([[1.0, 0.0]], np.float32)}
    ref["a.membrane"][0, 0, 0] = 2.00015
    run = {k: v.copy() for k, v in ref.items()}
    run["a.spikes"][0, 0, 0] = 1
    report = _tally(ref, run, ["a"], v_th=2.0)
    assert (report["layers"]["a"]["numerical"], report["layers"]["a"]["real"]) == (1, 0)


def test_scores_off_count_non_finite_samples_and_maxima_describe_the_finite_values():
    """Three samples: one NaN score, one score off by 0.5, one NaN where torch's is NaN too: all 3 samples off
    (a value off by more than the tolerance, or not finite), 1 NaN counted against the runner (torch's own NaN is
    not its), and max abs 0.5 (not hidden by the NaNs)."""
    ref = {"scores": np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 1.0]], np.float32)}
    run = {"scores": np.array([[np.nan, 0.0], [0.0, 1.5], [np.nan, 1.0]], np.float32)}
    errors = _tally(ref, run, [])["outputs"]["scores"]
    assert (errors["samples_off"], errors["non_finite"], errors["max_abs"]) == (3, 1, 0.5)


def test_accuracy_counts_each_side_against_the_labels():
    """torch right on both samples, the runner on one."""
    ref = {"scores": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)}
    run = {"scores": np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)}
    report = _tally(ref, run, [], labels=np.array([0, 1]))
    assert report["accuracy"] == {"real": {"reference": 1.0, "candidate": 0.5}}


def test_boundaries_of_the_pass_criteria_are_inclusive():
    """A numerical flip rate equal to the maximum passes; top-1 agreement equal to the minimum passes (19 of 20 at
    bf16's 0.95); a top-2 margin equal to the score tolerance is not a clear top-1; real flips are summed over
    every layer, the first one named."""
    errors = {"scores": {"max_abs": 0.0, "max_rel": 0.0, "max_abs_spike_exact": 0.0, "non_finite": 0}}
    agreeing = {"exact_agree": 20, "exact": 20, "unambiguous_agree": 20, "unambiguous": 20}
    assert _failures(PRESETS["fp32"], errors, agreeing, {}, PRESETS["fp32"].max_numerical_flip_rate) == []
    clear = {**agreeing, "unambiguous_agree": 19}
    assert _failures(PRESETS["bf16"], errors, clear, {}, 0.0) == []
    stats = {"a": LayerStats(real=1, first_real_step=2), "b": LayerStats(real=3, first_real_step=1)}
    assert "4 real spike mismatches, first in a at t=2" in _failures(PRESETS["fp32"], errors, agreeing, stats, 0.0)
    ref = {"scores": np.array([[0.0, PRESETS["bf16"].score_atol]], np.float64)}
    assert _tally(ref, {k: v.copy() for k, v in ref.items()}, [], "bf16")["top1"]["unambiguous"] == 0
