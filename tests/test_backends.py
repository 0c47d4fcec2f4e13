"""One conformance test over every runner present, plus the registry's behaviour without runtimes."""

import numpy as np
import pytest

from conftest import REPO
from helpers import make_run, ort_cuda_on_the_cpu, reference_file, tiny_zoo_config
from snncompile.backends import RUNNERS, available_runners, create_runner
from snncompile.errors import ConfigError, RunnerUnavailableError
from snncompile.text import counted

AVAILABLE = available_runners()
GPU_RUNNERS = {"ort-cuda", "trt"} | ({"torch-fast"} if __import__("torch").cuda.is_available() else set())
# runners whose float arithmetic is not the reference's own (GPU kernels, compiled code, per-step convs
# on other batch shapes, OpenVINO's own JIT convolutions): judged by verify
OTHER_ARITHMETIC = GPU_RUNNERS | {"torch-compile", "torch-loop", "ov-cpu"}


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path_factory.mktemp("conf"), tiny_zoo_config(REPO / "models" / "dvs_cifar10.toml"))
    export_run(run, rates=True, n_random=32, n_real=0)
    return run


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_runner_conformance(name, exported_run):
    if AVAILABLE[name] is not None:
        pytest.skip(f"{name}: {AVAILABLE[name]}")
    x = np.load(reference_file(exported_run))["random"]
    refs = np.load(reference_file(exported_run, "outputs"))
    with create_runner(name, exported_run) as runner:
        assert runner.output_names == ["scores", "rates"]
        assert [s.name for s in runner.inputs] == ["input"]
        out = runner.infer({"input": x})
    assert set(out) == {"scores", "rates"}
    assert out["scores"].shape == (32, 10) and out["scores"].dtype == np.float32
    if name in OTHER_ARITHMETIC:
        # cuDNN sums convolutions in another order than the CPU reference, compiled code fuses float ops:
        # a membrane within rounding of V_th may flip (then the scores of that sample differ); verify
        # proves each flip is numerical
        from snncompile.compare import verify_run

        report = verify_run(exported_run, name, "fp32")
        assert report["passed"], report["reasons"]
        return
    # fp32 on the CPU: the same spikes, hence the same voted scores, bit for bit
    np.testing.assert_array_equal(out["scores"], refs["random/scores"])
    np.testing.assert_array_equal(out["rates"], refs["random/rates"])


def test_unknown_runner_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown runner .tensorflow. \\(known: torch, torch-fast, torch-compile, torch-loop, ort-cpu, ort-cuda, ov-cpu, trt\\)"):
        create_runner("tensorflow", tmp_path)


def test_unavailable_runner_names_the_reason(tmp_path, monkeypatch):
    import snncompile.backends.ort as ort_mod

    monkeypatch.setattr(ort_mod, "_onnxruntime", lambda: None)
    with pytest.raises(RunnerUnavailableError, match=r"pip install 'snncompile\[onnx\]'"):
        create_runner("ort-cpu", tmp_path)


def test_torch_fast_reports_every_layer_spike_exact_on_cpu(tmp_path):
    """On the CPU torch-fast is the unfused layer-major path: verify finds no flip at all (the fused
    kernel path is checked in test_kernels.py, in Triton's interpreter)."""
    pytest.importorskip("onnxruntime")
    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, order="step", n_random=32, n_real=0)  # a per-step file: torch-fast still runs layer-major
    # device="cpu": on a GPU machine too, this is the CPU path's test (the GPU's has its own below)
    report = verify_run(run, "torch-fast", "fp32", model_file="model_per_step_layers.onnx", options={"device": "cpu"})
    assert report["passed"] and report["layers_checked"], report["reasons"]
    assert sum(s["flips"] for s in report["layers"].values()) == 0
    with create_runner("torch-fast", run, "model_per_step_layers.onnx", device="cpu") as runner:
        assert runner.graph.order == "layer" and not runner.graph.net.fused_lif and not runner.cuda_graph


