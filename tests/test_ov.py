"""OpenVINO's CPU plugin as a second ONNX runtime (runner ``ov-cpu``): its numerics settings, shape-specialized
compiles, threads, and verify's verdicts on it (every export form; a wrong file fails)."""

import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

import onnx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import make_run, reference_file, tiny_zoo_config  # noqa: E402
from snncompile.backends import create_runner  # noqa: E402
from snncompile.cli import cli  # noqa: E402
from snncompile.compare import verify_run  # noqa: E402
from snncompile.errors import ArtifactError, InputError, RunnerUnavailableError  # noqa: E402
from snncompile.export_onnx import export_run  # noqa: E402


@pytest.fixture(scope="module")
def layers_run(tmp_path_factory):
    """A tiny paper-style MNIST run (NeuNorm, voting) with its per-layer export."""
    run = make_run(tmp_path_factory.mktemp("ov"), tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, n_random=32, n_real=0)
    return run


def test_compiles_in_fp32_as_written_whatever_the_cpus_default(layers_run):
    """The plugin's default precision is bf16 on CPUs with bf16 instructions: the runner's compiles say f32."""
    x = np.load(reference_file(layers_run))["random"][:, :2]
    with create_runner("ov-cpu", layers_run, "model_layers.onnx") as runner:
        runner.infer({"input": x})
        compiled = next(iter(runner._requests.values())).get_compiled_model()
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert str(compiled.get_property("EXECUTION_MODE_HINT")) == "ExecutionMode.ACCURACY"


def test_one_compile_per_batch_size_and_at_most_four(layers_run, monkeypatch):
    import snncompile.backends.ov as ov_backend

    monkeypatch.setattr(ov_backend, "MAX_COMPILED", 2)
    x = np.load(reference_file(layers_run))["random"]
    with create_runner("ov-cpu", layers_run, "model_layers.onnx") as runner:
        assert runner.inputs[0].shape[1] is None  # the file's batch is dynamic ...
        for b in (5, 7, 5, 9):  # 9 evicts 7
            out = runner.infer({"input": x[:, :b]})
            assert out["scores"].shape == (b, 10) and out["lif1.spikes"].shape[:2] == (x.shape[0], b)
        assert [shapes[0][1][1] for shapes in runner._requests] == [5, 9]
        compiled = runner._requests[next(iter(runner._requests))].get_compiled_model()
        assert compiled.inputs[0].get_partial_shape().is_static  # ... and fixed in each compiled model


def test_outputs_are_copies_a_later_inference_does_not_overwrite(layers_run):
    x = np.load(reference_file(layers_run))["random"][:, :3]
    with create_runner("ov-cpu", layers_run, "model_layers.onnx") as runner:
        first = runner.infer({"input": x})
        kept = {name: value.copy() for name, value in first.items()}
        runner.infer({"input": np.zeros_like(x)})
        for name, value in kept.items():
            np.testing.assert_array_equal(first[name], value)


def test_threads_follow_the_cpu_affinity(layers_run):
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two usable CPUs to restrict to one")
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        with create_runner("ov-cpu", layers_run, "model_layers.onnx") as runner:
            handle = runner.prepare({"input": np.load(reference_file(layers_run))["random"][:, :2]})
            runner.run_prepared(handle)
            assert runner.timing_mode(handle) == "CPU, 1 thread"
            compiled = next(iter(runner._requests.values())).get_compiled_model()
            assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_verify_passes_layer_by_layer(layers_run):
    report = verify_run(layers_run, "ov-cpu", "fp32")
    assert report["passed"], report["reasons"]
    assert report["layers_checked"] and all(layer["real"] == 0 for layer in report["layers"].values())
    result = CliRunner().invoke(cli, ["verify", str(layers_run), "--runner", "ov-cpu", "--no-progress"])
    assert result.exit_code == 0 and "PASSED: ov-cpu matches torch within fp32 tolerances" in result.output


def test_a_perturbed_file_fails_on_openvino_and_names_the_first_divergent_layer(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, n_random=32, n_real=0)
    path = run / "model_layers.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "net.stages.3.weight")  # the conv feeding lif2
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 1, 1] += 5.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    report = verify_run(run, "ov-cpu", "fp32")
    assert not report["passed"] and report["first_divergence"]["layer"] == "lif2"
    assert report["layers"]["lif2"]["real"] > 0


