"""Trainer: run directory contents, MSE loss, exact resume, weights-only checkpoints."""

import json

import pytest
import torch

from helpers import conv_input_channels
from snncompile.artifacts import read_manifest
from snncompile.config import apply_overrides
from snncompile.errors import ArtifactError, ConfigError, TrainingInterrupted
from snncompile.runs import CHECKPOINT, load_checkpoint, load_network, read_metrics
from snncompile.train import fuses_optimizer, load_optimizer_state, loss_fn, make_optimizer, train


def test_mse_loss_on_voted_rate_by_hand():
    scores = torch.tensor([[0.2, 0.6], [1.0, 0.0]])
    labels = torch.tensor([1, 0])
    # (0.2^2 + 0.4^2 + 0 + 0) / 4 = 0.05
    assert loss_fn(scores, labels, "mse").item() == pytest.approx(0.05)
    assert loss_fn(scores, labels, "ce").item() == pytest.approx(torch.nn.functional.cross_entropy(scores, labels).item())


def test_run_directory_contents(tmp_path, digits_cfg):
    result = train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    run = result.run_dir
    assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "config.toml", "metrics.jsonl", "manifest.json"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_acc"] == result.test_acc and rows[1]["train_loss"] < rows[0]["train_loss"]
    manifest = read_manifest(run)
    assert manifest["config_hash"] == digits_cfg.hash()
    assert set(manifest["artifacts"]) == {"checkpoint.pt", "config.toml", "metrics.jsonl"}
    cfg, net = load_network(run)
    assert cfg == digits_cfg and not net.training


def test_resume_reproduces_uninterrupted_run(tmp_path, digits_cfg):
    digits_cfg.model.dropout = 0.3  # the dropout RNG must be replayed too
    full = train(digits_cfg, tmp_path / "a", progress=False, echo=lambda s: None)
    part = train(digits_cfg, tmp_path / "b", stop_after=1, progress=False, echo=lambda s: None)
    assert load_checkpoint(part.run_dir / CHECKPOINT)["epoch"] == 1
    resumed = train(resume=part.run_dir, progress=False, echo=lambda s: None)
    a = load_checkpoint(full.run_dir / CHECKPOINT)
    b = load_checkpoint(resumed.run_dir / CHECKPOINT)
    assert b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines_a = (full.run_dir / "metrics.jsonl").read_text().splitlines()
    lines_b = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("train_seconds", "samples_per_s")} for r in rows]  # noqa: E731
    assert strip(lines_a) == strip(lines_b)

    said = []
    again = train(resume=resumed.run_dir, progress=False, echo=said.append)  # nothing left to train
    assert again.test_acc == full.test_acc and "nothing to train" in said[-1]
    assert not any(line.startswith("resuming") for line in said)  # not "resuming ..." and then nothing
    assert load_checkpoint(resumed.run_dir / CHECKPOINT)["epoch"] == 2


