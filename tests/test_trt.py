"""TensorRT path: everything checkable without TensorRT runs everywhere; builds run where it imports."""

import importlib.util

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, ZOO, zoo_ids
from helpers import make_run, replace_checkpoint, tiny_zoo_config
from snncompile.backends import available_runners, create_runner
from snncompile.backends.trt import BuildOptions, parse_profile
from snncompile.cli import cli
from snncompile.errors import ConfigError, RunnerUnavailableError
from snncompile.export_onnx import export_run

HAVE_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx", "tensorrt_bindings", "tensorrt_rtx_bindings"))


def _skip_unless_can_build():
    """TensorRT builds for the GPU it runs on; TensorRT-RTX builds portable engines with or without one."""
    import torch

    from snncompile.backends.trt import is_rtx, tensorrt_module

    if not torch.cuda.is_available() and not is_rtx(tensorrt_module().__name__):
        pytest.skip("TensorRT needs a CUDA GPU to build")


def test_parse_profile():
    assert parse_profile("1:16:128") == (1, 16, 128)
    for bad in ("1:16", "a:b:c", "0:1:2", "4:2:8", "1:16:8"):
        with pytest.raises(ConfigError):
            parse_profile(bad)


def test_build_options_validation():
    with pytest.raises(ConfigError, match="--precision must be one of fp32, tf32, fp16, bf16"):
        BuildOptions(precision="int8").validate()
    with pytest.raises(ConfigError, match="--workspace must be at least 16 MB"):
        BuildOptions(workspace_mb=1).validate()


