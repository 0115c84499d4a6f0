"""WTTM: the loss against a hand-computed value, and its distinctive detail, the sample-adaptive weight U_γ
(the unnormalised power sum of the teacher's T=1 probabilities) on each sample's KL, as the official code."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.kd import kd_loss
from methods.wttm import wttm_loss
from tests.test_modifiers import composed


def test_wttm_loss_matches_the_hand_computed_formula():
    s, t, gamma = [1.0, 0.0, -1.0], [2.0, 0.0, 0.0], 0.5
    p_t = [math.exp(v) / sum(math.exp(w) for w in t) for v in t]
    p_s = [math.exp(v) / sum(math.exp(w) for w in s) for v in s]
    power_sum = sum(p**gamma for p in p_t)
    q = [p**gamma / power_sum for p in p_t]
    expected = power_sum * sum(a * math.log(a / b) for a, b in zip(q, p_s))
    assert wttm_loss(torch.tensor([s]), torch.tensor([t]), gamma).item() == pytest.approx(expected, rel=1e-6)


def official_wttm(y_s, y_t, gamma):
    """zkxufo/TTM distiller_zoo/wttm.py, written out: pow of the probabilities, normalised; mean of norm·KL."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), gamma)
    norm = p_t.sum(1)
    p_t = p_t / norm[:, None]
    return (norm * F.kl_div(p_s, p_t, reduction="none").sum(1)).mean()


def ttm_kl(y_s, y_t, gamma):
    """Each sample's KL(p̂_t ‖ p_s) with p̂_t ∝ p_t^γ, unweighted (TTM)."""
    q = torch.softmax(y_t, dim=1).pow(gamma)
    q = q / q.sum(1, keepdim=True)
    return (q * (q.log() - F.log_softmax(y_s, dim=1))).sum(1)


def test_wttm_weights_each_samples_kl_by_the_teachers_power_sum():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10) * 2
    assert wttm_loss(s, t, 0.25).item() == pytest.approx(official_wttm(s, t, 0.25).item(), rel=1e-5)
    student = torch.randn(1, 10).repeat(2, 1)
    teacher = torch.stack([torch.zeros(10), torch.tensor([9.0] + [0.0] * 9)])  # a flat and a confident row
    u = torch.softmax(teacher, 1).pow(0.25).sum(1)
    assert u[0].item() == pytest.approx(10**0.75, rel=1e-5) and u[1] < u[0]  # the flat row weighs more
    kl = ttm_kl(student, teacher, 0.25)
    assert wttm_loss(student, teacher, 0.25).item() == pytest.approx((u * kl).mean().item(), rel=1e-5)
    assert wttm_loss(student, teacher, 0.25).item() != pytest.approx(kl.mean().item(), rel=1e-2)  # not TTM


def test_gamma_one_is_plain_kl_at_temperature_one():
    torch.manual_seed(1)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert wttm_loss(s, t, 1.0).item() == pytest.approx(kd_loss(s, t, 1.0).item(), rel=1e-5)


def test_wttm_method_has_a_ce_and_a_weighted_wttm_term():
    method = composed("wttm", {"gamma": 0.25, "wttm_weight": 3.0}).train()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    logits, losses = method.forward_train(x, y)
    assert torch.allclose(losses["ce"], F.cross_entropy(logits, y))
    assert torch.allclose(losses["wttm"], 3.0 * wttm_loss(logits, method.teacher_features(x).logits, 0.25))
