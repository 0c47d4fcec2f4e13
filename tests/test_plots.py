"""Training curves: one run's PNG (recorded in its manifest), several runs labelled by how their configs
differ, and one-line errors for what cannot be plotted."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from snncompile.cli import cli  # noqa: E402
from snncompile.plots import plot_runs, run_labels  # noqa: E402
from snncompile.train import train  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The tiny digits config trained for 2 epochs with and without NeuNorm (same seed)."""
    from conftest import REPO
    from snncompile.config import load_config

    root = tmp_path_factory.mktemp("runs")
    base = ["train.epochs=2", "data.limit_train=128", "data.limit_test=64", "model.arch='8C3-AP2-16FC-Voting'",
            "model.T=2", "train.threads=1"]
    runs = []
    for neunorm in ("true", "false"):
        cfg = load_config(REPO / "models" / "digits.toml", [*base, f"model.neunorm={neunorm}"])
        runs.append(train(cfg, root, progress=False, echo=lambda s: None).run_dir)
    return runs


def test_labels_name_the_differing_config_keys(two_runs):
    assert run_labels(two_runs) == ["model.neunorm=True", "model.neunorm=False"]
    trained_twice = [two_runs[0].parent.parent / "again" / two_runs[0].name, two_runs[0]]  # same id, other folder
    trained_twice[0].mkdir(parents=True)
    for name in ("config.toml", "manifest.json"):
        (trained_twice[0] / name).write_bytes((two_runs[0] / name).read_bytes())
    assert run_labels(trained_twice) == [f"again/{two_runs[0].name}", f"digits/{two_runs[0].name}"]


def test_one_run_writes_training_png_into_the_run(two_runs):
    result = CliRunner().invoke(cli, ["plot", str(two_runs[0])])
    assert result.exit_code == 0, result.output
    png = two_runs[0] / "training.png"
    assert result.output.strip() == f"wrote {png}" and png.read_bytes().startswith(PNG)
    assert "training.png" in json.loads((two_runs[0] / "manifest.json").read_text())["artifacts"]


def test_one_runs_plot_draws_the_loss_on_a_log_axis_and_names_the_final_and_best_test_accuracy(two_runs, tmp_path,
                                                                                             monkeypatch):
    from snncompile import plots
    from snncompile.runs import read_metrics

    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    plots.plot_training(two_runs[0], tmp_path / "t.png")
    rows = read_metrics(two_runs[0] / "metrics.jsonl")
    best = max(rows, key=lambda r: r["test_acc"])
    ax_loss, ax_acc = drawn[0].axes
    assert ax_loss.get_yscale() == "log" and ax_acc.get_yscale() == "linear"
    assert ax_acc.get_title() == (f"test: {100 * rows[-1]['test_acc']:.2f} % at the end, best "
                                  f"{100 * best['test_acc']:.2f} % (epoch {best['epoch']})")
    labels = [t.get_text() for t in ax_loss.get_yticklabels() + ax_loss.get_yticklabels(minor=True) if t.get_text()]
    assert labels and not [t for t in labels if "^" in t], labels  # plain numbers, not 2x10^-3


def test_several_runs_on_shared_axes(two_runs, tmp_path, monkeypatch):
    out = tmp_path / "cmp.png"
    result = CliRunner().invoke(cli, ["plot", *map(str, two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG) and not list(tmp_path.glob(".*"))  # written atomically, no leftovers
    monkeypatch.chdir(tmp_path)  # the default lands in the current folder, not among the runs a glob would catch
    default = CliRunner().invoke(cli, ["plot", *map(str, two_runs), "--label", "on", "--label", "off"])
    assert default.exit_code == 0 and (tmp_path / "training_comparison.png").is_file()
    assert not (two_runs[0].parent / "training_comparison.png").exists()
    twice = CliRunner().invoke(cli, ["plot", str(two_runs[0]), str(two_runs[0].parent / ".." / "digits" / two_runs[0].name)])
    assert twice.exit_code == 1 and twice.output.startswith(f"error: the same run is given twice: {two_runs[0]} and ")
    assert plot_runs(two_runs, tmp_path / "x.png", ["a", "b"]).is_file()


def test_bad_input_is_one_line(two_runs, tmp_path):
    missing = CliRunner().invoke(cli, ["plot", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and missing.output.strip() == f"error: run directory not found: {tmp_path / 'nowhere'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["plot", str(empty)])
    assert result.output.strip() == f"error: {empty} has no finished epoch (metrics.jsonl is missing or empty)"
    from conftest import REPO
    from helpers import make_run, tiny_zoo_config

    untrained = make_run(tmp_path / "init", tiny_zoo_config(REPO / "models" / "digits.toml"))
    result = CliRunner().invoke(cli, ["plot", str(untrained)])
    assert result.output.strip() == (f"error: {untrained} holds untrained weights (from `snncompile init`): there are "
                                     "no curves to draw")
    (empty / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 0.5}\n{"epoch": 2, "te')  # a torn copy
    result = CliRunner().invoke(cli, ["plot", str(empty)])
    assert result.output.strip().startswith(f"error: {empty / 'metrics.jsonl'} is corrupt (not one JSON row per line)")
    (empty / "metrics.jsonl").write_text('{"epoch": 21}\n')  # a row without its figures: a KeyError in the plot
    result = CliRunner().invoke(cli, ["plot", str(empty)])
    assert result.output.strip().startswith(f"error: {empty / 'metrics.jsonl'} is corrupt (not one JSON row per line)")
    copy = tmp_path / "copy"  # a run whose manifest is corrupt: the error comes before training.png is replaced
    copy.mkdir()
    for name in ("metrics.jsonl", "config.toml"):
        (copy / name).write_bytes((two_runs[0] / name).read_bytes())
    (copy / "manifest.json").write_text("{not json")
    (copy / "training.png").write_bytes(b"earlier")
    result = CliRunner().invoke(cli, ["plot", str(copy)])
    assert result.exit_code == 1 and "manifest.json" in result.output and "\n" not in result.output.strip()
    assert (copy / "training.png").read_bytes() == b"earlier"
    labels = CliRunner().invoke(cli, ["plot", str(two_runs[0]), "--label", "a", "--label", "b"])
    assert labels.exit_code == 2 and "--label given 2 times for 1 run" in labels.output


def test_labels_leave_out_keys_that_change_only_how_a_run_executes(tmp_path):
    """Two runs with other frame-cache workers and folders were labelled with every such key: the legend
    overflowed. (Threads are not such a key: on a CPU they change the weights.)"""
    from conftest import REPO
    from helpers import make_run, tiny_zoo_config
    from snncompile.config import apply_overrides
    from snncompile.plots import run_labels

    base = tiny_zoo_config(REPO / "models" / "digits.toml")
    a = make_run(tmp_path / "a", apply_overrides(base, ["model.neunorm=true", "data.num_workers=1", "data.cache_dir=/x"]))
    b = make_run(tmp_path / "b", apply_overrides(base, ["model.neunorm=false", "data.num_workers=2", "data.cache_dir=/y"]))
    assert run_labels([a, b]) == ["model.neunorm=True", "model.neunorm=False"]
