"""torchrun + DDP on the CPU with gloo: 2 ranks equal 1 rank at twice the batch, rank-0-only writes,
resume under 2 ranks, bad launches, a process group the caller started."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from snncompile.config import load_config
from snncompile.errors import ConfigError
from snncompile.runs import CHECKPOINT, load_checkpoint
from snncompile.train import train

# 129 = 4 x 32 + 1: the last global batch has one sample, fewer than the 2 ranks, so rank 1 has none there
N_TRAIN = 129
SETTINGS = ["train.epochs=2", f"data.limit_train={N_TRAIN}", "data.limit_test=64", "model.arch='16C3-AP2-32FC-Voting'",
            "model.T=3", "train.threads=1", "train.lr=3e-3"]


def plain_env(env_extra=None):
    """This process's environment without torchrun's variables (a test may itself run under a launcher)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    return env


def torchrun(args, nproc=2, script=None, env_extra=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [script] if script else ["-m", "snncompile"]
    cmd += args
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=plain_env(env_extra), timeout=300)


def train_args(out, batch, extra=()):
    args = ["train", str(REPO / "models" / "digits.toml"), "--out", str(out), "--no-progress"]
    for s in [*SETTINGS, f"data.batch_size={batch}", *extra]:
        args += ["--set", s]
    return args


