"""Exact arithmetic (snncompile/exact.py): hand-computed grids, the exactness it buys, and bit-identical
membranes on a real runtime."""

import math

import pytest
import torch
from torch import nn

from conftest import REPO
from snncompile.config import load_config
from snncompile.errors import ConfigError
from snncompile.exact import Grid, LayerGrid, Quantize, grid_violations, input_grids, quantize, snap_to_grid
from snncompile.models import LIFCell, SpikingNetwork
from snncompile.neurons import LIFParams


def test_quantize_rounds_to_the_grid_ties_to_even_after_the_clamp():
    x = torch.tensor([0.30, -0.30, 1.5 / 256, 2.5 / 256, 3.0, -7.0, 0.0])
    q = quantize(x, 8, limit=1.0)
    # 0.3 * 256 = 76.8 -> 77; ties 1.5 -> 2 and 2.5 -> 2 (to even); 3.0 and -7.0 clamp to +-1
    assert q.tolist() == [77 / 256, -77 / 256, 2 / 256, 2 / 256, 1.0, -1.0, 0.0]
    assert quantize(torch.tensor([0.3]), 0).tolist() == [0.0]


def test_quantize_passes_the_gradient_straight_through_inside_the_clamp():
    x = torch.tensor([0.301, -0.5, 2.0], requires_grad=True)
    quantize(x, 4, limit=1.0).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # rounding invisible; the clamped value gets none


def test_weight_bits_and_snapping_by_hand():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -3.0, 0.0], [1 / 3, 0.0, 0.0]]))
        layer.bias.copy_(torch.tensor([0.5, 0.0]))
    lg = LayerGrid(0, layer, Grid(8, 2.0))  # (in the network below the quantizer's half step adds 2^-9: same c)
    # row 0: S = 0.5 + 2 * (1 + 3) = 8.5 -> c = floor(24 - 8 - log2 8.5) = floor(12.91) = 12
    # row 1: S = 2 / 3               -> c = floor(24 - 8 + 0.585)     = 16
    assert lg.weight_bits().tolist() == [12, 16]
    assert 24 - 8 - math.log2(8.5) == pytest.approx(12.91, abs=0.01)
    assert not lg.on_grid()  # 1/3 is no multiple of 2^-16
    stages = [Quantize(8, 2.0), layer]
    report = snap_to_grid(stages)
    assert layer.weight[1, 0].item() == 21845 / 65536  # round(65536 / 3) / 65536
    assert layer.weight[0].tolist() == [1.0, -3.0, 0.0] and layer.bias.tolist() == [0.5, 0.0]
    assert report == [{"stage": 1, "input_bits": 8, "weight_bits": [12, 16],
                       "max_rel_change": pytest.approx(abs(21845 / 65536 - torch.tensor(1 / 3).item()) / 3)}]
    assert grid_violations(stages) == []


def test_snapped_sums_are_exact_in_any_order():
    torch.manual_seed(1)
    layer = nn.Linear(1152, 16)
    with torch.no_grad():
        layer.weight.mul_(3)
    stages = [Quantize(6, 1.0), layer]
    snap_to_grid(stages)
    x = quantize(torch.randn(64, 1152), 6, 1.0)
    exact = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert torch.equal(layer(x).double(), exact)  # fp32 GEMM == the exact sum
    w = layer.weight.detach()
    for seed in range(3):  # a plain fp32 sum in a random order: the same bits
        order = torch.randperm(1152, generator=torch.Generator().manual_seed(seed))
        total = layer.bias.detach().clone().expand(64, 16).clone()
        for i in order[:400].tolist() + order[400:].tolist():
            total = total + x[:, i : i + 1] * w[:, i]
        assert torch.equal(total.double(), exact)


def test_too_many_input_bits_for_a_layer_is_a_config_error():
    layer = nn.Linear(64, 1)
    with torch.no_grad():
        layer.weight.fill_(0.5)  # sum |w| = 32 = 2^5: 24 - 16 - 5 = 3 fractional weight bits
        layer.bias.zero_()
    with pytest.raises(ConfigError, match="only 2 fractional weight bits"):  # the bound adds half a grid step
        snap_to_grid([Quantize(16, 1.0), layer])


def test_too_large_weights_after_spikes_blame_the_weights_not_the_input_bits():
    # spikes carry 0 fractional bits, so lowering model.exact_bits cannot help: S = 2^22 leaves 24 - 22 = 2
    layer = nn.Linear(64, 1)
    with torch.no_grad():
        layer.weight.fill_(2.0**16)
        layer.bias.zero_()
    with pytest.raises(ConfigError, match="only 2 fractional weight bits next to 0 input bits: its weights are too "
                                          "large for fp32 \\(sum of \\|w\\| per output up to 4.19e\\+06\\)"):
        snap_to_grid([LIFCell(LIFParams(), "lif1"), layer])


