"""Architecture builder, the zoo at tiny size, and layer-major == step-major (PAPER.md §4, §7)."""

from pathlib import Path

import pytest
import torch

from conftest import MODEL_FILES, REPO, ZOO, zoo_ids
from helpers import conv_input_channels
from snncompile.config import load_config
from snncompile.errors import ConfigError
from snncompile.models import LIFCell, NeuNormCell, network_from_config, parse_architecture
from snncompile.neurons import LIFParams
from snncompile.models import SpikingNetwork

BATCH = 8  # oneDNN's GEMM is row-independent from 8 rows up (see models.py docstring)


def tiny(path, gain: float = 3.0):
    """A zoo entry at 1/16 width with weights scaled so that every LIF layer fires."""
    cfg = load_config(path)
    net = network_from_config(cfg.model, width_divisor=16)
    with torch.no_grad():
        for stage in net.stages:
            if isinstance(stage, (torch.nn.Conv2d, torch.nn.Linear)):
                stage.weight.mul_(gain)
        for stage in net.stages:
            if isinstance(stage, NeuNormCell):
                stage.norm.u_scale.uniform_(-0.5, 0.5)  # exercise the recurrence, not the zero init
    return cfg, net


def tiny_input(cfg, batch=BATCH):
    shape = (cfg.model.T, batch, *cfg.model.input_shape)
    if cfg.data.name in ("random", "nmnist", "dvs_cifar10", "dvs_gesture"):
        return (torch.rand(shape) < 0.2).float()  # event frames / binary input
    return torch.randn(shape)


def test_parse_paper_notation():
    specs = parse_architecture("128C3(Encoding)-256C3-AP2-1024FC-Voting")
    assert [(s.kind, s.size, s.kernel) for s in specs] == [
        ("conv", 128, 3), ("conv", 256, 3), ("pool", 2, 0), ("fc", 1024, 0), ("voting", 0, 0)]
    assert parse_architecture("128C3-10")[-1].kind == "readout"
    # widths as written (narrow ones too); only test-size shrinking floors them at 4
    assert [s.size for s in parse_architecture("2C3-3FC-Voting")[:2]] == [2, 3]
    assert [s.size for s in parse_architecture("128C3-8FC-Voting", width_divisor=4)[:2]] == [32, 4]
    assert [(s.kind, s.size) for s in parse_architecture("2C5-AP2-10")] == [("conv", 2), ("pool", 2), ("readout", 10)]


@pytest.mark.parametrize("arch", ["128C3-XX-Voting", "Voting-128C3", "AP2-10FC-Voting", "128C3-64FC",
                                  "8C2-8C3-10", "8C3-AP0-10", "0C3-10", "8C3-0FC-10",
                                  # '(Encoding)' labels the first conv only, once
                                  "32C3-AP2(Encoding)-Voting", "32C3-64C3(Encoding)-Voting", "32C3-Voting(Encoding)",
                                  "(Encoding)32C3-Voting", "32C3(Encoding)(Encoding)-Voting", "64FC(Encoding)-Voting"])
def test_bad_architecture_is_one_line_config_error(arch):
    with pytest.raises(ConfigError) as err:
        SpikingNetwork(arch, (1, 8, 8), LIFParams())
    assert "\n" not in str(err.value)


def test_neunorm_u_starts_at_the_configured_value():
    """PAPER.md leaves U's initial value open ([U]): model.neunorm_u_init, 0 (the identity) by default."""
    path = REPO / "models" / "digits.toml"
    for overrides, value in (([], 0.0), (["model.neunorm_u_init=0.25"], 0.25)):
        net = network_from_config(load_config(path, overrides).model)
        norms = [s.norm.u_scale for s in net.stages if isinstance(s, NeuNormCell)]
        assert norms and all(torch.equal(u, torch.full_like(u, value)) for u in norms)
    with pytest.raises(ConfigError, match="config key .model.neunorm_u_init. must be a finite number"):
        load_config(path, ["model.neunorm_u_init=nan"])


