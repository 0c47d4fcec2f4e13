"""ONNX files whose weights point outside what export writes are not opened (a received run directory)."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import set_external_data  # noqa: E402

from snncompile.backends import available_runners, create_runner  # noqa: E402
from snncompile.errors import ArtifactError  # noqa: E402
from snncompile.onnx_files import require_own_external_data  # noqa: E402


# the runners that open an ONNX file themselves, each with its own reader of external data
ONNX_READERS = [name for name in ("ort-cpu", "ov-cpu") if available_runners()[name] is None]


def _model_with_weight(folder, name: str, location: str | None, as_constant: bool = False):
    """``folder/name``: y = x + w, w (4 float32) inline or in external file ``location`` (relative to folder),
    as an initializer or as a Constant node's value."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    if location is not None:
        target = (folder / location).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(w.raw_data)
        set_external_data(w, location, offset=0, length=16)
        w.data_location = TensorProto.EXTERNAL
        w.ClearField("raw_data")
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    if as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[] if as_constant else [w])
    path = folder / name
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    return path


@pytest.mark.parametrize("runner_name", ONNX_READERS)
@pytest.mark.parametrize("location", [None, "model.onnx.data"])
def test_weights_inline_or_in_the_data_file_export_writes_are_opened(tmp_path, location, runner_name):
    path = _model_with_weight(tmp_path, "model.onnx", location)
    require_own_external_data(path)
    runner = create_runner(runner_name, tmp_path, "model.onnx")  # and the runtime reads them as weights
    assert runner.infer({"x": np.ones(4, np.float32)})["y"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("location,as_constant", [("../outside/secret.bin", False), ("other.onnx.data", False),
                                                  ("../outside/secret.bin", True)])
@pytest.mark.parametrize("runner_name", ONNX_READERS)
def test_weights_in_any_other_file_are_not_opened(tmp_path, location, as_constant, runner_name):
    """A model naming ../outside/secret.bin made older ONNX Runtimes read that file as its weights."""
    run = tmp_path / "run"
    run.mkdir()
    path = _model_with_weight(run, "model.onnx", location, as_constant)
    with pytest.raises(ArtifactError, match=f"^{path} keeps weights in '{location}', not in 'model.onnx.data' "
                                            r"beside it as export writes them: not opened"):
        create_runner(runner_name, run, "model.onnx")


@pytest.mark.parametrize("runner_name,says", [("ort-cpu", "protobuf parsing failed"), ("ov-cpu", "model can't be parsed")])
def test_a_file_that_is_not_a_model_is_left_to_the_runtime(tmp_path, runner_name, says):
    if runner_name not in ONNX_READERS:
        pytest.skip(f"{runner_name}: {available_runners()[runner_name]}")
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    require_own_external_data(tmp_path / "model.onnx")  # no verdict of its own on a file it cannot read ...
    with pytest.raises(ArtifactError) as err:  # ... the runtime's error says what is wrong, in one line
        create_runner(runner_name, tmp_path, "model.onnx")
    message = str(err.value)
    assert "keeps weights" not in message and says in message.lower() and "\n" not in message, message


def _external(tensor, location: str):
    set_external_data(tensor, location, offset=0, length=len(tensor.raw_data))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return tensor


@pytest.mark.parametrize("where", ["local function", "sparse constant"])
def test_weights_outside_named_in_a_function_or_a_sparse_constant_are_not_opened(tmp_path, where):
    """The walk covered the main graph's dense tensors only: a Constant in a local function, or a sparse one,
    could still name ../secret.bin (ONNX Runtime 1.32 refuses those itself; older ones and TensorRT's parser)."""
    w = _external(numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"), "../secret.bin")
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])]
    if where == "local function":
        body = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Add", ["a", "w"], ["b"])]
        function = helper.make_function("local", "AddW", ["a"], ["b"], body, [helper.make_opsetid("", 18)])
        graph = helper.make_graph([helper.make_node("AddW", ["x"], ["y"], domain="local")], "g", x, out)
        model = helper.make_model(graph, functions=[function],
                                  opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    else:
        indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "i")
        sparse = helper.make_sparse_tensor(w, indices, [4])
        graph = helper.make_graph([helper.make_node("Constant", [], ["w"], sparse_value=sparse),
                                   helper.make_node("Add", ["x", "w"], ["y"])], "g", x, out)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ArtifactError, match="keeps weights in '../secret.bin'"):
        require_own_external_data(path)
