"""`snncompile bench`: verified runners only, percentiles, bench.json/md/png, one-line errors."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import conv_input_channels, make_run, reference_file, replace_checkpoint, tiny_zoo_config  # noqa: E402
from snncompile.artifacts import record_artifact  # noqa: E402
from snncompile.bench import bench_run, percentiles  # noqa: E402
from snncompile.cli import cli  # noqa: E402
from snncompile.errors import ArtifactError, ConfigError  # noqa: E402
from snncompile.export_onnx import export_run  # noqa: E402


@pytest.fixture
def exported(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    export_run(run, layers=False, n_random=32, n_real=0)
    return run


def test_percentiles():
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert p["p50_ms"] == pytest.approx(50.5) and p["p90_ms"] == pytest.approx(90.1) and p["p99_ms"] == pytest.approx(99.01)


def test_bench_writes_json_table_and_plot(exported):
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch,ort-cpu", "--batch", "1,4",
                                      "--iters", "3", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads((exported / "bench.json").read_text())
    assert set(data["runners"]) == {"torch", "ort-cpu"} and data["T"] == 4
    assert data["runners"]["ort-cpu"]["verified"] is True
    for entry in data["runners"].values():
        for batch, s in entry["by_batch"].items():
            assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] and s["iters"] == 3
            assert s["samples_per_s"] == pytest.approx(int(batch) / (s["p50_ms"] / 1e3))
    table = (exported / "bench.md").read_text()
    assert "| ort-cpu | 4 |" in table and "| torch | 1 |" in table and "| ort-cpu | 4 |" in result.output
    assert "ort-cpu batch 4: p50 " in result.output  # each measurement said as it is made
    assert (exported / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_threads_sets_torch_and_onnx_runtime_threads(exported):
    import torch

    before = torch.get_num_threads()
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch,ort-cpu", "--batch", "2",
                                      "--iters", "1", "--warmup", "0", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "batch 2: p50" not in result.output and "| ort-cpu | 2 |" in result.output  # the table, without the lines
    data = json.loads((exported / "bench.json").read_text())
    assert {name: e["by_batch"]["2"]["execution"] for name, e in data["runners"].items()} == {
        "torch": "CPU, 1 thread", "ort-cpu": "CPU, 1 thread"}
    assert torch.get_num_threads() == before


def test_bench_precision_applies_to_torch_fast_only(exported):
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "ort-cpu,torch-fast", "--batch", "2",
                                      "--iters", "2", "--warmup", "0", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    data = json.loads((exported / "bench_bf16.json").read_text())
    assert data["runners"]["ort-cpu"]["precision"] == "fp32" and data["runners"]["torch-fast"]["precision"] == "bf16"
    assert data["runners"]["torch-fast"]["verified"] is True, data["runners"]["torch-fast"].get("skipped")
    assert "| torch-fast (bf16) | 2 |" in result.output and "| ort-cpu | 2 |" in result.output
    # written beside, not over, the fp32 results
    assert json.loads((exported / "bench_bf16.json").read_text())["runners"]["torch-fast"]["precision"] == "bf16"
    assert not (exported / "bench.json").exists() and f"wrote {exported / 'bench_bf16.json'}" in result.output


def test_runner_failing_verify_is_skipped_with_reason(exported):
    path = exported / "model.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "net.stages.0.bias")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(3.0), init.name))
    onnx.save(model, str(path))
    # recorded as the export's own file, so that its verify is what fails (a file that is not the export's is
    # refused before any runner)
    from snncompile.artifacts import sha256_file, update_manifest

    entry = json.loads((exported / "manifest.json").read_text())["exports"]["model.onnx"]
    update_manifest(exported, exports={"model.onnx": {**entry, "sha256": sha256_file(path)}})
    data = bench_run(exported, ["ort-cpu", "torch"], (2,), warmup=0, iters=2, echo=lambda s: None)
    assert data["runners"]["ort-cpu"]["skipped"].startswith("verify failed:")
    assert "by_batch" in data["runners"]["torch"]


def test_bad_arguments_are_one_line(exported, tmp_path):
    with pytest.raises(ConfigError, match="unknown runner"):
        bench_run(exported, ["tensorflow"], (1,))
    result = CliRunner().invoke(cli, ["bench", str(exported), "--batch", "1,x"])
    assert result.exit_code == 2 and result.output.strip() == "error: --batch expects comma-separated integers, got '1,x'"
    empty = make_run(tmp_path / "other", tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    result = CliRunner().invoke(cli, ["bench", str(empty)])
    assert result.exit_code == 1 and result.output.strip() == f"error: {empty} has no model.onnx: run `snncompile export {empty}` first"
    result = CliRunner().invoke(cli, ["bench", str(exported), "--batch", "0,2"])
    assert result.exit_code == 2 and result.output.strip() == "error: --batch sizes must be >= 1, got 0,2"
    broken = reference_file(exported)
    broken.write_bytes(b"not an npz")
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch", "--batch", "1"])
    assert result.exit_code == 1 and f"{broken.name} is missing or corrupt" in result.output
    assert "Traceback" not in result.output and not (exported / "bench.json").exists()  # nothing timed first


def test_pipeline_rejects_a_bad_batch_before_training(tmp_path):
    result = CliRunner().invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path),
                                      "--batch", "2,0"])
    assert result.exit_code == 2 and result.output.strip() == "error: --batch sizes must be >= 1, got 2,0"
    assert not list(tmp_path.iterdir())


def test_gate_keeps_the_real_samples_and_a_runner_that_cannot_be_verified_is_skipped(tmp_path, monkeypatch):
    """The gate exports the _layers twin on first use with the same reference inputs (real ones included), and a
    runner whose gate cannot run is skipped with the reason while the others are still timed."""
    import snncompile.bench as bench

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    export_run(run, n_random=8, n_real=8)
    before = dict(np.load(reference_file(run)))
    real_gate = bench.gate

    def gate(run_dir, name, *args):
        if name == "torch-fast":
            raise ArtifactError("no model_layers_fp32.plan")
        return real_gate(run_dir, name, *args)

    monkeypatch.setattr(bench, "gate", gate)
    data = bench_run(run, ["torch-fast", "ort-cpu"], (1, 1, 2), warmup=0, iters=2, echo=lambda s: None)
    assert data["runners"]["torch-fast"]["skipped"] == "cannot verify: no model_layers_fp32.plan"
    assert data["runners"]["ort-cpu"]["verified"] and list(data["runners"]["ort-cpu"]["by_batch"]) == ["1", "2"]
    after = np.load(reference_file(run))
    assert sorted(after.files) == sorted(before) == ["random", "real", "real_labels"]
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert (run / "model_layers.onnx").is_file()


def test_bench_of_a_layers_export_gates_on_that_file(exported):
    export_run(exported, layers=True, n_random=32, n_real=0)
    data = bench_run(exported, ["ort-cpu"], (2,), warmup=0, iters=2, echo=lambda s: None, model_file="model_layers.onnx")
    assert data["runners"]["ort-cpu"]["verified"] and "2" in data["runners"]["ort-cpu"]["by_batch"]


def test_per_step_layout_is_the_same_function_and_benches_separately(exported):
    from snncompile.compare import verify_run

    export_run(exported, order="step", n_random=32, n_real=0)
    report = verify_run(exported, "ort-cpu", "fp32", model_file="model_per_step.onnx")
    # a non-spiking readout: the last Gemm rounds differently per library, spikes do not differ
    assert report["passed"] and report["outputs"]["scores"]["max_abs"] <= 1e-5
    data = bench_run(exported, ["ort-cpu"], (2,), warmup=0, iters=2, echo=lambda s: None, model_file="model_per_step.onnx")
    assert data["order"] == "step" and (exported / "bench_model_per_step.json").is_file()
    assert json.loads((exported / "verify.json").read_text())["ort-cpu:model_per_step.onnx"]["passed"]


def test_bench_a_mixed_precision_export_verifies_onnx_runtime_at_its_precision(exported):
    export_run(exported, precision="fp16", n_random=32, n_real=0)
    data = bench_run(exported, ["ort-cpu"], (2,), iters=2, warmup=0, model_file="model_fp16.onnx", echo=lambda s: None)
    entry = data["runners"]["ort-cpu"]
    assert entry["precision"] == "fp16" and entry["verified"] is True, entry.get("skipped")
    assert entry["by_batch"]["2"]["p50_ms"] > 0
    # the gate checked layer by layer on the fp16 graph's _layers twin, exported on first use
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["exports"]["model_fp16_layers.onnx"]["precision"] == "fp16"
    report = json.loads((exported / "verify.json").read_text())["ort-cpu:model_fp16_layers.onnx/fp16"]
    assert report["precision"] == "fp16" and report["layers_checked"]


def test_no_cudnn_autotune_benches_separately_and_reaches_torch_fast(exported, monkeypatch):
    from snncompile.backends import create_runner, runner_options

    assert runner_options("torch-fast", cudnn_autotune=False) == {"precision": "fp32", "autotune": False}
    assert runner_options("torch-fast") == {"precision": "fp32"}  # autotuned by default
    assert runner_options("ort-cuda", cudnn_autotune=False) == {} and runner_options("torch", cudnn_autotune=False) == {}
    made = []
    monkeypatch.setattr("snncompile.bench.create_runner", lambda *a, **kw: made.append(kw) or create_runner(*a, **kw))
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch-fast", "--batch", "2",
                                      "--iters", "2", "--warmup", "0", "--no-cudnn-autotune"])
    assert result.exit_code == 0, result.output
    assert made == [{"precision": "fp32", "autotune": False}]
    data = json.loads((exported / "bench_no_autotune.json").read_text())
    assert data["cudnn_autotune"] is False and data["runners"]["torch-fast"]["verified"] is True
    assert not (exported / "bench.json").exists()


def test_no_cuda_graph_benches_separately_and_reaches_the_runners(exported, monkeypatch):
    from snncompile.backends import create_runner, runner_options

    assert runner_options("ort-cuda", cuda_graph=False) == {"cuda_graph": False}
    assert runner_options("trt", "fp16", cuda_graph=False) == {"precision": "fp16", "cuda_graph": False}
    assert runner_options("ort-cpu", cuda_graph=False) == {} and runner_options("ort-cuda") == {}
    made = []
    monkeypatch.setattr("snncompile.bench.create_runner", lambda *a, **kw: made.append(kw) or create_runner(*a, **kw))
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch-fast,ort-cpu", "--batch", "2",
                                      "--iters", "2", "--warmup", "0", "--no-cuda-graph"])
    assert result.exit_code == 0, result.output
    assert {"cuda_graph": False, "precision": "fp32"} in made  # torch-fast was built without a graph
    data = json.loads((exported / "bench_no_cuda_graph.json").read_text())
    assert data["cuda_graph"] is False and data["runners"]["torch-fast"]["verified"] is True
    assert data["runners"]["torch-fast"]["by_batch"]["2"]["execution"].startswith("CPU, ")  # no graph claimed
    assert data["runners"]["ort-cpu"]["by_batch"]["2"]["execution"] == f"CPU, {len(os.sched_getaffinity(0))} threads"
    assert not (exported / "bench.json").exists()


def test_pad_channels_benches_separately_and_pads_torch_fasts_input_conv(exported, monkeypatch):
    """--pad-channels 8: torch-fast (only) runs bench-nmnist's 2-channel input conv on 8 channels, verified
    like any torch-fast, its rows say so, and the results go to bench_pad8.*."""
    from snncompile.backends import runner_options

    assert runner_options("torch-fast", pad_channels=8) == {"precision": "fp32", "pad_channels": 8}
    assert runner_options("ort-cpu", pad_channels=8) == {} and runner_options("torch-fast") == {"precision": "fp32"}
    seen = conv_input_channels(monkeypatch, in_channels=2)  # what the 2-channel input conv was given
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch-fast", "--batch", "2",
                                      "--iters", "2", "--warmup", "0", "--pad-channels", "8"])
    assert result.exit_code == 0, result.output
    data = json.loads((exported / "bench_pad8.json").read_text())
    entry = data["runners"]["torch-fast"]
    assert data["pad_channels"] == 8 and entry["verified"] is True
    assert entry["by_batch"]["2"]["execution"].endswith("input channels padded to 8")
    assert set(seen) == {2, 8}  # unpadded in the torch reference that verify runs, padded in torch-fast
    assert not (exported / "bench.json").exists()
    bad = CliRunner().invoke(cli, ["bench", str(exported), "--pad-channels", "0"])
    assert bad.exit_code != 0 and "--pad-channels" in bad.output


def test_channels_last_benches_separately_with_torch_fasts_convs_in_channels_last(exported, monkeypatch):
    """--channels-last: torch-fast (only) keeps its conv weights, hence activations, in channels_last; the
    same scores as in NCHW, verified like any torch-fast, its rows say so, results in bench_channels_last.*."""
    import torch

    from snncompile.backends import create_runner, runner_options

    assert runner_options("torch-fast", channels_last=True) == {"precision": "fp32", "channels_last": True}
    assert runner_options("ort-cpu", channels_last=True) == {}
    feed = {"input": np.load(reference_file(exported, "inputs"))["random"][:, :2]}
    with create_runner("torch-fast", exported, channels_last=True) as last, create_runner("torch-fast", exported) as nchw:
        convs = [m for m in last.graph.net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        got, want = last.infer(feed), nchw.infer(feed)
    assert got.keys() == want.keys()  # last bits may differ (a CPU's channels_last convolution sums otherwise)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    from snncompile.backends.fast import TorchFastRunner

    built = []  # every torch-fast the bench makes, its verify gate's included: the layout it times
    real_init = TorchFastRunner.__init__
    monkeypatch.setattr(TorchFastRunner, "__init__",
                        lambda self, *a, **kw: built.append(kw.get("channels_last", False)) or real_init(self, *a, **kw))
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch-fast", "--batch", "2",
                                      "--iters", "2", "--warmup", "0", "--channels-last"])
    assert result.exit_code == 0, result.output
    assert len(built) >= 2 and all(built), built  # the gate verified the layout it then timed
    data = json.loads((exported / "bench_channels_last.json").read_text())
    entry = data["runners"]["torch-fast"]
    assert data["channels_last"] is True and entry["verified"] is True
    assert entry["by_batch"]["2"]["execution"].endswith("channels_last")
    assert not (exported / "bench.json").exists()


def test_a_bench_where_every_runner_was_skipped_still_plots_without_warnings(tmp_path):
    import warnings

    from snncompile.bench_report import _plot

    pytest.importorskip("matplotlib")
    results = {"model": "m", "T": 4, "runners": {"ort-cuda": {"skipped": "CUDAExecutionProvider is not in this build"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" was one, on an H200
        assert _plot(results, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_the_bench_plot_ticks_the_measured_batch_sizes_and_writes_plain_numbers():
    """The batch axis carries the sizes that ran (not 2 and 4 between 1 and 8), and no tick label is in
    matplotlib's 2x10^1 notation: latencies from 0.15 to 260 ms, throughputs up to 40,000 samples/s."""
    from snncompile.bench_report import bench_figure
    from snncompile.plots import pyplot

    pytest.importorskip("matplotlib")
    plt = pyplot()
    rows = {name: {"by_batch": {str(b): {"p50_ms": a + per * b, "samples_per_s": b / ((a + per * b) / 1e3)}
                                for b in (1, 16, 128)}}
            for name, (a, per) in {"torch-fast": (0.12, 0.026), "torch": (5.0, 2.0)}.items()}
    rows["ort-cpu"] = {"by_batch": {"1": {"p50_ms": 1.4, "samples_per_s": 714.0}, "16": {"failed": "out of memory"}}}
    fig = bench_figure({"model": "m", "T": 8, "runners": rows}, plt)
    fig.canvas.draw()
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [1, 16, 128]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "16", "128"]
        labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
        assert labels and not [t for t in labels if "times" in t or "^" in t or "e+" in t], labels
    thr_labels = {t.get_text() for t in fig.axes[1].get_yticklabels()}
    assert "10,000" in thr_labels and "1,000" in thr_labels, thr_labels
    plt.close(fig)