def test_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ArtifactError, match="corrupt or not an snncompile checkpoint") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage, words", [
    ({"model": {"stages.0.weight": 3}}, "its model is not a dict of named tensors"),
    ({"epoch": "two"}, "epoch 'two' is not a count"),
    ({"optimizer": [1]}, "its optimizer or scheduler state is not a dict"),
])
def test_a_hand_made_checkpoint_is_one_line(tmp_path, damage, words):
    """Each was a traceback in export or train --resume (AttributeError, ValueError)."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "epoch": 1, "model": {"w": torch.zeros(1)}, "optimizer": {}, "scheduler": {}, **damage}, path)
    with pytest.raises(ArtifactError, match=f"is not an snncompile checkpoint \\({words}\\)$"):
        load_checkpoint(path)


def test_resume_from_an_optimizer_state_of_another_network_is_one_line(tmp_path, digits_cfg):
    part = train(digits_cfg, tmp_path, stop_after=1, progress=False, echo=lambda s: None)
    state = load_checkpoint(part.run_dir / CHECKPOINT)
    torch.save({**state, "optimizer": {"state": {}, "param_groups": []}}, part.run_dir / CHECKPOINT)
    with pytest.raises(ArtifactError, match=r"checkpoint.pt does not fit this run's network and optimizer \(.*\): restore"):
        train(resume=part.run_dir, progress=False, echo=lambda s: None)


def test_checkpoint_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": {}, "payload": Evil()}, path)
    with pytest.raises(ArtifactError):
        load_checkpoint(path)


def test_a_plain_pickle_is_refused_without_torchs_warning_lines(tmp_path):
    """pickle.dump of a dict (protocol 4) printed torch's two-line "Detected pickle protocol 4" UserWarning before
    the one-line error."""
    import pickle
    import warnings

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"format": 1, "model": {}}, protocol=4))
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        with pytest.raises(ArtifactError, match="is corrupt or not an snncompile checkpoint"):
            load_checkpoint(path)
    assert [str(w.message) for w in given] == []


def test_failed_checkpoint_write_leaves_previous_file(tmp_path, monkeypatch, digits_cfg):
    result = train(digits_cfg, tmp_path, stop_after=1, progress=False, echo=lambda s: None)
    before = (result.run_dir / CHECKPOINT).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        train(resume=result.run_dir, progress=False, echo=lambda s: None)
    assert (result.run_dir / CHECKPOINT).read_bytes() == before
    assert not [p for p in result.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_crash_between_an_epochs_writes_leaves_no_gap_in_the_metrics(tmp_path, monkeypatch, digits_cfg):
    import snncompile.train as trainer

    cfg = apply_overrides(digits_cfg, ["train.epochs=3"])
    real = trainer._append_metrics

    def dies_at_epoch_2(path, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # killed while writing epoch 2's results
        real(path, row)

    monkeypatch.setattr(trainer, "_append_metrics", dies_at_epoch_2)
    with pytest.raises(TrainingInterrupted):  # the Ctrl-C, said in one line
        train(cfg, tmp_path, progress=False, echo=lambda s: None)
    monkeypatch.undo()
    (run,) = (tmp_path / "digits").iterdir()
    train(resume=run, progress=False, echo=lambda s: None)
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_train_threads_apply_to_training_only(digits_cfg, tmp_path):
    import torch

    from snncompile.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        digits_cfg.train.epochs = 1  # the fixture sets train.threads = 1
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("failure", ["device", "rendezvous"])
def test_train_threads_are_restored_when_setup_fails(failure, digits_cfg, tmp_path, monkeypatch):
    """train.threads is set first thing; a launch or device error before training must not leave it set."""
    import snncompile.train as trainer

    if failure == "device":
        def no_device(name, option=None):
            raise ConfigError("--set train.device=cuda asks for a CUDA GPU, but none is visible")

        monkeypatch.setattr(trainer, "resolve_device", no_device)
    else:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        for var in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    digits_cfg.train.threads = before + 1  # differs from the caller's count, whatever the machine has
    with pytest.raises(ConfigError):
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    assert torch.get_num_threads() == before


def test_channels_last_training_learns_the_same_network(tmp_path, digits_cfg):
    """train.channels_last only changes how conv weights and activations are laid out: the run trains to
    the same weights (to convolution rounding: NHWC and NCHW kernels sum in other orders) and its
    checkpoint loads into an ordinary network."""
    digits_cfg.model.arch = "8C3-8C3-AP2-32FC-Voting"
    plain = train(digits_cfg, tmp_path / "a", progress=False, echo=lambda s: None)
    digits_cfg.train.channels_last = True
    last = train(digits_cfg, tmp_path / "b", progress=False, echo=lambda s: None)
    a = load_checkpoint(plain.run_dir / CHECKPOINT)["model"]
    b = load_checkpoint(last.run_dir / CHECKPOINT)["model"]
    conv = next(k for k in b if k.endswith("weight") and b[k].dim() == 4 and b[k].shape[1] > 1)
    assert b[conv].is_contiguous(memory_format=torch.channels_last) and not b[conv].is_contiguous()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    cfg, net = load_network(last.run_dir)
    assert cfg.train.channels_last and abs(last.test_acc - plain.test_acc) <= 0.02


def test_padded_conv_channels_train_the_same_network_with_unpadded_weights(tmp_path, digits_cfg, monkeypatch):
    """train.pad_conv_channels = 8: the digits' 1-channel input conv runs on 8 channels during training,
    and the run trains to the same weights (to summation order), stored at their real shapes."""
    seen = conv_input_channels(monkeypatch)
    digits_cfg.train.epochs = 1
    plain = train(digits_cfg, tmp_path / "a", progress=False, echo=lambda s: None)
    assert seen and set(seen) == {1}
    seen.clear()
    digits_cfg.train.pad_conv_channels = 8
    padded = train(digits_cfg, tmp_path / "b", progress=False, echo=lambda s: None)
    assert set(seen) == {8}
    a = load_checkpoint(plain.run_dir / CHECKPOINT)["model"]
    b = load_checkpoint(padded.run_dir / CHECKPOINT)["model"]
    for key in a:
        assert b[key].shape == a[key].shape
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    with pytest.raises(ConfigError, match="pad_conv_channels must be >= 1"):
        apply_overrides(digits_cfg, ["train.pad_conv_channels=0"])


def test_cudnn_autotuning_follows_the_config_during_training_and_is_restored(monkeypatch, tmp_path, digits_cfg):
    """train.cudnn_benchmark (default on) is what cuDNN sees while the run trains; the process's own
    setting comes back after, whichever way the run ends."""
    import snncompile.train as train_module

    seen = []
    monkeypatch.setattr(train_module, "_train", lambda *args: seen.append(torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.benchmark
    assert train_module.Config().train.cudnn_benchmark is True
    for setting in (True, False):
        digits_cfg.train.cudnn_benchmark = setting
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
        assert torch.backends.cudnn.benchmark == before
    assert seen == [True, False]


def test_a_run_killed_after_its_last_checkpoint_still_reports_its_accuracy(tmp_path, monkeypatch, digits_cfg):
    """The manifest's training summary and metrics hash follow every checkpoint; one killed between its last
    checkpoint and that update is summarised from metrics.jsonl when resumed with nothing left to train."""
    import snncompile.train as trainer
    from snncompile.artifacts import sha256_file

    real = trainer._save_checkpoint

    def killed_after_epoch_2(run_dir, net, opt, sched, epoch, cfg):
        real(run_dir, net, opt, sched, epoch, cfg)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_checkpoint", killed_after_epoch_2)
    with pytest.raises(TrainingInterrupted):  # the Ctrl-C, said in one line
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    monkeypatch.undo()
    (run,) = (tmp_path / "digits").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert read_manifest(run)["training"]["test_acc"] == rows[0]["test_acc"]  # epoch 1's, written with its checkpoint
    said = []
    again = train(resume=run, progress=False, echo=said.append)
    assert "nothing to train" in said[-1] and again.test_acc == rows[1]["test_acc"]
    manifest = read_manifest(run)
    assert manifest["training"]["epochs_done"] == 2 and manifest["training"]["test_acc"] == rows[1]["test_acc"]
    assert manifest["artifacts"]["metrics.jsonl"]["sha256"] == sha256_file(run / "metrics.jsonl")


def test_an_exact_model_is_evaluated_in_fp32_whatever_the_training_precision(digits_cfg):
    """model.exact: the accuracy reported for a checkpoint is the exact network's, so evaluation runs without
    the bf16 autocast of training, with TF32 and cuDNN off (flags read on the CPU too)."""
    from torch import nn

    from snncompile.data import load_dataset
    from snncompile.models import network_from_config
    from snncompile.train import evaluate

    class Spy(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.seen = net, set()

        def forward(self, x):
            self.seen.add((torch.is_autocast_enabled("cpu"), torch.backends.cudnn.allow_tf32,
                           torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.enabled))
            return self.net(x)

    digits_cfg.train.precision = "bf16"
    data = load_dataset(digits_cfg, progress=False)
    for exact, expected in ((False, (True,)), (True, (False, False, False, False))):
        digits_cfg.model.exact = exact
        spy = Spy(network_from_config(digits_cfg.model))
        evaluate(spy, data.test, digits_cfg, torch.device("cpu"), data.static)
        assert {seen[: len(expected)] for seen in spy.seen} == {expected}, exact


def test_an_empty_test_split_is_one_line_before_training(tmp_path, digits_cfg):
    # in range, yet no sample held out: this divided by zero after a whole epoch
    cfg = apply_overrides(digits_cfg, ["data.test_fraction=0.0001"])
    with pytest.raises(ConfigError, match="digits's test split is empty: raise data.test_fraction or data.limit_test"):
        train(cfg, tmp_path, progress=False, echo=lambda s: None)
    assert not (tmp_path / "digits").exists()


def test_fewer_model_classes_than_the_dataset_has_is_one_line_before_training(tmp_path, digits_cfg):
    cfg = apply_overrides(digits_cfg, ["model.classes=8"])
    with pytest.raises(ConfigError, match="digits has 10 classes but model.classes = 8: set model.classes = 10"):
        train(cfg, tmp_path, progress=False, echo=lambda s: None)
    assert not (tmp_path / "digits").exists()


def test_ctrl_c_says_which_checkpoint_survived_and_how_to_continue(tmp_path, digits_cfg, monkeypatch):
    """After a Ctrl-C the CLI printed only click's "Aborted!"; now one line names the surviving checkpoint and
    the command (checkpoints are written between epochs, atomically), and that command works."""
    import snncompile.train as t

    real = t._epoch_order

    def interrupt_in(epoch_to_stop):
        def order(n, cfg, epoch, ctx):
            if epoch == epoch_to_stop:
                raise KeyboardInterrupt
            return real(n, cfg, epoch, ctx)
        return order

    monkeypatch.setattr(t, "_epoch_order", interrupt_in(2))
    with pytest.raises(TrainingInterrupted) as err:
        train(digits_cfg, tmp_path / "a", progress=False, echo=lambda s: None)
    (run,) = (tmp_path / "a" / "digits").iterdir()
    assert str(err.value) == (f"interrupted in epoch 2: {run} keeps the checkpoint of epoch 1; continue with "
                              f"`snncompile train --resume {run}`") and err.value.exit_code == 130
    monkeypatch.setattr(t, "_epoch_order", real)
    assert train(resume=run, progress=False, echo=lambda s: None).epochs_done == 2

    monkeypatch.setattr(t, "_epoch_order", interrupt_in(1))
    with pytest.raises(TrainingInterrupted) as err:
        train(digits_cfg, tmp_path / "b", progress=False, echo=lambda s: None)
    # nothing worth keeping: the run dir goes (each early Ctrl-C left one more run without weights)
    assert not list((tmp_path / "b" / "digits").iterdir())
    assert str(err.value).startswith("interrupted in epoch 1, before the first checkpoint: ")
    assert str(err.value).endswith(" is removed; run the same command again")


def test_a_run_that_died_in_its_first_epoch_starts_again_but_a_finished_one_is_never_overwritten(
        tmp_path, digits_cfg, monkeypatch):
    """A crash in epoch 1 leaves a run without a checkpoint: `train --resume` starts it again where it is. A run
    whose checkpoint was deleted after epochs finished, or an init run without one, is refused: starting over
    would truncate its metrics and overwrite its record."""
    import snncompile.train as t
    from snncompile.exports import missing_export

    real = t._epoch_order

    def crash(n, cfg, epoch, ctx):  # a process killed outright (SIGKILL, the machine gone) runs no cleanup:
        raise SystemExit(137)  # as it leaves the run (an exception removes the run it made, as a Ctrl-C does)

    monkeypatch.setattr(t, "_epoch_order", crash)
    with pytest.raises(SystemExit):
        train(digits_cfg, tmp_path / "a", progress=False, echo=lambda s: None)
    (early,) = (tmp_path / "a" / "digits").iterdir()
    assert str(missing_export(early, "model.onnx")) == (f"{early} has no checkpoint: it was stopped before its first "
                                                        f"epoch ended; `snncompile train --resume {early}` starts it again")
    monkeypatch.setattr(t, "_epoch_order", real)
    said = []
    again = train(resume=early, progress=False, echo=said.append)
    assert said[0] == f"starting {early} again at epoch 1 (it was stopped before any epoch finished)"
    assert again.run_dir == early and again.epochs_done == 2 and list((tmp_path / "a" / "digits").iterdir()) == [early]
    fresh = train(digits_cfg, tmp_path / "c", progress=False, echo=lambda s: None)  # the same seed from the start
    assert [r["test_acc"] for r in read_metrics(early / "metrics.jsonl")] == [
        r["test_acc"] for r in read_metrics(fresh.run_dir / "metrics.jsonl")]

    (early / "checkpoint.pt").unlink()  # finished epochs, checkpoint deleted: never started over
    refused = (f"{early / 'checkpoint.pt'} is missing: restore it from a copy, or `snncompile train {early / 'config.toml'}` again "
               "into a new run")
    with pytest.raises(ArtifactError) as err:
        train(resume=early, progress=False, echo=lambda s: None)
    assert str(err.value) == refused and len(read_metrics(early / "metrics.jsonl")) == 2
    assert str(missing_export(early, "model.onnx")) == refused  # export's advice too, not "train --resume"


def test_resume_may_change_how_the_run_executes_but_not_what_it_trains(tmp_path, digits_cfg, monkeypatch):
    """--resume took no --set: a run could not go on with its frame cache moved, or fewer evaluation samples at
    once. Those settings may change now; anything that changes the weights (the thread count too) is a one-line
    error naming it."""
    import snncompile.train as t
    from click.testing import CliRunner
    from snncompile.cli import cli

    part = train(digits_cfg, tmp_path, stop_after=1, progress=False, echo=lambda s: None)
    changed = CliRunner().invoke(cli, ["train", "--resume", str(part.run_dir), "--set", "model.T=4", "--set",
                                       "train.lr=0.1", "--set", "train.threads=2", "--no-progress"])
    assert changed.exit_code == 2 and changed.output.strip() == (
        "error: a resumed run keeps its own config; only description, data.num_workers, data.cache_dir, "
        "data.eval_batch_size, train.compact_spikes, data.root may differ, not model.T, train.lr, train.threads")
    sizes = []
    real_batches = t.batches
    monkeypatch.setattr(t, "batches", lambda split, size, *a, **k: sizes.append(size) or real_batches(split, size, *a, **k))
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(part.run_dir), "--set", "data.eval_batch_size=50",
                                       "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert set(sizes) == {50} and "resuming" in resumed.output and "after 2 epochs" in resumed.output


def test_resume_with_a_corrupt_metrics_file_is_one_line(tmp_path, digits_cfg):
    part = train(digits_cfg, tmp_path, stop_after=1, progress=False, echo=lambda s: None)
    (part.run_dir / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 0.5')  # truncated: a traceback before
    with pytest.raises(ArtifactError, match=r"metrics.jsonl is corrupt \(not one JSON row per line\): move it aside"):
        train(resume=part.run_dir, progress=False, echo=lambda s: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_cuda_without_one_names_the_option_the_user_gave():
    """bench train --device cuda said `use --set train.device=cpu`, an option bench train does not read."""
    from snncompile.train import resolve_device

    with pytest.raises(ConfigError, match=r"^--set train.device=cuda asks for a CUDA GPU, but none is visible: use "
                                          r"--set train.device=cpu$"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^--device cuda asks for a CUDA GPU, but none is visible: use --device cpu$"):
        resolve_device("cuda", "--device ")
    with pytest.raises(ConfigError, match=r"resume it on a machine with one$"):  # --resume cannot change the device
        resolve_device("cuda", None)


@pytest.mark.parametrize("overrides, note", [
    (["train.schedule=multistep", "train.milestones=[2, 9]", "train.epochs=3"], None),
    (["train.schedule=multistep", "train.milestones=[3, 9]", "train.epochs=3"],
     "note: train.milestones [3, 9] are all at or past the last epoch (train.epochs = 3): the learning rate stays "),
    (["train.schedule=step", "train.milestones=[2]", "train.epochs=3"], None),
    (["train.schedule=step", "train.milestones=[5, 1]", "train.epochs=3"], "are all at or past the last epoch"),
    (["train.schedule=cosine", "train.milestones=[1]"], "note: train.milestones [1] are not read by train.schedule = 'cosine'"),
    (["train.schedule=step"], None),
])
def test_milestones_that_never_act_are_noted(digits_cfg, overrides, note):
    """A shortened run of a multistep config (cifar10's [35, 70, 105] at train.epochs=1) trained at a constant
    rate without a word; it is allowed (a smoke test), but said."""
    from snncompile.train import _unused_milestones_note

    got = _unused_milestones_note(apply_overrides(digits_cfg, overrides))
    assert got == note if note is None else got.startswith(note) or note in got


def test_training_says_when_its_milestones_never_act(tmp_path, digits_cfg):
    lines = []
    cfg = apply_overrides(digits_cfg, ["train.schedule=multistep", "train.milestones=[35, 70]", "train.epochs=1"])
    train(cfg, tmp_path, progress=False, echo=lines.append)
    assert any("train.milestones [35, 70] are all at or past the last epoch (train.epochs = 1)" in s for s in lines)


def test_a_diverged_epoch_is_never_checkpointed(tmp_path, digits_cfg, monkeypatch):
    """SGD at lr 1e30 left NaN weights, exit 0 and a "final test accuracy"; their export verified PASSED (both
    sides computed the same NaN network). Now the epoch is not saved and the error says what was kept."""
    import snncompile.train as t
    from snncompile.errors import TrainingDiverged

    from conftest import REPO
    from snncompile.config import load_config

    # the README's digits network (the shrunk test one stays finite at this rate)
    cfg = load_config(REPO / "models" / "digits.toml", ["train.optimizer=sgd", "train.lr=1e30", "train.epochs=1",
                                                        "train.threads=1"])
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 1 \(.*\): .* is removed; lower train.lr"):
        train(cfg, tmp_path, progress=False, echo=lambda s: None)
    assert not any((tmp_path / "digits").iterdir())  # the run dir this call made, nothing in it worth keeping
    checks = iter([True, False])  # epoch 1 fine, epoch 2 diverges
    monkeypatch.setattr(t, "_finite", lambda loss, net: next(checks))
    with pytest.raises(TrainingDiverged, match=r"epoch 2 .*: not saved, .* keeps the checkpoint of epoch 1; lower"):
        train(apply_overrides(digits_cfg, ["train.epochs=2"]), tmp_path, progress=False, echo=lambda s: None)
    (run,) = (tmp_path / "digits").iterdir()
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 1 and [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]


def test_resume_refuses_a_config_toml_edited_in_train_or_data(tmp_path, digits_cfg):
    """Editing train.lr and train.epochs in config.toml, then --resume, trained one more epoch at rate 0 (the
    finished cosine schedule came back from the checkpoint), rewrote the checkpoint with identical weights and
    left the manifest's old config hash. data.root may change (the data moved)."""
    from snncompile.config import dumps_toml
    from snncompile.runs import load_run_config

    part = train(apply_overrides(digits_cfg, ["train.schedule=cosine"]), tmp_path, stop_after=1, progress=False,
                 echo=lambda s: None)
    before = (part.run_dir / CHECKPOINT).read_bytes()
    edited = apply_overrides(load_run_config(part.run_dir), ["train.lr=0.5", "train.epochs=3"])
    (part.run_dir / "config.toml").write_text(dumps_toml(edited))
    with pytest.raises(ArtifactError, match=r"checkpoint.pt was not trained with .*config.toml: train.epochs = 3 \(trained "
                                          r"with 2\); train.lr = 0.5 \(trained with 0.003\) \(config.toml edited"):
        train(resume=part.run_dir, progress=False, echo=lambda s: None)
    assert (part.run_dir / CHECKPOINT).read_bytes() == before
    moved = apply_overrides(edited, ["train.lr=0.003", "train.epochs=2", f"data.root='{tmp_path}'"])
    (part.run_dir / "config.toml").write_text(dumps_toml(moved))
    assert train(resume=part.run_dir, progress=False, echo=lambda s: None).epochs_done == 2


def test_a_run_is_trained_by_one_process_at_a_time(tmp_path, digits_cfg):
    """Two `train --resume` of one run both trained, overwrote each other's checkpoints and wrote every epoch
    twice into metrics.jsonl. The lock is config.toml's flock, held by another process here."""
    import fcntl
    import subprocess
    import sys

    part = train(digits_cfg, tmp_path, stop_after=1, progress=False, echo=lambda s: None)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(part.run_dir / "config.toml")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArtifactError, match=r"is being trained by another process: wait for it to finish"):
            train(resume=part.run_dir, progress=False, echo=lambda s: None)
    finally:
        holder.kill()
        holder.wait()
    assert [r["epoch"] for r in read_metrics(part.run_dir / "metrics.jsonl")] == [1]
    assert train(resume=part.run_dir, progress=False, echo=lambda s: None).epochs_done == 2
    with open(part.run_dir / "config.toml") as f:  # released when training ends
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_checkpoint_copied_in_from_another_run_is_not_taken_for_this_runs(tmp_path, digits_cfg):
    """Another seed's checkpoint copied over a run's exported, and verified, as this run's under its accuracy."""
    import shutil

    from snncompile.runs import load_network

    ours = train(digits_cfg, tmp_path / "a", stop_after=1, progress=False, echo=lambda s: None).run_dir
    theirs = train(apply_overrides(digits_cfg, ["train.seed=1"]), tmp_path / "b", stop_after=1, progress=False,
                   echo=lambda s: None).run_dir
    load_network(ours)
    shutil.copy(theirs / CHECKPOINT, ours / CHECKPOINT)
    with pytest.raises(ArtifactError, match=r"checkpoint.pt was not trained with .*config.toml: train.seed = 0 \(trained "
                                          r"with 1\) \(config.toml edited since, or the checkpoint copied from another"):
        load_network(ours)


