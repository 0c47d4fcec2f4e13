"""The command line: --help without extras, the main command end to end, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO
from snncompile.cli import cli

BLOCK_EXTRAS = """
import sys
BLOCKED = {'onnx', 'onnxruntime', 'onnxscript', 'tensorrt', 'tensorrt_rtx', 'tensorrt_bindings', 'tensorrt_rtx_bindings',
           'tonic', 'triton', 'matplotlib'}
class Hide:
    # Wraps every finder so the extras look absent, as on a machine without them: find_spec answers None
    # (importlib.util.find_spec probes, as torch's own import does, see nothing; `import x` raises
    # ModuleNotFoundError).
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import snncompile, snncompile.cli, snncompile.train, snncompile.models
from snncompile.cli import cli
sys.argv = ['snncompile', '--help']
cli()
"""


def test_help_works_with_no_extra_installed():
    out = subprocess.run([sys.executable, "-c", BLOCK_EXTRAS], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout


def test_train_command_end_to_end(tmp_path):
    result = CliRunner().invoke(cli, [
        "train", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), "--no-progress",
        "--set", "train.epochs=1", "--set", "data.limit_train=64", "--set", "data.limit_test=32",
        "--set", "model.arch='8C3-AP2-16FC-Voting'",
    ])
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output and "s wall; run:" in result.output
    assert len(list((tmp_path / "digits").iterdir())) == 1
    # the printed next steps run verbatim (the hint exported only --layers, and bench needs model.onnx)
    (hint,) = [line for line in result.output.splitlines() if line.startswith("next: ")]
    steps = [step.split() for step in hint.removeprefix("next: ").split(" && ")]
    assert [step[1] for step in steps] == ["export", "export", "verify", "bench"]
    for step in steps:
        extra = ["--iters", "3", "--warmup", "1", "--batch", "1"] if step[1] == "bench" else []
        done = CliRunner().invoke(cli, step[1:] + extra)
        assert done.exit_code == 0, (step, done.output)


def test_train_stopped_by_stop_after_says_it_is_not_final_and_how_to_go_on(tmp_path):
    """`--stop-after 1` of 2 epochs printed "final test accuracy ... after 1 epoch" and only the export hint."""
    tiny = ["--set", "data.limit_train=64", "--set", "data.limit_test=32", "--set", "model.arch='8C3-AP2-16FC-Voting'"]
    result = CliRunner().invoke(cli, ["train", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path),
                                      "--no-progress", "--set", "train.epochs=2", "--stop-after", "1", *tiny])
    assert result.exit_code == 0, result.output
    assert "final" not in result.output and "after 1 of 2 epochs (stopped by --stop-after)" in result.output
    (run,) = (tmp_path / "digits").iterdir()
    (go_on,) = [line for line in result.output.splitlines() if line.startswith("continue: ")]
    assert go_on == f"continue: snncompile train --resume {run}"
    resumed = CliRunner().invoke(cli, go_on.split()[2:] + ["--no-progress"])
    assert resumed.exit_code == 0 and "final test accuracy" in resumed.output and "after 2 epochs" in resumed.output


def test_missing_config_and_bad_resume_are_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["train", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: config file not found: {tmp_path / 'missing.toml'}"]
    r = runner.invoke(cli, ["train", "--resume", str(tmp_path)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "manifest.json is missing" in r.output


@pytest.mark.parametrize("model", ["mnist.toml", "cifar10.toml"])
def test_a_dataset_without_data_root_is_a_usage_error(tmp_path, model):
    """It is the config that lacks something, like every other config error (exit 2); it exited 1, as for a
    dataset folder that is missing or broken."""
    r = CliRunner().invoke(cli, ["train", str(REPO / "models" / model), "--set", "data.root=", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "needs data.root: --set data.root=/path/to/" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_unknown_verify_runner_is_a_usage_error_before_any_work(tmp_path):
    r = CliRunner().invoke(cli, ["verify", str(tmp_path), "--runner", "tensorflow"])  # tmp_path is no run: not read
    assert r.exit_code == 2
    assert "Invalid value for '--runner': 'tensorflow' is not one of 'torch', 'torch-fast'" in r.output


def test_export_says_why_it_saved_no_real_reference_inputs(tmp_path):
    """A run whose dataset is not where its config says exported "16 random + 0 real" and nothing more: a note
    on stderr now says why (and what else needs the data)."""
    from helpers import make_run
    from snncompile.config import load_config

    cfg = load_config(REPO / "models" / "mnist.toml", [f"data.root='{tmp_path / 'nowhere'}'", "model.T=2",
                                                       "model.arch='8C3-AP2-16FC-Voting'"])
    run = make_run(tmp_path, cfg)
    result = CliRunner().invoke(cli, ["export", str(run), "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "4 random + 0 real reference inputs" in result.stdout
    (note,) = result.stderr.splitlines()
    assert note.startswith("note: no real reference inputs (MNIST files missing in") and "verify --test-set" in note


def test_a_step_export_saves_the_reference_inputs_it_claims(tmp_path):
    """`export --form step` said "40 random + 0 real reference inputs" and saved none. It now saves them, for
    verify and bench to stream, in files of its own (the unrolled export's hold other outputs), and says what the
    export itself checked."""
    from helpers import make_run, tiny_zoo_config

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    result = CliRunner().invoke(cli, ["export", str(run), "--form", "step", "--samples", "40"])
    assert result.exit_code == 0, result.output
    # what the export compared, on the 32 inputs it takes, not the 40 saved
    assert ("40 random + 40 real reference inputs (verify and bench stream them, T calls each); cleaned vs raw graph: "
            "identical on 32 inputs" in result.stdout), result.stdout
    assert sorted(p.name for p in run.glob("reference_*")) == ["reference_inputs_step_n40-40.npz",
                                                               "reference_outputs_step_n40-40.npz"]
    with np.load(run / "reference_inputs_step_n40-40.npz") as inputs, np.load(run / "reference_outputs_step_n40-40.npz") as outputs:
        assert inputs["random"].shape[1] == inputs["real"].shape[1] == 40  # the digits ship with scikit-learn
        assert outputs["random/scores"].shape[0] == outputs["real/scores"].shape[0] == 40


def test_train_suggests_exporting_only_when_the_exports_are_not_of_its_checkpoint(tmp_path, digits_cfg):
    """`train --resume` of a finished run whose exports are current printed the whole export chain again; it
    now suggests verify and bench alone (the exports while either is missing or of another checkpoint)."""
    from snncompile.export_onnx import export_run
    from snncompile.train import train

    run = train(digits_cfg, tmp_path, progress=False, echo=lambda s: None).run_dir

    def next_line() -> str:
        result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--no-progress"])
        assert result.exit_code == 0, result.output
        return result.stdout.splitlines()[-1]

    assert next_line() == f"next: snncompile export {run} && snncompile export {run} --layers && " \
                          f"snncompile verify {run} && snncompile bench {run}"
    export_run(run, n_random=4, n_real=0)
    assert "export" in next_line()  # model_layers.onnx still missing
    export_run(run, layers=True, n_random=4, n_real=0)
    assert next_line() == f"next: snncompile verify {run} && snncompile bench {run}"
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["exports"]["model.onnx"]["checkpoint_sha256"] = "0" * 64  # exported from another checkpoint
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert "export" in next_line()
    manifest["artifacts"]["checkpoint.pt"] = "damaged"  # a hint must not turn a finished training into a traceback
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert next_line().startswith(f"next: snncompile export {run} && ")


def test_ctrl_c_is_one_line_and_exit_130_in_every_command(tmp_path, monkeypatch):
    """Interrupted while loading (a bare KeyboardInterrupt) or inside the exporter (an error wrapping one): one
    line and the shell's SIGINT code, not "Aborted!" with exit 1 or "torch.onnx.export failed"."""
    from helpers import make_run, tiny_zoo_config, wrapped_ctrl_c

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("snncompile.export_onnx.load_network", ctrl_c)
        bare = CliRunner().invoke(cli, ["export", str(run)])
    assert bare.exit_code == 130
    assert bare.stderr.splitlines() == ["error: interrupted: snncompile export stopped before it finished (artifacts "
                                        "are written whole or not at all; run it again to finish)"]

    monkeypatch.setattr("torch.onnx.export", wrapped_ctrl_c)
    inside = CliRunner().invoke(cli, ["export", str(run)])
    assert inside.exit_code == 130
    assert inside.stderr.splitlines() == [f"error: export interrupted: nothing of it was written; {run} is as it was"]

    # bench's subcommands sit in a nested group: its exit, which carries the Ctrl-C, was reported again by the
    # outer group ("snncompile run stopped", then "snncompile bench stopped")
    with monkeypatch.context() as m:
        m.setattr("snncompile.bench.bench_run", ctrl_c)
        m.setattr("snncompile.bench_train.bench_train", ctrl_c)
        for args, name in ((["bench", str(run)], "bench run"), (["bench", "train", str(REPO / "models" / "digits.toml")], "bench train")):
            interrupted = CliRunner().invoke(cli, args)
            assert interrupted.exit_code == 130
            assert interrupted.stderr.splitlines() == [f"error: interrupted: snncompile {name} stopped before it finished "
                                                       "(artifacts are written whole or not at all; run it again to finish)"]


def test_first_line_of_any_error():
    """One helper for every "first line of a third-party error": an empty message (IndexError in one copy of
    it) gives the type's name, a paragraph its first line, cut to the limit."""
    from snncompile.errors import described, first_line

    assert first_line(KeyError()) == "KeyError" and described(KeyError()) == "KeyError"
    assert first_line(ValueError("  bad shape\n  at line 3\n")) == "bad shape"
    assert described(RuntimeError("x" * 300), limit=5) == "RuntimeError: xxxxx"


def test_help_lists_every_command_with_a_whole_summary():
    """click cut each docstring at about 45 characters ("train  Train MODEL_TOML (e.g."), and `bench --help` hid
    that `bench RUN` is `bench run RUN`, whose options only `bench run --help` lists."""
    result = CliRunner().invoke(cli, ["--help"])
    commands = result.output.split("Commands:")[1].strip().splitlines()
    assert len(commands) == len(cli.commands)
    for line in commands:
        assert line.rstrip().endswith(".") and not line.rstrip().endswith("..."), line
    assert "`snncompile bench run --help` lists" in " ".join(CliRunner().invoke(cli, ["bench", "--help"]).output.split())