def test_bench_profile_writes_where_each_runners_time_goes(exported, monkeypatch):
    """--profile: torch.profiler's table per runner at the last batch size, printed and kept beside the
    bench (torch's operators here on the CPU; on CUDA every kernel, ONNX Runtime's included)."""
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch", "--batch", "1,4", "--iters", "2",
                                      "--warmup", "1", "--profile"])
    assert result.exit_code == 0, result.output
    text = (exported / "bench_profile.txt").read_text()
    assert text.startswith("torch (fp32), batch 4, ") and "CPU operators of 3 batches, by self time:" in text
    assert "aten::" in text and "conv" in text  # the reference's own operators, convs among them
    assert text.strip() in result.output and "bench_profile.txt" in result.output.splitlines()[-1]
    assert json.loads((exported / "bench.json").read_text())["profile_file"] == "bench_profile.txt"
    plain = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch", "--batch", "1", "--iters", "1"])
    assert plain.exit_code == 0 and "by self time" not in plain.output
    assert "_profile.txt" not in plain.output.splitlines()[-1]
    (exported / "bench_profile.txt").unlink()
    monkeypatch.setattr("snncompile.bench.available_runners", lambda: {"torch": "not here (test)"})
    with pytest.raises(ArtifactError, match="no runner was timed"):  # nothing timed: nothing written
        bench_run(exported, ["torch"], (1,), iters=1, progress=False, echo=lambda s: None, profile=True)
    assert not (exported / "bench_profile.txt").exists()