def test_neunorm_between_convs_only_by_default():
    net = SpikingNetwork("8C3-8C3-AP2-8C3-16FC-Voting", (1, 8, 8), LIFParams(), neunorm=True)
    kinds = [type(s).__name__ for s in net.stages]
    assert kinds[:7] == ["Conv2d", "LIFCell", "NeuNormCell", "Conv2d", "LIFCell", "NeuNormCell", "AvgPool2d"]
    assert kinds[7:9] == ["Conv2d", "LIFCell"]  # last conv feeds an FC: no NeuNorm unless asked
    shapes = [tuple(s.norm.u_scale.shape) for s in net.stages if isinstance(s, NeuNormCell)]
    assert shapes == [(8, 8, 8), (8, 8, 8)]
    with_fc = SpikingNetwork("8C3-8C3-AP2-8C3-16FC-Voting", (1, 8, 8), LIFParams(), neunorm=True, neunorm_before_fc=True)
    assert sum(isinstance(s, NeuNormCell) for s in with_fc.stages) == 3


def test_voting_head_scores_are_voted_rates():
    net = SpikingNetwork("4C3-Voting", (1, 4, 4), LIFParams(), classes=10, vote_group=10)
    x = torch.randn(4, 2, 1, 4, 4)
    out = net.forward_sequence(x)
    assert out.shape == (4, 2, 100) and set(out.unique().tolist()) <= {0.0, 1.0}
    expected = out.sum(0).view(2, 10, 10).sum(-1) / (4 * 10)
    assert torch.allclose(net(x), expected)


@pytest.mark.parametrize("path", MODEL_FILES, ids=[Path(p).stem for p in MODEL_FILES])
def test_zoo_builds_tiny_and_trains_one_step(path):
    cfg, net = tiny(path)
    x = tiny_input(cfg, batch=2)
    scores = net(x)
    assert scores.shape == (2, cfg.model.classes)
    scores.sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("path", ZOO, ids=zoo_ids())
def test_layer_major_equals_step_major(path):
    cfg, net = tiny(path)
    # eval(): dropout draws its masks in a different RNG order in the two loops; every other stage
    # behaves the same in train and eval (no batch statistics anywhere).
    net.eval()
    x = tiny_input(cfg)
    rec_layer, rec_step = {}, {}
    out_layer = net.decode(net.forward_sequence(x, "layer", rec_layer))
    out_step = net.decode(net.forward_sequence(x, "step", rec_step))
    assert torch.equal(out_layer, out_step)
    assert rec_layer.keys() == rec_step.keys() == set(net.lif_names())
    for name in rec_layer:
        spikes = rec_layer[name][0]
        assert 0 < spikes.mean() < 1, f"{name} must fire for the comparison to mean anything"
        assert torch.equal(spikes, rec_step[name][0]), name

    grads = {}
    for order in ("layer", "step"):
        net.zero_grad()
        net(x, order).square().sum().backward()
        grads[order] = [p.grad.clone() for p in net.parameters()]
    for g_layer, g_step in zip(grads["layer"], grads["step"]):
        # Same function, different summation order of the weight-gradient reductions (T*B at once vs
        # T partial sums): equal to float32 rounding relative to the gradient's scale.
        scale = g_step.abs().max().item()
        torch.testing.assert_close(g_layer, g_step, rtol=1e-4, atol=1e-5 * max(scale, 1e-6))
    assert any(g.abs().sum() > 0 for g in grads["layer"])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_padded_conv_channels_are_the_same_function(monkeypatch, channels_last):
    """pad_conv_channels = 8 (for cuDNN's tensor-core kernels): bench-nmnist's 2-channel input conv runs on
    8 channels, 6 of them zero in the input and the weight. Scores and gradients agree with the unpadded
    run up to summation order; the weight keeps its shape and its gradient; the memory format is kept."""
    cfg, net = tiny(REPO / "models" / "bench-nmnist.toml")
    if channels_last:
        net.to(memory_format=torch.channels_last)
    x = tiny_input(cfg)
    y = torch.randint(0, cfg.model.classes, (x.shape[1],))
    seen = conv_input_channels(monkeypatch)
    results = {}
    for pad in (1, 8):
        net.pad_conv_channels = pad
        net.zero_grad()
        seen.clear()
        scores = net(x)
        torch.nn.functional.cross_entropy(scores, y).backward()
        results[pad] = (scores.detach(), [p.grad.clone() for p in net.parameters()], list(seen))
    first = net.stages[0]
    assert results[1][2][0] == 2 and results[8][2][0] == 8  # the input conv, padded
    assert results[8][2][1:] == results[1][2][1:] == [8]  # 128 / 16 = 8 channels already: untouched
    assert first.weight.shape[1] == 2 and first.weight.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(results[8][0], results[1][0], rtol=1e-5, atol=1e-5)
    for padded, plain in zip(results[8][1], results[1][1]):
        assert padded.shape == plain.shape
        torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)
    assert results[1][1][0].abs().sum() > 0  # the input conv's weight does get a gradient