def only_run(out):
    runs = list((out / "digits").iterdir())
    assert len(runs) == 1, runs  # rank 1 did not create a second run directory
    return runs[0]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun(train_args(out, 16))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The reference run dir for ``n`` training samples: one process at the global batch of two ranks at 16."""
    runs = {}

    def run(n=N_TRAIN):
        if n not in runs:
            settings = [*SETTINGS, f"data.limit_train={n}", "data.batch_size=32"]
            cfg = load_config(REPO / "models" / "digits.toml", settings)
            runs[n] = train(cfg, tmp_path_factory.mktemp("single"), progress=False, echo=lambda s: None).run_dir
        return runs[n]

    return run


def assert_same_training(run, reference, n=N_TRAIN):
    """Same weights to float rounding, and metrics that count each of the n samples once per epoch."""
    a = load_checkpoint(run / CHECKPOINT)["model"]
    b = load_checkpoint(reference / CHECKPOINT)["model"]
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(a[key], torch.zeros_like(a[key])))
    assert moved  # trained weights, not an empty comparison
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(r) for r in (reference / "metrics.jsonl").read_text().splitlines()]
    for row, ref in zip(rows, ref_rows, strict=True):
        hits = row["train_acc"] * n  # correct / seen: a whole number only when seen is n
        assert hits == pytest.approx(round(hits), abs=1e-6), row
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5), (row, ref)


def test_epoch_order_splits_each_global_batch_without_padding():
    """Rank r takes every W-th sample of each global batch of W*B; the last, smaller batch is split with loss
    weights W*n_r/m (DDP's mean over ranks is then the mean over its m samples), and a rank with no sample
    there trains a stand-in at weight 0, counted nowhere: every rank takes the same number of steps."""
    from torch.utils.data import DistributedSampler

    from snncompile.distributed import DistContext
    from snncompile.train import _epoch_order, _epoch_permutation

    cfg = load_config(REPO / "models" / "digits.toml", [*SETTINGS, "data.batch_size=16"])
    for n, epoch in ((129, 1), (100, 3), (7, 2)):
        sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=cfg.train.seed)
        sampler.set_epoch(epoch)  # single-process runs (and their resumes) keep the order they always had
        assert _epoch_permutation(n, cfg.train.seed, epoch).tolist() == list(sampler)
    for n, world in ((129, 2), (100, 3), (128, 2), (33, 2)):
        perm = _epoch_permutation(n, cfg.train.seed, 1)
        ranks = [_epoch_order(n, cfg, 1, DistContext(rank=r, world_size=world, backend="gloo")) for r in range(world)]
        steps = -(-n // (world * 16))
        assert [len(steps_r) for steps_r in ranks] == [steps] * world
        for k in range(steps):
            global_batch = perm[k * world * 16 : (k + 1) * world * 16]
            m = len(global_batch)
            counted = []
            for r, steps_r in enumerate(ranks):
                step = steps_r[k]
                share = global_batch[r::world]
                if len(share):
                    assert torch.equal(step.idx, share) and step.counted == len(share)
                    assert step.weight / (world * len(share)) == pytest.approx(1 / m)
                    if m == world * 16:
                        assert step.weight == 1.0  # exactly: full batches are not rescaled at all
                    counted += step.idx.tolist()
                else:
                    assert (step.weight, step.counted, len(step.idx)) == (0.0, 0, 1)
            assert sorted(counted) == sorted(global_batch.tolist())


def test_two_ranks_equal_one_rank_at_double_batch(two_rank_run, one_rank_run):
    out, _ = two_rank_run
    assert_same_training(only_run(out), one_rank_run())


def test_rank_zero_writes_once(two_rank_run):
    out, result = two_rank_run
    run = only_run(out)
    assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "config.toml", "metrics.jsonl", "manifest.json"}
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 32}
    assert result.stdout.count("final test accuracy") == 1 and result.stdout.count("epoch   1/2") == 1


def test_resume_under_two_ranks_reproduces_uninterrupted(two_rank_run, tmp_path):
    out, _ = two_rank_run
    first = torchrun([*train_args(tmp_path, 16), "--stop-after", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    run = only_run(tmp_path)
    resumed = torchrun(["train", "--resume", str(run), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(only_run(out) / CHECKPOINT)["model"]
    b = load_checkpoint(run / CHECKPOINT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rank_crash_leaves_last_good_checkpoint(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import snncompile.train as t
        real = t._epoch_order
        def crashing(n, cfg, epoch, ctx):
            if epoch == 2 and ctx.rank == 1:
                os._exit(3)  # a hard crash: no exception handling, no cleanup
            return real(n, cfg, epoch, ctx)
        t._epoch_order = crashing
        from snncompile.cli import main
        sys.argv = ["snncompile"] + sys.argv[1:]
        main()
    """))
    result = torchrun(train_args(tmp_path, 16), script=str(script))
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: rank 0")]
    assert len(errors) == 1 and "continue with --resume" in errors[0]
    run = only_run(tmp_path)
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_incomplete_rendezvous_is_one_line(monkeypatch, digits_cfg, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing") as err:
        train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    assert "\n" not in str(err.value)


def test_world_size_too_large_for_the_data(tmp_path):
    result = torchrun(train_args(tmp_path, 16, ["data.limit_train=20"]))
    assert result.returncode == 1
    assert "error: 20 training samples cannot feed 2 ranks x data.batch_size 16" in result.stderr + result.stdout


def test_process_group_is_freed_when_training_ends(tmp_path):
    """The cause of an abort at exit seen in ~4 % of runs under load: torch.distributed.nn (imported by DDP's
    constructor) binds ``group.WORLD`` into ten default arguments; imported after init, they kept the group,
    so gloo's three native threads outlived destroy_process_group into interpreter shutdown. Deterministic
    check: after training, a rank has no more native threads than before (Python's own, such as tqdm's
    monitor, are not counted)."""
    script = tmp_path / "threads.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, threading
        from pathlib import Path
        from snncompile.config import load_config
        from snncompile.train import train
        def native_threads():
            return len(os.listdir("/proc/self/task")) - threading.active_count()
        before = native_threads()
        cfg = load_config({str(REPO / "models" / "digits.toml")!r}, {[*SETTINGS, "train.epochs=1", "data.batch_size=16"]!r})
        out = Path(sys.argv[1])
        train(cfg, out, progress=False, echo=lambda s: None)
        (out / ("threads" + os.environ["RANK"])).write_text(f"{{before}} {{native_threads()}}")  # one file per rank
    """))
    result = torchrun([str(tmp_path)], script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        before, after = (tmp_path / f"threads{rank}").read_text().split()
        assert before == after, f"{after} native threads after training, {before} before: the process group was kept"


def test_a_process_group_the_caller_started_stays_theirs(tmp_path):
    """A library user who starts the group can train twice in one process (a second init_process_group over
    torchrun's store is not reliable in torch); train() leaves their group running and uses its backend, and
    their destroy_process_group frees it (its native threads joined, so nothing is left to abort at exit)."""
    script = tmp_path / "twice.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys, threading
        from pathlib import Path
        import torch.distributed as dist
        from snncompile.config import load_config
        from snncompile.train import train
        def native_threads():
            return len(os.listdir("/proc/self/task")) - threading.active_count()
        before = native_threads()
        dist.init_process_group("gloo")
        cfg = load_config({str(REPO / "models" / "digits.toml")!r}, {[*SETTINGS, "train.epochs=1", "data.batch_size=16"]!r})
        out = Path(sys.argv[1])
        alive = []
        for i in range(2):
            train(cfg, out / str(i), progress=False, echo=lambda s: None)
            alive.append(dist.is_initialized())
        dist.destroy_process_group()
        seen = {{"alive": alive, "threads": [before, native_threads()]}}
        (out / ("seen" + os.environ["RANK"])).write_text(json.dumps(seen))
    """))
    result = torchrun([str(tmp_path)], script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen{rank}").read_text())
        assert seen["alive"] == [True, True]
        before, after = seen["threads"]
        assert before == after, f"{after} native threads after destroy_process_group, {before} before: the group was kept"
    for i in (0, 1):
        (run,) = (tmp_path / str(i) / "digits").iterdir()  # rank 0 wrote each run once
        assert json.loads((run / "manifest.json").read_text())["distributed"]["backend"] == "gloo"


def test_a_group_started_without_torchrun_is_used(tmp_path, one_rank_run):
    """A caller who starts the group without torchrun's variables (mp.spawn and a FileStore here, as on a
    cluster whose scheduler sets its own) gets 2-rank training: equal to 1 rank at twice the batch.

    At 131 samples the last global batch has 3, split 2 and 1: the loss weights 4/3 and 2/3 are what make
    the ranks' average its mean (at 129 the one sample's stand-in on rank 1 is that sample, so any weights
    summing to 2 pass)."""
    n = 131
    script = tmp_path / "spawned.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from snncompile.train import train  # before the group exists (see distributed.py)
        import torch.distributed as dist
        import torch.multiprocessing as mp
        from snncompile.config import load_config

        def worker(rank, root):
            store = dist.FileStore(str(root / "store"), 2)
            dist.init_process_group("gloo", rank=rank, world_size=2, store=store)
            cfg = load_config({str(REPO / "models" / "digits.toml")!r},
                              {[*SETTINGS, f"data.limit_train={n}", "data.batch_size=16"]!r})
            train(cfg, root / "out", progress=False, echo=lambda s: None)
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(worker, args=(Path(sys.argv[1]),), nprocs=2)
    """))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                            env=plain_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path / "out")
    assert json.loads((run / "manifest.json").read_text())["distributed"]["world_size"] == 2
    assert_same_training(run, one_rank_run(n), n)


@pytest.mark.parametrize("import_first", [True, False])
def test_a_group_started_before_importing_snncompile_is_warned_about(import_first):
    """Started before snncompile (so before torch.distributed.nn) was imported, a caller's group is captured by
    torch.distributed.nn's default arguments and cannot be freed: train() says so and how to avoid it."""
    lines = ["import warnings", "import torch.distributed as dist",
             "dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())",
             "from snncompile.distributed import init_distributed",
             "with warnings.catch_warnings(record=True) as caught:",
             "    warnings.simplefilter('always')",
             "    ctx = init_distributed('cpu')",
             "dist.destroy_process_group()",
             "print(ctx.backend, ctx.owns_group, [str(w.message) for w in caught])"]
    if import_first:
        lines.insert(0, "import snncompile.distributed")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29999"}
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    backend, owns, caught = result.stdout.split(" ", 2)
    assert (backend, owns) == ("gloo", "False")
    if import_first:
        assert caught.strip() == "[]"
    else:
        assert "import snncompile before init_process_group" in caught