def test_resuming_a_finished_run_rewrites_nothing(tmp_path, digits_cfg):
    """It rewrote metrics.jsonl with the same rows, and so failed on a read-only mount with nothing to train."""
    run = train(digits_cfg, tmp_path, progress=False, echo=lambda s: None).run_dir
    before = {name: (run / name).stat().st_ino for name in ("metrics.jsonl", "manifest.json", CHECKPOINT)}
    assert train(resume=run, progress=False, echo=lambda s: None).epochs_done == 2
    # an atomic rewrite is a new file
    assert {name: (run / name).stat().st_ino for name in before} == before


def test_a_finished_runs_metrics_edited_since_are_not_recorded_as_its_own(tmp_path, digits_cfg):
    """`train --resume` of a finished run whose last metrics row was edited (test_acc 1.0) printed "final test
    accuracy 100.00 %" and wrote it into the manifest, the edited file's hash with it."""
    run = train(digits_cfg, tmp_path, progress=False, echo=lambda s: None).run_dir
    before = read_manifest(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["test_acc"] = 1.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ArtifactError, match=rf"metrics.jsonl: epoch 2's row says test acc 1.0, but training recorded "
                                            rf"{before['training']['test_acc']!r}: the file was edited since"):
        train(resume=run, progress=False, echo=lambda s: None)
    assert read_manifest(run) == before
    rows[-1]["test_acc"], rows[-1]["test_loss"] = before["training"]["test_acc"], 0.5  # only the loss: named as such
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ArtifactError, match=r"epoch 2's row says test loss 0.5, but training recorded [\d.e-]+: the"):
        train(resume=run, progress=False, echo=lambda s: None)


