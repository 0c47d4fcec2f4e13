"""`snncompile pipeline`: all stages on the embedded default, then nothing redone on a second run."""

import json
import re

import pytest

pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from conftest import REPO  # noqa: E402
from snncompile.backends import available_runners  # noqa: E402
from snncompile.cli import cli  # noqa: E402

ARGS = ["--set", "train.epochs=2", "--set", "data.limit_train=256", "--set", "data.limit_test=64",
        "--set", "model.arch='16C3-AP2-32FC-Voting'", "--set", "model.T=3", "--set", "train.lr=3e-3",
        "--set", "train.threads=1", "--batch", "1,2", "--no-progress"]


def test_pipeline_runs_every_stage_once(tmp_path):
    runner = CliRunner()
    first = runner.invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS])
    assert first.exit_code == 0, first.output
    for stage in ("train", "export", "verify", "bench"):
        assert f"  {stage:<7} done" in first.output
    assert "verify ort-cpu: PASSED on " in first.output and "| ort-cpu | 2 |" in first.output
    # the whole (limited) test split too, prediction for prediction
    assert re.search(r"verify ort-cpu@test: PASSED on 64 inputs, 0 spike flips \(0 real\), \d+ membrane values not "
                     r"bit-equal, top-1 agreement 100.00 %", first.output), first.output
    assert "  build   skipped: " in first.output
    run = next((tmp_path / "digits").iterdir())
    assert {"checkpoint.pt", "model.onnx", "verify.json", "bench.json", "training.png"} <= {p.name for p in run.iterdir()}

    second = runner.invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS])
    assert second.exit_code == 0, second.output
    for stage in ("train", "plot", "export", "verify", "bench"):  # the plot was drawn again each time
        assert f"  {stage:<7} up to date" in second.output
    assert len(list((tmp_path / "digits").iterdir())) == 1
    # the same batch sizes in another order are the same bench
    reordered = runner.invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path),
                                    *ARGS[:-3], "--batch", "2,1", "--no-progress"])
    assert "  bench   up to date" in reordered.output, reordered.output
    verify_lines = [[line for line in out.output.splitlines() if line.startswith("verify ")] for out in (first, second)]
    assert verify_lines[0] == verify_lines[1] and len(verify_lines[0]) >= 4  # the same lines in the same order
    # a verify.json edited since verify wrote it was shown as up to date, edits and all: verified again
    saved = json.loads((run / "verify.json").read_text())
    saved["ort-cpu"]["passed"] = "edited"
    (run / "verify.json").write_text(json.dumps(saved))
    edited = runner.invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS])
    assert "  verify  done" in edited.output and json.loads((run / "verify.json").read_text())["ort-cpu"]["passed"] is True

    # another benchmark batch list redoes only the bench stage
    third = runner.invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path),
                                *ARGS[:-3], "--batch", "4", "--no-progress"])
    assert "  train   up to date" in third.output and "  bench   done" in third.output
    bench = json.loads((run / "bench.json").read_text())
    assert bench["batches"] == [4]
    # every stage ran on train.threads, bench's ONNX Runtime sessions too (it ran on 2 whatever the config said)
    assert {e["by_batch"]["4"]["execution"] for e in bench["runners"].values()} == {"CPU, 1 thread"}

    # keys that change how it runs, not what it trains, find the same run: nothing is trained again
    fourth = runner.invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS[:-3],
                                 "--set", "data.eval_batch_size=100", "--set", "description='other words'", "--batch",
                                 "4", "--no-progress"])
    assert fourth.exit_code == 0, fourth.output
    for stage in ("train", "export", "verify"):
        assert f"  {stage:<7} up to date" in fourth.output
    assert len(list((tmp_path / "digits").iterdir())) == 1
    # another thread count trains other weights on a CPU (another summation order): not this run
    from snncompile.config import load_config
    from snncompile.pipeline import find_run

    overrides = [ARGS[i + 1] for i, a in enumerate(ARGS) if a == "--set"]
    assert find_run(tmp_path, load_config(REPO / "models" / "digits.toml", overrides)) == run
    assert find_run(tmp_path, load_config(REPO / "models" / "digits.toml", [*overrides, "train.threads=2"])) is None


