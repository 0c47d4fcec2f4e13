"""LIF dynamics against traces computed by hand (PAPER.md §1)."""

import pytest
import torch

from snncompile.neurons import LIF, LIFParams, lif_scan, rectangular_surrogate, spike

P = LIFParams(v_th=0.5, k_tau1=0.2, a=1.0)


def _trace(currents, p=P):
    x = torch.tensor(currents, dtype=torch.float64).view(-1, 1)
    spikes, mem = lif_scan(x, p, return_membrane=True)
    return spikes.view(-1).tolist(), mem.view(-1).tolist()


def test_constant_input_fires_every_other_step():
    # u1 = .45 (no spike); u2 = .2*.45 + .45 = .54 (spike); reset: u3 = .2*.54*0 + .45 = .45; u4 = .54
    spikes, mem = _trace([0.45] * 4)
    assert spikes == [0, 1, 0, 1]
    assert mem == pytest.approx([0.45, 0.54, 0.45, 0.54], abs=1e-12)


def test_varying_input_trace():
    # u1 = .6 (spike); u2 = .2*.6*(1-1) + .1 = .1; u3 = .2*.1 + .3 = .32; u4 = .2*.32 + .5 = .564 (spike);
    # u5 = 0 + 0 = 0
    spikes, mem = _trace([0.6, 0.1, 0.3, 0.5, 0.0])
    assert spikes == [1, 0, 0, 1, 0]
    assert mem == pytest.approx([0.6, 0.1, 0.32, 0.564, 0.0], abs=1e-12)


def test_fires_on_strict_greater_than_threshold():
    # u1 = .5 exactly: no spike (strict '>'); u2 = .1 + .5 = .6: spike
    spikes, _ = _trace([0.5, 0.5])
    assert spikes == [0, 1]


def test_leak_constant_changes_the_trace():
    spikes, mem = _trace([0.3, 0.3, 0.3], LIFParams(v_th=0.5, k_tau1=0.9, a=1.0))
    # u1 = .3; u2 = .27 + .3 = .57 (spike); u3 = 0 + .3 = .3
    assert spikes == [0, 1, 0]
    assert mem == pytest.approx([0.3, 0.57, 0.3], abs=1e-12)


@pytest.mark.parametrize("a", [1.0, 0.5])
def test_surrogate_gradient_matches_formula(a):
    # .25 and .75 lie exactly on a = .5's window edges |u - V_th| = a/2 (exact in binary): outside, 0 (strict <)
    u = torch.tensor([-0.2, 0.05, 0.25, 0.3, 0.5, 0.7, 0.74, 0.75, 0.9, 1.2], dtype=torch.float64, requires_grad=True)
    spike(u, 0.5, a).sum().backward()
    expected = [(1.0 / a) if abs(v - 0.5) < a / 2 else 0.0 for v in u.tolist()]
    if a == 0.5:
        assert expected[2] == expected[7] == 0.0
    assert u.grad.tolist() == pytest.approx(expected)
    assert rectangular_surrogate(u.detach(), 0.5, a).tolist() == pytest.approx(expected)


def test_gradient_flows_through_reset_gate():
    # u2 = k*u1*(1 - o1) + I2 with u1 = I1 = .7, o1 = H(.7 - .5) = 1.
    # du2/dI1 = k*(1 - o1) - k*u1*dH/du(u1) = .2*0 - .2*.7*1 = -0.14 (0 if the reset were detached).
    currents = torch.tensor([[0.7], [0.1]], dtype=torch.float64, requires_grad=True)
    _, mem = lif_scan(currents, P, return_membrane=True)
    mem[1].sum().backward()
    assert currents.grad[0].item() == pytest.approx(-0.14)
    assert currents.grad[1].item() == pytest.approx(1.0)


def test_forward_is_plain_comparison_without_autograd():
    u = torch.tensor([0.4, 0.6])
    with torch.no_grad():
        out = spike(u, 0.5, 1.0)
    assert out.grad_fn is None and out.tolist() == [0.0, 1.0]


def test_module_matches_functions_and_is_stateless():
    lif = LIF(P)
    x = torch.rand(5, 3, 4)
    first, second = lif(x), lif(x)  # no hidden state carried between calls (reset per sample)
    assert torch.equal(first, second) and torch.equal(first, lif_scan(x, P))
    assert lif(x[:, :1]).equal(first[:, :1])  # samples are independent of each other


def test_first_step_from_the_zero_state_is_the_current_itself():
    """lif_step(None, None, I) (what unrolled graphs run at t = 1) gives the bits the explicit zero
    state gives: the leak term k_tau1 * 0 * (1 - 0) adds exactly nothing, so u[1] = I[1]."""
    from snncompile.neurons import lif_step

    current = torch.tensor([0.5, 0.5000001, -3.0, 0.0, 1e-30, 7.25])
    zeros = torch.zeros_like(current)
    u_none, o_none = lif_step(None, None, current, P)
    u_zero, o_zero = lif_step(zeros, zeros, current, P)
    assert torch.equal(u_none, current) and torch.equal(u_none, u_zero) and torch.equal(o_none, o_zero)
    assert o_none.tolist() == [0, 1, 0, 0, 0, 1]


def test_first_step_under_autograd_does_not_keep_the_layer_major_current_alive():
    """The spike saves u[1] for its surrogate; were u[1] a view of the current (a time slice of the
    layer-major conv output), backward would hold the whole [T*B, ...] output. Inference aliases it."""
    from snncompile.neurons import lif_step

    currents = torch.randn(4, 3, 5, requires_grad=True) * 1.0  # non-leaf, like a conv output
    u, _ = lif_step(None, None, currents.unbind(0)[0], P)
    assert u.untyped_storage().data_ptr() != currents.untyped_storage().data_ptr()
    with torch.no_grad():
        u, _ = lif_step(None, None, currents.unbind(0)[0], P)
    assert u.untyped_storage().data_ptr() == currents.untyped_storage().data_ptr()