def _net(arch: str, exact: bool = True, neunorm: bool = True) -> SpikingNetwork:
    return SpikingNetwork(arch, (1, 8, 8), LIFParams(), neunorm=neunorm, exact=exact, exact_bits=8, exact_input_max=1.0)


def test_the_network_quantizes_its_input_and_neunorm_outputs_and_tracks_the_grids():
    net = _net("8C3-8C3-AP2-16FC-Voting")
    kinds = [type(s).__name__ for s in net.stages]
    assert kinds == ["Quantize", "Conv2d", "LIFCell", "NeuNormCell", "Quantize", "Conv2d", "LIFCell", "AvgPool2d",
                     "Flatten", "Linear", "LIFCell", "Linear", "LIFCell"]
    with torch.no_grad():
        net.stages[3].norm.u_scale.fill_(-2.0)  # |y| <= 1 + 2 / 8
    grids = [(lg.index, lg.input.frac_bits, lg.input.bound) for lg in input_grids(list(net.stages))]
    assert grids == [(1, 8, 1.0 + 2**-9), (5, 8, pytest.approx(1.25 * 1.001 + 2**-9)), (9, 2, 1.0), (11, 0, 1.0)]
    assert grid_violations(list(net.stages))  # fresh weights: not on their grids
    snap_to_grid(list(net.stages))
    assert grid_violations(list(net.stages)) == []
    plain = _net("8C3-8C3-AP2-16FC-Voting", exact=False)
    assert "model.exact = true" in grid_violations(list(plain.stages))[0]


def test_exact_networks_refuse_pools_that_leave_the_grid():
    with pytest.raises(ConfigError, match="power-of-two pooling"):
        _net("8C3-AP3-16FC-Voting")
    _net("8C3-AP3-16FC-Voting", exact=False)  # fine without exact arithmetic


def test_exact_bits_are_validated():
    with pytest.raises(ConfigError, match="exact_bits"):
        load_config(REPO / "models" / "digits.toml", ["model.exact=true", "model.exact_bits=17"])
    with pytest.raises(ConfigError, match="exact_input_max"):
        load_config(REPO / "models" / "digits.toml", ["model.exact_input_max=0"])


def test_training_checkpoints_the_snapped_network(tmp_path, digits_cfg):
    from snncompile.artifacts import read_manifest
    from snncompile.runs import load_network
    from snncompile.train import train

    digits_cfg.model.neunorm = digits_cfg.model.neunorm_before_fc = True  # 16C3-NeuNorm-AP2-32FC-Voting
    digits_cfg.model.exact = True
    result = train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    cfg, net = load_network(result.run_dir)
    assert any(isinstance(s, Quantize) for s in net.stages) and grid_violations(list(net.stages)) == []
    exact = read_manifest(result.run_dir)["exact"]
    assert exact["input_bits"] == 8 and [layer["stage"] for layer in exact["layers"]] == [1, 7, 9]
    assert result.test_acc > 0.3  # it still learns (10 classes)


@pytest.mark.parametrize("runner", ["ort-cpu", "ov-cpu", pytest.param("ort-cuda", marks=pytest.mark.gpu)])
def test_membranes_are_bit_identical_on_onnx_runtimes(tmp_path, runner):
    """The claim itself, on real runtimes: exact arithmetic makes every membrane ONNX Runtime (or OpenVINO)
    computes the same bits as torch's (on CUDA, through the implicit-GEMM convolutions its options ask for);
    without it, the same network's membranes differ in their last bits."""
    pytest.importorskip("onnxruntime")
    from helpers import make_run
    from snncompile.backends import available_runners
    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    if available_runners()[runner] is not None:
        pytest.skip(f"{runner}: {available_runners()[runner]}")
    differing = {}
    for exact in (True, False):
        cfg = load_config(REPO / "models" / "digits.toml", [f"model.exact={str(exact).lower()}"])
        run = make_run(tmp_path / str(exact), cfg)
        export_run(run, layers=True, check_numerics=False)
        report = verify_run(run, runner)
        assert report["passed"] and report["exact_model"] == exact
        differing[exact] = {name: layer["membranes_differing"] for name, layer in report["layers"].items()}
    assert set(differing[True].values()) == {0}, differing[True]
    assert sum(differing[False].values()) > 0, "control: the plain network should show summation-order rounding"


