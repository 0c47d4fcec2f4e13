"""`snncompile bench train`: every variant trains the same network and is timed; peers when installed."""

import importlib.util
import re

import pytest
from click.testing import CliRunner

from conftest import REPO
from helpers import conv_input_channels
from snncompile.cli import cli
from snncompile.errors import MissingDependencyError
from snncompile.text import counted

TINY = ["--set", "model.arch='8C3-AP2-8C3-AP2-16FC-10'", "--T", "3", "--batch", "4", "--steps", "2", "--warmup", "1",
        "--device", "cpu"]


def test_bench_train_prints_every_variant():
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), *TINY, "--peers"])
    assert result.exit_code == 0, result.output
    out = result.output
    threads = counted(__import__("torch").get_num_threads(), "thread")  # bench-nmnist.toml leaves train.threads at torch's default
    assert f"bench-nmnist: T = 3, batch 4, fp32, cpu ({threads}), median of 2 steps" in out
    assert "| snncompile (layer-major) |" in out and "| torch loop (step-major) |" in out and "1.00x |" in out
    assert "failed:" not in out  # a broken variant becomes a row, not an exception: catch it here
    for peer in ("spikingjelly", "snntorch"):
        if importlib.util.find_spec(peer):
            assert f"| {peer} | " in out and f"| {peer} | skipped" not in out
        else:
            assert f"| {peer} | skipped: not installed" in out


def test_bench_train_profile_shows_where_our_step_spends_its_time(monkeypatch):
    import functools

    import snncompile.bench_train as bench_train
    from snncompile.profiling import profile_calls

    # every operator, not the top 20: on a busy machine the optimizer's small self time can rank 21st,
    # and what is checked here is that the profiled call is a whole step, not how its parts rank
    monkeypatch.setattr(bench_train, "profile_calls", functools.partial(profile_calls, rows=1000))
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), *TINY, "--profile"])
    assert result.exit_code == 0, result.output
    table, profile = result.output.split("CPU operators of 3 steps, by self time:")
    assert "| snncompile (layer-major) |" in table
    profile, by_shape = profile.split("The same steps, operators split by input shapes:")
    # which tensors a step's copies and convolutions are: the tiny net's input conv reads [T*B, 2, 34, 34]
    assert re.search(r"aten::convolution_backward.*\[\[", by_shape) and "2, 34, 34]" in by_shape, by_shape
    # the profile is of a whole training step: forward convs (named by the CPU build's conv backend),
    # their backward, the optimizer
    rows = profile.splitlines()
    assert any("conv" in row and "backward" not in row for row in rows), profile
    for op in ("aten::convolution_backward", "Optimizer.step#SGD.step"):
        assert op in profile, op


def test_bench_train_on_a_voting_network_with_mse():
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "digits.toml"), "--set",
                                      "model.arch='8C3-AP2-16FC-Voting'", "--T", "2", "--batch", "4", "--steps", "1",
                                      "--warmup", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| snncompile (layer-major) |" in result.output and "failed:" not in result.output


def test_inference_bench_still_takes_a_run_dir(tmp_path):
    result = CliRunner().invoke(cli, ["bench", str(tmp_path)])
    assert result.exit_code == 1 and "manifest.json is missing" in result.output


def test_bench_train_measures_what_uint8_spikes_save():
    import pytest
    import torch

    from snncompile.bench_train import bench_train
    from snncompile.config import load_config

    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='8C3-AP2-8C3-AP2-16FC-10'", "model.T=3",
                                                               "data.batch_size=4"])
    r = bench_train(cfg, torch.device("cpu"), steps=1, warmup=0, echo=lambda s: None)
    ours = r["variants"]["snncompile (layer-major)"]
    # spikes autograd saves (T=3, B=4): lif1 [8, 34, 34] and lif2 [8, 17, 17] for the pools, lif3 [16]
    # for the readout: (9248 + 2312 + 16) * 12 = 138,912 values, 4 bytes -> 1 byte each
    assert (ours["saved_mib_uncompacted"] - ours["saved_mib"]) * 2**20 == pytest.approx(3 * 138_912)
    assert "saved_mib_uncompacted" not in r["variants"]["torch loop (step-major)"]  # the plain loop keeps fp32


