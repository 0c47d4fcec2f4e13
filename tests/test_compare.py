"""Spike-aware verification on real runs and runtimes: a perturbed model that must fail, reports, damaged inputs (the
flip classification itself: test_flips.py)."""

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import make_run, reference_file, replace_checkpoint, tiny_zoo_config  # noqa: E402
from snncompile.backends import available_runners  # noqa: E402
from snncompile.cli import cli  # noqa: E402
from snncompile.compare import verify_run, verify_runs  # noqa: E402
from snncompile.errors import ArtifactError  # noqa: E402
from snncompile.export_onnx import export_run  # noqa: E402
from snncompile.runs import load_run_config  # noqa: E402


@pytest.fixture
def exported(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, n_random=64, n_real=0)
    return run


def test_the_report_says_what_the_membranes_mean():
    from snncompile.verify_report import _exactness_line

    def report(differing, exact, precision="fp32", passed=True):
        return {"layers": {"lif1": {"membranes_differing": differing}}, "exact_model": exact, "runner": "ort-cpu",
                "precision": precision, "passed": passed}

    assert _exactness_line(report(0, True)) == "every membrane bit-identical to torch's (exact-arithmetic model)"
    assert _exactness_line(report(0, False)) == "every membrane bit-identical to torch's"
    assert "ort-cpu does not compute in plain fp32" in _exactness_line(report(3, True))
    assert "exact only in fp32" in _exactness_line(report(3, True, "fp16"))
    assert _exactness_line(report(3, False)) == ("3 membrane values differ in their last bits (summation order); "
                                                 "model.exact = true makes them bit-identical")
    assert _exactness_line(report(3, False, "tf32x2")) == _exactness_line(report(3, False))  # fp32-accurate
    # it said "last bits (summation order)" of fp16 gaps of 0.45 and of a corrupted model too
    assert _exactness_line(report(3, False, "fp16")) == ("3 membrane values differ: fp16 arithmetic (model.exact = "
                                                         "true makes fp32 runs bit-identical, not this precision)")
    assert _exactness_line(report(3, False, passed=False)) == "3 membrane values differ from torch's"
    assert _exactness_line(report(3, True, passed=False)) == "3 membrane values differ from torch's"


def test_perturbed_weight_fails_and_names_first_divergent_layer(exported):
    path = exported / "model_layers.onnx"
    model = onnx.load(str(path))
    # The second conv (stage 3) feeds lif2: nudge one weight hard enough to change spikes.
    init = next(i for i in model.graph.initializer if i.name == "net.stages.3.weight")
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 1, 1] += 5.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))

    report = verify_run(exported, "ort-cpu", "fp32")
    assert not report["passed"] and not report["model_matches_export"]
    # first why: the file is not the export (the spike mismatches below then say where it differs)
    assert report["reasons"][0] == (f"model_layers.onnx is not the file its export wrote (sha256 mismatch): export it "
                                    f"again: `snncompile export {exported} --layers --samples 64`")
    assert report["first_divergence"] == {"layer": "lif2", "step": 1}
    assert report["layers"]["lif1"]["flips"] == 0 and report["layers"]["lif2"]["real"] > 0
    assert any("first in lif2 at t=1" in r for r in report["reasons"])

    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1
    assert "FAILED:" in result.output and "first divergence: lif2 at t=1" in result.output


@pytest.mark.parametrize("steps", [3, 4])
def test_an_export_committed_while_verify_runs_is_named_and_nothing_recorded(exported, monkeypatch, steps):
    """Another command exports the checked file again in the middle of verify: at another T its new file met the
    inputs read before it (it said "T (axis 0) must be 3, got 4"); at the same T the report was filed under the
    old file's hash. Either way verify now says what happened and records nothing."""
    from snncompile import compare

    before = (exported / "verify.json").exists()
    real_batches = compare._ReferenceInputs.batches

    def batches_with_an_export_meanwhile(self, split, batch):
        export_run(exported, steps=steps, layers=True, n_random=64, n_real=0)  # the other command, committed
        yield from real_batches(self, split, batch)

    monkeypatch.setattr(compare._ReferenceInputs, "batches", batches_with_an_export_meanwhile)
    with pytest.raises(ArtifactError, match=r"model_layers.onnx was exported again while verify ran \(by another "
                                            r"command\): nothing was recorded; verify it again$"):
        verify_run(exported, "ort-cpu", "fp32")
    assert (exported / "verify.json").exists() == before
    monkeypatch.undo()
    assert verify_run(exported, "ort-cpu", "fp32")["passed"]  # the new export, verified again