def test_torch_fast_bf16_flips_are_measured_not_hidden(tmp_path):
    pytest.importorskip("onnxruntime")
    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-cifar.toml"))
    export_run(run, layers=True, n_random=32, n_real=0)
    fp32 = verify_run(run, "torch-fast", "fp32")
    bf16 = verify_run(run, "torch-fast", "bf16", options={"precision": "bf16"})
    assert fp32["passed"], fp32["reasons"]
    if not __import__("torch").cuda.is_available():
        # bit for bit on the CPU; on a GPU cuDNN's fp32 kernels sum in another order than the reference's
        assert fp32["outputs"]["scores"]["max_abs"] == 0.0
    # bf16 convs round the currents: some spikes flip, and every one is counted and classified
    flips = sum(s["flips"] for s in bf16["layers"].values())
    assert flips > 0 and flips == sum(s["numerical"] + s["real"] + s["propagated"] for s in bf16["layers"].values())


def test_torch_fast_bad_options_are_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    export_run(run, n_random=4, n_real=0)
    with pytest.raises(ConfigError, match="torch-fast precision must be one of fp32, tf32, fp16, bf16, tf32x2, got .int8."):
        create_runner("torch-fast", run, precision="int8")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(RunnerUnavailableError, match="CUDA graphs need a CUDA device"):
            create_runner("torch-fast", run, cuda_graph=True)