def _gpu_or_skip():
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("fused_update", [None, True], ids=["default-sgd", "fused-sgd"])
def test_cuda_graphed_training_step_trains_like_the_eager_step(fused_update):
    """The captured step (forward, backward, SGD) replayed K times == K eager steps, weight for weight; with
    torch's default SGD update and with its fused one (train.fused_optimizer, what our variants time)."""
    import torch

    _gpu_or_skip()
    from snncompile.bench_train import _cuda_graphed
    from snncompile.config import load_config
    from snncompile.memory import SavedActivations
    from snncompile.models import network_from_config
    from snncompile.train import loss_fn

    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='8C3-AP2-8C3-AP2-16FC-10'", "model.T=3"])
    device = torch.device("cuda")
    x = (torch.rand(3, 8, *cfg.model.input_shape, device=device) < 0.2).float()
    y = torch.randint(0, 10, (8,), device=device)
    weights = []
    for graphed in (False, True):
        torch.manual_seed(0)
        net = network_from_config(cfg.model).to(device)
        initial = [p.detach().clone() for p in net.parameters()]
        net.fused_lif = importlib.util.find_spec("triton") is not None
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=fused_update)

        def update(net=net, opt=opt):
            with SavedActivations():
                scores = net(x, "layer").float()
            loss_fn(scores, y, "ce").backward()
            opt.step()

        if graphed:
            replay = _cuda_graphed(update, opt, device)  # 3 eager warm-up steps, then the capture
            for _ in range(4):
                replay()
        else:
            for _ in range(3 + 4):
                opt.zero_grad(set_to_none=True)
                update()
        torch.cuda.synchronize()
        weights.append([p.detach().clone() for p in net.parameters()])
    assert sum(float((w - w0).abs().sum()) for w, w0 in zip(weights[1], initial)) > 0  # it did train
    for eager, replayed in zip(*weights):
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-6)


def test_bench_train_on_cuda_times_the_graphed_step():
    _gpu_or_skip()
    # the benchmark's own network at a small batch: in the tiny one every kernel takes microseconds and the
    # LIF kernels can miss the table's top rows (on an H200 they did)
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), "--T", "4",
                                      "--batch", "32", "--steps", "2", "--warmup", "1", "--device", "cuda",
                                      "--precision", "bf16", "--profile"])
    assert result.exit_code == 0, result.output
    assert ", CUDA graph) |" in result.output and "skipped" not in result.output and "failed:" not in result.output
    assert "SGD update alone (" in result.output  # the fused update, timed against the default one
    profile = result.output.split("GPU kernels of 3 steps, by self time:")[1]
    # the fused kernels, profiled as kernels: a LIF whose spikes go into a pool runs as lif_pool_*
    assert re.search(r"\blif(_pool)?_forward\b", profile) and re.search(r"\blif(_pool)?_backward\b", profile), profile