def test_the_step_form_streams_on_openvino(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, form="step", n_random=16, n_real=0)
    report = verify_run(run, "ov-cpu", "fp32", model_file="model_step.onnx")
    assert report["passed"], report["reasons"]
    assert report["layers_checked"] and report["T"] == 4


def test_an_fp16_export_verifies_at_its_own_precision(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, precision="fp16", n_random=32, n_real=0)
    report = verify_run(run, "ov-cpu", "fp32", model_file="model_fp16_layers.onnx")
    assert report["precision"] == "fp16" and report["passed"], report["reasons"]


def test_unavailable_without_openvino_names_the_extra(tmp_path, monkeypatch):
    import snncompile.backends.ov as ov_backend

    monkeypatch.setattr(ov_backend, "_openvino", lambda: None)
    with pytest.raises(RunnerUnavailableError, match=r"pip install 'snncompile\[openvino\]'"):
        create_runner("ov-cpu", tmp_path)


def test_bench_profiles_openvino_with_its_own_counters(layers_run):
    """torch.profiler sees none of OpenVINO's work: --profile on ov-cpu is the plugin's performance counters,
    naming each node's kernel: fp32 ones. A runner made without profiling has no counters to give."""
    from snncompile.bench import bench_run

    bench_run(layers_run, ["ov-cpu"], (2,), iters=2, warmup=1, progress=False, echo=lambda s: None, profile=True,
              model_file="model_layers.onnx")
    text = (layers_run / "bench_model_layers_profile.txt").read_text()
    assert text.startswith("ov-cpu (fp32), batch 2, CPU, ") and "OpenVINO's performance counters, 10 batches (10 inferences" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and not line.startswith("| node")]
    operations = {row[0].strip("| ") for row in rows if len(row) == 4}
    assert {"Convolution", "FullyConnected"} <= operations
    kernels = {row[2] for row in rows if len(row) == 5}
    assert kernels and all(k.endswith("f32") or k.startswith("unknown") for k in kernels), kernels  # no bf16 kernel
    with create_runner("ov-cpu", layers_run, "model_layers.onnx") as plain:
        plain.infer({"input": np.load(reference_file(layers_run))["random"][:, :2]})
        with pytest.raises(ValueError, match="profile=True"):
            plain.profiled_runs()


def test_the_openvino_profile_table_takes_medians_of_the_last_runs():
    """By hand: the first of four inferences (warm-up) left out, each node's median over the last three (a stall in
    one moves nothing), operations summed over their nodes, each node with its kernel."""
    from snncompile.profiling import ov_profile_table

    runs = [{"conv": ("Convolution", "brgconv_avx512_f32", 400.0 if i == 0 else 100.0),
             "mul_a": ("Subgraph", "jit_avx512_f32", 900.0 if i == 2 else 30.0),
             "mul_b": ("Subgraph", "jit_avx512_f32", 10.0)} for i in range(4)]
    text = ov_profile_table(runs, last=3, what="3 batches")
    assert "(3 inferences; its nodes 0.140 ms per run, medians)" in text
    assert "| Convolution | 1 | 100.0 | 71.4 % |" in text and "| Subgraph | 2 | 40.0 | 28.6 % |" in text
    assert "| mul_a | Subgraph | jit_avx512_f32 | 30.0 | 21.4 % |" in text
    assert text.index("| Convolution |") < text.index("| Subgraph |")