def test_onnx_runtime_cpu_is_profiled_by_its_own_profiler(exported, monkeypatch):
    """torch.profiler sees none of ONNX Runtime's CPU work: --profile on ort-cpu is ONNX Runtime's own profile, from a
    runner of its own whose trace directory goes with it; the timed runner's sessions profile nothing."""
    import tempfile
    from pathlib import Path

    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    said: list[str] = []
    bench_run(exported, ["ort-cpu"], (2,), iters=2, warmup=1, progress=False, echo=said.append, profile=True)
    text = (exported / "bench_profile.txt").read_text()
    assert text.startswith("ort-cpu (fp32), batch 2, CPU, ") and "ONNX Runtime's profiler, 10 batches (10 session runs" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert {"Conv", "Gemm", "Greater", "AveragePool"} <= set(rows)  # the network's operators, each with its time
    assert float(rows["Conv"].split(" | ")[2]) > 0
    profiling = [d for d in made if Path(d).name.startswith("snncompile-ort-profile-")]
    assert len(profiling) == 1 and not Path(profiling[0]).exists()  # one profiling runner, its traces removed with it


def test_the_onnx_runtime_profile_table_takes_medians_of_the_last_runs():
    """By hand: two warm-up runs left out, each node's median over the counted runs (a 900 us stall in one of
    three runs moves nothing), operators summed over their nodes."""
    from snncompile.profiling import ort_profile_table

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "output_type_shape": [{"float": [2, 3]}]}}

    events = []
    for run, start in enumerate((0, 1000, 2000, 3000, 4000)):
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 500})
        warm = run < 2  # slow first runs: not counted
        events += [node("conv_a", "Conv", start + 10, 400 if warm else 100),
                   node("mul_a", "Mul", start + 120, 900 if run == 3 else 30),  # one stall
                   node("mul_b", "Mul", start + 160, 10)]
    text = ort_profile_table(events, runs=3, what="3 batches")
    assert "(3 session runs; per run, medians: 0.500 ms, its nodes 0.140 ms;" in text
    assert "| Conv | 1 | 100.0 | 71.4 % |" in text and "| Mul | 2 | 40.0 | 28.6 % |" in text
    assert "| mul_a | Mul | 2x3 | 30.0 | 21.4 % |" in text
    assert text.index("| Conv |") < text.index("| Mul |")  # slowest first