def test_peers_are_built_from_our_networks_layers_with_the_same_shapes():
    """The layer list the spikingjelly and snntorch builders follow is read off our network: the issue's two
    benchmark networks, conv by conv and linear by linear (the readout does not spike), and a NeuNorm network
    without its NeuNorm (the peers have none)."""
    import snncompile.bench_train as bt
    from snncompile.config import load_config

    nmnist = load_config(REPO / "models" / "bench-nmnist.toml").model
    assert bt._layers(nmnist) == [("conv", 2, 128, 3), ("pool", 2), ("conv", 128, 128, 3), ("pool", 2), ("flatten",),
                                  ("linear", 128 * 8 * 8, 256, True), ("linear", 256, 10, False)]
    cifar = load_config(REPO / "models" / "bench-cifar.toml").model
    assert bt._layers(cifar) == [("conv", 3, 128, 3), ("conv", 128, 256, 3), ("pool", 2), ("conv", 256, 512, 3),
                                 ("pool", 2), ("conv", 512, 1024, 3), ("conv", 1024, 512, 3), ("flatten",),
                                 ("linear", 512 * 8 * 8, 1024, True), ("linear", 1024, 512, True),
                                 ("linear", 512, 10, False)]
    voting = load_config(REPO / "models" / "nmnist.toml").model  # 128C3-128C3-AP2-128C3-256C3-AP2-1024FC-Voting
    assert voting.neunorm and bt._layers(voting) == [
        ("conv", 2, 128, 3), ("conv", 128, 128, 3), ("pool", 2), ("conv", 128, 128, 3), ("conv", 128, 256, 3),
        ("pool", 2), ("flatten",), ("linear", 256 * 8 * 8, 1024, True), ("linear", 1024, 100, True)]


def _table_with_a_failing_variant(monkeypatch, failing_call: int, message: str) -> str:
    """bench train's table on a tiny bench-nmnist on the CPU, every variant timed at 2.0 ms but the
    ``failing_call``-th (1: our layer-major step; 2: the step loop), which raises ``message``."""
    import torch

    import snncompile.bench_train as bt
    from snncompile.config import load_config

    calls = []

    def time_steps(step, device, steps, warmup):
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError(message)
        return {"median_ms": 2.0, "min_ms": 2.0, "peak_mib": None}

    monkeypatch.setattr(bt, "_time_steps", time_steps)
    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='8C3-AP2-16FC-10'", "model.T=2",
                                                               "data.batch_size=2"])
    return bt.format_train_table(bt.bench_train(cfg, torch.device("cpu"), steps=1, warmup=0, echo=lambda s: None))


def test_a_failing_variant_costs_its_row_not_the_table(monkeypatch):
    table = _table_with_a_failing_variant(monkeypatch, 2, "out of memory\nsecond line")  # the step loop
    assert "| torch loop (step-major) | failed: RuntimeError: out of memory |" in table
    assert "| snncompile (layer-major) | 2.0 |" in table


def test_bench_train_compile_times_both_orders_under_torch_compile():
    import torch._dynamo.utils as dynamo_utils

    dynamo_utils.counters.clear()
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), "--set",
                                      "model.arch='4C3-AP2-8FC-10'", "--T", "2", "--batch", "2", "--steps", "2",
                                      "--warmup", "0", "--device", "cpu", "--compile"])
    assert result.exit_code == 0, result.output
    assert "failed:" not in result.output
    rows = {line.split("|")[1].strip(): line for line in result.output.splitlines() if line.startswith("| ")}
    for name in ("snncompile (layer-major, torch.compile)", "torch loop (step-major), torch.compile"):
        cells = [c.strip() for c in rows[name].split("|")[1:-1]]
        assert float(cells[1]) > 0 and cells[4] == "-", cells  # timed; saved bytes not claimed for compiled code
    # whole graphs: spike marking for uint8 saving broke them after every LIF step, slowing the compiled rows
    assert sum(dynamo_utils.counters["graph_break"].values()) == 0, dict(dynamo_utils.counters["graph_break"])


def test_bench_train_runs_every_variant_under_the_configs_cudnn_autotuning(monkeypatch):
    """Ours and the peers all run with train.cudnn_benchmark as set; the result records it."""
    import torch

    import snncompile.bench_train as bench_module
    from snncompile.config import load_config

    seen = []
    monkeypatch.setattr(bench_module, "_bench_train",
                        lambda *args: seen.append(torch.backends.cudnn.benchmark) or {"variants": {}})
    before = torch.backends.cudnn.benchmark
    for setting in ("true", "false"):
        cfg = load_config(REPO / "models" / "bench-nmnist.toml", [f"train.cudnn_benchmark={setting}"])
        result = bench_module.bench_train(cfg, torch.device("cpu"))
        assert result["cudnn_benchmark"] is (setting == "true") and torch.backends.cudnn.benchmark == before
    assert seen == [True, False]


