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
from snncompile.split_tf32 import SplitTF32, apply_split_tf32, round_to_tf32, spike_fed_layers, split_input

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


def _wide_range_fp32(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.exp2(torch.randint(-60, 60, (n,), generator=gen).float())


def _truncate_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """What a tensor core may do with an fp32 operand instead of rounding it: drop the 13 low bits."""
    return (x.contiguous().view(torch.int32) & -(1 << 13)).view(torch.float32)


def test_split_input_gives_an_exact_tf32_high_part_and_a_small_remainder():
    x = torch.cat([_wide_range_fp32(100_000, 2), torch.tensor([0.0, -0.0, 1.0, -3.0, 0.1, 2.0**100, 1.0 - 2**-24])])
    hi, lo = split_input(x)
    assert torch.equal(round_to_tf32(hi), hi) and torch.equal(_truncate_to_tf32(hi), hi)  # 11 significant bits
    assert torch.equal(hi.double() + lo.double(), x.double())  # nothing lost
    assert (lo.abs() <= x.abs() * 2.0**-11).all()
    # a remainder of at most 12 significant bits: TF32 keeps all but the last
    assert ((_truncate_to_tf32(lo) - lo).abs() <= lo.abs() * 2.0**-11).all()


def test_split_input_survives_fma_contraction():
    """A compiler may fuse ``x + x * 2^13`` into one FMA (TensorRT's pointwise kernels, Inductor): the
    product is exact, so t is the same. Veltkamp's usual ``x * (2^13 + 1)`` does not survive a contraction
    into ``t - (t - x)``: emulated in float64 (fp32 products are exact there), its high part has bits TF32
    drops."""
    x = _wide_range_fp32(100_000, 3)
    x64 = x.double()
    t_fma = (x64 + x64 * 2.0**13).float()  # one rounding
    hi = t_fma - (t_fma - x)
    assert torch.equal(t_fma, x + x * 2.0**13) and torch.equal(hi, split_input(x)[0])
    t = x * 8193.0
    hi_contracted = (x64 * 8193.0 - (t - x).double()).float()  # hi = fma(x, 8193, -(t - x))
    assert not torch.equal(round_to_tf32(hi_contracted), hi_contracted)


@pytest.mark.parametrize("tf32", [round_to_tf32, _truncate_to_tf32], ids=["rounding", "truncating"])
def test_on_an_emulated_tf32_core_analog_input_split_too_is_fp32_accurate(tf32):
    """The first conv's analog input is not exact in TF32: W x split as W_hi x_hi + W_lo x_hi + W_hi x_lo is
    within 2^-20 of sum |W||x| (module docstring), where the weights alone split are off by 2^-14 of it,
    whether the core rounds its operands or truncates them."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 8, 3, 3, generator=gen) * 0.1
    x = torch.randn(8, 8, 10, 10, generator=gen).abs() * 3 + 0.01
    exact = F.conv2d(x.double(), w.double(), padding=1)
    scale = F.conv2d(x.double().abs(), w.double().abs(), padding=1)

    def core(a, b):  # operands as the core sees them, exact products and sums
        return F.conv2d(tf32(a).double(), tf32(b).double(), padding=1)

    hi = round_to_tf32(w)
    x_hi, x_lo = split_input(x)
    split = core(x_hi, hi) + core(x_hi, w - hi) + core(x_lo, hi)
    weights_only = core(x, hi) + core(x, w - hi)
    assert ((split - exact).abs() <= scale * 2.0**-20).all()
    assert ((weights_only - exact).abs() / scale).max() > 2.0**-14


def _truncated(v: torch.Tensor, ulp: torch.Tensor) -> torch.Tensor:
    """float64 ``v`` cut towards zero to a multiple of ``ulp`` (a power of two)."""
    return (v / ulp).trunc() * ulp


def _truncating_core_sum(products: torch.Tensor, block: int, guard_bits: int) -> torch.Tensor:
    """Sums exact float64 ``products [..., K]`` the way Fasi et al. (2021) found an A100's TF32 tensor core
    does: ``block`` products at a time and the accumulator aligned to the largest of them, cut off
    ``guard_bits`` below its 24 bits, added, then truncated to 24 bits (fp32). Returns ``[...]`` fp32."""
    acc = torch.zeros(products.shape[:-1], dtype=torch.float64)
    one = torch.ones_like(acc)
    for j in range(0, products.shape[-1], block):
        terms = torch.cat([acc[..., None], products[..., j:j + block]], dim=-1)
        top = torch.frexp(terms.abs().amax(dim=-1)).exponent  # largest = m 2^top, m in [0.5, 1)
        total = _truncated(terms, torch.ldexp(one, top - 24 - guard_bits)[..., None]).sum(dim=-1)
        acc = _truncated(total, torch.ldexp(one, torch.frexp(total.abs()).exponent - 24))
    return acc.float()


def _truncating_core(block: int = 4, guard_bits: int = 3):
    """A stand-in for ``torch.nn.functional`` whose conv2d/linear run on the emulated truncating core
    (operands truncated to TF32; bias, if any, added in fp32 after)."""

    def products(x, w):  # [..., K] x [O, K] -> exact [..., O, K]
        return _truncate_to_tf32(x).double()[..., None, :] * _truncate_to_tf32(w).double()

    def linear(x, w, bias=None):
        y = _truncating_core_sum(products(x, w), block, guard_bits)
        return y if bias is None else y + bias

    def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
        assert groups == 1
        cols = F.unfold(x, w.shape[2:], dilation=dilation, padding=padding, stride=stride)  # [N, K, L]
        y = linear(cols.transpose(1, 2), w.flatten(1)).transpose(1, 2)  # [N, O, L]
        size = [(x.shape[2 + i] + 2 * _pair(padding)[i] - _pair(dilation)[i] * (w.shape[2 + i] - 1) - 1)
                // _pair(stride)[i] + 1 for i in range(2)]
        y = y.reshape(x.shape[0], w.shape[0], *size)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    return type("TruncatingTF32Core", (), {"conv2d": staticmethod(conv2d), "linear": staticmethod(linear)})


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def test_truncating_core_emulation_by_hand():
    """Block of 4 plus the accumulator, aligned to the largest, cut 3 bits below its 24 (1's last bit is
    2^-23): 2^-27 is cut off; two 2^-24 are kept in the guard bits and sum to a bit that fits (without
    guard bits both would be cut); 1 + 1.5 * 2^-23 is truncated to 1 + 2^-23, and -1 - 2^-25 to -1."""
    e = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    assert _truncating_core_sum(e(1.0, 2.0**-27), 4, 3).item() == 1.0
    assert _truncating_core_sum(e(1.0, 2.0**-24, 2.0**-24), 4, 3).item() == 1.0 + 2.0**-23
    assert _truncating_core_sum(e(1.0, 2.0**-24, 2.0**-24), 4, 0).item() == 1.0
    assert _truncating_core_sum(e(1.0, 2.0**-23, 2.0**-24), 4, 3).item() == 1.0 + 2.0**-23
    assert _truncating_core_sum(e(-1.0, -2.0**-25), 4, 3).item() == -1.0  # towards zero, not down
    assert _truncating_core_sum(e(3 * 2.0**-24), 4, 3).item() == 3 * 2.0**-24
    # the accumulator joins the next block's alignment: 1, then 4 terms of 2^-26 in the next block
    assert _truncating_core_sum(e(1.0, 0, 0, 0, *[2.0**-26] * 4), 4, 3).item() == 1.0
    torch.testing.assert_close(_truncating_core().conv2d(torch.ones(1, 2, 3, 3), torch.ones(4, 2, 3, 3),
                                                         padding=1),
                               F.conv2d(torch.ones(1, 2, 3, 3), torch.ones(4, 2, 3, 3), padding=1))


def test_on_a_truncating_tensor_core_the_analog_split_keeps_three_accumulators(monkeypatch):
    """Why SplitTF32(analog=True) makes two calls: on a core that truncates its sums (the H200 behaved
    like one: README, "Third session"), the split over one accumulator ``[x_hi | x_hi | x_lo]`` (its form
    until 2026-11-27) loses about K / 4 units of the accumulator's last place; three accumulators lose
    about a third of that, far below plain TF32, though not down to fp32 rounding. The spike split
    stays near fp32 on such a core."""
    import snncompile.split_tf32 as split_tf32

    gen = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(128, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.uniform_(-(128 * 9) ** -0.5, (128 * 9) ** -0.5, generator=gen)
    x = torch.randn(2, 128, 8, 8, generator=gen)
    s = (torch.rand(2, 128, 8, 8, generator=gen) < 0.2).float()
    core = _truncating_core()
    w = conv.weight.detach()

    def err(y, inp):
        return (y.double() - F.conv2d(inp.double(), w.double(), padding=1)).abs().max().item()

    monkeypatch.setattr(split_tf32, "F", core)
    three, spike_split = err(SplitTF32(conv, analog=True)(x), x), err(SplitTF32(conv)(s), s)
    monkeypatch.undo()
    hi = round_to_tf32(w)
    x_hi, x_lo = split_input(x)
    one = err(core.conv2d(torch.cat([x_hi, x_hi, x_lo], 1), torch.cat([hi, w - hi, hi], 1), padding=1), x)
    plain, fp32 = err(core.conv2d(x, w, padding=1), x), err(F.conv2d(x, w, padding=1), x)
    spike_fp32 = err(F.conv2d(s, w, padding=1), s)
    print(f"max error, analog input: one accumulator {one:.3g}, three {three:.3g}, plain TF32 {plain:.3g}, "
          f"CPU fp32 {fp32:.3g}; spikes: split {spike_split:.3g}, CPU fp32 {spike_fp32:.3g}")
    assert three < one / 2
    assert plain > 20 * three
    assert three > 2 * fp32  # what the docs say: between fp32 and plain TF32, not fp32-accurate
    assert spike_split < 2 * spike_fp32


def test_analog_split_layer_reproduces_the_layer_in_fp32():
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(3, 16, 3, padding=1, stride=2), nn.Linear(40, 12)
    x, f = torch.randn(5, 3, 9, 9), torch.randn(2, 5, 40)  # a linear over [..., F] input too
    torch.testing.assert_close(SplitTF32(conv, analog=True)(x), conv(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(SplitTF32(fc, analog=True)(f), fc(f), rtol=1e-5, atol=1e-6)
    spikes = (f > 0).float()
    torch.testing.assert_close(SplitTF32(fc)(spikes), fc(spikes), rtol=1e-6, atol=1e-6)
    assert SplitTF32(conv, analog=True).weight.shape == (32, 3, 3, 3)  # [W_hi; W_lo], as for spikes


class _EmulatedTF32Layer(nn.Module):
    """A conv/linear as a runtime with TF32 on computes it (``tf32``: operands rounded to TF32) or as an
    exact one does (float64, rounded once to fp32); exact products and sums in both."""

    def __init__(self, layer: nn.Module, tf32: bool):
        super().__init__()
        self.layer, self.tf32 = layer, tf32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        operand = (lambda t: round_to_tf32(t).double()) if self.tf32 else (lambda t: t.double())
        return _emulated(F.conv2d if isinstance(self.layer, nn.Conv2d) else F.linear, operand,
                         self.layer)(x, self.layer.weight, self.layer.bias)


def _emulated(op, operand, layer=None):
    """``op`` (F.conv2d / F.linear, with ``layer``'s geometry) on operands passed through ``operand``, in
    float64 (exact products and sums here), rounded once to fp32, then the bias."""
    kwargs = {} if layer is None or not isinstance(layer, nn.Conv2d) else {
        "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}

    def run(x, weight, bias=None, *args, **more):
        out = op(operand(x), operand(weight.detach()), None, *args, **{**kwargs, **more}).float()
        return out if bias is None else out + bias.detach().view(-1, *[1] * (out.dim() - 2))

    return run


@pytest.mark.parametrize("model", ["digits", "mnist"])
def test_on_an_emulated_tf32_runtime_the_export_s_split_flips_like_exact_arithmetic(model, monkeypatch):
    """What ORT CUDA / TensorRT do with the tf32x2 export: TF32 for every conv/linear of the graph.
    Emulated on a calibrated zoo network and compared with torch's fp32 spikes: the network with every
    layer split (``analog=True``, as exported) flips about as often as exact arithmetic does (any two
    fp32 summation orders differ at the threshold now and then); with only the spike layers split (as the
    export was before), the rest in TF32, orders of magnitude more. mnist: NeuNorm feeds every conv."""
    import copy

    import snncompile.split_tf32 as split_tf32
    from snncompile.data import random_input
    from snncompile.init_run import calibrate_firing

    cfg = tiny_zoo_config(REPO / "models" / f"{model}.toml")
    net = network_from_config(cfg.model).eval()
    x = random_input(cfg, 64, torch.Generator().manual_seed(5))
    calibrate_firing(net, x)

    def flip_rate(variant) -> float:
        record = {}
        with torch.no_grad():
            variant.forward_sequence(x, "layer", record)
        return (torch.cat([s.flatten() for s, _ in record.values()]) != reference).double().mean().item()

    record = {}
    with torch.no_grad():
        net.forward_sequence(x, "layer", record)
    reference = torch.cat([s.flatten() for s, _ in record.values()])

    def emulated(net, tf32: bool):
        """``net`` with its Conv2d/Linear stages (the unsplit ones) computed as the emulated runtime would."""
        for i, stage in enumerate(net.stages):
            if isinstance(stage, (nn.Conv2d, nn.Linear)):
                net.stages[i] = _EmulatedTF32Layer(stage, tf32)
        return net

    exact = flip_rate(emulated(copy.deepcopy(net), tf32=False))
    tf32_operand = lambda t: round_to_tf32(t).double()  # noqa: E731
    core = type("TF32Core", (), {"conv2d": staticmethod(_emulated(F.conv2d, tf32_operand)),
                                 "linear": staticmethod(_emulated(F.linear, tf32_operand))})
    monkeypatch.setattr(split_tf32, "F", core)  # the split layers' products on the emulated TF32 core
    all_split = copy.deepcopy(net)
    apply_split_tf32(all_split, analog=True)
    spike_layers_split = copy.deepcopy(net)
    apply_split_tf32(spike_layers_split)
    all_split, partly = flip_rate(all_split), flip_rate(emulated(spike_layers_split, tf32=True))
    print(f"flip rates vs torch fp32: exact {exact:.2e}, all split {all_split:.2e}, spike layers split {partly:.2e}")
    assert all_split <= 3 * exact + 1e-6
    assert partly > 30 * max(all_split, 1e-6)


def test_a_grouped_convolution_is_refused():
    with pytest.raises(ValueError, match="ungrouped convolutions, got groups=2"):
        SplitTF32(nn.Conv2d(4, 8, 3, groups=2))


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
    # analog: the rest too, input split
    mnist = network_from_config(tiny_zoo_config(REPO / "models" / "mnist.toml").model)
    weighted = sum(isinstance(s, (nn.Conv2d, nn.Linear)) for s in mnist.stages)
    assert apply_split_tf32(mnist, analog=True) == weighted
    assert [s.analog for s in mnist.stages if isinstance(s, SplitTF32)] == [True] * (weighted - 2) + [False] * 2


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
    """`export --precision tf32x2`: every conv/linear split in the graph (the spike layers' stacked hi/lo
    weights; the first conv's input split by the graph, x_hi against the stacked weights, x_lo against W_hi),
    the fp32 module's outputs as reference; ONNX Runtime (fp32 on the CPU) passes verify; the CUDA
    runner turns TF32 on for this file only, which is why no layer of it may be left unsplit."""
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
    assert result.path.name == "model_tf32x2_layers.onnx" and result.split_tf32_layers == 8  # 5 convs, 3 linears
    entry = read_manifest(run)["exports"]["model_tf32x2_layers.onnx"]
    assert entry["precision"] == "tf32x2" and entry["split_tf32_layers"] == 8
    graph = onnx.load(str(result.path)).graph
    conv_weights = [numpy_helper.to_array(t) for t in graph.initializer if t.dims and len(t.dims) == 4]
    stacked = [w for w in conv_weights if w.shape[0] in (32, 64, 128)]  # 2 x C_out of convs 2-5
    assert len(stacked) == 4
    for w in stacked:
        hi, lo = np.split(w, 2)
        assert np.array_equal(round_to_tf32(torch.tensor(hi)).numpy(), hi) and np.abs(lo).max() > 0
    # the input conv (3 channels): [W_hi; W_lo] against x_hi, and W_hi alone against x_lo (three accumulators)
    first = sorted((w for w in conv_weights if w.shape[1] == 3), key=len)
    assert [len(w) for w in first] == [8, 16]
    hi, lo = np.split(first[1], 2)
    assert np.array_equal(first[0], hi) and np.array_equal(round_to_tf32(torch.tensor(hi)).numpy(), hi)
    # the input split survived the exporter's optimizer as written: x * 2^13, not x * (2^13 + 1)
    constants = [float(v) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and not t.dims
                 for v in numpy_helper.to_array(t).ravel()]
    constants += [float(numpy_helper.to_array(a.t)) for n in graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value" and not a.t.dims]
    assert 8192.0 in constants and 8193.0 not in constants
    report = verify_run(run, "ort-cpu", "tf32x2", model_file="model_tf32x2_layers.onnx")
    assert report["passed"], report["reasons"]
    assert cuda_provider_options(run, "model_tf32x2_layers.onnx") == {"use_tf32": "1"}
    assert cuda_provider_options(run, "model.onnx") == {"use_tf32": "0"}
    with pytest.raises(ConfigError, match="--precision tf32x2 applies to the unrolled form only"):
        export_run(run, form="step", precision="tf32x2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_spike_split_is_fp32_accurate_and_the_analog_split_far_better_than_tf32():
    """Spike input: the weight split is fp32-accurate. Analog input: the split is far more accurate than
    plain TF32 and, in three accumulators, more than in one (the truncating core's prediction, emulated in
    ``test_on_a_truncating_tensor_core_the_analog_split_keeps_three_accumulators``), but not fp32-accurate
    (the H200 of 2026-11-27: one accumulator 7.6e-5 against cuDNN fp32's 8.4e-7)."""
    from snncompile.torch_settings import tf32_math

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
        # analog input (the first conv's, NeuNorm's output): the input split too
        x = torch.randn(64, 256, 16, 16, device="cuda")
        exact_x = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        fp32_x_err = (conv(x).double() - exact_x).abs().max().item()
        analog_err = (SplitTF32(conv, analog=True)(x).double() - exact_x).abs().max().item()
        w = conv.weight.detach()
        hi = round_to_tf32(w)
        x_hi, x_lo = split_input(x)
        with tf32_math(True):
            tf32_x_err = (conv(x).double() - exact_x).abs().max().item()
            one_accumulator = F.conv2d(torch.cat([x_hi, x_hi, x_lo], 1), torch.cat([hi, w - hi, hi], 1), conv.bias,
                                       padding=1)
        one_accumulator_err = (one_accumulator.double() - exact_x).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    # printed first: when an assertion fails, every figure is in the log (the third GPU session's run
    # stopped at the analog one and left plain TF32's analog error unknown)
    print(f"max error vs float64: fp32 {fp32_err:.3g}, split TF32 {split_err:.3g}, plain TF32 {tf32_err:.3g}; "
          f"analog input: fp32 {fp32_x_err:.3g}, split TF32 {analog_err:.3g} (one accumulator "
          f"{one_accumulator_err:.3g}), plain TF32 {tf32_x_err:.3g}")
    # fp32-accurate: within a small factor of cuDNN's own fp32 convolution (tensor cores accumulate
    # with truncation, so not necessarily better), and far from plain TF32
    assert split_err < 16 * fp32_err + 1e-6
    assert tf32_err > 50 * split_err
    assert analog_err < one_accumulator_err
    assert tf32_x_err > 20 * analog_err