def test_timing_some_runners_again_keeps_the_others_rows_of_the_same_export(exported):
    """A bench of one runner refreshes that runner's rows and keeps the rows the earlier bench timed for the
    others (same export bytes, T, platform, GPU and versions); after any of those changes it starts over."""
    first = bench_run(exported, ["torch", "ort-cpu"], (1, 4), warmup=0, iters=2, progress=False, echo=lambda s: None)
    said = []
    second = bench_run(exported, ["ort-cpu"], (2,), warmup=0, iters=2, progress=False, echo=said.append)
    assert set(second["runners"]) == {"torch", "ort-cpu"} and second["batches"] == [1, 2, 4]
    assert second["runners"]["torch"] == first["runners"]["torch"]  # kept as measured, with its time
    assert list(second["runners"]["ort-cpu"]["by_batch"]) == ["2"]  # re-timed: only the new rows
    assert said == ["kept from the earlier bench of this export: torch (time them again with --runners)"]
    saved = json.loads((exported / "bench.json").read_text())
    assert set(saved["runners"]) == {"torch", "ort-cpu"} and "| torch | 4 |" in (exported / "bench.md").read_text()
    saved["environment"]["torch"] = "0.0"  # another machine's or version's figures: not mixed in
    (exported / "bench.json").write_text(json.dumps(saved))
    record_artifact(exported, "bench.json")  # as that bench would have recorded it: only the versions differ
    third = bench_run(exported, ["ort-cpu"], (1,), warmup=0, iters=2, progress=False, echo=lambda s: None)
    assert list(third["runners"]) == ["ort-cpu"] and third["batches"] == [1]
    (exported / "bench.json").write_text("{not json")  # unreadable: replaced, as before
    fourth = bench_run(exported, ["torch"], (1,), warmup=0, iters=2, progress=False, echo=lambda s: None)
    assert list(fourth["runners"]) == ["torch"] and json.loads((exported / "bench.json").read_text()) == fourth