def test_cli_verify_passes_on_untouched_export(exported):
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "PASSED: ort-cpu matches torch within fp32 tolerances (" in result.output


def test_verify_of_a_read_only_run_says_so_before_comparing(exported, monkeypatch):
    """It compared every input, then died writing verify.json with a traceback, its PASSED/FAILED never shown.
    (A read-only mount is simulated: as root, permissions alone do not stop a write.)"""
    import os

    import snncompile.compare as compare

    real_access = os.access
    monkeypatch.setattr("snncompile.artifacts.os.access",
                        lambda path, mode: not (str(path) == str(exported) and mode & os.W_OK) and real_access(path, mode))
    compared = []
    monkeypatch.setattr(compare, "create_runner", lambda *a, **k: compared.append(a[0]))
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1 and not compared, result.output
    assert result.stderr.splitlines() == [f"error: cannot write in {exported} (verify.json): it is read-only here; "
                                          "copy the run directory somewhere writable"]


def test_a_folder_it_cannot_create_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(cli, ["train", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path / "a-file" / "out"),
                                      "--set", "train.epochs=1", "--set", "data.limit_train=32", "--no-progress"])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    # the file in the way, not the run dir it could not make below it (".../a-file/out/digits/<run-id>")
    assert line == f"error: Not a directory: {tmp_path / 'a-file'} is a file", result.output


