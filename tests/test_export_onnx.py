"""ONNX export: every zoo model at tiny size and a trained digits model, on real ONNX Runtime (and OpenVINO)."""

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from conftest import REPO, ZOO, zoo_ids  # noqa: E402
from helpers import make_run, reference_file, replace_checkpoint, tiny_zoo_config, wrapped_ctrl_c  # noqa: E402
from snncompile.backends import available_runners, create_runner  # noqa: E402
from snncompile.compare import verify_run, verify_runs  # noqa: E402
from snncompile.config import load_config  # noqa: E402
from snncompile.errors import ArtifactError, ExportError, InputError, Interrupted  # noqa: E402
from snncompile.export_onnx import ALLOWED_OPS, _check_graph, export_run  # noqa: E402
from snncompile.runs import load_network  # noqa: E402
from snncompile.streaming import StreamedRunner  # noqa: E402
from snncompile.train import train  # noqa: E402


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    """The embedded default trained briefly (full width, real data), exported with per-layer outputs."""
    cfg = load_config(REPO / "models" / "digits.toml", ["train.epochs=3", "train.threads=2"])
    result = train(cfg, tmp_path_factory.mktemp("digits"), progress=False, echo=lambda s: None)
    export_run(result.run_dir, rates=True)
    export_run(result.run_dir, layers=True, rates=True)
    return result


# the ONNX runtimes installed: every zoo export is verified on each (ONNX Runtime always; OpenVINO, an independent
# reader and set of kernels, where the openvino extra is installed, as in CI)
ONNX_RUNTIMES = [name for name in ("ort-cpu", "ov-cpu") if available_runners()[name] is None]


@pytest.mark.parametrize("path", ZOO, ids=zoo_ids())
def test_zoo_exports_and_onnx_runtimes_are_spike_exact(tmp_path, path):
    run = make_run(tmp_path, tiny_zoo_config(path))
    result = export_run(run, layers=True, n_random=256, n_real=64)
    assert set(result.ops) <= ALLOWED_OPS and not {"Loop", "Scan", "If"} & set(result.ops)
    reports = verify_runs(run, dict.fromkeys(ONNX_RUNTIMES), "fp32")  # one pass, the torch reference run once
    for name, report in reports.items():
        assert sum(report["inputs"].values()) >= 256
        assert report["passed"], (name, report["reasons"])
        # Spike-exact but for rounding coincidences at the threshold (two libraries, two summation
        # orders): no real flip, and every numerical one within 1e-4 of V_th.
        assert report["layers_checked"] and all(s["real"] == 0 for s in report["layers"].values()), name
        assert report["numerical_flip_rate"] <= 1e-6, name
        # top-1 differs only where a numerical flip diverged the sample (dvs_cifar10: one flip in 5e7 neuron-steps
        # changed one near-tie sample's winner)
        top1 = report["top1"]
        assert top1["agree"] >= top1["total"] - top1["samples_diverged"] and top1["judged_agree"] == top1["judged"], name
    # the comparison means something only if the layers actually spike
    rates = [s for s in _layer_rates(run).values()]
    assert all(0 < r < 1 for r in rates), rates
    # with the batch fixed (what the ORT runners do), no shape arithmetic is left: every node computes
    # on tensors, which is what lets ort-cuda put the whole graph on the GPU and capture it
    assert not _ops_with_batch_fixed(run / "model_layers.onnx", 3, tmp_path) & SHAPE_OPS


SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Expand", "Gather", "Range"}


def _ops_with_batch_fixed(path, batch, tmp_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # provider-independent folding
    opts.add_free_dimension_override_by_name("batch", batch)
    opts.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(tmp_path / "folded.onnx").graph.node}


def _layer_rates(run):
    x = np.load(reference_file(run))["random"][:, :16]
    with create_runner("ort-cpu", run, "model_layers.onnx") as r:
        out = r.infer({"input": x})
    return {k: float(v.mean()) for k, v in out.items() if k.endswith(".spikes")}