def test_two_benches_at_once_keep_each_others_rows(exported, monkeypatch):
    """Each read the earlier rows, then wrote its own: the second to write dropped the first's rows, though both
    said they wrote bench.json. The read and the write are one step under the run dir's lock now: here the
    second bench starts while the first is writing, and waits."""
    import threading

    import snncompile.bench as bench

    bench_run(exported, ["ort-cpu"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    real_write, started, second = bench.write_results, threading.Event(), {}

    def write_slowly(*args, **kwargs):
        started.set()
        threading.Event().wait(2)  # the other bench reads the earlier rows now, unless it must wait
        return real_write(*args, **kwargs)

    monkeypatch.setattr(bench, "write_results", write_slowly)
    other = threading.Thread(target=lambda: second.update(
        data=(started.wait(60), bench_run(exported, ["torch"], (1,), warmup=0, iters=1, progress=False,
                                          echo=lambda s: None))))
    other.start()
    bench_run(exported, ["torch-fast"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    other.join(timeout=120)
    assert set(json.loads((exported / "bench.json").read_text())["runners"]) == {"ort-cpu", "torch-fast", "torch"}


def test_a_bench_json_edited_since_bench_wrote_it_keeps_none_of_its_rows(exported):
    """A made-up trt row added to bench.json by hand was carried into the next bench's table (and the file's new
    hash recorded as bench's): rows are kept only from the file bench recorded."""
    bench_run(exported, ["torch", "ort-cpu"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    saved = json.loads((exported / "bench.json").read_text())
    saved["runners"]["trt"] = {**saved["runners"]["torch"], "runner": "trt"}
    (exported / "bench.json").write_text(json.dumps(saved))
    said = []
    data = bench_run(exported, ["ort-cpu"], (1,), warmup=0, iters=1, progress=False, echo=said.append)
    assert list(data["runners"]) == ["ort-cpu"] and not any("kept from" in line for line in said)
    assert "| trt |" not in (exported / "bench.md").read_text()


def test_gate_exports_the_layers_twin_again_when_it_is_not_the_timed_files(exported):
    """A model_layers.onnx of older weights (export --layers, more training, export) or of another T (export
    --T 2 beside it) is not the timed file's twin: the gate exports it again rather than failing a correct
    runner on the old graph's real spike mismatches, or checking the T=4 graph for a T=2 file."""
    export_run(exported, layers=True, n_random=32, n_real=0)
    replace_checkpoint(exported)
    export_run(exported, layers=False, n_random=32, n_real=0)
    data = bench_run(exported, ["ort-cpu"], (2,), warmup=0, iters=2, echo=lambda s: None)
    assert data["runners"]["ort-cpu"]["verified"] is True, data["runners"]["ort-cpu"].get("skipped")
    trained_T = json.loads((exported / "manifest.json").read_text())["exports"]["model_layers.onnx"]["T"]
    export_run(exported, steps=2, layers=False, n_random=32, n_real=0)
    said = []
    data = bench_run(exported, ["ort-cpu"], (2,), warmup=0, iters=2, echo=said.append)
    assert data["T"] == 2 and data["runners"]["ort-cpu"]["verified"] is True, data["runners"]["ort-cpu"].get("skipped")
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["exports"]["model_layers.onnx"]["T"] == 2  # the layer check ran on the T=2 graph
    # and says so: the user's own model_layers.onnx (verify's default file) was replaced without a word
    assert said[0] == (f"exported model_layers.onnx (T = 2) to check model.onnx layer by layer; it replaces the one at "
                       f"T = {trained_T}")
    assert json.loads((exported / "verify.json").read_text())["ort-cpu"]["inputs"] == {"random": 32}


def test_bench_T_exports_the_timed_file_again_at_that_T_with_its_other_settings(exported):
    """`bench --T 2` on a file exported at the trained T = 4: exported again at T = 2 with the options it was
    exported with (order, --rates, opset, reference counts), said, and timed at 2 into bench_<file>_T2.*, beside
    the trained T's results; --T of the file's own T exports nothing."""
    export_run(exported, order="step", rates=True, opset=17, n_random=16, n_real=0)
    before = json.loads((exported / "manifest.json").read_text())["exports"]["model_per_step.onnx"]
    args = ["bench", str(exported), "--model", "model_per_step.onnx", "--runners", "ort-cpu", "--batch", "2",
            "--iters", "2", "--warmup", "0"]
    result = CliRunner().invoke(cli, [*args, "--T", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"exporting model_per_step.onnx at T = 2 (it is at T = 4; `snncompile export "
                                    f"{exported} --opset 17 --rates --order step --samples 16` writes that one again)\n")
    entry = json.loads((exported / "manifest.json").read_text())["exports"]["model_per_step.onnx"]
    assert entry["T"] == 2 and entry["sha256"] != before["sha256"]
    assert {k: entry[k] for k in ("form", "order", "rates", "opset", "precision", "reference_samples")} == {
        "form": "unrolled", "order": "step", "rates": True, "opset": 17, "precision": "fp32", "reference_samples": [16, 0]}
    data = json.loads((exported / "bench_model_per_step_T2.json").read_text())
    assert data["T"] == 2 and data["runners"]["ort-cpu"]["verified"] is True
    assert not (exported / "bench_model_per_step.json").exists()
    result = CliRunner().invoke(cli, [*args, "--T", "2"])  # already at T = 2: timed as it is
    assert result.exit_code == 0 and "exporting" not in result.output, result.output
    assert json.loads((exported / "manifest.json").read_text())["exports"]["model_per_step.onnx"] == entry
    result = CliRunner().invoke(cli, [*args, "--T", "4"])  # back at the trained T: the plain stem
    assert result.exit_code == 0, result.output
    assert json.loads((exported / "bench_model_per_step.json").read_text())["T"] == 4


def test_gate_fails_a_timed_file_whose_own_verify_failed(exported):
    """The timed file must pass its own verify: scores off by 5.0 (every prediction unchanged) fail the gate,
    and so does a file that is not the one its export recorded."""
    from snncompile.artifacts import sha256_file, update_manifest

    export_run(exported, layers=True, n_random=32, n_real=0)
    path = exported / "model.onnx"
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    for node in model.graph.node:  # scores + 5: the same top-1 everywhere
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(5.0, np.float32), "five"))
    model.graph.node.append(onnx.helper.make_node("Add", [f"{out}_raw", "five"], [out]))
    onnx.save(model, str(path))
    # not the file its export recorded: refused before any runner, and before its _layers twin is exported again
    twin = (exported / "model_layers.onnx").read_bytes()
    with pytest.raises(ArtifactError, match=r"^model.onnx is not the file its export wrote \(sha256 mismatch\): export "
                                            r"it again: `snncompile export .* --samples 32`$"):
        bench_run(exported, ["ort-cpu", "torch"], (2,), warmup=0, iters=2, echo=lambda s: None)
    assert (exported / "model_layers.onnx").read_bytes() == twin and not (exported / "bench.json").exists()
    update_manifest(exported, exports={"model.onnx": {**json.loads((exported / "manifest.json").read_text())["exports"]
                                                      ["model.onnx"], "sha256": sha256_file(path)}})
    data = bench_run(exported, ["ort-cpu", "torch"], (2,), warmup=0, iters=2, echo=lambda s: None)
    skipped = data["runners"]["ort-cpu"]["skipped"]
    assert skipped.startswith("verify failed: model.onnx: scores differ by up to 5 (> 1e-05) on 32 samples, more "
                              "than the 1 that numerical spike flips explain") and "sha256" not in skipped


def test_gate_lets_the_timed_file_flip_on_other_samples_than_its_twin():
    """The timed file runs other kernels than its _layers twin, so a numerical flip may land on a sample of
    its own: scores off on one sample (twice as many as the twin's flipped samples, where it had any) pass;
    more do not, nor NaN, nor more changed predictions."""
    from snncompile.bench_gate import _timed_file_reasons

    def plain(samples_off, changed=0, non_finite=0):
        return {"model_matches_export": True, "tolerance": {"score_atol": 1e-5},
                "outputs": {"scores": {"max_abs": 0.1, "samples_off": samples_off, "non_finite": non_finite}},
                "top1": {"unambiguous": 32, "unambiguous_agree": 32 - changed}}

    def twin(diverged):
        return {"top1": {"samples_diverged": diverged}}

    assert _timed_file_reasons("model.onnx", plain(1, changed=1), twin(0)) == []
    assert _timed_file_reasons("model.onnx", plain(4, changed=4), twin(2)) == []
    assert "on 2 samples, more than the 1" in _timed_file_reasons("model.onnx", plain(2), twin(0))[0]
    assert "3 predictions differ, more than the 2" in _timed_file_reasons("model.onnx", plain(2, changed=3), twin(1))[0]
    assert "NaN/inf" in _timed_file_reasons("model.onnx", plain(0, non_finite=1), twin(0))[0]


def test_a_runner_failing_at_one_batch_size_costs_only_that_row(exported, monkeypatch):
    """Out of memory at one batch size (here raised by the real ort-cpu runner's prepare at batch 8) is a
    `failed:` row; the sizes and runners before and after it are timed and bench.json/md are written."""
    from snncompile.backends import create_runner

    def runner_failing_at_8(name, *args, **kw):
        runner = create_runner(name, *args, **kw)
        if name == "ort-cpu":
            prepare = runner.prepare

            def prepare_or_oom(feed):
                if feed["input"].shape[1] == 8:
                    raise MemoryError("out of memory allocating 8 samples\nsecond line")
                return prepare(feed)

            runner.prepare = prepare_or_oom
        return runner

    monkeypatch.setattr("snncompile.bench.create_runner", runner_failing_at_8)
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "ort-cpu,torch", "--batch", "1,8,2",
                                      "--iters", "2", "--warmup", "0"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    data = json.loads((exported / "bench.json").read_text())
    rows = data["runners"]["ort-cpu"]["by_batch"]
    assert rows["8"] == {"failed": "failed: MemoryError: out of memory allocating 8 samples"}
    assert rows["1"]["p50_ms"] > 0 and rows["2"]["p50_ms"] > 0 and set(data["runners"]["torch"]["by_batch"]) == {"1", "2", "8"}
    assert "| ort-cpu | 8 | failed: MemoryError: out of memory allocating 8 samples |" in (exported / "bench.md").read_text()
    def no_session(name, *args, **kw):  # e.g. a TensorRT engine that does not build here
        if name == "ort-cpu":
            raise RuntimeError("session could not be created")
        return create_runner(name, *args, **kw)

    monkeypatch.setattr("snncompile.bench.create_runner", no_session)
    data = bench_run(exported, ["ort-cpu", "torch"], (1,), warmup=0, iters=2, echo=lambda s: None)
    assert data["runners"]["ort-cpu"]["skipped"] == "failed: RuntimeError: session could not be created"
    assert data["runners"]["torch"]["by_batch"]["1"]["p50_ms"] > 0


def test_kept_rows_table_and_plot_list_batch_sizes_in_numerical_order(exported, monkeypatch, tmp_path):
    """bench.json is written with sorted keys ("1", "16", "2"): the kept rows, bench.md and the plot put the
    batch sizes back in numerical order, and the runners in the registry's."""
    bench_run(exported, ["torch"], (1, 2, 16), warmup=0, iters=1, progress=False, echo=lambda s: None)
    data = bench_run(exported, ["ort-cpu"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    assert list(data["runners"]["torch"]["by_batch"]) == ["1", "2", "16"]  # kept, read back from bench.json
    table = (exported / "bench.md").read_text()
    assert table.index("| torch | 1 |") < table.index("| torch | 2 |") < table.index("| torch | 16 |")
    saved = json.loads((exported / "bench.json").read_text())
    assert list(saved["runners"]["torch"]["by_batch"]) == ["1", "16", "2"]  # as written: sorted as strings
    from snncompile.bench_report import _plot, format_table

    rows = format_table(saved).splitlines()
    assert [r.split("|")[2].strip() for r in rows if r.startswith("| torch |")] == ["1", "2", "16"]
    # runners in the registry's order, not bench.json's sorted keys (ort-cpu < torch), pipeline's re-print
    assert list(saved["runners"]) == ["ort-cpu", "torch"]
    assert [r.split("|")[1].strip() for r in rows if r.startswith("| ")][1:] == ["torch"] * 3 + ["ort-cpu"]
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    drawn = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, x, *a, **kw: drawn.append(list(x)) or real_plot(ax, x, *a, **kw))
    assert _plot(saved, tmp_path / "bench.png")
    assert [1, 2, 16] in drawn and [1, 16, 2] not in drawn


def test_kept_rows_need_the_same_runtime_versions(exported):
    """environment() names the onnxruntime, OpenVINO, TensorRT and triton versions (None when absent, read without
    importing them), so ort-cpu's rows from an older ONNX Runtime are not kept beside newer figures."""
    import onnxruntime

    from snncompile.artifacts import environment

    env = environment()
    assert env["onnxruntime"] == onnxruntime.__version__ and {"openvino", "tensorrt", "triton"} <= set(env)
    try:
        import openvino
    except ImportError:
        openvino = None
    # the wheel's version: 2026.4.1 of 2026.4.1-22982-...
    assert env["openvino"] == (openvino.__version__.split("-")[0] if openvino else None)
    bench_run(exported, ["ort-cpu"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    saved = json.loads((exported / "bench.json").read_text())
    saved["environment"]["onnxruntime"] = "1.0.0"  # measured under another ONNX Runtime
    (exported / "bench.json").write_text(json.dumps(saved))
    record_artifact(exported, "bench.json")  # as that bench would have recorded it: only the versions differ
    data = bench_run(exported, ["torch"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    assert list(data["runners"]) == ["torch"]


def test_without_matplotlib_bench_claims_no_plot_and_removes_a_stale_one(exported, monkeypatch):
    """bench.png is reported only when this bench drew it: without matplotlib an earlier run's plot (figures
    these results replace) is removed, with its manifest entry, and the CLI does not claim it."""
    pytest.importorskip("matplotlib")
    from snncompile.errors import MissingDependencyError

    args = ["bench", str(exported), "--runners", "torch", "--batch", "1", "--iters", "1", "--warmup", "0"]
    drawn = CliRunner().invoke(cli, args)
    assert drawn.exit_code == 0 and drawn.output.splitlines()[-1].endswith("bench.md, bench.png"), drawn.output
    assert "bench.png" in json.loads((exported / "manifest.json").read_text())["artifacts"]

    def no_matplotlib():
        raise MissingDependencyError("matplotlib", "plot")

    monkeypatch.setattr("snncompile.plots.pyplot", no_matplotlib)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"wrote {exported / 'bench.json'}, bench.md"
    assert not (exported / "bench.png").exists()
    assert "bench.png" not in json.loads((exported / "manifest.json").read_text())["artifacts"]
    assert "plot_file" not in json.loads((exported / "bench.json").read_text())


def test_tensorrt_runs_a_tf32x2_export_at_tf32x2():
    """A tf32x2 export's engine is built with TF32 on (its only build precision) and held to tf32x2's (fp32's)
    tolerances: the runner asks for that engine; on any other export tf32x2 means fp32, as before."""
    from snncompile.backends import runner_options
    from snncompile.backends.base import runner_numerics
    from snncompile.backends.trt import ENGINE_PRECISION, engine_name

    assert runner_numerics("trt", "tf32x2", "tf32x2") == "tf32x2"
    assert runner_options("trt", "tf32x2", model_precision="tf32x2") == {"precision": "tf32x2"}
    assert runner_numerics("trt", "tf32x2") == "fp32" and runner_options("trt", "tf32x2") == {"precision": "fp32"}
    assert runner_numerics("ort-cuda", "tf32x2", "tf32x2") == "tf32x2"
    precision = ENGINE_PRECISION.get("tf32x2", "tf32x2")
    assert engine_name("model_tf32x2_layers.onnx", precision) == "model_tf32x2_layers_tf32.plan"


def _bench_files(run) -> dict:
    """What an earlier bench left: its files' bytes and their manifest entries."""
    artifacts = json.loads((run / "manifest.json").read_text())["artifacts"]
    return {name: ((run / name).read_bytes(), artifacts.get(name)) for name in ("bench.json", "bench.md", "bench.png")
            if (run / name).exists()}


def test_a_timed_file_of_an_earlier_checkpoint_is_one_line_before_anything_is_timed(exported, monkeypatch):
    """The walkthrough: export, export --layers, train --resume, bench: every runner was skipped on "real spike
    mismatches" (the gate's reference is the current checkpoint) and bench exited 0. The timed file is refused at
    once, with the command that writes it again, and the earlier results stay."""
    export_run(exported, layers=True, n_random=32, n_real=0)
    bench_run(exported, ["torch", "ort-cpu"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    before = _bench_files(exported)
    replace_checkpoint(exported)
    monkeypatch.setattr("snncompile.bench.create_runner", lambda *a, **k: pytest.fail("a runner was created"))
    monkeypatch.setattr("snncompile.bench.gate", lambda *a, **k: pytest.fail("a runner was verified"))
    result = CliRunner().invoke(cli, ["bench", str(exported), "--batch", "1", "--iters", "1"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: model.onnx was exported from an earlier checkpoint (training continued since): export it again: "
        f"`snncompile export {exported} --samples 32`"], result.output
    assert _bench_files(exported) == before


def test_gate_exports_the_twin_again_when_it_was_exported_from_another_checkpoint(exported):
    """A _layers twin of the same weights but recorded from an earlier checkpoint file (here: the same weights saved
    again at another epoch) would be refused by verify: the gate exports it again rather than skip the runner."""
    export_run(exported, layers=True, n_random=32, n_real=0)
    replace_checkpoint(exported, scale=1.0, epoch=7)
    export_run(exported, layers=False, n_random=32, n_real=0)
    data = bench_run(exported, ["ort-cpu"], (2,), warmup=0, iters=1, echo=lambda s: None)
    assert data["runners"]["ort-cpu"]["verified"] is True, data["runners"]["ort-cpu"].get("skipped")
    exports = json.loads((exported / "manifest.json").read_text())["exports"]
    assert exports["model_layers.onnx"]["checkpoint_sha256"] == exports["model.onnx"]["checkpoint_sha256"]


@pytest.mark.parametrize("kind", ["inputs", "outputs"])
@pytest.mark.parametrize("damage", ["first half", "garbage"])
def test_corrupt_reference_files_are_one_line_before_anything_is_timed(exported, kind, damage):
    """A cut-short reference_outputs npz was a zipfile.BadZipFile traceback out of the first runner's gate: both
    reference files are read whole before any runner, one line naming the file and the command that writes it."""
    export_run(exported, layers=True, n_random=32, n_real=0)  # the twin, sharing the files: the gate exports nothing
    bench_run(exported, ["torch"], (1,), warmup=0, iters=1, progress=False, echo=lambda s: None)
    before = _bench_files(exported)
    path = reference_file(exported, kind, "model.onnx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "first half" else b"\x00garbage, not an npz" * 10)
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch,ort-cpu", "--batch", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {path} is missing or corrupt (")
    assert line.endswith(f"): export again: `snncompile export {exported} --samples 32`"), line
    assert _bench_files(exported) == before


def test_reference_outputs_of_the_wrong_shape_are_one_line_before_anything_is_timed(exported):
    """Stored scores cut short (another export's file copied in) reached every runner's gate: one line now."""
    export_run(exported, layers=True, n_random=32, n_real=0)
    path = reference_file(exported, "outputs", "model.onnx")
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    np.savez(path, **{**arrays, "random/scores": arrays["random/scores"][:5]})
    result = CliRunner().invoke(cli, ["bench", str(exported), "--runners", "torch,ort-cpu", "--batch", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.strip().splitlines()
    assert line == (f"error: {path} is not this export's ('random/scores' is [5, 10], expected [32, classes], one row per "
                    f"'random' input): export again: `snncompile export {exported} --samples 32`"), line


def test_a_bench_that_timed_nothing_is_an_error_and_keeps_the_earlier_results(exported, monkeypatch):
    """Every runner skipped (here: a corrupt verify.json that no gate can merge into, then every batch size failing)
    printed a table of skips, exited 0 and replaced good results: one line naming each runner's reason now, nothing
    written or recorded."""
    from snncompile.backends import create_runner

    args = ["bench", str(exported), "--runners", "ort-cpu", "--batch", "1,2", "--iters", "1", "--warmup", "0"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    before = _bench_files(exported)
    assert set(before) >= {"bench.json", "bench.md"} and all(entry for _, entry in before.values())
    (exported / "verify.json").write_text('{"ort-cpu": ')  # a write cut short
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith(f"error: no runner was timed (ort-cpu: cannot verify: {exported / 'verify.json'}")
    assert error.endswith("verify.json is corrupt: move it aside (or delete it) and verify again): earlier "
                          "results left as they were"), error
    assert _bench_files(exported) == before
    (exported / "verify.json").unlink()

    def failing_at_every_size(name, *args, **kw):
        runner = create_runner(name, *args, **kw)

        def prepare(feed):
            raise MemoryError(f"out of memory allocating {feed['input'].shape[1]} samples")

        runner.prepare = prepare
        return runner

    monkeypatch.setattr("snncompile.bench.create_runner", failing_at_every_size)
    with pytest.raises(ArtifactError) as err:
        bench_run(exported, ["ort-cpu", "torch"], (1, 2), warmup=0, iters=1, echo=lambda s: None)
    assert str(err.value) == ("no runner was timed (ort-cpu: failed: MemoryError: out of memory allocating 1 samples; "
                              "torch: failed: MemoryError: out of memory allocating 1 samples): earlier results left "
                              "as they were")
    assert _bench_files(exported) == before
    from snncompile.bench import _brief

    # a failed verify lists every reason: the first stands for them (all were printed as the runner was skipped)
    reasons = "verify failed: 10634 real spike mismatches, first in lif1 at t=1; top-1 agreement 91.00 %\n< 100 %"
    assert _brief(reasons) == "verify failed: 10634 real spike mismatches, first in lif1 at t=1 ..."