def test_bench_train_times_on_the_configs_threads_and_says_so(monkeypatch):
    """`--set train.threads=1` was accepted and ignored: both variants ran on every core, so on a busy CPU the
    ratios measured thread contention (3.7x where one thread each gave 1.2x)."""
    import torch

    import snncompile.bench_train as bench_module
    from snncompile.config import load_config

    seen = []
    monkeypatch.setattr(bench_module, "_bench_train", lambda *args: seen.append(torch.get_num_threads()) or {
        "variants": {}, "model": "bench-nmnist", "T": 2, "batch": 2, "precision": "fp32", "device": "cpu", "steps": 1})
    before = torch.get_num_threads()
    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["train.threads=1"])
    result = bench_module.bench_train(cfg, torch.device("cpu"))
    assert seen == [1] and result["threads"] == 1 and torch.get_num_threads() == before
    assert bench_module.format_train_table(result).splitlines()[0].startswith("bench-nmnist: T = 2, batch 2, fp32, "
                                                                               "cpu (1 thread), median of 1 step")


def test_cuda_variants_add_unpacked_spikes_and_the_fused_input_conv_where_they_apply(monkeypatch):
    """On CUDA the graphed variants are timed once more with the saved spikes not packed to uint8 (packed, when
    the config turns packing off), and once more with the input conv fused into its LIF, not when the network has
    no such conv or the config already fuses it. A config's padded input channels pad every variant (timed here
    on the CPU through the same code)."""
    import torch

    import snncompile.bench_train as bt
    from snncompile.config import load_config

    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='8C3-AP2-16FC-10'", "model.T=2",
                                                               "data.batch_size=2"])
    cuda = torch.device("cuda")
    names = [name for name, _ in bt._variants(cfg, cuda, True, False, False)]
    assert names == ["snncompile (fused LIF)", "snncompile (fused LIF, CUDA graph)",
                     "snncompile (fused LIF, CUDA graph, channels_last)",
                     "snncompile (fused LIF, CUDA graph, spikes saved unpacked)",
                     "snncompile (fused LIF, CUDA graph, channels_last, spikes saved unpacked)",
                     "snncompile (fused LIF, CUDA graph, input conv fused)",
                     "snncompile (fused LIF, CUDA graph, channels_last, input conv fused)",
                     "torch loop (step-major)"]
    assert len(bt._variants(cfg, torch.device("cpu"), False, False, False)) == 2
    variants = dict(bt._variants(cfg, cuda, True, False, True))
    profiled = [name for name, options in variants.items() if options.get("profiled")]
    assert profiled == [names[0], names[2], names[5]]  # the eager step, channels_last's and the fused input conv's
    assert variants[names[4]] == {**variants[names[2]], "compact_spikes": False, "profiled": False}
    assert variants[names[6]] == {**variants[names[2]], "fuse_input_conv": True, "profiled": False}
    assert len(bt._variants(cfg, cuda, False, False, False)) == 6  # no fused LIF: no fused input conv either
    cfg.train.fuse_input_conv = True  # already fused: likewise
    assert len(bt._variants(cfg, cuda, True, False, False)) == 6
    cfg.train.fuse_input_conv = False
    cfg.model.input_shape = [8, 34, 34]  # 72 terms per output: nothing to fuse
    assert len(bt._variants(cfg, cuda, True, False, False)) == 6
    cfg.model.input_shape = [2, 34, 34]
    cfg.train.compact_spikes = False  # the config keeps them unpacked: the twins pack them
    twins = dict(bt._variants(cfg, cuda, True, False, False))
    assert twins["snncompile (fused LIF, CUDA graph, spikes saved as uint8)"]["compact_spikes"] is True
    cfg.train.compact_spikes = True

    seen = conv_input_channels(monkeypatch)
    cfg.train.pad_conv_channels = 8
    monkeypatch.setattr(bt, "_variants", lambda *args: [("padded", dict(order="layer", fused=False))])
    result = bt.bench_train(cfg, torch.device("cpu"), steps=1, warmup=0, echo=lambda s: None)
    assert isinstance(result["variants"]["padded"], dict) and seen and set(seen) == {8}