def test_trained_digits_equal_on_ort_cpu(trained_digits):
    report = verify_run(trained_digits.run_dir, "ort-cpu", "fp32")
    assert report["inputs"] == {"random": 256, "real": 256}
    assert report["passed"] and report["outputs"]["scores"]["max_abs"] == 0.0
    assert sum(s["flips"] for s in report["layers"].values()) == 0
    assert report["top1"]["agree"] == 512
    acc = report["accuracy"]["real"]
    assert acc["reference"] == acc["ort-cpu"] > 0.8  # 3 epochs: trained, not converged
    assert json.loads((trained_digits.run_dir / "verify.json").read_text())["ort-cpu"]["passed"]


def test_metadata_and_dynamic_batch(trained_digits):
    run = trained_digits.run_dir
    model = onnx.load(str(run / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["snncompile.T"] == "4" and meta["snncompile.form"] == "unrolled"
    assert json.loads(meta["snncompile.neuron"]) == {"v_th": 0.5, "k_tau1": 0.2, "a": 1.0}
    assert json.loads(meta["snncompile.class_names"]) == [str(i) for i in range(10)]
    assert json.loads(meta["snncompile.normalisation"]) == {"mean": [0.5], "std": [0.5]}
    assert len(meta["snncompile.config_hash"]) == 16 and "snncompile.version" in meta
    assert [o.name for o in model.graph.output][:2] == ["scores", "rates"]
    x = np.load(reference_file(run))["real"]
    with create_runner("ort-cpu", run) as r:
        for batch in (1, 3, 17):
            assert r.infer({"input": x[:, :batch]})["scores"].shape == (batch, 10)
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["exports"]["model.onnx"]
    assert entry["exporter"].startswith("torch.export") and entry["opset"] == 18
    assert entry["cleaned_vs_raw"].startswith("identical") and entry["nodes_clean"] < entry["nodes_raw"]
    assert manifest["artifacts"]["model.onnx"]["sha256"] == entry["sha256"]


def test_step_form_streams_to_the_unrolled_result(trained_digits):
    run = trained_digits.run_dir
    export_run(run, form="step")
    x = np.load(reference_file(run))["real"][:, :40]
    with StreamedRunner(create_runner("ort-cpu", run, "model_step.onnx"), 4) as r:
        streamed = r.infer({"input": x})["scores"]
    with create_runner("ort-cpu", run) as r:
        unrolled = r.infer({"input": x})["scores"]
    np.testing.assert_array_equal(streamed, unrolled)
    names = [i.name for i in onnx.load(str(run / "model_step.onnx")).graph.input]
    assert names[:3] == ["input", "output_sum", "state.lif1.u"] and "state.neunorm1.x" in names


def test_other_T_unrolls_statically(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    export_run(run, steps=6, n_random=8, n_real=0)
    with create_runner("ort-cpu", run) as r:
        assert r.inputs[0].shape[0] == 6
        with pytest.raises(InputError, match=r"T \(axis 0\) must be 6, got 4") as err:
            r.infer({"input": np.zeros((4, 2, 2, 34, 34), np.float32)})
        assert "\n" not in str(err.value)
        with pytest.raises(InputError, match="expected \\[6, B, 2, 34, 34\\] float32, got \\[6, 2, 34, 34\\]"):
            r.infer({"input": np.zeros((6, 2, 34, 34), np.float32)})
        with pytest.raises(InputError, match="float64"):
            r.infer({"input": np.zeros((6, 2, 2, 34, 34))})
        with pytest.raises(InputError, match="expected \\['input'\\], got \\['x'\\]"):
            r.infer({"x": np.zeros((6, 2, 2, 34, 34), np.float32)})
        import torch

        with pytest.raises(InputError, match=r"expected a numpy array \(\[6, B, 2, 34, 34\] float32\), got "
                                             r"torch.Tensor \(use .numpy\(\)\)"):
            r.infer({"input": torch.zeros((6, 2, 2, 34, 34))})


def test_failed_export_leaves_no_partial_artifact(tmp_path, monkeypatch):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    before = sorted(p.name for p in run.iterdir())
    manifest_before = (run / "manifest.json").read_text()

    def fail(*args, **kwargs):
        raise ExportError("injected failure after the graph was written")

    monkeypatch.setattr("snncompile.export_onnx._check_numerics", fail)
    with pytest.raises(ExportError, match="injected"):
        export_run(run, n_random=8, n_real=0)
    assert sorted(p.name for p in run.iterdir()) == before  # no model.onnx, no npz, no staging dir
    assert (run / "manifest.json").read_text() == manifest_before


def test_a_ctrl_c_the_exporter_wraps_is_an_interrupt_not_an_export_failure(tmp_path, monkeypatch):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    before = sorted(p.name for p in run.iterdir())
    manifest_before = (run / "manifest.json").read_text()
    monkeypatch.setattr("torch.onnx.export", wrapped_ctrl_c)
    with pytest.raises(Interrupted, match="export interrupted: nothing of it was written"):
        export_run(run, n_random=8, n_real=0)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "manifest.json").read_text() == manifest_before


def test_a_ctrl_c_while_an_export_moves_into_place_waits_for_its_manifest_entry(tmp_path, monkeypatch, ctrl_c_raises):
    """The files and the manifest entry that describes them are written one after the other: a Ctrl-C between
    them would leave a model the manifest does not describe. It is held until both are written."""
    import os
    import signal

    import snncompile.export_onnx as export_onnx
    from snncompile.artifacts import read_manifest, sha256_model

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    real_update = export_onnx.update_manifest

    def ctrl_c_then_update(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # after the model and its references were renamed into place
        return real_update(*args, **kwargs)

    monkeypatch.setattr(export_onnx, "update_manifest", ctrl_c_then_update)
    with pytest.raises(Interrupted, match="export interrupted as it finished: .*model.onnx and its manifest entry"):
        export_run(run, n_random=8, n_real=0)
    entry = read_manifest(run)["exports"]["model.onnx"]
    assert entry["sha256"] == sha256_model(run / "model.onnx")
    assert all((run / name).is_file() for name in entry["reference_files"])
    assert not list(run.glob(".export-*"))


def test_allow_list_rejects_loop_and_custom_ops(tmp_path):
    """Valid ONNX that the checker passes, each refused by the allow-list with what it uses named: an op outside
    the list (Relu), a Loop (T is unrolled statically: no control flow) and an op of a custom domain."""
    from onnx import TensorProto, helper

    def tensor(name, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, [1])

    body = helper.make_graph(  # one iteration: y = x + x, the loop condition passed through
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info(
            "cond_in", TensorProto.BOOL, []), tensor("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), tensor("v_out")])
    loop = [helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [3])),
            helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])),
            helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)]
    cases = [([helper.make_node("Relu", ["x"], ["y"])], r"disallowed ops \['Relu'\]$"),
             (loop, r"disallowed ops \['Loop'\]$"),  # Constant is allowed
             ([helper.make_node("Spike", ["x"], ["y"], domain="snn.custom")],
              r"disallowed ops \['Spike'\]; custom domains \['snn.custom'\]$")]
    for nodes, match in cases:
        graph = helper.make_graph(nodes, "g", [tensor("x")], [tensor("y")])
        opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("snn.custom", 1)] if nodes[0].domain else [])
        path = tmp_path / "m.onnx"
        onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
        with pytest.raises(ExportError, match=match):
            _check_graph(onnx, path)


