"""``dkd``: golden values of the loss (a hand-derived case, the paper's formula in plain Python, the KD
identity of DKD eq. 7), numerical stability, the warm-up, and the method's loss terms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.data import DatasetInfo
from bench.errors import BenchError
from bench.models import create_model
from methods import MethodContext, build_hparams, get_method
from methods.dkd import dkd_loss, warmup_factor
from methods.kd import kd_loss


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _dkd_by_formula(s, t, targets, alpha, beta, temperature) -> float:
    """DKD (Zhao et al. 2022, eq. 1-7) written out per sample in plain Python."""
    total = 0.0
    for row_s, row_t, k in zip(s, t, targets):
        p_s = _softmax([v / temperature for v in row_s])
        p_t = _softmax([v / temperature for v in row_t])
        b_s, b_t = [p_s[k], 1 - p_s[k]], [p_t[k], 1 - p_t[k]]
        q_s = [v / (1 - p_s[k]) for i, v in enumerate(p_s) if i != k]
        q_t = [v / (1 - p_t[k]) for i, v in enumerate(p_t) if i != k]
        total += alpha * _kl(b_t, b_s) + beta * _kl(q_t, q_s)
    return total / len(s) * temperature**2


def test_hand_derived_value():
    """Student uniform over 3 classes, teacher [ln 2, 0, 0], target 0, T=1: b_T = [1/2, 1/2], b_S = [1/3, 2/3],
    the non-target distributions are both uniform, so DKD = α·(½ ln(3/2) + ½ ln(3/4)) = α·½ ln(9/8)."""
    s = torch.zeros(1, 3)
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    got = dkd_loss(s, t, torch.tensor([0]), alpha=2.0, beta=8.0, temperature=1.0)
    assert got.item() == pytest.approx(2.0 * 0.5 * math.log(9 / 8), rel=1e-6)


@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.5, 2.5)])
def test_matches_the_formula_written_out(alpha, beta, temperature):
    s = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.3], [2.0, 2.0, 2.0, 2.1]]
    t = [[2.0, 1.0, 0.0, 0.5], [1.0, 1.0, 1.0, -2.0], [-1.0, 3.0, 0.0, 0.2]]
    targets = [1, 2, 0]
    expected = _dkd_by_formula(s, t, targets, alpha, beta, temperature)
    got = dkd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(targets), alpha, beta, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_reduces_to_kd_with_the_paper_weights():
    """DKD eq. 7: KD = TCKD + (1 − p_t^T)·NCKD (one sample, so β can carry the per-sample weight)."""
    torch.manual_seed(0)
    for _ in range(3):
        s, t, k = torch.randn(1, 7, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64), torch.tensor([3])
        temperature = 3.0
        p_target = F.softmax(t / temperature, dim=1)[0, 3].item()
        got = dkd_loss(s, t, k, alpha=1.0, beta=1.0 - p_target, temperature=temperature)
        assert got.item() == pytest.approx(kd_loss(s, t, temperature).item(), rel=1e-10)


def test_extreme_logits_stay_finite():
    s = torch.tensor([[300.0, -300.0, 0.0], [-500.0, 500.0, 1.0]], requires_grad=True)
    t = torch.tensor([[-400.0, 400.0, 0.0], [0.0, 0.0, 900.0]])
    loss = dkd_loss(s, t, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert dkd_loss(t, t, torch.tensor([0, 1])).item() == pytest.approx(0.0, abs=1e-6)


def test_warmup_is_linear_over_mdistillers_one_based_epochs():
    assert warmup_factor(0, 20) == pytest.approx(1 / 20)
    assert warmup_factor(9, 20) == pytest.approx(0.5)
    assert warmup_factor(19, 20) == 1.0 and warmup_factor(100, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0


def test_method_terms_and_warmup():
    info = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), "none")
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 10, 1), create_model("resnet14", 10, 1)
    hp = build_hparams("dkd", {"beta": 6.0, "ce_weight": 0.5}, "dkd")
    method = get_method("dkd")(student, teacher, hp, MethodContext(info, 100, 30)).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    with torch.no_grad():
        s, t = student(x), teacher(x)
        method.on_epoch_start(4)
        _, losses = method.forward_train(x, y)
    assert set(losses) == {"ce", "dkd"}
    assert losses["ce"].item() == pytest.approx(0.5 * F.cross_entropy(s, y).item(), rel=1e-6)
    assert losses["dkd"].item() == pytest.approx(5 / 20 * dkd_loss(s, t, y, 1.0, 6.0, 4.0).item(), rel=1e-6)


@pytest.mark.parametrize("values, message", [({"temperature": 0}, "temperature"), ({"warmup_epochs": -1}, "warmup")])
def test_bad_hparams(values, message):
    with pytest.raises(BenchError, match=message):
        build_hparams("dkd", values, "dkd")
