"""NeuNorm and voting against hand-computed values (PAPER.md §2-§3)."""

import pytest
import torch

from snncompile.layers import NeuNorm, Voting, voting_matrix


def _neunorm_f2():
    norm = NeuNorm(channels=2, height=1, width=1, k_tau2=0.9)
    with torch.no_grad():
        norm.u_scale.copy_(torch.tensor([0.5, 2.0]).view(2, 1, 1))
    return norm


def test_neunorm_hand_computed():
    # v/F = (1 - .9) / 2**2 = .025.
    # t1: o = [1, 1] -> x1 = .025*2 = .05; y = [1 - .5*.05, 1 - 2*.05] = [.975, .9]
    # t2: o = [1, 0] -> x2 = .9*.05 + .025*1 = .07; y = [1 - .035, 0 - .14] = [.965, -.14]
    norm = _neunorm_f2()
    spikes = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(2, 1, 2, 1, 1)
    y = norm(spikes).detach().view(2, 2)
    assert y[0].tolist() == pytest.approx([0.975, 0.9])
    assert y[1].tolist() == pytest.approx([0.965, -0.14])


def test_neunorm_state_is_per_position_shared_over_channels():
    norm = NeuNorm(channels=3, height=2, width=2, k_tau2=0.5)
    assert norm.u_scale.shape == (3, 2, 2)  # [F, H, W], not the known-wrong [F, 1, 1]
    with torch.no_grad():
        norm.u_scale.fill_(1.0)
    spikes = torch.zeros(1, 1, 3, 2, 2)
    spikes[0, 0, :, 0, 0] = 1.0  # all three channels fire at position (0, 0) only
    y = norm(spikes).detach()[0, 0]
    # x(0,0) = (1 - .5) / 9 * 3 = 1/6, every channel at (0,0) gets 1 - 1/6; other positions untouched
    assert y[:, 0, 0].tolist() == pytest.approx([5 / 6] * 3)
    assert y[:, 1, 1].tolist() == [0.0, 0.0, 0.0]


def test_neunorm_resets_per_sample_and_matches_in_train_and_eval():
    norm = _neunorm_f2()
    spikes = (torch.rand(4, 3, 2, 1, 1) > 0.5).float()
    norm.train()
    a = norm(spikes)
    norm.eval()
    b, c = norm(spikes), norm(spikes[:, 1:2])
    assert torch.equal(a, b)
    assert torch.equal(b[:, 1:2], c)  # no batch statistics, no state carried over between calls


def test_neunorm_u_is_learnable():
    norm = _neunorm_f2()
    norm(torch.ones(2, 1, 2, 1, 1)).sum().backward()
    assert norm.u_scale.grad is not None and norm.u_scale.grad.abs().sum() > 0


def test_voting_matrix_and_scores():
    m = voting_matrix(classes=3, group=2)
    assert m.tolist() == [[0.5, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0.5, 0], [0, 0, 0.5], [0, 0, 0.5]]
    vote = Voting(classes=3, group=2)
    rates = torch.tensor([[1.0, 0.5, 0.0, 0.25, 0.75, 0.75]])
    assert vote(rates).tolist() == [[0.75, 0.125, 0.75]]
    assert not list(vote.parameters())  # fixed, nothing to learn
    assert torch.allclose(vote(rates), rates @ voting_matrix(3, 2))
    counts = torch.tensor([[4.0, 2.0, 0.0, 1.0, 3.0, 3.0]])  # the same rates as spike counts over T = 4
    assert vote.from_counts(counts, 4).tolist() == [[0.75, 0.125, 0.75]]


def test_layer_major_neunorm_equals_its_step_form_bit_for_bit():
    torch.manual_seed(0)
    norm = NeuNorm(512, 3, 3, k_tau2=0.9)
    with torch.no_grad():
        norm.u_scale.normal_()
    spikes = (torch.rand(6, 4, 512, 3, 3) < 0.4).float()
    x = norm.initial_state(spikes[0])
    outs = []
    for spikes_t in spikes.unbind(0):
        x, y = norm.step(x, spikes_t)
        outs.append(y)
    assert torch.equal(norm(spikes), torch.stack(outs))