def test_pipeline_stream_adds_the_step_form_verified_and_timed_streamed(tmp_path):
    """--stream: the step form exported, verified streamed (every layer at every step, reference inputs and the
    test split) on the runners that stream it, benched streamed; up to date on a second run, exported again
    once its file is gone. Without --stream none of it runs."""
    runner = CliRunner()
    command = ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS]
    plain = runner.invoke(cli, command)
    assert plain.exit_code == 0 and "step" not in plain.output.split("test accuracy")[0], plain.output
    first = runner.invoke(cli, [*command, "--stream"])
    assert first.exit_code == 0, first.output
    for stage in ("train", "export", "verify", "bench"):
        assert f"  {stage:<7} up to date" in first.output  # the unrolled stages were done by the plain run
    for stage in ("step export", "step verify", "step bench"):
        assert f"  {stage} done" in first.output
    trt_unavailable = available_runners()["trt"]  # an engine of the step form, where TensorRT runs
    assert (f"  step build skipped: {trt_unavailable}" if trt_unavailable else "  step build done") in first.output
    assert re.search(r"verify ort-cpu:model_step.onnx@test: PASSED on 64 inputs, 0 spike flips \(0 real\)", first.output)
    assert "verify ort-cpu:model_step.onnx: PASSED on " in first.output and "torch-fast:model_step" not in first.output
    assert "model digits (model_step.onnx, streamed, one call per step), T = 3" in first.output
    assert "| ort-cpu | 2 |" in first.output.split("streamed, one call per step")[1]
    run = next((tmp_path / "digits").iterdir())
    assert {"model_step.onnx", "bench_model_step.json"} <= {p.name for p in run.iterdir()}

    second = runner.invoke(cli, [*command, "--stream"])
    assert second.exit_code == 0 and all(f"  {s} up to date" in second.output
                                         for s in ("step export", "step verify", "step bench")), second.output
    (run / "model_step.onnx").unlink()
    third = runner.invoke(cli, [*command, "--stream"])
    assert third.exit_code == 0 and "  step export done" in third.output, third.output


def test_pipeline_verifies_reference_inputs_when_the_test_split_is_gone(tmp_path, monkeypatch):
    # e.g. the dataset folder moved after training: verify says so and still checks the reference inputs
    import snncompile.compare as compare
    from snncompile.errors import DataError

    def gone(self, cfg, steps, progress):
        raise DataError("verify on the test set needs the run's dataset: data.root moved")

    monkeypatch.setattr(compare._TestSet, "__init__", gone)
    result = CliRunner().invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS])
    assert result.exit_code == 0, result.output
    assert "  verify  done (reference inputs only: verify on the test set needs the run's dataset: data.root moved)" in result.output
    assert "verify ort-cpu: PASSED" in result.output and "@test" not in result.output
    monkeypatch.undo()  # the dataset is back: the test split is checked now, not skipped as up to date
    again = CliRunner().invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS])
    assert again.exit_code == 0, again.output
    assert "  verify  done\n" in again.output and "verify ort-cpu@test: PASSED" in again.output


def test_pipeline_passes_over_init_runs_and_redoes_what_another_command_replaced(tmp_path):
    runner = CliRunner()
    digits = str(REPO / "models" / "digits.toml")
    settings = [a for a in ARGS[:-3]]  # the --set pairs
    init = runner.invoke(cli, ["init", digits, "--out", str(tmp_path), *settings])
    assert init.exit_code == 0, init.output
    (untrained,) = (tmp_path / "digits").iterdir()
    # same config hash, but `init` weights: the pipeline trains a run of its own instead of resuming them
    first = runner.invoke(cli, ["pipeline", digits, "--out", str(tmp_path), *ARGS])
    assert first.exit_code == 0, first.output
    assert "  train   done" in first.output and f"run: {untrained}\n" not in first.output
    (run,) = {p for p in (tmp_path / "digits").iterdir()} - {untrained}
    resumed = runner.invoke(cli, ["train", "--resume", str(untrained)])
    assert resumed.exit_code == 1 and "holds untrained weights" in resumed.output and "Traceback" not in resumed.output
    # a manual bench replaces bench.json (and writes verify.json entries of its own)
    manual = runner.invoke(cli, ["bench", str(run), "--runners", "ort-cpu", "--batch", "4", "--iters", "2"])
    assert manual.exit_code == 0, manual.output
    second = runner.invoke(cli, ["pipeline", digits, "--out", str(tmp_path), *ARGS])
    assert second.exit_code == 0, second.output
    assert "  verify  up to date" in second.output and "  bench   done" in second.output
    assert "| torch-fast | 2 |" in second.output and "| ort-cpu | 4 |" not in second.output
    assert "verify ort-cpu:model" not in second.output  # bench's own verify entries are not the pipeline's


def test_runs_started_in_one_second_are_ordered_by_their_counter():
    from pathlib import Path

    from snncompile.pipeline import _creation_order

    names = ["20261126-133019-9", "20261126-133020", "20261126-133019", "20261126-133019-10"]
    newest_first = sorted(names, key=lambda n: _creation_order(Path(n)), reverse=True)
    assert newest_first == ["20261126-133020", "20261126-133019-10", "20261126-133019-9", "20261126-133019"]


