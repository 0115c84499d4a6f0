import math

import pytest
import torch

from methods.kd import kd_loss


def test_kd_loss_matches_the_hand_computed_formula():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    T = 2.0
    total = 0.0
    for i in range(2):
        ps = [math.exp(v / T) for v in s[i].tolist()]
        pt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = T * T * total / 2
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_only_the_student_gets_gradients():
    s = torch.randn(4, 5, requires_grad=True)
    assert kd_loss(s, s.detach(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(4, 5)
    kd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