def test_verify_without_export_is_one_line(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    result = CliRunner().invoke(cli, ["verify", str(run), "--runner", "ort-cpu"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {run} has no model.onnx: run `snncompile export {run}` first"]


def test_the_next_step_named_fits_the_file_asked_for(tmp_path):
    """Every missing export was answered with `snncompile export RUN`, which cannot write model_fp16_layers.onnx,
    nor anything without a checkpoint; and unchecked layers always pointed at plain model_layers.onnx."""
    from snncompile.compare import layers_hint
    from snncompile.exports import missing_export
    from snncompile.runs import load_run_config

    run = make_run(tmp_path / "a", tiny_zoo_config(REPO / "models" / "mnist.toml"))
    T = load_run_config(run).model.T
    assert str(missing_export(run, "model_fp16_layers.onnx")) == (
        f"{run} has no model_fp16_layers.onnx: run `snncompile export {run} --layers --precision fp16` first")
    assert str(missing_export(run, "model_per_step.onnx")) == (
        f"{run} has no model_per_step.onnx: run `snncompile export {run} --order step` first")
    assert str(missing_export(run, "model_step.onnx")).endswith(f"`snncompile export {run} --form step` first")
    assert str(missing_export(run, "nope.onnx")) == f"{run} has no export named nope.onnx (its exports: none yet)"
    (run / "checkpoint.pt").unlink()  # an init run's weights are gone: `train --resume` cannot bring them back
    assert str(missing_export(run, "model.onnx")) == (f"{run / 'checkpoint.pt'} is missing: restore it from a copy, or "
                                                      f"`snncompile train {run / 'config.toml'}` again into a new run")

    exports = {"model_fp16.onnx": {"T": T, "precision": "fp16"}, "model.onnx": {"T": T + 1},
               "model_layers.onnx": {"T": T, "layers": True}, "model_per_step.onnx": {"T": T, "order": "step"},
               "model_per_step_layers.onnx": {"T": T, "order": "step", "layers": True}}
    assert layers_hint(run, exports, "model_fp16.onnx") == (f"`snncompile export {run} --layers --precision fp16` adds "
                                                            "model_fp16_layers.onnx, on which verify classifies every flip")
    assert layers_hint(run, exports, "model.onnx") == (  # the twin at the trained T is not its twin
        f"`snncompile export {run} --T {T + 1} --layers` writes model_layers.onnx (now T = {T}) again as this file's "
        "twin, on which verify classifies every flip")
    assert layers_hint(run, exports, "model_per_step.onnx") == (
        f"`snncompile verify {run} --model model_per_step_layers.onnx` checks them")
    exports["model_per_step_layers.onnx"]["checkpoint_sha256"] = "older weights"  # verify would refuse that twin
    assert layers_hint(run, exports, "model_per_step.onnx").startswith(
        f"`snncompile export {run} --layers --order step` writes model_per_step_layers.onnx (now another checkpoint) again")
    # a _layers file whose layer outputs are not the run's (another run's, copied in) said to verify itself
    assert layers_hint(run, exports, "model_layers.onnx") == (
        f"model_layers.onnx's layer outputs are not this run's network's (another run's file?): "
        f"`snncompile export {run} --layers` writes it again")


def test_verify_on_the_whole_test_set(tmp_path):
    from snncompile.config import load_config

    cfg = load_config(REPO / "models" / "digits.toml")
    run = make_run(tmp_path, cfg)
    export_run(run, layers=True, n_random=8, n_real=8)
    result = CliRunner().invoke(cli, ["verify", str(run), "--runner", "ort-cpu", "--test-set", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = __import__("json").loads((run / "verify.json").read_text())["ort-cpu@test"]
    from snncompile.data import load_dataset

    n_test = len(load_dataset(cfg, progress=False).test)
    assert 350 < n_test < 370  # 20 % of scikit-learn's 1,797 digits
    assert report["inputs"] == {"test": n_test} and report["top1"]["total"] == n_test
    assert report["reference_reproduced"] is None
    assert set(report["accuracy"]["test"]) == {"reference", "ort-cpu"}
    assert report["layers"]["lif1"]["neurons_per_step"] == n_test * 32 * 8 * 8
    assert f"on {n_test} inputs ({n_test} test)" in result.output


def test_several_runners_in_one_pass_report_what_each_alone_does(exported, monkeypatch):
    """verify_runs feeds each batch to every runner after one reference inference: same reports as one
    verify_run per runner, with the reference (and the inputs) visited once."""
    import json

    import snncompile.compare as compare

    alone = {name: verify_run(exported, name, "bf16", options={"precision": "bf16"} if name == "torch-fast" else None)
             for name in ("ort-cpu", "torch-fast")}
    calls = []
    real_create = compare.create_runner

    def counting_create(name, *args, **kwargs):
        runner = real_create(name, *args, **kwargs)
        if name == "torch":
            infer = runner.infer
            runner.infer = lambda feed: (calls.append(feed["input"].shape[1]), infer(feed))[1]
        return runner

    monkeypatch.setattr(compare, "create_runner", counting_create)
    together = verify_runs(exported, {"ort-cpu": None, "torch-fast": {"precision": "bf16"}}, "bf16", batch=16)
    assert sum(calls) == 64 and len(calls) == 4  # the 64 reference inputs once, in batches of 16
    assert together == alone
    assert alone["torch-fast"]["outputs"]["scores"]["max_abs"] > 0  # the two runners really differ
    assert alone["ort-cpu"]["outputs"] != alone["torch-fast"]["outputs"]
    saved = json.loads((exported / "verify.json").read_text())
    # ort-cpu runs the fp32 file as written: judged and filed at fp32, not at the bf16 torch-fast was asked for
    assert together["ort-cpu"]["precision"] == "fp32" and together["ort-cpu"]["tolerance"]["score_atol"] == 1e-5
    assert saved["ort-cpu"] == together["ort-cpu"] and saved["torch-fast/bf16"] == together["torch-fast"]
    assert "ort-cpu/bf16" not in saved


def test_verify_on_test_set_without_the_dataset_is_one_line(exported):
    # The tiny mnist config points data.root at ../shared/data/mnist; move it somewhere empty.
    import re

    path = exported / "config.toml"
    text, n = re.subn(r'(?m)^root = ".*"$', f'root = "{exported / "nothing"}"', path.read_text())
    assert n == 1
    path.write_text(text)
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--test-set"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: verify on the test set needs the run's dataset: "), lines


def test_cli_verify_hands_the_precision_to_runners_that_take_one(exported):
    # --precision is both the tolerance preset and, for torch-fast/trt, how the runner computes
    CliRunner().invoke(cli, ["verify", str(exported), "--runner", "torch-fast", "--no-progress"])
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "torch-fast", "--precision", "bf16", "--no-progress"])
    T = load_run_config(exported).model.T
    assert f"verify torch-fast on model_layers.onnx (T = {T}) vs torch (bf16, TF32 off)" in result.output, result.output
    assert "note:" not in result.output  # torch-fast computes what was asked
    saved = __import__("json").loads((exported / "verify.json").read_text())
    report = saved["torch-fast/bf16"]
    assert report["precision"] == "bf16" and report["outputs"]["scores"]["max_abs"] > 0  # bf16 did run
    assert saved["torch-fast"]["precision"] == "fp32"  # the fp32 check is still there, beside it


def test_cli_verify_judges_onnx_runtime_at_the_files_own_precision(exported):
    # ort-cpu runs the fp32 file in fp32 whatever --precision says: the looser fp16 preset would let a real
    # mismatch pass, and filing it under ort-cpu/fp16 would claim an fp16 check that never ran
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--precision", "fp16", "--no-progress"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first == ("note: --precision fp16 sets what torch-fast and trt compute; model_layers.onnx is checked on "
                     "ort-cpu at fp32, as they compute it (ONNX Runtime computes in fp16 on `snncompile export RUN "
                     "--precision fp16`'s file)"), first
    assert "vs torch (fp32, TF32 off)" in result.output
    saved = __import__("json").loads((exported / "verify.json").read_text())
    assert saved["ort-cpu"]["precision"] == "fp32" and "ort-cpu/fp16" not in saved
    if available_runners()["ov-cpu"] is None:  # with both runtimes' runners, both named
        both = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--runner", "ov-cpu",
                                        "--precision", "fp16", "--no-progress"])
        assert both.output.splitlines()[0].endswith("is checked on ort-cpu at fp32, ov-cpu at fp32, as they compute "
                                                    "it (ONNX Runtime and OpenVINO compute in fp16 on `snncompile "
                                                    "export RUN --precision fp16`'s file)"), both.output


