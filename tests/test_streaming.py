"""The step-form export streamed over T calls: the same spikes as the per-timestep graph, verified layer by layer on
ONNX Runtime (a perturbed file fails), timed by bench."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import make_run, ort_cuda_on_the_cpu, tiny_zoo_config  # noqa: E402
from snncompile.backends import available_runners, create_runner  # noqa: E402
from snncompile.bench import bench_run  # noqa: E402
from snncompile.cli import cli  # noqa: E402
from snncompile.compare import verify_run  # noqa: E402
from snncompile.errors import ArtifactError  # noqa: E402
from snncompile.export_onnx import export_run  # noqa: E402
from snncompile.graphs import UnrolledGraph  # noqa: E402
from snncompile.runs import load_network  # noqa: E402
from snncompile.streaming import StreamedRunner  # noqa: E402
from snncompile.streaming import streamed as streamed_runner  # noqa: E402


@pytest.fixture
def streamed(tmp_path):
    """A tiny paper-style MNIST run (NeuNorm, voting) with its step-form export."""
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, form="step", n_random=16, n_real=0)
    return run


def _inputs(run, batch: int = 3) -> np.ndarray:
    manifest = json.loads((run / "manifest.json").read_text())
    with np.load(run / manifest["exports"]["model_step.onnx"]["reference_files"][0]) as saved:
        return np.ascontiguousarray(saved["random"][:, :batch])


def test_the_torch_module_streamed_is_the_per_timestep_graph_bit_for_bit(streamed):
    """T calls of the step module, each one's states fed to the next, give every layer's spikes and membranes of the
    unrolled per-timestep graph, which runs the same steps in one module: equal bits, not close ones."""
    x = _inputs(streamed)
    with StreamedRunner(create_runner("torch", streamed, "model_step.onnx"), x.shape[0]) as runner:
        got = runner.infer({"input": x})
    graph = UnrolledGraph(load_network(streamed)[1], layers=True, order="step").eval()
    with torch.no_grad():
        want = dict(zip(graph.output_names, (t.numpy() for t in graph(torch.from_numpy(x)))))
    assert set(got) == set(want) and len(got) > 1 + 2  # scores and several layers
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert any(got[f"{lif}.spikes"].any() for lif in ("lif1", "lif2"))  # spikes to compare, not all zeros


def test_verify_streams_the_step_form_layer_by_layer_and_a_perturbed_file_fails(streamed):
    report = verify_run(streamed, "ort-cpu", "fp32", model_file="model_step.onnx")
    assert report["passed"], report["reasons"]
    # the torch reference, streamed, reproduces the scores the export stored; every LIF layer was compared
    assert report["reference_reproduced"] and report["layers_checked"] and set(report["layers"]) >= {"lif1", "lif2"}

    path = streamed / "model_step.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "net.stages.3.weight")  # the second conv, into lif2
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 1, 1] += 5.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    report = verify_run(streamed, "ort-cpu", "fp32", model_file="model_step.onnx")
    assert not report["passed"] and not report["model_matches_export"]
    assert report["first_divergence"] == {"layer": "lif2", "step": 1}
    assert report["layers"]["lif1"]["flips"] == 0 and report["layers"]["lif2"]["real"] > 0


def test_cli_verify_of_the_step_form_uses_the_runners_that_stream_it(streamed):
    result = CliRunner().invoke(cli, ["verify", str(streamed), "--model", "model_step.onnx", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "PASSED: ort-cpu matches torch" in result.output and "torch-fast" not in result.output


def test_bench_times_t_streamed_calls_and_skips_runners_of_unrolled_exports(streamed):
    said: list[str] = []
    results = bench_run(streamed, ["torch", "ort-cpu", "torch-fast"], (1, 2), warmup=1, iters=2, progress=False,
                        echo=said.append, model_file="model_step.onnx", profile=True)
    steps = results["T"]
    # ONNX Runtime's own profile of the stream: every step call a session run of the step graph
    profile = (streamed / results["profile_file"]).read_text()
    assert f"ONNX Runtime's profiler, 10 batches ({10 * steps} session runs;" in profile and "| Conv |" in profile
    for name, how in (("torch", f"{steps} step calls"), ("ort-cpu", f"{steps} step calls, states bound in place")):
        rows = results["runners"][name]["by_batch"]
        assert set(rows) == {"1", "2"} and all(r["execution"].endswith(how) for r in rows.values())
    assert results["runners"]["ort-cpu"]["verified"]
    assert "runs unrolled exports" in results["runners"]["torch-fast"]["skipped"]
    table = (streamed / "bench_model_step.md").read_text()
    assert table.startswith(f"model mnist (model_step.onnx, streamed, one call per step), T = {steps}")


def test_onnx_runtime_streams_with_states_bound_in_place_as_with_states_through_the_host(streamed, monkeypatch):
    """ONNX Runtime's bound stream (states alternating between device buffers, call 0 reading zeros) gives the bits
    of T plain calls, stream after stream: a stream that wrote into its zeros, or read a stale set, would start the
    second input from the first one's states. Over more batch sizes than the runner keeps sessions for, so streams
    are released with theirs and made again."""
    import snncompile.backends.ort as ort_backend

    monkeypatch.setattr(ort_backend, "MAX_SESSIONS", 2)
    x = _inputs(streamed, batch=8)
    with StreamedRunner(create_runner("ort-cpu", streamed, "model_step.onnx"), x.shape[0]) as bound, \
            StreamedRunner(create_runner("ort-cpu", streamed, "model_step.onnx"), x.shape[0], bind_states=False) as host:
        assert bound.bound and not host.bound
        assert set(bound.infer({"input": x[:, :2]})) == set(host.output_names) == set(bound.output_names)
        _same_streams(bound, host, x, batches=((3, 0), (3, 3), (1, 0), (2, 5), (3, 1)))
        assert len(bound.inner._streams) <= 2
        handle = bound.prepare({"input": np.ascontiguousarray(x[:, :3])})
        bound.run_prepared(handle)  # timed calls: nothing copied back
        assert np.array_equal(handle.bindings[-1].copy_outputs_to_cpu()[0], host.infer({"input": x[:, :3]})["scores"])


def _same_streams(bound: StreamedRunner, host: StreamedRunner, x: np.ndarray, batches=((3, 0), (3, 3), (2, 1))):
    for batch, offset in batches:
        feed = {"input": np.ascontiguousarray(x[:, offset:offset + batch])}
        got, want = bound.infer(feed), host.infer(feed)
        for name in want:
            assert np.array_equal(got[name], want[name]), (batch, offset, name)


def _entry(run_options, key: str):
    """A RunOptions config entry, None where unset (ONNX Runtime raises for those)."""
    if run_options is None:
        return None
    try:
        return run_options.get_run_config_entry(key)
    except RuntimeError:
        return None


def test_ort_cuda_binds_one_graph_per_call_checked_on_the_cpu_provider(streamed):
    """ort-cuda's bound stream, on ONNX Runtime's CPU provider: each call gets a graph id of its own (1..T; a graph
    replays the buffers it was captured with), and the stream gives the bits the same session gives call by call
    through the runner's own binding, with the states through the host."""
    x = _inputs(streamed, batch=8)
    steps = x.shape[0]
    inner = ort_cuda_on_the_cpu(graphs=True)(streamed, "model_step.onnx")
    with StreamedRunner(inner, steps) as bound:
        host = StreamedRunner(inner, steps, bind_states=False)  # the same runner: the same sessions
        _same_streams(bound, host, x)
        handle = bound.prepare({"input": np.ascontiguousarray(x[:, :3])})
        for options in (handle.run_options, handle.timed_options):
            assert [o.get_run_config_entry("gpu_graph_id") for o in options] == [str(t + 1) for t in range(steps)]
        # timed streams queue every call but the last; collected ones wait at each (the copies need it)
        queued = [[_entry(o, "disable_synchronize_execution_providers") for o in options]
                  for options in (handle.run_options, handle.timed_options)]
        assert queued == [[None] * steps, ["1"] * (steps - 1) + [None]]
        bound.run_prepared(handle)
        assert np.array_equal(handle.bindings[-1].copy_outputs_to_cpu()[0], host.infer({"input": x[:, :3]})["scores"])
        assert bound.timing_mode(handle).endswith(f"{steps} step calls, states bound in place")


