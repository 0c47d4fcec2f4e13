"""Spikes saved for backward as uint8: bit-identical gradients, and the bytes saved counted by hand."""

import pytest
import torch

from conftest import ZOO, zoo_ids
from helpers import tiny_zoo_config
from snncompile.memory import SavedActivations
from snncompile.models import SpikingNetwork, network_from_config
from snncompile.neurons import LIFParams


def _grads(net, x, compact: bool, order: str = "layer"):
    net.zero_grad(set_to_none=True)
    with SavedActivations(compact=compact) as saved:
        scores = net(x, order)
    scores.square().sum().backward()
    return saved.saved_bytes, {n: p.grad.clone() for n, p in net.named_parameters()}


def test_saved_bytes_drop_by_three_bytes_per_saved_spike_by_hand():
    # 4C3 on a 1x6x6 input, T = 2, B = 3: the LIF's spikes s1 [2, 3, 4, 6, 6] = 864 values are saved by
    # the average pool (for its backward). fp32: 4 bytes each; compacted: 1 byte -> 3 * 864 = 2592 fewer.
    torch.manual_seed(0)
    net = SpikingNetwork("4C3-AP2-10", (1, 6, 6), LIFParams(0.5, 0.2, 1.0), classes=10, vote_group=1)
    x = torch.rand(2, 3, 1, 6, 6) * 2
    plain, g_plain = _grads(net, x, compact=False)
    compact, g_compact = _grads(net, x, compact=True)
    assert plain - compact == 3 * 864
    for name in g_plain:
        assert torch.equal(g_plain[name], g_compact[name]), name


@pytest.mark.parametrize("order", ["layer", "step"])
def test_spikes_cast_for_a_bf16_conv_are_saved_as_uint8_too(order):
    # Under bf16 autocast the conv/linear after a LIF saves a bf16 copy of its spikes: 4C3-8C3-10 on
    # 1x6x6, T = 2, B = 3 saves s1 [2, 3, 4, 6, 6] (864 values, for conv2) and s2 [2, 3, 8, 6, 6] (1728,
    # for the readout): compacted, 2 - 1 bytes fewer each, 2592 in all, with the same gradients.
    torch.manual_seed(0)
    net = SpikingNetwork("4C3-8C3-10", (1, 6, 6), LIFParams(0.5, 0.2, 1.0), classes=10, vote_group=1)
    x = torch.rand(2, 3, 1, 6, 6) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, g_plain = _grads(net, x, compact=False, order=order)
        compact, g_compact = _grads(net, x, compact=True, order=order)
    assert plain - compact == 864 + 1728
    for name in g_plain:
        assert torch.equal(g_plain[name], g_compact[name]), name


@pytest.mark.parametrize("path", ZOO, ids=zoo_ids())
@pytest.mark.parametrize("order", ["layer", "step"])
def test_zoo_gradients_are_bit_identical_with_compact_spikes(path, order):
    cfg = tiny_zoo_config(path)
    torch.manual_seed(0)
    net = network_from_config(cfg.model).eval()  # dropout off: both passes see the same function
    x = (torch.rand(cfg.model.T, 2, *cfg.model.input_shape) < 0.3).float()
    plain, g_plain = _grads(net, x, compact=False, order=order)
    compact, g_compact = _grads(net, x, compact=True, order=order)
    assert compact < plain
    for name in g_plain:
        assert torch.equal(g_plain[name], g_compact[name]), name


def test_a_freed_spike_tensor_is_not_trusted():
    # Once the registered tensor is gone, its address may hold anything: what autograd saves from that
    # address is kept as is, never squeezed into uint8 (here: an address the allocator handed on).
    import weakref

    gone = torch.ones(3)
    w = torch.full((1000,), 0.25, requires_grad=True)
    with SavedActivations(compact=True) as saved:
        saved._spikes[w.untyped_storage().data_ptr()] = weakref.ref(gone)
        del gone
        y = (w * w).sum()  # saves w: 0.25 would read back as 0 from uint8
    y.backward()
    assert torch.equal(w.grad, torch.full((1000,), 0.5))
    assert saved.saved_bytes == 4000


def test_the_trainer_keeps_spikes_compact(digits_cfg, tmp_path, monkeypatch):
    # The training step runs its forward inside SavedActivations (compact): spy on the pack count.
    import snncompile.memory as memory
    from snncompile.train import train

    packed = []
    original = memory.SavedActivations._pack

    def spy(self, t):
        out = original(self, t)
        packed.append(isinstance(out, memory._Packed))
        return out

    monkeypatch.setattr(memory.SavedActivations, "_pack", spy)
    digits_cfg.train.epochs = 1
    train(digits_cfg, tmp_path, progress=False, echo=lambda s: None)
    assert any(packed)