def test_plain_verify_checks_model_onnx_when_model_layers_onnx_is_not_its_twin(exported):
    # export --T 8 --layers, then export at the trained T: model_layers.onnx computes another network (T = 8)
    # than model.onnx, so verify's default is model.onnx itself, with the command that brings the twin back
    T = load_run_config(exported).model.T
    export_run(exported, steps=T + 2, layers=True, n_random=16, n_real=0)
    export_run(exported, layers=False, n_random=16, n_real=0)
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"verify ort-cpu on model.onnx (T = {T}) vs torch" in result.output, result.output
    hint = (f"`snncompile export {exported} --layers --samples 16` writes model_layers.onnx (now T = {T + 2}) again as "
            "this file's twin")
    assert hint in " ".join(result.output.split()), result.output
    export_run(exported, layers=True, n_random=16, n_real=0)  # the twin back at the trained T: checked again
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert f"verify ort-cpu on model_layers.onnx (T = {T}) vs torch" in result.output, result.output


def test_missing_reference_outputs_or_corrupt_verify_json_is_one_line_before_any_work(exported, monkeypatch):
    import snncompile.compare as compare

    monkeypatch.setattr(compare, "create_runner", lambda *a, **k: pytest.fail("verify ran before the check"))
    (exported / "verify.json").write_text('{"ort-cpu": ')  # a write cut short
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {exported / 'verify.json'} is corrupt: move it aside (or delete it) and verify again"]
    reference_file(exported, "outputs").unlink()
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1 and result.output.strip() == (
        f"error: {exported}: the reference inputs and outputs of model_layers.onnx are gone: run `snncompile export "
        f"{exported} --layers --samples 64` again")
    assert "Traceback" not in result.output