def test_unpacked_spikes_keep_more_for_backward_and_only_our_variants_take_the_fused_update(monkeypatch):
    """A variant with compact_spikes off keeps its spikes as they are: what it saves for backward is what the
    packed variant would save without packing. Where the fused update applies (CUDA; forced here), our variants
    update through torch's fused SGD and the torch loop through torch's default; the update alone is timed both
    ways and printed under the table."""
    import torch

    import snncompile.bench_train as bt
    from snncompile.config import load_config

    # no pool: the conv's 0/1 spikes go into the FC layer, and packing them keeps 3 bytes of 4 less
    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='8C3-16FC-10'", "model.T=2",
                                                               "data.batch_size=2"])
    monkeypatch.setattr(bt, "_variants", lambda *args: [
        ("packed", dict(order="layer", fused=False)), ("unpacked", dict(order="layer", fused=False, compact_spikes=False)),
        ("loop", dict(order="step", fused=False))])
    monkeypatch.setattr(bt, "fuses_optimizer", lambda cfg, device: True)
    kernels = []
    real_sgd = torch.optim.SGD

    class Spy(real_sgd):
        def __init__(self, params, **kwargs):
            kernels.append(kwargs.get("fused"))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", Spy)
    result = bt.bench_train(cfg, torch.device("cpu"), steps=2, warmup=0, echo=lambda s: None)
    packed, unpacked = result["variants"]["packed"], result["variants"]["unpacked"]
    assert "saved_mib_uncompacted" not in unpacked and unpacked["saved_mib"] == packed["saved_mib_uncompacted"]
    assert unpacked["saved_mib"] > packed["saved_mib"]
    assert kernels == [True, True, None, True, None]  # packed, unpacked, the loop; then the update alone both ways
    update = result["optimizer_update"]
    assert update["parameters"] == sum(p.numel() for p in bt.network_from_config(cfg.model).parameters())
    assert update["fused_ms"] > 0 and update["default_ms"] > 0
    assert f"SGD update alone ({update['parameters']:,} parameters, eager): fused " in bt.format_train_table(result)

    # where packing keeps under 1 % less (on the GPU, bench-nmnist: its conv spikes are all pooled, hence not
    # 0/1, and stay as they are; 0.2 of 459 MiB), the twins are skipped, named in the table
    assert bt._packing_moot({"packed": packed}) is None
    moot = {"a": "failed: x", "b": {"saved_mib": 459.1, "saved_mib_uncompacted": 459.3}}
    assert bt._packing_moot(moot) == "packing keeps only 0.2 of 459.3 MiB less here (pooled spikes stay as they are)"
    assert bt._packing_moot({"b": {"saved_mib": 459.3}}) is None  # nothing measured both ways
    monkeypatch.setattr(bt, "_packing_moot", lambda results: "packing keeps only 0.2 of 459.3 MiB less here")
    kernels.clear()
    result = bt.bench_train(cfg, torch.device("cpu"), steps=1, warmup=0, echo=lambda s: None)
    assert result["variants"]["unpacked"] == "packing keeps only 0.2 of 459.3 MiB less here"
    assert kernels == [True, None, True, None]  # the packed variant, the loop, the update alone: nothing else
    assert "| unpacked | skipped: packing keeps only 0.2 of 459.3 MiB less here |" in bt.format_train_table(result)