def test_corrupt_and_missing_model_files_are_one_line(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    with pytest.raises(ArtifactError, match="has no model.onnx: run `snncompile export .*` first"):
        create_runner("ort-cpu", run)
    (run / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ArtifactError, match="cannot be loaded by ONNX Runtime") as err:
        create_runner("ort-cpu", run)
    assert "\n" not in str(err.value)


def test_run_dir_from_another_version(tmp_path):
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(run_format=99, snncompile_version="9.9.9")
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="snncompile 9.9.9 with run format 99; this is snncompile .* expecting run format 1"):
        export_run(run)


def test_large_models_use_external_data(tmp_path, monkeypatch):
    # Models over ~1.8 GB of weights go to model.onnx.data; lower the limit to exercise that path.
    monkeypatch.setattr("snncompile.export_onnx.EXTERNAL_DATA_BYTES", 0)
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    export_run(run, n_random=16, n_real=0)
    assert (run / "model.onnx.data").stat().st_size > 0
    header = onnx.load(str(run / "model.onnx"), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in header.graph.initializer)
    assert not [p for p in run.iterdir() if p.name.startswith(".export-")]
    onnx.checker.check_model(str(run / "model.onnx"), full_check=True)
    assert verify_run(run, "ort-cpu", "fp32")["passed"]
    # the weights are part of the export's hash and of the manifest: changed, the file is not the one exported
    manifest = json.loads((run / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["artifacts"]
    data = bytearray((run / "model.onnx.data").read_bytes())
    data[:64] = bytes(64)
    (run / "model.onnx.data").write_bytes(bytes(data))
    assert not verify_run(run, "ort-cpu", "fp32")["model_matches_export"]
    monkeypatch.setattr("snncompile.export_onnx.EXTERNAL_DATA_BYTES", 1 << 40)  # exported again, inline
    export_run(run, n_random=16, n_real=0)
    assert not (run / "model.onnx.data").exists()  # the earlier export's weights, unused now, are gone
    assert verify_run(run, "ort-cpu", "fp32")["model_matches_export"]


def test_step_form_of_a_readout_head_streams_to_the_unrolled_result(tmp_path):
    """A readout head's scores are analog sums that ONNX Runtime and torch round apart (~1 ulp): the step export
    is checked within fp32's score tolerance there (exact equality failed every such export)."""
    from snncompile.init_run import init_run

    cfg = load_config(REPO / "models" / "bench-nmnist.toml", ["model.arch='8C3-AP2-8C3-AP2-32FC-10'"])
    run, _ = init_run(cfg, tmp_path)  # calibrated: every layer fires, so the readout sums real currents
    result = export_run(run, form="step", n_random=8, n_real=0)
    assert result.form == "step" and (run / "model_step.onnx").is_file()
    assert load_network(run)[1].head == "readout"
    report = verify_run(run, "ort-cpu", "fp32", model_file="model_step.onnx")  # streamed on both sides
    assert report["passed"] and report["reference_reproduced"], report["reasons"]


def test_the_file_has_the_opset_it_is_recorded_with(tmp_path):
    """Below 18 torch converts the graph down and, where that fails, keeps opset 18 without a word: either the
    file has the requested opset, or the export fails saying which it could write."""
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    for opset in (13, 17):
        try:
            export_run(run, opset=opset, n_random=4, n_real=0)
        except ExportError as e:
            assert f"could not write opset {opset} (it wrote 18)" in str(e)
            continue
        written = {o.domain: o.version for o in onnx.load(str(run / "model.onnx")).opset_import}[""]
        manifest = json.loads((run / "manifest.json").read_text())
        assert written == opset == manifest["exports"]["model.onnx"]["opset"]


def test_exports_at_two_T_each_keep_their_reference_inputs(tmp_path):
    """Exporting at another T used to overwrite the one reference set, and the earlier export could no longer
    be verified (its T no longer matched): each T keeps its own files."""
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    trained_T = load_network(run)[0].model.T
    export_run(run)
    export_run(run, steps=trained_T + 2, layers=True)
    manifest = json.loads((run / "manifest.json").read_text())["exports"]
    assert manifest["model.onnx"]["reference_files"] == ["reference_inputs.npz", "reference_outputs.npz"]
    assert manifest["model_layers.onnx"]["reference_files"] == [f"reference_inputs_T{trained_T + 2}.npz",
                                                              f"reference_outputs_T{trained_T + 2}.npz"]
    assert verify_run(run, "ort-cpu", model_file="model.onnx")["passed"]
    layers = verify_run(run, "ort-cpu", model_file="model_layers.onnx")
    assert layers["passed"] and layers["layers"]["lif1"]["flip_rate_per_step"].__len__() == trained_T + 2


def test_an_export_with_fewer_samples_keeps_the_earlier_exports_references(tmp_path):
    """A later export at the same T with fewer --samples rewrote the shared reference files, and the earlier
    export was then verified on fewer samples: the counts are in the names when they are not the defaults."""
    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    export_run(run, n_random=24, n_real=0)
    export_run(run, layers=True, n_random=8, n_real=0)
    exports = json.loads((run / "manifest.json").read_text())["exports"]
    assert exports["model.onnx"]["reference_files"] == ["reference_inputs_n24-0.npz", "reference_outputs_n24-0.npz"]
    assert exports["model.onnx"]["reference_samples"] == [24, 0]
    assert np.load(reference_file(run, model_file="model.onnx"))["random"].shape[1] == 24
    assert np.load(reference_file(run, model_file="model_layers.onnx"))["random"].shape[1] == 8
    assert verify_run(run, "ort-cpu", model_file="model.onnx")["inputs"] == {"random": 24}


def test_an_export_records_the_checkpoint_it_was_made_from_and_verify_refuses_it_after_more_training(tmp_path):
    """train --resume after export: verify's torch reference is the new checkpoint while the file holds the old
    weights, which failed as thousands of real spike mismatches; each export now records its checkpoint's hash,
    and verify of an export of an earlier checkpoint is one line naming the command that writes that file again."""
    from snncompile.artifacts import sha256_file
    from snncompile.runs import CHECKPOINT

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    export_run(run, precision="fp16", layers=True, steps=6, n_random=8, n_real=0)
    entry = json.loads((run / "manifest.json").read_text())["exports"]["model_fp16_layers.onnx"]
    assert entry["checkpoint_sha256"] == sha256_file(run / CHECKPOINT)
    replace_checkpoint(run)
    with pytest.raises(ArtifactError) as err:
        verify_run(run, "ort-cpu", "fp16", model_file="model_fp16_layers.onnx")
    assert str(err.value) == ("model_fp16_layers.onnx was exported from an earlier checkpoint (training continued "
                              f"since): export it again: `snncompile export {run} --T 6 --layers --precision fp16 "
                              "--samples 8`")
    export_run(run, precision="fp16", layers=True, steps=6, n_random=8, n_real=0)  # what the message says
    assert verify_run(run, "ort-cpu", "fp16", model_file="model_fp16_layers.onnx")["passed"]


def test_a_config_whose_model_section_was_edited_after_training_is_refused(tmp_path):
    """v_th edited from 0.5 to 0.3 in config.toml: export wrote the edited network on the trained weights and
    verify passed it (torch and ONNX Runtime computed the same wrong model)."""
    import torch

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))
    path = run / "config.toml"
    original = path.read_text()
    assert original.count("v_th = 0.5\n") == 1
    path.write_text(original.replace("v_th = 0.5\n", "v_th = 0.3\n"))
    with pytest.raises(ArtifactError, match=r"config.toml: \[model\] is not what the checkpoint was trained with: "
                                            r"v_th = 0.3 \(trained with 0.5\)\. Put it back"):
        export_run(run, n_random=4, n_real=0)
    # the other sections may change (a dataset moved to another folder)
    path.write_text(original.replace('description = "', 'description = "moved: '))
    export_run(run, n_random=4, n_real=0)
    # a checkpoint from before checkpoints recorded their settings is not checked
    path.write_text(original.replace("v_th = 0.5\n", "v_th = 0.3\n"))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["model_settings"]
    torch.save(state, run / "checkpoint.pt")
    export_run(run, n_random=4, n_real=0)


