"""Typed config: TOML loading, --set overrides, one-line errors with exit code 2."""

import re

import pytest
from click.testing import CliRunner

from conftest import REPO
from snncompile.cli import cli
from snncompile.config import Config, apply_overrides, dumps_toml, load_config
from snncompile.errors import ConfigError


def test_loads_zoo_entry_with_types():
    cfg = load_config(REPO / "models" / "digits.toml")
    assert cfg.name == "digits" and cfg.model.T == 4 and isinstance(cfg.train.lr, float)
    assert cfg.model.input_shape == [1, 8, 8]


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["train.lr=0.01", "train.epochs=3", "train.optimizer=sgd", "model.neunorm=true",
                                     "train.milestones=[2, 4]", "model.v_th=1"])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3 and cfg.train.optimizer == "sgd"
    assert cfg.model.neunorm is True and cfg.train.milestones == [2, 4]
    assert cfg.model.v_th == 1.0 and isinstance(cfg.model.v_th, float)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'"),
        ("nope.lr=0.1", "unknown config key 'nope.lr'"),
        ("train.epochs=2.5", "expects int"),
        ("train.epochs=true", "expects int"),
        ("model.neunorm=3", "expects bool"),
        ("model.arch=10", r"expects str, got 10 \(int\) \(quoted: --set model.arch='10'\)"),  # TOML read 10
        ("train.optimizer=rmsprop", "must be one of adam, sgd"),
        ("model.T=0", "model.T must be between 1 and 4096, got 0"),
        ("train.lr", "expects key=value"),
        ("data.test_fraction=0", r"data.test_fraction must be between 0 and 1 \(exclusive\), got 0.0"),
        ("data.test_fraction=1", "data.test_fraction must be between 0 and 1"),
        ("train.lr=-1", "train.lr must be a positive finite number, got -1.0"),
        ("train.lr=nan", "config key 'train.lr' must be a finite number, got nan"),
        ("model.a=nan", "config key 'model.a' must be a finite number, got nan"),  # `a <= 0` let nan through
        ("model.exact_input_max=inf", "config key 'model.exact_input_max' must be a finite number"),
        ("model.neunorm_u_init=-inf", "config key 'model.neunorm_u_init' must be a finite number"),
        ("train.threads=-1", r"train.threads must be >= 0 \(0: torch's default\), got -1"),
        ("data.std=[0]", r"data.std must be positive finite numbers, got \[0.0\]"),
        ("data.mean=[inf]", r"config key 'data.mean\[0\]' must be a finite number, got inf"),
        ("data.limit_train=-5", r"data.limit_train must be >= 0 \(0: all\), got -5"),
        ("data.limit_test=-1", "data.limit_test must be >= 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.split_seed=-1", r"data.split_seed must be in \[0, 2\^32\)"),
        ("train.seed=4294967296", r"train.seed must be in \[0, 2\^32\)"),
        ("train.momentum=-0.5", r"train.momentum must be in \[0, 1\)"),
        ("train.momentum=5", r"train.momentum must be in \[0, 1\) \(SGD diverges from 1 up\), got 5.0"),  # was taken
        ("train.weight_decay=-1e-4", "train.weight_decay must be >= 0"),
        ("train.gamma=0", r"train.gamma must be in \(0, 1\]"),
        ("train.gamma=5", r"train.gamma must be in \(0, 1\] \(the schedules decay the learning rate by it\)"),
        ("train.schedule=multistep", "train.schedule = 'multistep' needs train.milestones"),  # ran at a constant lr
        ("model.T=100000000000000000000", "model.T must be between 1 and 4096"),  # a traceback in torch's expand()
        ("model.v_th=-1", r"model.v_th must be > 0, got -1.0"),  # trained with every neuron always firing
        ("model.v_th=0", "model.v_th must be > 0"),
        ("data.mean=[0.5, 0.5]", r"data.mean has 2 values for the 1 channel\(s\) of model.input_shape \[1, 8, 8\]"),
        ("model.lr=0.01", r"unknown config key 'model.lr' \(it is a \[train\] key: train.lr; known in \[model\]"),
        ("train.milestones=[0, 3]", "train.milestones must be epochs >= 1"),
        ("model.classes=0", "model.classes must be >= 1"),
        ("model.input_shape=[64]", r"model.input_shape must be \[C, H, W\] with positive sizes, got \[64\]"),
        ("model.vote_group=0", "model.vote_group must be >= 1"),
        ("model.v_th=inf", "config key 'model.v_th' must be a finite number"),
    ],
)
def test_bad_override_is_one_line(override, words):
    with pytest.raises(ConfigError, match=words) as err:
        apply_overrides(Config(), [override])
    assert "\n" not in str(err.value)


def test_settings_that_only_look_valid_alone():
    """Accepted before, then wrong later: a pad that shifts 8x8 digits out of frame trained to chance, and an
    event dataset's data.mean was ignored; the wrong number of means blamed model.input_shape."""
    with pytest.raises(ConfigError, match=r"data.augment_pad 100 would shift 8x8 images mostly out of frame: at most 4"):
        apply_overrides(Config(), ["data.augment=shift", "data.augment_pad=100"])
    apply_overrides(Config(), ["data.augment=shift", "data.augment_pad=4"])
    with pytest.raises(ConfigError, match=r"data.std normalises images; nmnist frames are event counts"):
        apply_overrides(Config(), ["data.name=nmnist", "model.input_shape=[2, 34, 34]", "data.std=[0.5, 0.5]"])