def test_bench_train_plot_draws_every_timed_variant_and_names_the_others(tmp_path, monkeypatch):
    """--plot: ms per step and peak memory per variant as bars in a PNG; a variant that failed is named
    under the chart, not drawn; without matplotlib it is the one-line error before any timing."""
    pytest.importorskip("matplotlib")
    import snncompile.bench_train as bt

    out = tmp_path / "plots" / "train.png"
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), *TINY,
                                      "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in result.output
    drawn = {}
    real = bt.plot_train_bench

    def spy(r, path):
        drawn.update(r["variants"])
        return real(r, path)

    monkeypatch.setattr(bt, "plot_train_bench", spy)
    monkeypatch.setattr(bt, "_attempt", lambda measure: "failed: RuntimeError: out of memory")
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), *TINY,
                                      "--plot", str(out)])
    assert set(drawn.values()) == {"failed: RuntimeError: out of memory"}, result.output
    assert result.exit_code == 1 and "error: no variant could be timed" in result.output  # drawn, then exit 1
    monkeypatch.setattr("snncompile.plots.pyplot", lambda: (_ for _ in ()).throw(MissingDependencyError("matplotlib", "plot")))
    monkeypatch.setattr(bt, "_bench_train", lambda *a: pytest.fail("timed before the missing matplotlib was reported"))
    result = CliRunner().invoke(cli, ["bench", "train", str(REPO / "models" / "bench-nmnist.toml"), *TINY,
                                      "--plot", str(out)])
    assert result.exit_code != 0 and "pip install 'snncompile[plot]'" in result.output


def test_the_train_bench_chart_draws_peak_gpu_memory_or_on_a_cpu_what_backward_keeps_and_names_the_untimed():
    pytest.importorskip("matplotlib")
    from snncompile.bench_train import train_bench_figure
    from snncompile.plots import pyplot

    plt = pyplot()
    head = {"model": "m", "T": 8, "batch": 4, "precision": "fp32"}
    cpu = {"ours": {"median_ms": 60.0, "peak_mib": None, "saved_mib": 82.2},
           "loop": {"median_ms": 80.0, "peak_mib": None, "saved_mib": 99.2}, "peer": "skipped: not installed"}
    gpu = {"ours": {"median_ms": 3.3, "peak_mib": 1465.0, "saved_mib": 400.0},
           "loop": {"median_ms": 26.2, "peak_mib": 3068.0, "saved_mib": 900.0}}
    for variants, device, widths, label in ((cpu, "cpu", [99.2, 82.2], "saved for backward, MiB (peak memory: CUDA only)"),
                                            (gpu, "cuda", [3068.0, 1465.0], "peak GPU memory, MiB")):
        fig = train_bench_figure({**head, "device": device, "variants": variants}, plt)
        ax_ms, ax_mem = fig.axes
        assert [bar.get_width() for bar in ax_mem.patches] == widths  # bottom-up: the table's first row on top
        assert ax_mem.get_xlabel() == label and [bar.get_width() for bar in ax_ms.patches] == [
            variants["loop"]["median_ms"], variants["ours"]["median_ms"]]
        texts = {t.get_text() for t in fig.texts}  # the title, and a variant that was not timed: named, not drawn
        assert texts == {f"m: T = 8, batch 4, fp32, {device}"} | (
            {"not timed: peer: skipped: not installed"} if "peer" in variants else set())
        assert [label.get_text() for label in ax_ms.get_yticklabels()] == ["loop", "ours"]
        plt.close(fig)