def test_torch_fast_computes_an_exact_models_membranes_bit_for_bit(tmp_path):
    """torch-fast (layer-major; on CUDA the fused kernels, CUDA graphs and convolutions without cuDNN, whose
    transformed algorithms round) against the reference: every membrane the same bits. On a CPU this checks
    the layer-major path; the CUDA half of the claim runs where a GPU is."""
    pytest.importorskip("onnxruntime")
    import torch
    from helpers import make_run
    from snncompile.backends import create_runner
    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    cfg = load_config(REPO / "models" / "digits.toml", ["model.exact=true"])
    run = make_run(tmp_path, cfg)
    export_run(run, layers=True, check_numerics=False)
    report = verify_run(run, "torch-fast")
    assert report["passed"] and report["exact_model"]
    assert {name: layer["membranes_differing"] for name, layer in report["layers"].items() if layer["membranes_differing"]} == {}
    with create_runner("torch-fast", run, "model_layers.onnx") as runner:
        assert runner.direct_convs == torch.cuda.is_available()


def test_onnx_runtime_cuda_convolves_an_exact_model_by_implicit_gemm(tmp_path):
    """ORT CUDA's provider options: an exact model's convolutions by cuDNN's implicit GEMM (direct sums; the
    provider's default timing search may pick Winograd or FFT, which round), a plain model's by the fastest."""
    pytest.importorskip("onnxruntime")
    from helpers import make_run
    from snncompile.backends.ort import cuda_provider_options

    for exact in (True, False):
        cfg = load_config(REPO / "models" / "digits.toml", [f"model.exact={str(exact).lower()}"])
        run = make_run(tmp_path / str(exact), cfg)
        want = {"use_tf32": "0", **({"cudnn_conv_algo_search": "DEFAULT"} if exact else {})}
        assert cuda_provider_options(run, "model.onnx") == want


def test_the_reference_runners_convolve_an_exact_model_without_cudnn_on_cuda(tmp_path):
    """torch, torch-loop and torch-compile run an exact model's convolutions as torch-fast does on CUDA:
    without cuDNN, whose Winograd/FFT algorithms would round its exact sums (the context they compute
    in, looked at with the device set to CUDA: no GPU needed to see it); TF32 off either way."""
    import torch
    from helpers import make_run
    from snncompile.backends import create_runner
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, load_config(REPO / "models" / "digits.toml", ["model.exact=true"]))
    export_run(run, n_random=4, n_real=0, check_numerics=False)
    with create_runner("torch", run, "model.onnx") as runner:
        assert runner.exact_model
        runner.device = torch.device("cuda")
        with runner.fp32_numerics():
            assert not torch.backends.cudnn.enabled and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.enabled
        runner.exact_model = False
        with runner.fp32_numerics():
            assert torch.backends.cudnn.enabled and not torch.backends.cudnn.allow_tf32


def test_cudnn_is_restored_after_the_direct_convolutions():
    import torch
    from snncompile.torch_settings import cudnn_disabled

    before = torch.backends.cudnn.enabled
    with pytest.raises(RuntimeError), cudnn_disabled():
        assert torch.backends.cudnn.enabled is False
        raise RuntimeError("inside")
    assert torch.backends.cudnn.enabled == before



def test_training_says_when_the_input_clamp_cuts_training_data():
    from snncompile.train import _say_clipped_inputs

    lines = []
    _say_clipped_inputs(torch.tensor([0.5, -1.0, 3.0, 0.0]), 1.0, lines.append)
    assert lines == ["note: model.exact_input_max = 1 clips 1 of 4 training input values (25 %, largest |x| 3): "
                     "raise it to keep them"]
    _say_clipped_inputs(torch.tensor([0.5, -1.0]), 1.0, lines.append)
    assert len(lines) == 1
    _say_clipped_inputs(torch.tensor([[0, 1, 5]], dtype=torch.uint16), 2.0, lines.append)  # event counts
    assert lines[1].startswith("note: model.exact_input_max = 2 clips 1 of 3 training input values (33 %, largest |x| 5)")


def test_the_grid_walk_refuses_what_would_leave_the_grid():
    with pytest.raises(ConfigError, match="power-of-two pooling"):
        input_grids([Quantize(8, 1.0), nn.AvgPool2d(3), nn.Flatten(), nn.Linear(4, 2)])
    with pytest.raises(ConfigError, match="must follow NeuNorm"):
        input_grids([Quantize(8), nn.Linear(4, 2)])
    # a window sum past fp32's 24 bits: 16 values up to 300 on a 2^-16 grid reach 2^28.2
    with pytest.raises(ConfigError, match="pool's window sum .* is not exact in fp32"):
        input_grids([Quantize(16, 300.0), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(1, 1)])
    # a pool of 4 keeps the grid, 2 bits finer
    assert input_grids([Quantize(8, 1.0), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 2)])[0].input.frac_bits == 10