def test_an_empty_file_is_one_line_not_a_model_without_inputs(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")  # OpenVINO reads it as a graph with no inputs or outputs
    with pytest.raises(ArtifactError, match=r"model.onnx cannot be loaded by OpenVINO: it has no graph"):
        create_runner("ov-cpu", tmp_path, "model.onnx")


def test_inputs_of_two_batch_sizes_or_an_empty_batch_are_one_line(tmp_path):
    """A step file's input and states must agree on the batch (ONNX Runtime's runners say so too); the plugin's
    own error was three lines of C++ source locations. An empty batch it cannot run at all."""
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, form="step", n_random=4, n_real=0)
    with create_runner("ov-cpu", run, "model_step.onnx") as runner:
        feed = {spec.name: np.zeros([3 if d is None else d for d in spec.shape], np.float32) for spec in runner.inputs}
        feed["input"] = np.zeros((2, *feed["input"].shape[1:]), np.float32)
        with pytest.raises(InputError, match=r"axis 0 \(batch\) is (2|3), input '[\w.]+' gives batch = (2|3)$"):
            runner.infer(feed)
        empty = {name: np.zeros((0, *value.shape[1:]), np.float32) for name, value in feed.items()}
        with pytest.raises(InputError, match=r"axis 0 \(batch\) is 0: OpenVINO runs no empty batch$"):
            runner.infer(empty)


def test_the_table_states_the_threads_the_plugin_runs(layers_run):
    """The plugin caps INFERENCE_NUM_THREADS at the cores it may use: --threads 8 on a 2-core machine runs 2, and
    bench's execution column says what ran, not what was asked."""
    from snncompile.backends.base import usable_cpus
    from snncompile.text import counted

    asked = usable_cpus() + 6
    with create_runner("ov-cpu", layers_run, "model_layers.onnx", threads=asked) as runner:
        handle = runner.prepare({"input": np.load(reference_file(layers_run))["random"][:, :2]})
        runner.run_prepared(handle)
        ran = int(next(iter(runner._requests.values())).get_compiled_model().get_property("INFERENCE_NUM_THREADS"))
        assert runner.timing_mode(handle) == f"CPU, {counted(ran, 'thread')}"
        assert ran <= usable_cpus() < asked


def test_openvino_streams_with_states_bound_in_place_as_with_states_through_the_host(tmp_path, monkeypatch):
    """The bound stream (each state passed as the plugin's own output tensor, two requests alternating, call 0
    reading zeros) gives the bits of T plain calls, stream after stream and across batch sizes, over more batch
    sizes than the runner keeps compiled models for (their streams go with them)."""
    import snncompile.backends.ov as ov_backend
    from snncompile.streaming import StreamedRunner

    monkeypatch.setattr(ov_backend, "MAX_COMPILED", 2)
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, form="step", n_random=8, n_real=0)
    x = np.load(reference_file(run, model_file="model_step.onnx"))["random"]
    steps = x.shape[0]
    with StreamedRunner(create_runner("ov-cpu", run, "model_step.onnx"), steps) as bound, \
            StreamedRunner(create_runner("ov-cpu", run, "model_step.onnx"), steps, bind_states=False) as host:
        assert bound.bound and not host.bound
        for batch, offset in ((3, 0), (3, 3), (1, 0), (2, 5), (3, 1)):
            feed = {"input": np.ascontiguousarray(x[:, offset:offset + batch])}
            got, want = bound.infer(feed), host.infer(feed)
            assert set(got) == set(want) == set(bound.output_names)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{batch} {offset} {name}")
        assert len(bound.inner._streams) <= 2
        handle = bound.prepare({"input": np.ascontiguousarray(x[:, :3])})
        bound.run_prepared(handle)  # timed calls: nothing copied out
        np.testing.assert_array_equal(handle.requests[-1].get_tensor("scores").data, host.infer({"input": x[:, :3]})["scores"])
        assert bound.timing_mode(handle).endswith(f"{steps} step calls, states bound in place")


def test_a_bound_stream_is_profiled_call_by_call(tmp_path):
    """bench --profile on a step file: the profiling runner's bound stream records each of its T calls."""
    from snncompile.streaming import StreamedRunner

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, form="step", n_random=4, n_real=0)
    x = np.load(reference_file(run, model_file="model_step.onnx"))["random"][:, :2]
    with StreamedRunner(create_runner("ov-cpu", run, "model_step.onnx", profile=True), x.shape[0]) as runner:
        handle = runner.prepare({"input": x})
        runner.run_prepared(handle)
        runner.run_prepared(handle)
        profiled = runner.inner.profiled_runs()
    assert len(profiled) == 2 * x.shape[0] and all("Convolution" in {op for op, _, _ in run.values()} for run in profiled)
