"""One conformance test over every runner present, plus the registry's behaviour without runtimes."""

import numpy as np
import pytest

from conftest import REPO
from helpers import make_run, tiny_zoo_config
from snncompile.backends import RUNNERS, available_runners, create_runner
from snncompile.errors import ConfigError, RunnerUnavailableError

AVAILABLE = available_runners()


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
    x = np.load(exported_run / "reference_inputs.npz")["random"]
    refs = np.load(exported_run / "reference_outputs.npz")
    with create_runner(name, exported_run) as runner:
        assert runner.output_names == ["scores", "rates"]
        assert [s.name for s in runner.inputs] == ["input"]
        out = runner.infer({"input": x})
    assert set(out) == {"scores", "rates"}
    assert out["scores"].shape == (32, 10) and out["scores"].dtype == np.float32
    # fp32 on the CPU: the same spikes, hence the same voted scores, bit for bit
    np.testing.assert_array_equal(out["scores"], refs["random/scores"])
    np.testing.assert_array_equal(out["rates"], refs["random/rates"])


def test_unknown_runner_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown runner .tensorflow. \\(known: torch, ort-cpu, ort-cuda, trt\\)"):
        create_runner("tensorflow", tmp_path)


def test_unavailable_runner_names_the_reason(tmp_path, monkeypatch):
    import snncompile.backends.ort as ort_mod

    monkeypatch.setattr(ort_mod, "_onnxruntime", lambda: None)
    with pytest.raises(RunnerUnavailableError, match=r"pip install 'snncompile\[onnx\]'"):
        create_runner("ort-cpu", tmp_path)
