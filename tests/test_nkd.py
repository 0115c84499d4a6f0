"""NKD: the loss against a hand-computed value, and its normalisation: the non-target term compares the
non-target probabilities renormalised to sum to one (the target column dropped before the softmax at λ),
while the target term uses the teacher's detached T=1 target probability."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.nkd import nkd_loss
from tests.test_modifiers import composed


def test_nkd_loss_matches_the_hand_computed_formula():
    s, t, y, lam, gamma = [1.0, 0.0, -1.0, 0.5], [2.0, 0.5, 0.0, 1.0], 2, 2.0, 1.5

    def softmax(z, temp=1.0):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    target = -softmax(t)[y] * math.log(softmax(s)[y])
    s_other = softmax([v for i, v in enumerate(s) if i != y], lam)
    t_other = softmax([v for i, v in enumerate(t) if i != y], lam)
    non_target = -gamma * lam**2 * sum(a * math.log(b) for a, b in zip(t_other, s_other))
    got = nkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), lam, gamma)
    assert got.item() == pytest.approx(target + non_target, rel=1e-6)


def test_the_non_target_term_is_the_normalised_distribution_over_the_wrong_classes():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5) * 2, torch.tensor([0, 1, 2, 3, 4, 0])
    lam, gamma = 3.0, 3.5
    p_s, p_t = F.softmax(s / lam, 1), F.softmax(t / lam, 1)
    keep = ~F.one_hot(y, 5).bool()
    # normalised = p_j / (1 − p_target) at temperature λ: the softmax over the non-target logits
    q_s = (p_s[keep].view(6, 4)) / (1 - p_s.gather(1, y[:, None]))
    q_t = (p_t[keep].view(6, 4)) / (1 - p_t.gather(1, y[:, None]))
    non_target = -(q_t * q_s.log()).sum(1).mean() * gamma * lam**2
    target = -(F.softmax(t, 1).gather(1, y[:, None]) * F.log_softmax(s, 1).gather(1, y[:, None])).mean()
    assert nkd_loss(s, t, y, lam, gamma).item() == pytest.approx((target + non_target).item(), rel=1e-5)
    # not the variant that keeps the target class inside the "non-target" softmax
    kept = -(F.softmax(t / lam, 1) * F.log_softmax(s / lam, 1)).sum(1).mean() * gamma * lam**2
    assert nkd_loss(s, t, y, lam, gamma).item() != pytest.approx((target + kept).item(), rel=1e-3)


def test_the_target_term_uses_the_teachers_t1_probability_without_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    nkd_loss(s, t, torch.tensor([0, 1, 2]), 4.0, 1.5).backward()
    assert s.grad.abs().sum() > 0
    # the teacher still gets a gradient from the non-target softmax (the official code does not detach it), but
    # the target term's weight is detached: with γ=0 only the target term remains and the teacher gets none
    t.grad = None
    nkd_loss(s, t, torch.tensor([0, 1, 2]), 4.0, 0.0).backward()
    assert t.grad is None or t.grad.abs().sum() == 0


def test_nkd_method_routes_its_logits_through_the_modifiers():
    method = composed("nkd+ls+ctkd").train()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    logits, losses = method.forward_train(x, y)
    assert set(losses) == {"ce", "nkd"} and torch.allclose(losses["ce"], F.cross_entropy(logits, y))
    sum(losses.values()).backward()
    assert method.logit_modifiers[1].theta.grad is not None  # the learned temperature enters the non-target term