def test_verify_of_an_export_of_an_earlier_checkpoint_is_one_line_before_any_work(exported, monkeypatch):
    """The walkthrough: export --layers, train --resume, verify --test-set failed on 10,634 "real spike mismatches"
    (the reference is the current checkpoint, the file the old weights). Refused at once, with the command that
    writes the file again; an export recorded before exports held the checkpoint's hash is not checked."""
    import json

    import snncompile.compare as compare

    real_create_runner = compare.create_runner
    monkeypatch.setattr(compare, "create_runner", lambda *a, **k: pytest.fail("verify ran before the check"))
    replace_checkpoint(exported)
    expected = [f"error: model_layers.onnx was exported from an earlier checkpoint (training continued since): "
                f"export it again: `snncompile export {exported} --layers --samples 64`"]
    for extra in ([], ["--test-set"]):
        result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress", *extra])
        assert result.exit_code == 1 and result.output.strip().splitlines() == expected, result.output
    assert not (exported / "verify.json").exists()
    trained = (exported / "checkpoint.pt").read_bytes()
    replace_checkpoint(exported, by_hand=True)  # another checkpoint copied in: no training wrote it
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1 and result.output.strip() == (
        "error: model_layers.onnx was exported from another checkpoint, and checkpoint.pt is not the one this run's "
        "training recorded in manifest.json (replaced by hand?): restore it, or export again: "
        f"`snncompile export {exported} --layers --samples 64`")
    (exported / "checkpoint.pt").write_bytes(trained[:100])  # cut short
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1 and "checkpoint.pt is corrupt or not an snncompile checkpoint" in result.output
    assert "earlier checkpoint" not in result.output  # not passed off as more training
    # an export written before entries held the checkpoint's hash: nothing to compare with, verify runs
    (exported / "checkpoint.pt").write_bytes(trained)
    manifest = json.loads((exported / "manifest.json").read_text())
    del manifest["exports"]["model_layers.onnx"]["checkpoint_sha256"]
    (exported / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(compare, "create_runner", real_create_runner)
    assert not verify_run(exported, "ort-cpu")["passed"]  # the old weights against the new reference, as before
    export_run(exported, layers=True, n_random=64, n_real=0)
    assert verify_run(exported, "ort-cpu")["passed"]


@pytest.mark.parametrize("kind", ["inputs", "outputs"])
@pytest.mark.parametrize("damage", ["first half", "garbage", "a flipped byte"])
def test_corrupt_reference_files_are_one_line_before_any_work(exported, monkeypatch, kind, damage):
    """A cut-short or garbage reference npz was a zipfile.BadZipFile traceback. np.load reads an npz lazily: cut
    short it fails at once, with a damaged array (its CRC) only when that array is read; both are one line now."""
    import snncompile.compare as compare

    monkeypatch.setattr(compare, "create_runner", lambda *a, **k: pytest.fail("verify ran before the check"))
    path = reference_file(exported, kind)
    data = path.read_bytes()
    if damage == "first half":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage, not an npz" * 10)
    else:
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF  # inside the first array's data: np.load itself succeeds
        path.write_bytes(bytes(flipped))
        with np.load(path) as lazy:
            assert lazy.files
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {path} is missing or corrupt (")
    assert line.endswith(f"): export again: `snncompile export {exported} --layers --samples 64`"), line


def _reshape_reference(path, change) -> None:
    """Rewrite one reference npz with ``change(arrays)`` applied (a dict of its arrays, edited in place)."""
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    change(arrays)
    np.savez(path, **arrays)


# (file, change, what the error must say): reference files of another export, or edited, read whole but wrong
_WRONG_REFERENCES = {
    "frame size": ("inputs", lambda a: a.update(random=a["random"][..., :-1]), "'random' is [4, 64, 1, 28, 27] float32, "
                   "expected [4, N, 1, 28, 28] float32"),
    "T": ("inputs", lambda a: a.update(random=a["random"][:2]), "'random' is [2, 64, 1, 28, 28] float32, expected "
          "[4, N, 1, 28, 28] float32"),
    "dtype": ("inputs", lambda a: a.update(random=a["random"].astype(np.float64)), "'random' is [4, 64, 1, 28, 28] "
              "float64"),
    "no labels": ("inputs", lambda a: a.update(real=a["random"]), "'real' and 'real_labels' must come together"),
    "float labels": ("inputs", lambda a: a.update(real=a["random"], real_labels=np.zeros(64)),
                     "'real_labels' is [64] float64, expected [64] integers"),
    "no random": ("inputs", lambda a: a.update(real=a.pop("random"), real_labels=np.zeros(64, np.int64)),
                  "no 'random' array"),
    "rows": ("outputs", lambda a: a.update({"random/scores": a["random/scores"][:10]}),
             "'random/scores' is [10, 10], expected [64, classes], one row per 'random' input"),
    "no scores": ("outputs", lambda a: a.pop("random/scores"), "no 'random/scores' array"),
}


@pytest.mark.parametrize("wrong", sorted(_WRONG_REFERENCES))
def test_reference_files_of_the_wrong_shape_are_one_line_before_any_work(exported, monkeypatch, wrong):
    """Reference arrays of another shape (another export's files copied in, or edited) were an axis error from the
    runtime halfway through verify, a KeyError traceback, or a pass with a misleading warning (stored scores cut
    short): one line now, naming the file, what is wrong and the export command."""
    import snncompile.compare as compare

    kind, change, says = _WRONG_REFERENCES[wrong]
    path = reference_file(exported, kind)
    _reshape_reference(path, change)
    monkeypatch.setattr(compare, "create_runner", lambda *a, **k: pytest.fail("verify ran before the check"))
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {path} is not this export's (") and says in line, line
    assert line.endswith(f"): export again: `snncompile export {exported} --layers --samples 64`"), line


@pytest.mark.parametrize("kind", ["inputs", "outputs"])
def test_reference_files_replaced_since_export_are_one_line(exported, monkeypatch, kind):
    """Reference inputs replaced by zeros of the same shape passed verify (its torch reference ran on them, so
    everything agreed; the only sign was a warning): files whose hash is not the one export recorded fail now."""
    import snncompile.compare as compare

    path = reference_file(exported, kind)
    _reshape_reference(path, lambda arrays: arrays.update({k: np.zeros_like(v) for k, v in arrays.items()}))
    monkeypatch.setattr(compare, "create_runner", lambda *a, **k: pytest.fail("verify ran before the check"))
    result = CliRunner().invoke(cli, ["verify", str(exported), "--runner", "ort-cpu", "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.strip().splitlines()
    assert line == (f"error: {path} is not the file its export wrote (sha256 mismatch): export again: "
                    f"`snncompile export {exported} --layers --samples 64`"), line


def test_verify_json_keeps_only_reports_of_the_exports_as_they_are_now(exported):
    """After an export again, the old file's PASSED report stayed in verify.json beside the new file's result;
    and a report made up by hand (a trt PASSED) was kept and the file's hash recorded as verify's."""
    import json

    verify_run(exported, "ort-cpu", model_file="model_layers.onnx")
    saved = json.loads((exported / "verify.json").read_text())
    assert saved["ort-cpu"]["model_sha256"] == json.loads((exported / "manifest.json").read_text())[
        "exports"]["model_layers.onnx"]["sha256"]
    export_run(exported, layers=True, n_random=64, n_real=0, steps=2)  # model_layers.onnx again, at T = 2
    verify_run(exported, "torch-fast", model_file="model_layers.onnx")
    saved = json.loads((exported / "verify.json").read_text())
    assert "ort-cpu" not in saved and saved["torch-fast"]["T"] == 2  # the T = 4 file's report is gone
    saved["trt"] = {**saved["torch-fast"], "runner": "trt"}  # made up by hand
    (exported / "verify.json").write_text(json.dumps(saved))
    verify_run(exported, "ort-cpu", model_file="model_layers.onnx")
    assert set(json.loads((exported / "verify.json").read_text())) == {"ort-cpu"}
    verify_run(exported, "torch-fast", model_file="model_layers.onnx")  # verify's own file: its reports kept
    assert set(json.loads((exported / "verify.json").read_text())) == {"ort-cpu", "torch-fast"}


def test_verify_records_verify_json_while_it_holds_the_run_dir_lock(exported, monkeypatch):
    """Recorded after the lock went, another verify merging in that gap saw a verify.json whose hash was not the
    manifest's and dropped every report in it as edited (the review reproduced it with two verifies)."""
    import subprocess
    import sys

    import snncompile.artifacts as artifacts

    real_record, seen = artifacts.record_artifact, []

    def record_and_probe(run_dir, name, **extra):
        probe = subprocess.run([sys.executable, "-c", f"""
import fcntl, os
fd = os.open({str(run_dir)!r}, os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""], capture_output=True, text=True, timeout=60)
        seen.append((name, probe.stdout.strip()))
        return real_record(run_dir, name, **extra)

    monkeypatch.setattr(artifacts, "record_artifact", record_and_probe)
    verify_run(exported, "ort-cpu")
    assert ("verify.json", "held") in seen and ("verify.json", "free") not in seen


def test_a_verify_killed_between_its_write_and_its_record_loses_no_report(exported, monkeypatch):
    """Killed after verify.json was renamed into place but before its hash was recorded, the next verify found a
    file the manifest did not vouch for and dropped every earlier report, silently. The hash is announced
    before the rename now."""
    import json

    import snncompile.artifacts as artifacts

    verify_run(exported, "ort-cpu")
    real_record = artifacts.record_artifact

    def killed(run_dir, name, **extra):
        raise KeyboardInterrupt  # stands for the SIGKILL: nothing after the rename runs

    monkeypatch.setattr(artifacts, "record_artifact", killed)
    with pytest.raises(KeyboardInterrupt):
        verify_run(exported, "torch-fast")
    monkeypatch.setattr(artifacts, "record_artifact", real_record)
    assert set(json.loads((exported / "verify.json").read_text())) == {"ort-cpu", "torch-fast"}  # renamed in
    verify_run(exported, "torch")
    assert set(json.loads((exported / "verify.json").read_text())) == {"ort-cpu", "torch-fast", "torch"}


def test_verify_names_the_runs_other_exports_that_changed_since(exported):
    """Another run's model.onnx copied in: verify checked model_layers.onnx, PASSED, and said nothing about the
    file users deploy and bench times."""
    from snncompile.verify_report import format_report

    export_run(exported, n_random=64, n_real=0)  # model.onnx beside model_layers.onnx
    report = verify_run(exported, "ort-cpu")
    assert report["passed"] and report["exports_changed"] == {}
    (exported / "model.onnx").write_bytes((exported / "model.onnx").read_bytes() + b"\0")  # no longer export's file
    report = verify_run(exported, "ort-cpu")
    assert report["model"] == "model_layers.onnx" and report["exports_changed"] == {
        "model.onnx": f"snncompile export {exported} --samples 64"}
    assert (f"warning: model.onnx, not checked here, differs from the file its export recorded (sha256 mismatch): "
            f"`snncompile export {exported} --samples 64` writes it again") in format_report(report).splitlines()


def test_a_16_bit_file_without_layer_outputs_failing_on_scores_says_why(exported):
    """`export --precision fp16` then `verify --model model_fp16.onnx` failed "scores differ by 0.15 > 0.1" on the
    tool's own fresh export, with nothing saying that flips, not errors, may explain it there."""
    from snncompile.verify_report import format_report

    report = verify_run(exported, "ort-cpu")
    report.update(layers_checked=False, precision="fp16", passed=False, reasons=["scores differ by 0.15 > 0.1"],
                  layers_hint="`snncompile export RUN --layers --precision fp16` adds model_fp16_layers.onnx")
    last = format_report(report).splitlines()[-1]
    assert last.startswith("FAILED: scores differ by 0.15 > 0.1 (without per-layer outputs every sample's scores are "
                           "held to the fp16 tolerance, spike flips included"), last
    report.update(precision="fp32")  # at fp32 a flip is itself a failure: nothing to explain away
    assert format_report(report).splitlines()[-1] == "FAILED: scores differ by 0.15 > 0.1"