def test_padded_conv_channels_are_bit_exact_with_exact_arithmetic():
    """With exact arithmetic every conv sum is exact in any order, so the zero channels change no bit."""
    from snncompile.exact import snap_to_grid

    net = SpikingNetwork("8C3-8C3-AP2-16FC-Voting", (1, 8, 8), LIFParams(v_th=0.5), vote_group=2, neunorm=True,
                         exact=True)
    with torch.no_grad():
        for stage in net.stages:
            if isinstance(stage, (torch.nn.Conv2d, torch.nn.Linear)):
                stage.weight.mul_(3.0)
    snap_to_grid(list(net.stages))
    x = torch.rand(3, BATCH, 1, 8, 8)
    outputs = []
    for pad in (1, 8):
        net.pad_conv_channels = pad
        rec = {}
        with torch.no_grad():
            net.forward_sequence(x, record=rec)
        outputs.append(rec)
    assert outputs[0].keys() == outputs[1].keys()
    for name, (spikes, membrane) in outputs[0].items():
        assert torch.equal(spikes, outputs[1][name][0]) and torch.equal(membrane, outputs[1][name][1])
    assert any(s.sum() > 0 for s, _ in outputs[0].values())


def test_lif_state_stays_fp32_under_bf16_autocast():
    net = SpikingNetwork("4C3-16FC-Voting", (1, 4, 4), LIFParams(), vote_group=2)
    rec = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.forward_sequence(torch.randn(2, 3, 1, 4, 4), record=rec)
    assert set(rec) == set(net.lif_names()) and len(rec) >= 2  # every LIF layer recorded: none passes vacuously
    assert all(m.dtype == torch.float32 for _, m in rec.values())
    assert any(isinstance(s, LIFCell) for s in net.stages)


def test_dropout_draws_a_new_mask_every_step():
    # v_th = -1: the hidden FC layer fires everywhere, so whatever is zero after dropout was dropped.
    net = SpikingNetwork("4C3-64FC-Voting", (1, 4, 4), LIFParams(v_th=-1.0), dropout=0.5, vote_group=2).train()
    dropout = next(s for s in net.stages if isinstance(s, torch.nn.Dropout))
    seen = []
    dropout.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    net(torch.randn(4, 1, 1, 4, 4))
    masks = seen[0].unflatten(0, (4, 1)) > 0  # [T, B, 64]
    assert 0.2 < masks.float().mean() < 0.8
    assert not any(torch.equal(masks[0], masks[t]) for t in range(1, 4))