def test_unknown_key_in_toml(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[model]\narch = "8C3-Voting"\nthreshold = 0.5\n')
    with pytest.raises(ConfigError, match="unknown config key 'model.threshold'"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "models" / "cifar10.toml", ["data.root=/tmp/x y"])
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(cfg))
    again = load_config(path)
    assert again == cfg and again.hash() == cfg.hash()


def test_cli_bad_override_exits_2_with_one_line():
    result = CliRunner().invoke(cli, ["train", str(REPO / "models" / "digits.toml"), "--set", "train.lrr=1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'train.lrr'")


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "", "..", "a\\b"])
def test_name_must_be_one_directory_name(name):
    """Runs go to <out>/<name>/: a name with a path in it would write outside --out."""
    with pytest.raises(ConfigError, match="name must be one directory name"):
        load_config(REPO / "models" / "digits.toml", [f"name={name!r}"])
    assert load_config(REPO / "models" / "digits.toml", ["name='my model-2.1'"]).name == "my model-2.1"


def test_any_text_round_trips_through_the_written_toml(tmp_path):
    """Characters beyond U+FFFF (JSON would write surrogate pairs, which TOML rejects), DEL, controls, quotes."""
    text = 'digits \U0001F642 \u00e9\u4e2d "q" \\ tab\t nl\n del\x7f nul\x00 \U0010FFFF'
    cfg = apply_overrides(Config(description=text), ["data.root='~/data \U0001F4C1'"])  # as `--set` gives it
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(cfg), encoding="ascii")  # plain ASCII whatever the text
    again = load_config(path)
    assert again.description == text and again == cfg and again.hash() == cfg.hash()
    with pytest.raises(ConfigError, match="'description' is not valid Unicode text"):
        apply_overrides(Config(), ["description=bad\udcff"])


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\u00e9"\n[model]\narch = "8C3-Voting"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 0xe9 at offset 18\); TOML files are UTF-8"):
        load_config(path)
    path.write_bytes('description = "caf\u00e9"\n[model]\narch = "8C3-Voting"\n'.encode("utf-8"))
    assert load_config(path).description == "caf\u00e9"


def test_a_model_toml_must_name_its_network(tmp_path):
    """An empty file, or one without [model], trained ModelConfig's default network for 10 epochs, unasked."""
    path = tmp_path / "no_model.toml"
    path.write_text('[data]\nname = "digits"\n')
    with pytest.raises(ConfigError, match=r"no_model.toml: no \[model\] arch: a model TOML names its network"):
        load_config(path)
    assert load_config(path, ["model.arch='8C3-AP2-16FC-Voting'"]).model.arch == "8C3-AP2-16FC-Voting"


def test_a_relative_data_root_is_stored_absolute(tmp_path, monkeypatch):
    """Stored as given, a relative root broke `train --resume` run from another directory (whose --set cannot change data.root)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "models" / "mnist.toml", ["data.root=../data/mnist", "data.cache_dir=frames"])
    assert cfg.data.root == str(tmp_path.parent / "data" / "mnist")
    assert cfg.data.cache_dir == str(tmp_path / "frames")  # else each directory a command ran in built its own cache
    assert load_config(REPO / "models" / "mnist.toml", ["data.cache_dir=~/frames"]).data.cache_dir == "~/frames"
    stored = tmp_path / "config.toml"
    stored.write_text(dumps_toml(cfg))
    monkeypatch.chdir(REPO)
    assert load_config(stored).data.root == cfg.data.root
    assert load_config(REPO / "models" / "digits.toml").data.root == ""  # no folder: left empty


def test_a_config_built_in_python_with_a_relative_root_is_recorded_absolute(tmp_path, monkeypatch):
    """apply_overrides alone keeps what it is given; the run's config.toml, written by train() or init_run(),
    must still find the data from another directory. The caller's Config is not changed."""
    from helpers import tiny_zoo_config
    from snncompile.init_run import init_run
    from snncompile.train import train

    monkeypatch.chdir(tmp_path)
    cfg = apply_overrides(tiny_zoo_config(REPO / "models" / "mnist.toml"), ["data.root=data/mnist"])
    assert cfg.data.root == "data/mnist"
    run, _ = init_run(cfg, tmp_path / "init")
    assert _stored_root(run) == str(tmp_path / "data" / "mnist")

    digits = load_config(REPO / "models" / "digits.toml", ["train.epochs=1", "data.limit_train=64", "data.limit_test=32",
                                                           "model.arch='8C3-AP2-16FC-Voting'", "model.T=2",
                                                           "train.threads=1"])
    digits = apply_overrides(digits, ["data.root=unused/by/digits"])
    result = train(digits, tmp_path / "train", progress=False, echo=lambda s: None)
    assert _stored_root(result.run_dir) == str(tmp_path / "unused" / "by" / "digits")
    assert cfg.data.root == "data/mnist" and digits.data.root == "unused/by/digits"


def _stored_root(run) -> str:
    """data.root as the run's config.toml holds it (load_config would make a relative one absolute itself)."""
    import tomllib

    return tomllib.loads((run / "config.toml").read_text())["data"]["root"]


def test_an_error_in_a_toml_file_names_the_file(tmp_path):
    """A run's config.toml edited by hand (a typo'd key) said "unknown config key 'train.bogus'", not where."""
    path = tmp_path / "config.toml"
    path.write_text((REPO / "models" / "digits.toml").read_text().replace("[train]", "[train]\nbogus = 1", 1))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: unknown config key 'train.bogus'"):
        load_config(path)
    with pytest.raises(ConfigError, match="^unknown config key 'train.nope'"):  # a --set names its own key
        load_config(REPO / "models" / "digits.toml", ["train.nope=1"])