@pytest.mark.parametrize("autotune", [True, False])
def test_torch_fast_forward_runs_under_its_cudnn_autotuning_setting(exported_run, monkeypatch, autotune):
    """cuDNN autotuning is on inside torch-fast's forward (where CUDA-graph warm-up times each conv shape)
    unless turned off, and the process-wide flag is restored after every call."""
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not autotune)
    with create_runner("torch-fast", exported_run, **({} if autotune else {"autotune": False})) as runner:
        seen = []
        forward = runner.graph.forward
        monkeypatch.setattr(runner.graph, "forward", lambda x: seen.append(torch.backends.cudnn.benchmark) or forward(x))
        runner.infer({"input": np.load(reference_file(exported_run))["random"][:, :2]})
    # one forward on the CPU; on CUDA the warm-up forwards and the captured one
    assert seen and set(seen) == {autotune} and torch.backends.cudnn.benchmark is (not autotune)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_fast_on_cuda_replays_its_graph_and_verifies(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("triton")
    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, n_random=64, n_real=0)
    report = verify_run(run, "torch-fast", "fp32")
    assert report["passed"], report["reasons"]
    assert sum(s["real"] for s in report["layers"].values()) == 0
    x = np.load(reference_file(run))["random"]
    with create_runner("torch-fast", run, "model_layers.onnx") as runner:  # the file verify ran
        assert runner.cuda_graph and runner.graph.net.fused_lif
        first = runner.infer({"input": x[:, :8]})
        runner.infer({"input": x[:, 8:24]})  # another shape: its own graph
        again = runner.infer({"input": x[:, :8]})  # replayed with new input copied in
    np.testing.assert_array_equal(first["scores"], again["scores"])


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "tf32x2"])
def test_torch_fast_channels_last_on_cuda_verifies_through_the_fused_kernels(tmp_path, precision):
    """bench --channels-last on CUDA: channels_last currents into the fused LIF and LIF + pool kernels (the
    one-warp pooled forward), captured in a CUDA graph, split TF32 layers included: spike-exact at fp32's
    tolerances, like NCHW."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("triton")
    import torch

    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-cifar.toml"))
    export_run(run, layers=True, n_random=64, n_real=0)
    report = verify_run(run, "torch-fast", precision, options={"precision": precision, "channels_last": True})
    assert report["passed"], report["reasons"]
    with create_runner("torch-fast", run, "model_layers.onnx", precision=precision, channels_last=True) as runner:
        assert runner.cuda_graph and runner.graph.net.fused_lif
        convs = [m for m in runner.graph.net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_free_dimensions_reads_each_named_axis_once():
    from snncompile.backends.ort import free_dimensions

    declared = {"input": (4, "batch", 2, 8, 8), "state": ("batch", 16)}
    feed = {"input": np.zeros((4, 3, 2, 8, 8), np.float32), "state": np.zeros((3, 16), np.float32)}
    assert free_dimensions(feed, declared) == (("batch", 3),)
    assert free_dimensions({"x": np.zeros((5, 2))}, {"x": (5, 2)}) == ()
    from snncompile.errors import InputError

    feed["state"] = np.zeros((2, 16), np.float32)
    with pytest.raises(InputError, match=r"input 'state': axis 0 \(batch\) is 2, another input gives batch = 3"):
        free_dimensions(feed, declared)


def test_ort_cpu_sessions_are_shape_specialized_and_bounded(exported_run, monkeypatch):
    pytest.importorskip("onnxruntime")
    import snncompile.backends.ort as ort_mod

    monkeypatch.setattr(ort_mod, "MAX_SESSIONS", 2)
    x = np.load(reference_file(exported_run))["random"]
    refs = np.load(reference_file(exported_run, "outputs"))
    with create_runner("ort-cpu", exported_run) as runner:
        for b in (5, 7, 5, 9, 32):  # 9 evicts 7, 32 evicts 5
            out = runner.infer({"input": x[:, :b]})
            np.testing.assert_array_equal(out["scores"], refs["random/scores"][:b])
        assert list(runner._specialized) == [(("batch", 9),), (("batch", 32),)]
        session = runner._specialized[(("batch", 32),)]
        assert session.get_inputs()[0].shape[1] == 32  # the batch is fixed in the session itself


def test_ort_cpu_threads_follow_the_cpu_affinity(exported_run):
    """Under taskset (or a cpuset), ONNX Runtime gets one thread per CPU the process may use, not per CPU of
    the machine: more would only take turns on the same cores."""
    import os

    pytest.importorskip("onnxruntime")
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two usable CPUs to restrict to one")
    os.sched_setaffinity(0, {min(allowed)})
    try:
        with create_runner("ort-cpu", exported_run) as runner:
            x = np.load(reference_file(exported_run))["random"][:, :2]
            handle = runner.prepare({"input": x})
            runner.run_prepared(handle)
            assert runner.timing_mode(handle) == "CPU, 1 thread"
            session = next(iter(runner._specialized.values()))
            assert session.get_session_options().intra_op_num_threads == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_ort_cuda_binding_path_on_the_cpu_provider(exported_run):
    pytest.importorskip("onnxruntime")
    x = np.load(reference_file(exported_run))["random"]
    refs = np.load(reference_file(exported_run, "outputs"))
    with ort_cuda_on_the_cpu()(exported_run) as runner:
        first = runner.infer({"input": x[:, :8]})
        other = runner.infer({"input": x[:, 8:16]})  # same bound buffers, new data copied in
        np.testing.assert_array_equal(first["scores"], refs["random/scores"][:8])
        np.testing.assert_array_equal(other["scores"], refs["random/scores"][8:16])
        np.testing.assert_array_equal(runner.infer({"input": x})["rates"], refs["random/rates"])
        handle = runner.prepare({"input": x[:, :8]})
        assert handle is runner._specialized[(("batch", 8),)]  # the session that infer used
        runner.run_prepared(handle)
        # a CUDA graph needs every node on the one provider, asked of ONNX Runtime by disabling its CPU
        # fallback; with the CPU as that provider it refuses the request, and the runner says why
        assert runner.timing_mode(handle).startswith("no CUDA graph: ") and "fallback" in runner.timing_mode(handle)
        np.testing.assert_array_equal(handle.binding.copy_outputs_to_cpu()[0], first["scores"])
    with ort_cuda_on_the_cpu()(exported_run, cuda_graph=False) as plain:
        handle = plain.prepare({"input": x[:, :4]})
        assert plain.timing_mode(handle) == "CUDA graph off" and not handle.cuda_graph


@pytest.mark.gpu
@pytest.mark.skipif(AVAILABLE["ort-cuda"] is not None, reason=f"ort-cuda: {AVAILABLE['ort-cuda']}")
def test_ort_cuda_captures_a_cuda_graph_and_replays_new_inputs(exported_run):
    x = np.load(reference_file(exported_run))["random"]
    with create_runner("ort-cuda", exported_run) as runner:
        first = runner.infer({"input": x[:, :8]})
        handle = runner.prepare({"input": x[:, 8:16]})
        assert runner.timing_mode(handle) == "CUDA graph", runner.timing_mode(handle)
        for _ in range(3):  # past ONNX Runtime's warm-up runs: captured, then replayed
            runner.run_prepared(handle)
        replayed = runner.infer({"input": x[:, :8]})  # the graph reads the new data copied into its buffer
    np.testing.assert_array_equal(first["scores"], replayed["scores"])  # same session: same kernels
    with create_runner("ort-cuda", exported_run, cuda_graph=False) as plain:
        assert plain.timing_mode(plain.prepare({"input": x[:, :8]})) == "CUDA graph off"


def test_torch_compile_is_opt_in_and_runs_the_per_timestep_loop(exported_run):
    from snncompile.backends import default_runners

    assert "torch-compile" not in default_runners() and "torch-compile" in RUNNERS
    with create_runner("torch-compile", exported_run) as runner:
        # reduce-overhead mode (CUDA graphs) on a GPU; nothing to capture on the CPU
        torch = __import__("torch")
        expected = "CUDA graph" if torch.cuda.is_available() else f"CPU, {counted(torch.get_num_threads(), 'thread')}"
        assert runner.graph.order == "step" and runner.timing_mode(None) == expected


def test_torch_compile_compiles_whole_graphs_for_every_batch_size(exported_run):
    """The strongest plain-PyTorch reference must not be handicapped: training's spike marking stopped Dynamo
    after every LIF step (23 graph breaks in the digits net, 3-5x slower), and past Dynamo's limit of compiled
    shapes (8; lowered to 1 here to stay quick) later batch sizes ran eagerly under the runner's name."""
    torch = __import__("torch")
    import torch._dynamo.utils as dynamo_utils

    # config.patch, not monkeypatch: on torch 2.11 monkeypatch's undo left the key deleted for later tests
    with torch._dynamo.config.patch(recompile_limit=1), create_runner("torch-compile", exported_run) as runner:
        dynamo_utils.counters.clear()
        steps, _, *frame = runner.inputs[0].shape  # [T, batch, C, H, W]
        for batch in (1, 2):
            x = np.random.default_rng(batch).random((steps, batch, *frame), dtype=np.float32)
            runner.infer({"input": x})
        assert sum(dynamo_utils.counters["graph_break"].values()) == 0, dict(dynamo_utils.counters["graph_break"])
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # one whole graph per batch size, none eager


def test_torch_loop_is_the_opt_in_per_timestep_reference(exported_run):
    from snncompile.backends import default_runners
    from snncompile.compare import verify_run

    assert "torch-loop" not in default_runners() and "torch-loop" in RUNNERS
    with create_runner("torch-loop", exported_run) as runner:
        torch = __import__("torch")
        cuda = torch.cuda.is_available()
        mode = "" if cuda else f"CPU, {counted(torch.get_num_threads(), 'thread')}"  # eager on a GPU: no graph
        assert runner.graph.order == "step" and runner.device.type == ("cuda" if cuda else "cpu")
        assert runner.timing_mode(None) == mode
    report = verify_run(exported_run, "torch-loop", "fp32")
    assert report["passed"], report["reasons"]


@pytest.mark.parametrize("name", ["torch-loop", "torch-compile"])
def test_per_timestep_references_refuse_a_streaming_export_in_one_line(name, tmp_path):
    pytest.importorskip("onnxscript")
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    export_run(run, form="step", n_random=4, n_real=0)
    with pytest.raises(ConfigError, match=f"^{name} runs unrolled exports; model_step.onnx is a 'step' export$"):
        create_runner(name, run, "model_step.onnx")
