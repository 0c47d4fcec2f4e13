"""Mixed precision in the graph (what strongly typed TensorRT builds parse): convs and matmuls in fp16/bf16,
every neuron in fp32. Checked on every zoo model's graph, run on ONNX Runtime (fp16) and on ONNX's
reference evaluator (bf16, which ONNX Runtime's CPU provider cannot run)."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, shape_inference  # noqa: E402

from conftest import REPO, ZOO, zoo_ids  # noqa: E402
from helpers import make_run, reference_file, tiny_zoo_config  # noqa: E402
from snncompile.cli import cli  # noqa: E402
from snncompile.compare import verify_run  # noqa: E402
from snncompile.export_onnx import export_run  # noqa: E402
from snncompile.mixed_precision import HEAVY_OPS, mixed_precision  # noqa: E402

LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def tensor_types(model) -> dict[str, int]:
    """Element type of every tensor in the graph, by ONNX shape/type inference."""
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


@pytest.fixture(scope="module")
def zoo_graphs(tmp_path_factory):
    """model_layers.onnx of every tiny zoo model, with its reference inputs."""
    graphs = {}
    for path in ZOO:
        run = make_run(tmp_path_factory.mktemp("zoo"), tiny_zoo_config(path))
        export_run(run, layers=True, n_random=8, n_real=0, check_numerics=False)
        graphs[run.parent.name] = (onnx.load(str(run / "model_layers.onnx")),
                                   np.load(reference_file(run))["random"])
    return graphs


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", zoo_ids())
def test_heavy_ops_compute_low_and_everything_else_fp32(zoo_graphs, name, precision):
    model, _ = zoo_graphs[name]
    before = model.SerializeToString()
    typed, converted = mixed_precision(model, precision)
    assert model.SerializeToString() == before  # the input model is untouched
    onnx.checker.check_model(typed, full_check=True)
    heavy = [n for n in typed.graph.node if n.op_type in HEAVY_OPS]
    assert converted == len(heavy) == sum(n.op_type in HEAVY_OPS for n in model.graph.node) > 0
    types = tensor_types(typed)
    low = LOW[precision]
    for node in heavy:  # every operand and result of a conv/matmul is 16-bit...
        assert {types[t] for t in [*node.input, *node.output] if t} == {low}, node.name
    for node in typed.graph.node:  # ...and nothing but the casts around them sees it: the neurons stay fp32
        if node.op_type in HEAVY_OPS or node.op_type == "Cast":
            continue
        float_types = {types[t] for t in [*node.input, *node.output] if t in types} - {
            TensorProto.BOOL, TensorProto.INT64, TensorProto.INT32}
        assert float_types <= {TensorProto.FLOAT}, f"{node.op_type} {node.name}: {float_types}"
    graph_io = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.input, *typed.graph.output]}
    assert graph_io == {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


@pytest.mark.parametrize("name", ["mnist", "bench-cifar"])
def test_fp16_graph_runs_on_onnx_runtime_close_to_fp32(zoo_graphs, name):
    model, x = zoo_graphs[name]
    typed, _ = mixed_precision(model, "fp16")
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    names = [o.name for o in model.graph.output]
    ref, low = dict(zip(names, run(model))), dict(zip(names, run(typed)))
    first = next(n for n in names if n.endswith(".membrane"))
    # the first layer's membrane at t=1 is one conv of the input: fp16 rounding, no more
    np.testing.assert_allclose(low[first][0], ref[first][0], atol=2e-2, rtol=2e-2)
    assert not np.array_equal(low[first], ref[first])  # and it did compute in fp16
    spikes = [n for n in names if n.endswith(".spikes")]
    assert all(set(np.unique(low[n])) <= {0.0, 1.0} for n in spikes)


def test_bf16_graph_runs_on_the_onnx_reference_evaluator(zoo_graphs):
    from onnx.reference import ReferenceEvaluator

    model, x = zoo_graphs["digits"]
    typed, _ = mixed_precision(model, "bf16")
    assert typed.opset_import[0].version >= 22  # Conv takes bfloat16 from opset 22 on
    names = [o.name for o in model.graph.output]
    first = next(n for n in names if n.endswith(".membrane"))
    ref = ReferenceEvaluator(model).run([first], {"input": x})[0]
    low = ReferenceEvaluator(typed).run([first], {"input": x})[0]
    assert low.dtype == np.float32
    np.testing.assert_allclose(low[0], ref[0], atol=0.1, rtol=2e-2)  # bf16 keeps 8 mantissa bits
    assert not np.array_equal(low, ref)


def test_rejects_other_precisions(zoo_graphs):
    with pytest.raises(ValueError, match="fp16 and bf16"):
        mixed_precision(zoo_graphs["digits"][0], "fp8")


def test_export_fp16_and_verify_it_at_fp16_tolerances(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    result = CliRunner().invoke(cli, ["export", str(run), "--layers", "--precision", "fp16", "--samples", "32"])
    assert result.exit_code == 0, result.output
    assert "model_fp16_layers.onnx" in result.output and "5 convs/matmuls in fp16" in result.output
    entry = json.loads((run / "manifest.json").read_text())["exports"]["model_fp16_layers.onnx"]
    assert entry["precision"] == "fp16" and entry["reduced_precision_nodes"] == 5
    report = verify_run(run, "ort-cpu", "fp16", model_file="model_fp16_layers.onnx")
    assert report["passed"], report["reasons"]
    assert report["outputs"]["scores"]["max_abs"] > 0  # the fp32 torch reference vs 16-bit convs
    assert all(s["real"] == 0 for s in report["layers"].values())
    # the graph really computes in fp16: its scores are off by more than fp32's tolerance allows, so ONNX
    # Runtime is judged at the file's fp16 even when fp32 is asked (what it computes, not what was asked)
    from snncompile.flips import PRESETS

    assert report["outputs"]["scores"]["max_abs"] > PRESETS["fp32"].score_atol
    asked_fp32 = verify_run(run, "ort-cpu", "fp32", model_file="model_fp16_layers.onnx")
    assert asked_fp32["precision"] == "fp16" and asked_fp32["passed"]
    # the verify command takes the export's precision as its default preset
    cli_run = CliRunner().invoke(cli, ["verify", str(run), "--model", "model_fp16_layers.onnx", "--runner", "ort-cpu",
                                       "--no-progress"])
    assert cli_run.exit_code == 0 and "PASSED: ort-cpu matches torch within fp16 tolerances" in cli_run.output


def test_verify_of_a_bf16_file_skips_a_default_runner_that_cannot_load_it(tmp_path):
    """ONNX Runtime's CPU provider has no bf16 Conv: verify with the default runners stopped at ort-cpu's load
    error and never checked torch-fast. Now ort-cpu is skipped with its reason (named, it is still an error)."""
    import onnxruntime as ort

    from snncompile.errors import ArtifactError

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "mnist.toml"))
    export_run(run, layers=True, precision="bf16", n_random=16, n_real=0)
    path = str(run / "model_bf16_layers.onnx")
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        loads = True
    except Exception:  # noqa: BLE001  onnxruntime's own NotImplemented
        loads = False
    result = CliRunner().invoke(cli, ["verify", str(run), "--model", "model_bf16_layers.onnx", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "PASSED: torch-fast matches torch within bf16 tolerances" in result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("ort-cpu: skipped (")]
    if loads:  # an ONNX Runtime with a bf16 CPU Conv: then it is checked like any other runner
        assert not skipped and "PASSED: ort-cpu" in result.output
    else:
        assert len(skipped) == 1 and "has no kernel for it at the file's precision" in skipped[0]
        with pytest.raises(ArtifactError, match="cannot be loaded by ONNX Runtime"):  # asked for by name
            verify_run(run, "ort-cpu", "bf16", model_file="model_bf16_layers.onnx")


def test_export_precision_needs_the_unrolled_form(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    result = CliRunner().invoke(cli, ["export", str(run), "--form", "step", "--precision", "fp16"])
    assert result.exit_code != 0 and "unrolled form only" in result.output