def test_export_command_names_the_options_of_each_file(tmp_path):
    """The command a message suggests writes the same file again: the options that name it (--layers, --order step,
    --precision, --form step), --rates, and --T / --opset / --samples only where they are not the defaults."""
    from snncompile.exports import export_command

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-nmnist.toml"))  # trained T = 4
    plain = {"form": "unrolled", "order": "layer", "T": 4, "layers": False, "rates": False, "precision": "fp32",
             "reference_samples": [256, 256]}
    assert export_command(run, plain) == f"snncompile export {run}"
    assert export_command(run, {}) == f"snncompile export {run}"  # an entry of an older version: the defaults
    assert (export_command(run, {**plain, "T": 6, "layers": True, "rates": True, "order": "step", "precision": "bf16",
                                 "reference_samples": [32, 0]})
            == f"snncompile export {run} --T 6 --layers --rates --order step --precision bf16 --samples 32")
    assert export_command(run, {**plain, "form": "step", "T": 4}) == f"snncompile export {run} --form step"
    assert export_command(run, {**plain, "opset": 18}) == f"snncompile export {run}"
    assert export_command(run, {**plain, "opset": 17}) == f"snncompile export {run} --opset 17"


def test_a_graph_outside_the_allow_list_names_every_reason(tmp_path):
    """With only a local function wrong, the message said "disallowed ops: []"; a custom domain beside a bad op
    was not named."""
    import onnx
    from onnx import TensorProto, helper

    from snncompile.export_onnx import _check_graph

    twice = helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                 [helper.make_opsetid("", 18)])
    graph = helper.make_graph([helper.make_node("Twice", ["x"], ["t"], domain="local"), helper.make_node("Relu", ["t"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                                functions=[twice]), str(path))
    with pytest.raises(ExportError, match=r"^exported graph uses non-standard or disallowed ops \['Relu', 'Twice'\]; "
                                          r"custom domains \['local'\]; local functions \['Twice'\]$"):
        _check_graph(onnx, path)


def test_suggested_commands_quote_a_path_with_a_space(tmp_path):
    """Pasted as printed, `snncompile export /data/my run --T 2` split the run into two arguments."""
    from snncompile.backends.trt import rebuild_command
    from snncompile.exports import export_command
    from snncompile.runs import missing_checkpoint

    run = make_run(tmp_path / "my runs", tiny_zoo_config(REPO / "models" / "digits.toml"))
    assert export_command(run, {"T": 2}) == f"snncompile export '{run}' --T 2"
    assert rebuild_command(run, "model.onnx", "fp16") == f"`snncompile build '{run}' --precision fp16`"
    # the profile is read from the engine's sidecar json, which a user can edit: it stays one argument
    assert rebuild_command(run, "model.onnx", "fp32", "1:8:64; rm -rf ~") == f"`snncompile build '{run}' --batch '1:8:64; rm -rf ~'`"
    (run / "checkpoint.pt").unlink()
    assert f"`snncompile train '{run / 'config.toml'}'` again" in str(missing_checkpoint(run))


def test_a_sigterm_during_export_leaves_no_staging_folder(tmp_path):
    """`timeout` or `kill` stopped an export and left its .export-* folder (the model, twice) in the run dir, and
    no later export removed it: Python's default SIGTERM runs no cleanup. The CLI now stops as for a Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    proc = subprocess.Popen([sys.executable, "-m", "snncompile", "export", str(run), "--samples", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})
    deadline = time.monotonic() + 120
    while not list(run.glob(".export-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in output, output
    assert not list(run.glob(".export-*")) and not (run / "model.onnx").exists()


def test_a_sigkill_during_export_leaves_a_staging_folder_the_next_export_removes(tmp_path):
    """SIGKILL runs no cleanup at all: its staging folder stayed forever. The next export removes it, since the
    process named in it is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    proc = subprocess.Popen([sys.executable, "-m", "snncompile", "export", str(run), "--samples", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 120
    while not list(run.glob(".export-*/*.onnx")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (left,) = run.glob(".export-*")
    assert f"_{proc.pid}-" in left.name
    export_run(run, n_random=4, n_real=0)
    assert not list(run.glob(".export-*")) and (run / "model.onnx").is_file()


def test_export_T_is_bounded_as_model_T(tmp_path):
    """--T 5000 (export, bench) ran for minutes before failing where model.T stops at 4096 at once."""
    from click.testing import CliRunner

    from snncompile.cli import cli
    from snncompile.errors import ConfigError
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "digits.toml"))
    for steps in (0, 4097):
        with pytest.raises(ConfigError, match=f"--T must be 1 to 4096, got {steps}"):
            export_run(run, steps=steps)
    for args in (["export", str(run), "--T", "4097"], ["bench", str(run), "--T", "4097"],
                 ["bench", "train", str(REPO / "models" / "digits.toml"), "--T", "4097"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "4097 is not in the range 1<=x<=4096" in result.output, (args, result.output)
    assert not (run / "model.onnx").exists()


def test_the_exported_graph_computes_the_papers_equations_by_hand(tmp_path):
    """Every other export test compares ONNX Runtime with the torch code the graph was traced from, so an error
    in that code's maths (a partial reset, NeuNorm's constants swapped, sum pooling) passes them all. This one
    holds ONNX Runtime's outputs to values worked by hand from PAPER.md, on 1C1-AP2-1C1-Voting with NeuNorm
    (U = .5, k_tau2 = .9), unit 1x1 convs, V_th .5, k_tau1 .2, T = 4 and a constant 2x2 input.

    lif1 (u = k_tau1 u (1 - o) + I): at .45, u = .45, .54 (spike), .45, .54 (spike); at .3, u = .3, .36, .372,
    .3744 (no spike). NeuNorm (x = k_tau2 x + (1 - k_tau2)/F^2 sum_f o, y = o - U x, F = 1): where lif1 spikes
    x = 0, .1, .09, .181, so y = 0, .95, -.045, .9095; elsewhere 0. AP2 averages 3 of 4: .7125, -.03375,
    .682125. lif2: u = 0, .7125 (spike), -.03375, .2 (-.03375) + .682125 = .675375 (spike). Voting, weights 1
    and .3, G = 1: u = 0, 1 (spike), 0, 1 (spike) and 0, .3, .06, .312; scores = spikes summed / T = .5, 0."""
    import torch

    from snncompile.artifacts import record_artifact
    from snncompile.config import Config
    from snncompile.runs import CHECKPOINT, load_checkpoint

    cfg = Config()
    model = cfg.model
    model.arch, model.input_shape, model.T, model.classes, model.vote_group = "1C1-AP2-1C1-Voting", [1, 2, 2], 4, 2, 1
    model.neunorm, model.k_tau2, model.v_th, model.k_tau1 = True, 0.9, 0.5, 0.2
    run = make_run(tmp_path, cfg)
    state = load_checkpoint(run / CHECKPOINT)
    one = torch.ones(1, 1, 1, 1)
    state["model"] = {"stages.0.weight": one, "stages.0.bias": torch.zeros(1),
                      "stages.2.norm.u_scale": torch.full((1, 2, 2), 0.5), "stages.4.weight": one.clone(),
                      "stages.4.bias": torch.zeros(1), "stages.7.weight": torch.tensor([[1.0], [0.3]]),
                      "stages.7.bias": torch.zeros(2)}
    torch.save(state, run / CHECKPOINT)
    record_artifact(run, CHECKPOINT)
    export_run(run, layers=True, n_random=4, n_real=0)
    x = np.broadcast_to(np.array([[0.45, 0.45], [0.3, 0.45]], np.float32), (4, 1, 1, 2, 2)).copy()
    out = create_runner("ort-cpu", run, "model_layers.onnx").infer({"input": x})

    def per_step(name):
        return out[name].reshape(4, -1)

    def approx(rows):  # fp32 rounding of the decimal values
        return pytest.approx(np.array(rows, np.float32), abs=1e-6)

    assert per_step("lif1.membrane") == approx([[.45, .45, .3, .45], [.54, .54, .36, .54], [.45, .45, .372, .45],
                                                [.54, .54, .3744, .54]])
    assert per_step("lif1.spikes").tolist() == [[0, 0, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]]
    assert per_step("lif2.membrane") == approx([[0], [.7125], [-.03375], [.675375]])
    assert per_step("lif2.spikes").tolist() == [[0], [1], [0], [1]]
    assert per_step("lif3.membrane") == approx([[0, 0], [1, .3], [0, .06], [1, .312]])
    assert out["scores"].tolist() == [[0.5, 0.0]]
