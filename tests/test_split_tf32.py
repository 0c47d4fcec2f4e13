"""torch-fast's tf32x2: weights split into TF32 hi + lo parts, spike layers fp32-accurate on tensor cores.

The CPU has no TF32, so the accuracy claim is checked by emulating a TF32 tensor core exactly (both
operands rounded to TF32, products and sums in float64); the GPU test at the end runs the real thing.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO
from helpers import make_run, tiny_zoo_config
from snncompile.models import network_from_config
from snncompile.split_tf32 import SplitTF32, apply_split_tf32, round_to_tf32, spike_fed_layers

ULP_TF32_AT_1 = 2.0**-10


def test_round_to_tf32_by_hand():
    x = torch.tensor([
        1.0 + 2**-12,            # below half a TF32 step: down
        1.0 + 2**-11,            # a tie, 1.0 is even: down
        1.0 + 3 * 2**-11,        # a tie between 1 + 2^-10 (odd) and 1 + 2^-9 (even): up
        1.0 + 2**-11 + 2**-20,   # just above the tie: up
        -(1.0 + 2**-11 + 2**-20),  # sign kept
        0.1,                     # 0x3DCCCCCD: dropped bits 0xCCD < half (0x1000): 0x3DCCC000
        0.0,
        1.0 - 2**-24,            # rounds up across the binade to 1.0
    ], dtype=torch.float32)
    want = [1.0, 1.0, 1.0 + 2**-9, 1.0 + 2**-10, -(1.0 + 2**-10), np.float32(np.frombuffer(
        np.array([0x3DCCC000], dtype=np.uint32).tobytes(), dtype=np.float32)[0]), 0.0, 1.0]
    assert round_to_tf32(x).tolist() == [float(w) for w in want]


def test_hi_plus_lo_is_the_weight_exactly_and_lo_is_small():
    w = torch.randn(64, 32, 3, 3)
    layer = nn.Conv2d(32, 64, 3, padding=1)
    layer.weight.data.copy_(w)
    split = SplitTF32(layer)
    hi, lo = split.weight[:64], split.weight[64:]
    assert torch.equal(round_to_tf32(hi), hi)  # hi is a TF32 value
    assert torch.equal(hi + lo, w)  # the split loses nothing
    assert (lo.abs() <= w.abs() * 2.0**-11).all()


def test_split_layer_reproduces_the_layer_in_fp32():
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(40, 12)
    s = (torch.rand(5, 8, 9, 9) < 0.3).float()
    f = (torch.rand(5, 40) < 0.3).float()
    torch.testing.assert_close(SplitTF32(conv)(s), conv(s), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(SplitTF32(fc)(f), fc(f), rtol=1e-6, atol=1e-6)


def test_on_an_emulated_tf32_core_the_split_is_fp32_accurate_where_plain_tf32_is_not():
    """A TF32 tensor core: operands rounded to TF32, exact products, (here) exact sums. Against the exact
    float64 result, plain TF32 is off by up to 2^-11 relative; the split by at most 2^-22 relative."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, 3, 3, generator=gen) * 0.1
    s = (torch.rand(16, 64, 12, 12, generator=gen) < 0.25).double()
    hi = round_to_tf32(w)
    lo = w - hi
    exact = F.conv2d(s, w.double(), padding=1)
    scale = F.conv2d(s, w.abs().double(), padding=1)  # sum |w| over the spikes: the error bound's scale
    plain = F.conv2d(s, round_to_tf32(w).double(), padding=1)
    split = F.conv2d(s, round_to_tf32(hi).double(), padding=1) + F.conv2d(s, round_to_tf32(lo).double(), padding=1)
    plain_err = (plain - exact).abs().max().item()
    split_err = (split - exact).abs().max().item()
    assert ((split - exact).abs() <= scale * 2.0**-22).all()
    assert split_err * 500 < plain_err
    # pooled spikes (k/4) are exact in TF32 too
    pooled = F.avg_pool2d(s, 2)
    assert torch.equal(round_to_tf32(pooled.float()).double(), pooled)