def test_a_run_being_trained_fresh_is_not_resumed_meanwhile(tmp_path, digits_cfg, monkeypatch):
    """Only resumed runs held the lock: a `train --resume` of a run that `train MODEL.toml` was still training
    trained it too (every epoch twice in metrics.jsonl)."""
    import snncompile.train as t

    refused = []
    real_append = t._append_metrics

    def append_then_try_to_resume(path, row):
        real_append(path, row)
        if not refused:
            with pytest.raises(ArtifactError, match="is being trained by another process") as err:
                train(resume=path.parent, progress=False, echo=lambda s: None)
            refused.append(str(err.value))

    monkeypatch.setattr(t, "_append_metrics", append_then_try_to_resume)
    run = train(digits_cfg, tmp_path, progress=False, echo=lambda s: None).run_dir
    assert refused and [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_a_config_key_a_later_version_adds_or_a_new_name_is_no_difference(tmp_path, digits_cfg):
    """Compared key by key over what the checkpoint recorded: one more [train] key in a later version would
    otherwise refuse every run trained before it; the run's name changes no weight."""
    from snncompile.config import dumps_toml
    from snncompile.runs import load_network, load_run_config

    run = train(digits_cfg, tmp_path, stop_after=1, progress=False, echo=lambda s: None).run_dir
    state = load_checkpoint(run / CHECKPOINT)
    del state["trained_config"]["train.seed"]  # as if this version had no such key yet
    torch.save(state, run / CHECKPOINT)
    (run / "config.toml").write_text(dumps_toml(apply_overrides(load_run_config(run), ["name=renamed"])))
    cfg, net = load_network(run)  # refused, it raises
    assert cfg.name == "renamed"
    assert {k: v.tolist() for k, v in net.state_dict().items()} == {k: v.tolist() for k, v in state["model"].items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_fused_optimizer_update_is_the_default_one_to_rounding_and_resumes_keep_their_own_kernel(digits_cfg,
                                                                                                      optimizer):
    """train.fused_optimizer (on by default) picks torch's fused update on CUDA only; it updates like the default
    one up to rounding. A checkpoint's optimizer state brings its groups' kernel flags along: resumed, the
    optimizer keeps the kernel this machine chose (where Adam's step counts go is a GPU question: the next test)."""
    digits_cfg.train.optimizer = optimizer
    assert fuses_optimizer(digits_cfg, torch.device("cuda")) and not fuses_optimizer(digits_cfg, torch.device("cpu"))
    digits_cfg.train.fused_optimizer = False
    assert not fuses_optimizer(digits_cfg, torch.device("cuda"))

    def params():
        torch.manual_seed(1)
        return [torch.randn(64, 9, requires_grad=True), torch.randn(10, requires_grad=True)]

    default, fused = params(), params()
    opt_default, opt_fused = make_optimizer(default, digits_cfg), make_optimizer(fused, digits_cfg, fused=True)
    assert opt_fused.param_groups[0]["fused"] is True and not opt_default.param_groups[0]["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in default]
        for group, opt in ((default, opt_default), (fused, opt_fused)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(default, fused):
        assert not torch.equal(a, params()[0 if a.dim() == 2 else 1])  # it did update
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)

    for saved, fused_here in ((opt_default.state_dict(), True), (opt_fused.state_dict(), False)):
        here = params()
        opt = make_optimizer(here, digits_cfg, fused=fused_here)
        load_optimizer_state(opt, saved)
        assert bool(opt.param_groups[0]["fused"]) is fused_here and opt.param_groups[0]["foreach"] is None
        assert opt.param_groups[0]["lr"] == digits_cfg.train.lr
        if optimizer == "adam":
            step = opt.state[here[0]]["step"]
            assert step.dtype == torch.float32 and float(step) == 3.0 and step.device.type == "cpu"
        for p in here:
            p.grad = torch.ones_like(p)
        opt.step()  # the other kernel runs on the loaded state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_a_resumed_adam_keeps_its_step_counts_where_its_kernel_wants_them(digits_cfg):
    """Adam's step counts live on the CPU for torch's default update and on the parameter's device for the fused
    one. A state saved by either, loaded into the other, has them moved (torch's loader would follow the saved
    groups' flags instead), and the update runs on it."""
    def params():
        torch.manual_seed(1)
        return [torch.randn(64, 9, device="cuda", requires_grad=True)]

    def stepped(fused: bool):
        here = params()
        opt = make_optimizer(here, digits_cfg, fused=fused)
        here[0].grad = torch.ones_like(here[0])
        opt.step()
        return opt

    for saved_fused, fused_here in ((False, True), (True, False)):
        here = params()
        opt = make_optimizer(here, digits_cfg, fused=fused_here)
        load_optimizer_state(opt, stepped(saved_fused).state_dict())
        step = opt.state[here[0]]["step"]
        assert step.dtype == torch.float32 and float(step) == 1.0
        assert step.device.type == ("cuda" if fused_here else "cpu")
        here[0].grad = torch.ones_like(here[0])
        opt.step()
        assert float(opt.state[here[0]]["step"]) == 2.0


def test_compact_spikes_off_trains_the_same_weights_without_packing(tmp_path, digits_cfg, monkeypatch):
    """train.compact_spikes = false: the trainer keeps saved spikes as they are; packing them to uint8 is
    exact, so the run trains to the same weights bit for bit (and may be resumed either way)."""
    import snncompile.train as train_module
    from snncompile.memory import SavedActivations

    packs = []

    class Spy(SavedActivations):
        def __init__(self, compact: bool = True):
            packs.append(compact)
            super().__init__(compact)

    monkeypatch.setattr(train_module, "SavedActivations", Spy)
    digits_cfg.train.epochs = 1
    digits_cfg.train.device = "cpu"  # bit for bit where training is deterministic: cuDNN's sums may vary per run
    packed = train(digits_cfg, tmp_path / "a", progress=False, echo=lambda s: None)
    assert packs and set(packs) == {True}
    packs.clear()
    digits_cfg.train.compact_spikes = False
    unpacked = train(digits_cfg, tmp_path / "b", progress=False, echo=lambda s: None)
    assert packs and set(packs) == {False}
    a = load_checkpoint(packed.run_dir / CHECKPOINT)["model"]
    b = load_checkpoint(unpacked.run_dir / CHECKPOINT)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_out_of_memory_in_the_first_epoch_is_one_line_and_leaves_no_run(tmp_path, digits_cfg, monkeypatch):
    """The CPU allocator's RuntimeError was a traceback, and the run directory it made (config.toml and
    manifest.json, no weights) stayed behind, as after any failure of epoch 1 (only a Ctrl-C cleaned up)."""
    import snncompile.train as t
    from snncompile.errors import OutOfMemory

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(t, "_train_epoch", no_memory)
    with pytest.raises(OutOfMemory) as err:
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    assert not any((tmp_path / "digits").iterdir())  # new_run_dir made it; nothing of it is left
    assert str(err.value).startswith("out of memory in epoch 1 (24.4 GiB asked of the host): lower data.batch_size "
                                     f"(now {digits_cfg.data.batch_size}) or the network's size; ")
    assert str(err.value).endswith(" is removed")

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(t, "_train_epoch", bug)
    with pytest.raises(ValueError, match="a bug"):  # a bug keeps its traceback; its half-made run is gone too
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    assert not any((tmp_path / "digits").iterdir())


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(tmp_path, digits_cfg, monkeypatch):
    """A full disk made torch's zip writer raise "unexpected pos N vs M", a traceback; in epoch 1 it left a run
    with a metrics row and no checkpoint, which --resume then called missing."""
    import snncompile.train as t

    real_save = torch.save
    saves = []

    def fails_second(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1025472 vs 1025360")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(t.torch, "save", fails_second)
    with pytest.raises(ArtifactError) as err:
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    (run,) = (tmp_path / "digits").iterdir()
    assert str(err.value) == (f"could not write {run / 'checkpoint.pt'} ([enforce fail at inline_container.cc:672] . "
                              "unexpected pos 1025472 vs 1025360): is the disk full? the previous checkpoint is kept")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    saves.clear()
    saves.append(1)  # the first save of a new run fails: no epoch is saved, and the run is removed
    with pytest.raises(ArtifactError, match=r"is the disk full\? no epoch is saved; .* is removed$"):
        train(digits_cfg, tmp_path / "b", progress=False, echo=lambda s: None)
    assert not any((tmp_path / "b" / "digits").iterdir())


def test_resume_finds_a_moved_dataset_through_set_data_root(tmp_path):
    """The checkpoint's config check lets data.root differ (the data moved), but `train --resume --set
    data.root=NEW` was refused: only hand-editing the run's config.toml went on."""
    from click.testing import CliRunner
    from conftest import REPO
    from snncompile.cli import cli
    from snncompile.config import load_config

    shared = REPO.parent / "shared" / "data" / "mnist"
    if not shared.is_dir():
        pytest.skip("the real MNIST files are not beside the checkout")
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    for f in shared.iterdir():
        (old / f.name).symlink_to(f)
    cfg = load_config(REPO / "models" / "mnist-cpu.toml", [
        f"data.root='{old}'", "train.epochs=2", "data.limit_train=64", "data.limit_test=32", "data.batch_size=32",
        "model.T=2", "model.arch='8C3-AP2-16FC-Voting'", "model.neunorm=false", "train.threads=1"])
    part = train(cfg, tmp_path / "runs", stop_after=1, progress=False, echo=lambda s: None)
    old.rename(new)
    lost = CliRunner().invoke(cli, ["train", "--resume", str(part.run_dir), "--no-progress"])
    assert lost.exit_code == 1 and f"MNIST files missing in {old}" in lost.output
    found = CliRunner().invoke(cli, ["train", "--resume", str(part.run_dir), "--set", f"data.root={new}", "--no-progress"])
    assert found.exit_code == 0, found.output
    assert "final test accuracy" in found.output and "after 2 epochs" in found.output