@pytest.mark.gpu
@pytest.mark.skipif(available_runners()["ort-cuda"] is not None, reason="ort-cuda is unavailable here")
def test_ort_cuda_streams_its_states_on_the_gpu_through_captured_graphs(streamed):
    """On the GPU: T captured graphs, replayed stream after stream with new frames, give the bits of the same
    session's calls with the states through the host."""
    x = _inputs(streamed, batch=8)
    inner = create_runner("ort-cuda", streamed, "model_step.onnx")
    with StreamedRunner(inner, x.shape[0]) as bound:
        host = StreamedRunner(inner, x.shape[0], bind_states=False)
        handle = bound.prepare({"input": np.ascontiguousarray(x[:, :3])})
        for _ in range(3):  # past ONNX Runtime's warm-up runs: every call's graph captured, then replayed
            bound.run_prepared(handle)
        assert bound.timing_mode(handle).startswith("CUDA graph, "), bound.timing_mode(handle)
        # a timed stream (its calls queued without waiting) ends with the scores of a stream that waited at each
        assert np.array_equal(handle.bindings[-1].copy_outputs_to_cpu()[0], host.infer({"input": x[:, :3]})["scores"])
        _same_streams(bound, host, x, batches=((3, 0), (3, 3), (3, 5)))


def test_only_the_step_form_is_streamed(streamed):
    export_run(streamed, n_random=4, n_real=0)
    exports = json.loads((streamed / "manifest.json").read_text())["exports"]
    with streamed_runner(create_runner("ort-cpu", streamed, "model.onnx"), exports["model.onnx"]) as plain:
        assert not isinstance(plain, StreamedRunner) and plain.output_names == ["scores"]
    with streamed_runner(create_runner("ort-cpu", streamed, "model_step.onnx"), exports["model_step.onnx"]) as runner:
        assert isinstance(runner, StreamedRunner) and runner.inputs[0].shape[0] == exports["model_step.onnx"]["T"]