def test_only_layers_that_read_spikes_are_split():
    bench = network_from_config(tiny_zoo_config(REPO / "models" / "bench-cifar.toml").model)
    kinds = [type(s).__name__ for s in bench.stages]
    weighted = [i for i, k in enumerate(kinds) if k in ("Conv2d", "Linear")]
    assert spike_fed_layers(bench.stages) == weighted[1:]  # all but the first conv (analog input)
    # a NeuNorm net: the convs read NeuNorm's output (not spikes) and stay fp32; the FCs read spikes
    mnist = network_from_config(tiny_zoo_config(REPO / "models" / "mnist.toml").model)
    split = [type(mnist.stages[i]).__name__ for i in spike_fed_layers(mnist.stages)]
    assert split == ["Linear", "Linear"]
    assert apply_split_tf32(mnist) == 2 and sum(isinstance(s, SplitTF32) for s in mnist.stages) == 2


def test_torch_fast_tf32x2_verifies_at_fp32(tmp_path):
    pytest.importorskip("onnxruntime")
    from snncompile.backends import create_runner
    from snncompile.compare import verify_run
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-cifar.toml"))
    export_run(run, layers=True, n_random=32, n_real=0)
    with create_runner("torch-fast", run, "model_layers.onnx", precision="tf32x2") as runner:
        assert runner.split_layers == 7  # 4 of 5 convs (not the first), 3 of 3 linears
    report = verify_run(run, "torch-fast", "tf32x2", options={"precision": "tf32x2"})
    assert report["passed"], report["reasons"]
    assert sum(s["real"] for s in report["layers"].values()) == 0


def test_tf32x2_export_carries_the_split_weights_and_verifies_on_onnx_runtime(tmp_path):
    """`export --precision tf32x2`: the spike layers' stacked hi/lo weights in the graph, the fp32 module's
    outputs as reference; ONNX Runtime (fp32 on the CPU) passes verify; the CUDA runner turns TF32 on
    for this file only."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from snncompile.artifacts import read_manifest
    from snncompile.backends.ort import cuda_provider_options
    from snncompile.compare import verify_run
    from snncompile.errors import ConfigError
    from snncompile.export_onnx import export_run

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "bench-cifar.toml"))
    export_run(run, n_random=16, n_real=0)
    result = export_run(run, layers=True, precision="tf32x2", n_random=16, n_real=0)
    assert result.path.name == "model_tf32x2_layers.onnx" and result.split_tf32_layers == 7
    entry = read_manifest(run)["exports"]["model_tf32x2_layers.onnx"]
    assert entry["precision"] == "tf32x2" and entry["split_tf32_layers"] == 7
    conv_weights = [numpy_helper.to_array(t) for t in onnx.load(str(result.path)).graph.initializer if t.dims and len(t.dims) == 4]
    stacked = [w for w in conv_weights if w.shape[0] in (32, 64, 128) and w.shape[1] > 3]  # 2 x C_out of convs 2-5
    assert len(stacked) == 4
    for w in stacked:
        hi, lo = np.split(w, 2)
        assert np.array_equal(round_to_tf32(torch.tensor(hi)).numpy(), hi) and np.abs(lo).max() > 0
    report = verify_run(run, "ort-cpu", "tf32x2", model_file="model_tf32x2_layers.onnx")
    assert report["passed"], report["reasons"]
    assert cuda_provider_options(run, "model_tf32x2_layers.onnx") == {"use_tf32": "1"}
    assert cuda_provider_options(run, "model.onnx") == {"use_tf32": "0"}
    with pytest.raises(ConfigError, match="--precision tf32x2 applies to the unrolled form only"):
        export_run(run, form="step", precision="tf32x2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_split_tf32_is_as_accurate_as_fp32_and_plain_tf32_is_not():
    from snncompile.backends.pt import tf32_math

    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1).cuda()
    s = (torch.rand(64, 256, 16, 16, device="cuda") < 0.2).float()
    exact = F.conv2d(s.double(), conv.weight.double(), conv.bias.double(), padding=1)
    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        fp32_err = (conv(s).double() - exact).abs().max().item()
        with tf32_math(True):
            tf32_err = (conv(s).double() - exact).abs().max().item()
        torch.backends.cudnn.allow_tf32 = False
        split_err = (SplitTF32(conv)(s).double() - exact).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    # fp32-accurate: within a small factor of cuDNN's own fp32 convolution (tensor cores may accumulate
    # with truncation, so not necessarily better), and far from plain TF32
    assert split_err < 16 * fp32_err + 1e-6
    assert tf32_err > 50 * split_err
    print(f"max error vs float64: fp32 {fp32_err:.3g}, split TF32 {split_err:.3g}, plain TF32 {tf32_err:.3g}")