def test_fused_spikes_are_reduced_only_where_a_conv_or_linear_casts_them_anyway():
    from torch import nn

    from snncompile.layers import NeuNorm
    from snncompile.models import NeuNormCell, _spike_dtype

    i = torch.zeros(2, 3)
    to_linear, to_conv = [nn.Flatten(), nn.Linear(3, 3)], [nn.Conv2d(1, 1, 3)]
    to_norm, to_pool = [NeuNormCell(NeuNorm(1, 1, 1), "n")], [nn.AvgPool2d(2), nn.Conv2d(1, 1, 3)]
    to_pools = [nn.AvgPool2d(2), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3, 3)]
    # pooled spikes m/9 (3x3), m/16 (4x4 into fp16 is exact, bf16 too), m/1024 (32x32: not in bf16)
    inexact = [[nn.AvgPool2d(3), nn.Conv2d(1, 1, 3)], [nn.AvgPool2d(32), nn.Conv2d(1, 1, 3)],
               [nn.AvgPool2d(2, padding=1), nn.Conv2d(1, 1, 3)], [nn.AvgPool2d(2), nn.Dropout(0.5), nn.Linear(3, 3)]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _spike_dtype(i, to_linear) == _spike_dtype(i, to_conv) == torch.bfloat16
        # pools of 2x2 and 4x4 windows average 0/1 spikes exactly in bf16, so the conv after them reads bf16
        assert _spike_dtype(i, to_pool) == _spike_dtype(i, to_pools) == torch.bfloat16
        # channel sums, inexact pools and the output counts stay fp32
        assert _spike_dtype(i, to_norm) == _spike_dtype(i, []) == torch.float32
        assert all(_spike_dtype(i, after) == torch.float32 for after in inexact)
    with torch.autocast("cpu", dtype=torch.float16):
        assert _spike_dtype(i, [nn.AvgPool2d(32), nn.Conv2d(1, 1, 3)]) == torch.float16  # 1024 <= 2^11
    assert _spike_dtype(i, to_conv) == _spike_dtype(i, to_pool) == torch.float32


def test_layers_too_large_for_32_bit_kernel_indices_take_the_torch_scan(monkeypatch):
    """The Triton kernels index t * N + i in 32 bits, so a layer of 2^31 or more neuron-steps runs the
    pure-torch scan. The limit is lowered here to this small layer's size to exercise both sides of it."""
    import snncompile.kernels as kernels
    import snncompile.models as models

    assert models._KERNEL_INDEX_LIMIT == 2**31
    calls = []
    for name in ("fused_lif", "fused_lif_pool", "fused_lif_inference"):
        monkeypatch.setattr(kernels, name, lambda h, *a, _n=name, **k: calls.append(_n) or h[..., ::2, ::2])
    net = SpikingNetwork("4C3-AP2-Voting", (1, 8, 8), LIFParams(), classes=2, vote_group=1)
    x = torch.randn(3, 2, 1, 8, 8)
    layer = 3 * 2 * 4 * 8 * 8  # neuron-steps of the LIF layer
    reference = net.run_stages(x, net.stages[:3])
    net.fused_lif = True
    monkeypatch.setattr(models, "_KERNEL_INDEX_LIMIT", layer + 1)
    net.run_stages(x, net.stages[:3])
    assert calls == ["fused_lif_pool"]  # below the limit: the kernel
    calls.clear()
    monkeypatch.setattr(models, "_KERNEL_INDEX_LIMIT", layer)
    assert torch.equal(net.run_stages(x, net.stages[:3]), reference) and calls == []


def test_a_readout_s_16_bit_outputs_are_averaged_over_t_in_fp32():
    """Under bf16 autocast a readout's outputs are bf16; decode sums them over T in fp32 (step by step in
    bf16 the sum rounds at every step: scores off by ~1e-3)."""
    torch.manual_seed(0)
    net = SpikingNetwork("8C3-AP2-32FC-10", (2, 8, 8), LIFParams(), classes=10)
    outputs = (torch.randn(8, 16, 10) * 3).to(torch.bfloat16)  # [T, B, classes], as under autocast
    scores = net.decode(outputs)
    in_fp32 = outputs.double().sum(0).float() / 8
    in_bf16 = outputs[0]
    for out_t in outputs[1:]:
        in_bf16 = in_bf16 + out_t
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, in_fp32, rtol=1e-6, atol=1e-6)
    assert (in_bf16.float() / 8 - in_fp32).abs().max() > 1e-3