def test_a_broken_peer_install_costs_its_row(tmp_path, monkeypatch):
    """A peer that is installed but fails to import (a spikingjelly built for another torch) is a `failed:`
    row after our variants were timed, not a traceback that loses them; snntorch likewise."""
    import sys

    import torch

    import snncompile.bench_train as bt
    from snncompile.config import load_config

    for peer, module in (("spikingjelly", "activation_based"), ("snntorch", None)):
        package = tmp_path / peer
        package.mkdir()
        (package / "__init__.py").write_text("" if module else "raise ImportError('built for another torch')\n")
        if module:
            (package / module).mkdir()
            (package / module / "__init__.py").write_text("raise ImportError('built for another torch')\n")
        for name in [n for n in sys.modules if n == peer or n.startswith(peer + ".")]:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='4C3-AP2-8FC-10'", "model.T=2",
                                                               "data.batch_size=2"])
    result = bt.bench_train(cfg, torch.device("cpu"), steps=1, warmup=0, peers=True, echo=lambda s: None)
    assert result["variants"]["spikingjelly"] == "failed: ImportError: built for another torch"
    assert result["variants"]["snntorch"] == "failed: ImportError: built for another torch"
    assert result["variants"]["snncompile (layer-major)"]["median_ms"] > 0


def test_ratios_are_to_the_first_of_our_variants_timed(monkeypatch):
    """Our first variant failing does not make the next row (the torch loop) the 1.00x baseline: the ratios
    are to the first of ours that was timed, named in the header, and absent when none of ours was."""
    import snncompile.bench_train as bt

    table = _table_with_a_failing_variant(monkeypatch, 1, "out of memory")  # our layer-major step
    assert "| vs snncompile (none timed) |" in table and "| torch loop (step-major) | 2.0 |" in table
    assert "x |" not in table and table.splitlines()[-1].endswith("| - |")
    result = {"model": "m", "T": 2, "batch": 4, "precision": "fp32", "device": "cuda", "steps": 1, "variants": {
        "snncompile (fused LIF)": "failed: RuntimeError: out of memory",
        "snncompile (fused LIF, CUDA graph)": {"median_ms": 4.0, "peak_mib": 1.0, "saved_mib": 1.0},
        "torch loop (step-major)": {"median_ms": 8.0, "peak_mib": 1.0, "saved_mib": 1.0}}}
    table = bt.format_train_table(result)
    assert "| vs snncompile (fused LIF, CUDA graph) |" in table
    assert "| 1.00x |" in table and table.splitlines()[-1].endswith("| 2.00x |")


def test_a_profile_prints_nothing_of_its_own_on_stderr(capfd):
    """Kineto wrote `USDT:... profiler_start` / `profiler_stop` lines to file descriptor 2 from C++ above every
    profile table; what the profiled calls print still shows."""
    import sys

    import torch

    from snncompile.profiling import profile_calls

    def call():
        torch.ones(4).sum()
        print("the call's own line", file=sys.stderr, flush=True)

    table = profile_calls(call, cuda=False, calls=2)
    err = capfd.readouterr().err
    assert "aten::sum" in table
    assert err.splitlines() == ["the call's own line"] * 2, err


def test_inputs_that_do_not_fit_and_a_table_of_failures_are_errors():
    """--batch 100000000 was the allocator's traceback; a network no variant could run printed a table of
    failures and exited 0 (bench, for inference, exits 1 when it timed nothing)."""
    digits = str(REPO / "models" / "digits.toml")
    huge = CliRunner().invoke(cli, ["bench", "train", digits, "--batch", "100000000", "--steps", "1", "--warmup", "0"])
    assert huge.exit_code == 2 and huge.output.strip().startswith(
        "error: --batch 100000000: not enough memory for its inputs ("), huge.output
    assert len(huge.output.strip().splitlines()) == 1
    none = CliRunner().invoke(cli, ["bench", "train", digits, "--set", "model.arch='999999999FC-Voting'", "--steps", "1",
                                    "--warmup", "0"])
    assert none.exit_code == 1 and "| failed: " in none.output
    assert none.output.strip().splitlines()[-1] == "error: no variant could be timed: the table says why"