def test_a_step_export_from_before_its_reference_files_is_one_line(streamed):
    """Step exports used to save no reference inputs: verify says to export again, it does not read another's."""
    manifest = json.loads((streamed / "manifest.json").read_text())
    manifest["exports"]["model_step.onnx"]["reference_files"] = []
    (streamed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"no reference inputs \(it predates them\): export again: "
                                            r"`snncompile export \S+ --form step --samples 16`$"):
        verify_run(streamed, "ort-cpu", "fp32", model_file="model_step.onnx")


def test_export_refuses_a_step_module_that_drops_a_state(tmp_path, monkeypatch):
    """The export checks the step module against the unrolled network in torch, exactly: a module that forgets
    its membranes between calls (every call starts from rest) is refused, and nothing is written."""
    import snncompile.export_onnx as export_onnx
    from snncompile.errors import ExportError
    from snncompile.graphs import StepGraph

    class Forgetful(StepGraph):
        def forward(self, x_t, output_sum, *flat_states):
            zeros = [torch.zeros_like(t) for t in flat_states]
            return super().forward(x_t, output_sum, *zeros)

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    monkeypatch.setattr(export_onnx, "StepGraph", Forgetful)
    with pytest.raises(ExportError, match=r"4 calls of the step module differ from the unrolled network"):
        export_run(run, form="step", n_random=16, n_real=0)
    assert not (run / "model_step.onnx").exists()