def test_a_damaged_run_of_the_same_config_stops_the_pipeline_instead_of_a_silent_retraining(tmp_path, digits_cfg):
    """A truncated manifest.json made the pipeline pass over its own run and train a new one without a word
    (hours, on a real model); a damaged run of another config is still passed over."""
    from snncompile.config import apply_overrides
    from snncompile.errors import ArtifactError
    from snncompile.pipeline import find_run
    from snncompile.train import train

    run = train(digits_cfg, tmp_path, stop_after=1, progress=False, echo=lambda s: None).run_dir
    manifest = run / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(ArtifactError, match=r"is a run of this config but cannot be read \(.*manifest.json.*\): repair "
                                            r"it, or move it out of .* to train a new one$"):
        find_run(tmp_path, digits_cfg)
    assert find_run(tmp_path, apply_overrides(digits_cfg, ["train.seed=5"])) is None
    manifest.write_text(json.dumps({"run_format": 0}))  # intact, of an older version: passed over, as before
    assert find_run(tmp_path, digits_cfg) is None


def test_pipeline_redoes_an_export_another_command_replaced_or_deleted(tmp_path):
    # `snncompile export RUN --T 2` rewrites model.onnx: the pipeline exports again instead of benching the T=2
    # model; a deleted reference file is exported again instead of failing verify
    runner = CliRunner()
    digits = str(REPO / "models" / "digits.toml")
    fast = [*ARGS[:-3], "--set", "train.epochs=1", "--batch", "1", "--no-progress"]
    first = runner.invoke(cli, ["pipeline", digits, "--out", str(tmp_path), *fast])
    assert first.exit_code == 0, first.output
    (run,) = (tmp_path / "digits").iterdir()
    manual = runner.invoke(cli, ["export", str(run), "--T", "2"])
    assert manual.exit_code == 0, manual.output
    again = runner.invoke(cli, ["pipeline", digits, "--out", str(tmp_path), *fast])
    assert again.exit_code == 0, again.output
    assert "  export  done" in again.output and "T = 3" in again.output
    assert json.loads((run / "manifest.json").read_text())["exports"]["model.onnx"]["T"] == 3
    (run / "reference_outputs.npz").unlink()
    (run / "metrics.jsonl").unlink()  # and the training plot cannot be drawn: said in one line, no reason to stop
    last = runner.invoke(cli, ["pipeline", digits, "--out", str(tmp_path), *fast])
    assert last.exit_code == 0, last.output
    assert "  export  done" in last.output and (run / "reference_outputs.npz").is_file()
    assert re.search(r"\n  plot    skipped: [^\n]*metrics.jsonl[^\n]*\n  export  done\n", last.output), last.output


def test_a_failing_plot_is_one_line_and_never_stops_the_pipeline(tmp_path, monkeypatch):
    import snncompile.plots as plots
    from snncompile.pipeline import _plot_training

    def broken(run):
        raise RuntimeError("no usable font\nsecond line")

    monkeypatch.setattr(plots, "plot_training", broken)
    assert _plot_training(tmp_path) == "skipped: RuntimeError: no usable font"


def test_ctrl_c_while_the_pipeline_trains_says_to_run_the_pipeline_again(tmp_path, monkeypatch):
    """It said `snncompile train --resume RUN`, which finishes the training but not the other stages."""
    import snncompile.train as trainer

    real = trainer._append_metrics

    def ctrl_c_in_epoch_2(path, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
        real(path, row)

    monkeypatch.setattr(trainer, "_append_metrics", ctrl_c_in_epoch_2)
    result = CliRunner().invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS])
    run = next((tmp_path / "digits").iterdir())
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == (f"error: pipeline interrupted in epoch 2: {run} keeps the checkpoint of "
                                              "epoch 1; run the same `snncompile pipeline` command again to go on from "
                                              "there")


def test_a_ctrl_c_in_the_first_epoch_leaves_no_run_behind(tmp_path, monkeypatch):
    """Each one left a run directory without weights, which the next pipeline passed over."""
    import snncompile.train as trainer

    def ctrl_c(path, row):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_append_metrics", ctrl_c)
    result = CliRunner().invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *ARGS])
    assert result.exit_code == 130 and not list((tmp_path / "digits").iterdir())
    assert result.stderr.splitlines()[-1].startswith("error: pipeline interrupted in epoch 1, before the first checkpoint")
    assert result.stderr.splitlines()[-1].endswith("is removed; run the same `snncompile pipeline` command again to go "
                                                   "on from there")
