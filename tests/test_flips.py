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