def test_without_tensorrt_every_entry_point_says_which_extra(tmp_path, monkeypatch):
    import snncompile.backends.trt as trt_backend

    monkeypatch.setattr(trt_backend, "TENSORRT_MODULES", ("tensorrt_that_is_not_installed",))  # absent even where it is
    assert "pip install 'snncompile[trt]'" in available_runners()["trt"]
    with pytest.raises(RunnerUnavailableError, match=r"snncompile\[trt\]"):
        create_runner("trt", tmp_path)
    pytest.importorskip("onnxruntime")
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    export_run(run, n_random=8, n_real=0)
    result = CliRunner().invoke(cli, ["build", str(run), "--precision", "fp16"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: TensorRT (tensorrt or tensorrt_rtx) is not installed: pip install "
                                     "'snncompile[trt]' (or 'snncompile[trt-rtx]': TensorRT-RTX, which builds engines "
                                     "without a GPU)")


def test_bad_profile_is_exit_2_before_touching_tensorrt(tmp_path):
    result = CliRunner().invoke(cli, ["build", str(tmp_path), "--batch", "8:4:2"])
    assert result.exit_code == 2 and result.output.strip() == "error: --batch needs 1 <= MIN <= OPT <= MAX, got '8:4:2'"


def test_build_needs_an_export(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    result = CliRunner().invoke(cli, ["build", str(run)])
    assert result.exit_code == 1 and f"has no model.onnx: run `snncompile export {run}` first" in result.output
    export_run(run, n_random=2, n_real=0)
    replace_checkpoint(run)  # training continued since: an engine of the export's weights would fail verify
    result = CliRunner().invoke(cli, ["build", str(run)])
    assert result.exit_code == 1 and result.output.strip() == (
        f"error: model.onnx was exported from an earlier checkpoint (training continued since): export it again: "
        f"`snncompile export {run} --samples 2`")
    result = CliRunner().invoke(cli, ["build", str(run), "--model", "model_step.onnx"])
    assert result.exit_code == 1 and f"has no model_step.onnx: run `snncompile export {run} --form step` first" in result.output
    export_run(run, n_random=2, n_real=0)  # of the current checkpoint again; then another file copied over it
    with open(run / "model.onnx", "ab") as f:  # the engine's sidecar would record the export's hash as its source
        f.write(b"\0")
    result = CliRunner().invoke(cli, ["build", str(run)])
    assert result.exit_code == 1 and result.output.strip() == (
        f"error: model.onnx is not the file its export wrote (sha256 mismatch): export it again: "
        f"`snncompile export {run} --samples 2`")
    assert not list(run.glob("*.plan"))


def test_every_input_of_an_engine_spans_the_batch_profile():
    """The unrolled input's T stays fixed; a step export's inputs (the frame, output_sum, every state) are all
    [B, ...]. Pure function: no TensorRT needed."""
    from snncompile.backends.trt import profile_shapes
    from snncompile.errors import ExportError

    assert profile_shapes("input", (8, -1, 2, 34, 34), (1, 16, 128)) == [
        [8, 1, 2, 34, 34], [8, 16, 2, 34, 34], [8, 128, 2, 34, 34]]
    assert profile_shapes("state.lif3.u", (-1, 256), (2, 4, 8)) == [[2, 256], [4, 256], [8, 256]]
    with pytest.raises(ExportError, match=r"^input input of shape \(-1, -1, 2\) has 2 dynamic dimensions"):
        profile_shapes("input", (-1, -1, 2), (1, 2, 4))
    with pytest.raises(ExportError, match="has 0 dynamic dimensions"):
        profile_shapes("input", (8, 1, 2), (1, 2, 4))


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_a_step_export_builds_an_engine_of_one_step_that_streams(tmp_path):
    """`build --model model_step.onnx`: one step's engine, every state an input and an output over the batch
    profile, its convs/linears in the reduced type at fp16; where engines run, verify streams it through
    TensorRT (T calls, states bound on the GPU) and checks every layer at every step."""
    import json

    import onnx

    from snncompile.build_engine import build_run
    from snncompile.compare import verify_run
    from snncompile.mixed_precision import HEAVY_OPS

    _skip_unless_can_build()
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    exported = export_run(run, form="step", n_random=16, n_real=0)
    result = CliRunner().invoke(cli, ["build", str(run), "--model", "model_step.onnx", "--batch", "1:4:16"])
    assert result.exit_code == 0, result.output
    side = json.loads((run / "model_step_fp32.json").read_text())
    assert side["form"] == "step" and side["T"] == exported.steps and side["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert side["onnx"] == "model_step.onnx" and (run / "model_step_fp32.plan").stat().st_size > 0
    heavy = sum(n.op_type in HEAVY_OPS for n in onnx.load(str(run / "model_step.onnx")).graph.node)
    assert build_run(run, "fp16", "1:4:16", model_file="model_step.onnx")["reduced_precision_nodes"] == heavy > 0
    if available_runners()["trt"]:  # no GPU, or tensorrt_rtx on a data-center GPU: it builds, it cannot run
        return
    report = verify_run(run, "trt", "fp32", model_file="model_step.onnx")
    assert report["passed"], report["reasons"]
    assert report["layers"] and all(s["real"] == 0 for s in report["layers"].values())


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_builds_and_verifies_where_it_can_run(tmp_path, precision):
    _skip_unless_can_build()
    from snncompile.build_engine import build_run
    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, n_random=64, n_real=0)
    side = build_run(run, precision, "1:8:64", model_file="model_layers.onnx")
    assert side["precision"] == precision and side["layers"] > 0 and (run / f"model_layers_{precision}.plan").is_file()
    # strongly typed: the 3 convs and 2 linears of the tiny net in the reduced type, nothing for fp32
    assert side["strongly_typed"] and side["reduced_precision_nodes"] == (0 if precision == "fp32" else 5)
    if available_runners()["trt"]:  # no GPU, or tensorrt_rtx on a data-center GPU: it builds, it cannot run
        return
    report = verify_run(run, "trt", precision, options={"precision": precision})
    assert report["passed"], report["reasons"]
    if precision == "fp32":
        assert report["numerical_flip_rate"] <= 1e-6 and all(s["real"] == 0 for s in report["layers"].values())
    assert np.isfinite(report["outputs"]["scores"]["max_abs"])


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
@pytest.mark.parametrize("model", ZOO, ids=zoo_ids())
def test_every_zoo_model_parses_and_builds(tmp_path, model):
    """Building needs no runtime support for the GPU (tensorrt_rtx builds on an H100 it cannot run on, or
    with no GPU at all)."""
    _skip_unless_can_build()
    from snncompile.build_engine import build_run
    from snncompile.export_onnx import export_run

    import onnx

    from snncompile.mixed_precision import HEAVY_OPS

    run = make_run(tmp_path, tiny_zoo_config(model))
    export_run(run, n_random=4, n_real=0, check_numerics=False)
    heavy = sum(n.op_type in HEAVY_OPS for n in onnx.load(str(run / "model.onnx")).graph.node)
    for precision in ("fp32", "fp16", "bf16"):
        side = build_run(run, precision, "1:4:16")
        assert (run / f"model_{precision}.plan").stat().st_size > 0 and side["layers"] > 0
        assert side["reduced_precision_nodes"] == (0 if precision == "fp32" else heavy) and heavy > 0


def test_tensorrt_rtx_runner_is_unavailable_on_a_datacenter_gpu():
    from snncompile.backends.trt import runtime_reason

    reason = runtime_reason("tensorrt_rtx", "9.0")
    assert reason.startswith("tensorrt_rtx runs engines only on compute capability 8.0, 8.6, 8.9, 12.0, 12.1, this GPU is 9.0")
    assert runtime_reason("tensorrt_rtx", "8.9") is None
    assert runtime_reason("tensorrt_rtx_bindings", "9.0") == reason  # the bindings wheel alone
    assert runtime_reason("tensorrt_bindings", "9.0") is None
    assert runtime_reason("tensorrt", "9.0") is None


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_pipeline_builds_engines_and_verifies_them(tmp_path):
    import torch

    if not torch.cuda.is_available() or available_runners()["trt"]:
        pytest.skip(f"TensorRT cannot run engines here: {available_runners()['trt']}")
    args = ["--set", "train.epochs=1", "--set", "data.limit_train=128", "--set", "data.limit_test=32",
            "--set", "model.arch='16C3-AP2-32FC-Voting'", "--set", "model.T=3", "--batch", "1,2", "--no-progress"]
    result = CliRunner().invoke(cli, ["pipeline", str(REPO / "models" / "digits.toml"), "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    assert "  build   done" in result.output and "verify trt: PASSED" in result.output
    run = next((tmp_path / "digits").iterdir())
    assert (run / "model_fp32.plan").is_file() and (run / "model_layers_fp32.plan").is_file()


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_tensorrt_rtx_engines_are_portable_and_say_where_they_were_built(tmp_path):
    import json

    import torch

    from snncompile.backends.trt import check_engine_matches, is_rtx, tensorrt_module
    from snncompile.build_engine import build_run
    from snncompile.export_onnx import export_run

    if not is_rtx(tensorrt_module().__name__):
        pytest.skip("TensorRT (not -RTX): engines belong to the GPU they were built on")
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    export_run(run, n_random=4, n_real=0, check_numerics=False)
    side = build_run(run, "fp32", "1:4:16")
    assert side["portable"] and side["compute_capability"] == "any of 8.0, 8.6, 8.9, 12.0, 12.1"
    assert json.loads((run / "model_fp32.json").read_text()) == side
    if not torch.cuda.is_available():
        assert side["gpu"] == "no GPU (ahead-of-time build)"
    else:  # built here or anywhere: only the TensorRT-RTX version must match
        check_engine_matches({**side, "gpu": "another GPU", "compute_capability": "8.6"}, run, "model.onnx")
    # --timing-cache asks for a file TensorRT-RTX never writes (it times no tactics): said, not silent
    from click.testing import CliRunner

    from snncompile.cli import cli

    result = CliRunner().invoke(cli, ["build", str(run), "--timing-cache", str(tmp_path / "tactics.cache")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"note: no timing cache written to {tmp_path / 'tactics.cache'}: "
                                          f"{side['tensorrt'].split()[0]} times no tactics at build time"]
    assert not (tmp_path / "tactics.cache").exists()


def _runtime_members(source: str) -> dict[str, set[str]]:
    """Attributes the runner reads from ``self.engine`` / ``self.context`` and from ``trt.Runtime(...)``."""
    import ast

    used: dict[str, set[str]] = {"ICudaEngine": set(), "IExecutionContext": set(), "Runtime": set()}
    owners = {"engine": "ICudaEngine", "context": "IExecutionContext"}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "self" \
                and base.attr in owners:
            used[owners[base.attr]].add(node.attr)
        if isinstance(base, ast.Name) and base.id in owners:  # a local (``context = runner.context``)
            used[owners[base.id]].add(node.attr)
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Attribute) and base.func.attr == "Runtime":
            used["Runtime"].add(node.attr)
    return used


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_runner_calls_only_runtime_api_that_exists():
    """No engine runs without a GPU TensorRT supports, so the runner's runtime calls are checked by name
    against the installed TensorRT's classes: a misspelt or removed API fails here, not on a user's GPU."""
    import inspect

    from snncompile.backends import trt as trt_backend

    from snncompile.backends import trt_stream

    trt = trt_backend.tensorrt_module()
    used = _runtime_members(inspect.getsource(trt_backend.TrtRunner))
    streamed = _runtime_members(inspect.getsource(trt_stream))  # a step engine's bound stream drives the context
    assert {"set_tensor_address", "get_tensor_shape"} <= streamed["IExecutionContext"]
    used["IExecutionContext"] |= streamed["IExecutionContext"]
    assert {"execute_async_v3", "set_tensor_address", "set_input_shape"} <= used["IExecutionContext"]
    assert {"create_execution_context", "get_tensor_mode", "num_io_tensors", "get_tensor_profile_shape"} <= used["ICudaEngine"]
    assert used["Runtime"] == {"deserialize_cuda_engine"}
    missing = [f"{cls}.{name}" for cls, names in used.items() for name in sorted(names)
               if not hasattr(getattr(trt, cls), name)]
    assert not missing, f"{trt.__name__} {trt.__version__} lacks {missing}"
    assert {"INPUT", "OUTPUT"} <= set(trt.TensorIOMode.__members__)


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_a_typed_export_builds_only_at_its_own_precision_and_is_parsed_as_it_is(tmp_path):
    """model_fp16.onnx is already typed: an fp32 build would label fp16 convs fp32, and an fp16 build must not
    cast its casts again (it parses the file as it is and reports the export's count of fp16 nodes)."""
    import json

    from snncompile.build_engine import build_run
    from snncompile.export_onnx import export_run

    _skip_unless_can_build()
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    typed = export_run(run, n_random=4, n_real=0, precision="fp16", check_numerics=False)
    result = CliRunner().invoke(cli, ["build", str(run), "--model", "model_fp16.onnx", "--precision", "fp32",
                                      "--batch", "1:4:16"])
    assert result.exit_code == 2
    assert "model_fp16.onnx is a fp16 export: build it with --precision fp16" in result.output
    side = build_run(run, "fp16", "1:4:16", model_file="model_fp16.onnx")
    assert side["reduced_precision_nodes"] == typed.reduced_precision_nodes > 0
    export_run(run, n_random=4, n_real=0, check_numerics=False)
    rewritten = build_run(run, "fp16", "1:4:16")  # the same typing done at build time from model.onnx
    assert side["layers"] == rewritten["layers"]
    assert json.loads((run / "model_fp16_fp16.json").read_text()) == side


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_a_tf32x2_export_builds_with_tf32_the_engine_its_runner_loads(tmp_path):
    """Every conv/linear of a tf32x2 export is split for TF32 (its input too where it is analog): it builds
    only with TF32 on, as the engine the trt runner loads at tf32x2 (verified at fp32's tolerances)."""
    from snncompile.backends.trt import ENGINE_PRECISION, engine_name
    from snncompile.build_engine import build_run
    from snncompile.export_onnx import export_run

    _skip_unless_can_build()
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))  # NeuNorm: analog-fed convs
    export_run(run, n_random=4, n_real=0, precision="tf32x2", check_numerics=False)
    result = CliRunner().invoke(cli, ["build", str(run), "--model", "model_tf32x2.onnx", "--precision", "fp32",
                                      "--batch", "1:4:16"])
    assert result.exit_code == 2 and "build it with --precision tf32" in result.output
    side = build_run(run, "tf32", "1:4:16", model_file="model_tf32x2.onnx")
    assert side["precision"] == "tf32"
    assert (run / engine_name("model_tf32x2.onnx", ENGINE_PRECISION["tf32x2"])).is_file()


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_an_engine_of_an_earlier_export_is_refused(tmp_path):
    """After a re-export (more training, another T) the old engine would run the old network: the runner checks
    the ONNX hash its sidecar recorded against the export's."""
    import json

    from snncompile.backends.trt import check_engine_current
    from snncompile.build_engine import build_run
    from snncompile.errors import ArtifactError
    from snncompile.export_onnx import export_run

    _skip_unless_can_build()
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    export_run(run, n_random=4, n_real=0, check_numerics=False)
    side = build_run(run, "fp32", "1:4:16")
    check_engine_current(side, run, "model.onnx")
    assert json.loads((run / "model_fp32.json").read_text())["onnx_sha256"] == side["onnx_sha256"]
    export_run(run, steps=6, n_random=4, n_real=0, check_numerics=False)
    with pytest.raises(ArtifactError, match="model_fp32.plan was built from an earlier model.onnx: rebuild it"):
        check_engine_current(side, run, "model.onnx")


def test_every_rebuild_hint_is_a_command_that_writes_the_same_engine(tmp_path):
    """A stale fp16 engine said `snncompile build RUN --model model.onnx`: that writes model_fp32.plan and the
    same error came back; the batch-profile hint lacked RUN itself. Pure functions: no TensorRT needed."""
    from snncompile.artifacts import update_manifest
    from snncompile.backends.trt import check_engine_current, rebuild_command
    from snncompile.errors import ArtifactError

    assert rebuild_command(tmp_path, "model.onnx", "fp32") == f"`snncompile build {tmp_path}`"
    assert rebuild_command(tmp_path, "model_T8.onnx", "fp16", batch="1:16:256") == (
        f"`snncompile build {tmp_path} --model model_T8.onnx --precision fp16 --batch 1:16:256`")
    update_manifest(tmp_path, exports={"model.onnx": {"sha256": "new"}})
    with pytest.raises(ArtifactError, match=rf"^model_fp16.plan was built from an earlier model.onnx: rebuild it with "
                                            rf"`snncompile build {tmp_path} --precision fp16 --batch 1:8:64`$"):
        check_engine_current({"precision": "fp16", "onnx_sha256": "old", "profile": {"min": 1, "opt": 8, "max": 64}},
                             tmp_path, "model.onnx")


def test_an_engine_or_sidecar_build_did_not_record_is_not_opened(tmp_path):
    """An engine is deserialized as code for the GPU: one copied in (or a sidecar edited to pass the version and
    GPU checks) was opened, only the sidecar's claims checked. Pure functions: no TensorRT needed."""
    from snncompile.artifacts import record_artifact, update_manifest
    from snncompile.backends.trt import check_engine_recorded
    from snncompile.errors import ArtifactError

    update_manifest(tmp_path, exports={})
    engine, sidecar = tmp_path / "model_fp32.plan", tmp_path / "model_fp32.json"
    engine.write_bytes(b"engine bytes")
    sidecar.write_text("{}")
    refused = rf"^{engine} is not the file build wrote \(not recorded, or its sha256 differs\): rebuild it with " \
              rf"`snncompile build {tmp_path}`$"
    with pytest.raises(ArtifactError, match=refused):  # never recorded: copied in
        check_engine_recorded(tmp_path, engine, "model.onnx", "fp32")
    record_artifact(tmp_path, engine.name)
    record_artifact(tmp_path, sidecar.name)
    check_engine_recorded(tmp_path, engine, "model.onnx", "fp32")  # as build left them
    sidecar.write_text('{"gpu": "the one here"}')
    with pytest.raises(ArtifactError, match=f"^{sidecar} is not the file build wrote"):
        check_engine_recorded(tmp_path, engine, "model.onnx", "fp32")
    record_artifact(tmp_path, sidecar.name)
    engine.write_bytes(b"other engine bytes")
    with pytest.raises(ArtifactError, match=refused):
        check_engine_recorded(tmp_path, engine, "model.onnx", "fp32")
