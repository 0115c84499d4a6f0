"""BD-KD losses against hand-computed values; balance weights carry no gradient; reduction to DML."""
import math

import pytest
import torch

from bench.errors import BenchError
from methods import build_hparams
from methods.bdkd import balance_weights, bdkd_student_loss, bdkd_teacher_loss, entropy_gap
from methods.dml import dml_loss

# Two samples, two classes, T = 1, both targets class 0.
#   sample 1: student logits (0, 0) -> p_s = (1/2, 1/2); teacher (ln 3, 0) -> p_t = (3/4, 1/4); H(p_s) > H(p_t)
#   sample 2: student (ln 9, 0) -> p_s = (9/10, 1/10); teacher (0, 0) -> p_t = (1/2, 1/2);     H(p_s) < H(p_t)
STUDENT = torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0]])
TEACHER = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
TARGETS = torch.tensor([0, 0])
CE_S = (-math.log(0.5) - math.log(0.9)) / 2
CE_T = (-math.log(0.75) - math.log(0.5)) / 2
FWD = [0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5), 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)]
REV = [0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)]
H_S = [math.log(2.0), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
H_T = [-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), math.log(2.0)]
GAP = [H_S[0] - H_T[0], H_S[1] - H_T[1]]  # (+0.131, -0.368)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_entropy_gap_by_hand():
    assert GAP[0] > 0 > GAP[1]
    assert entropy_gap(STUDENT, TEACHER).tolist() == pytest.approx(GAP, abs=1e-6)


def test_hard_balance_by_hand():
    # sample 1: student less confident -> reverse KL only; sample 2 -> forward KL only
    expected = CE_S + (REV[0] + FWD[1]) / 2
    assert bdkd_student_loss(STUDENT, TEACHER, TARGETS).item() == pytest.approx(expected, abs=1e-6)
    weighted = CE_S + (3.0 * REV[0] + 0.5 * FWD[1]) / 2
    got = bdkd_student_loss(STUDENT, TEACHER, TARGETS, forward_weight=0.5, reverse_weight=3.0)
    assert got.item() == pytest.approx(weighted, abs=1e-6)


@pytest.mark.parametrize("kappa", [1.0, 0.25])
def test_soft_balance_by_hand(kappa):
    w_r = [sigmoid(g / kappa) for g in GAP]
    expected = CE_S + sum((1 - w_r[i]) * FWD[i] + w_r[i] * REV[i] for i in range(2)) / 2
    got = bdkd_student_loss(STUDENT, TEACHER, TARGETS, balance="soft", kappa=kappa)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def _reference_student_loss(s, t, y, temp, balance, fw, rw, kappa):
    """Plain-Python loops, no torch: softmax, entropies, KLs at temperature ``temp``."""

    def softmax(row, temperature):
        e = [math.exp((v - max(row)) / temperature) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for i in range(len(s)):
        p_s, p_t = softmax(s[i], temp), softmax(t[i], temp)
        ce = -math.log(softmax(s[i], 1.0)[y[i]])
        fwd = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
        rev = sum(a * math.log(a / b) for a, b in zip(p_s, p_t))
        gap = -sum(a * math.log(a) for a in p_s) + sum(a * math.log(a) for a in p_t)
        r = (1.0 if gap > 0 else 0.0) if balance == "hard" else sigmoid(gap / kappa)
        total += ce + temp**2 * (fw * (1 - r) * fwd + rw * r * rev)
    return total / len(s)


@pytest.mark.parametrize("balance", ["hard", "soft"])
def test_student_loss_matches_a_loop_at_temperature(balance):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    got = bdkd_student_loss(s, t, y, 2.0, balance, forward_weight=0.7, reverse_weight=1.3, kappa=0.5)
    expected = _reference_student_loss(s.tolist(), t.tolist(), y.tolist(), 2.0, balance, 0.7, 1.3, 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "divergence, expected",
    [("forward", CE_T + 0.5 * (FWD[0] + FWD[1]) / 2), ("reverse", CE_T + 0.5 * (REV[0] + REV[1]) / 2), ("none", CE_T)],
)
def test_teacher_loss_by_hand(divergence, expected):
    # absolute names, whichever network is trained: forward = KL(p_t || p_s), reverse = KL(p_s || p_t)
    got = bdkd_teacher_loss(TEACHER, STUDENT, TARGETS, teacher_weight=0.5, teacher_divergence=divergence)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_balanced_teacher_loss_by_hand():
    # the student's hard weights: sample 1 (student less confident) reverse KL, sample 2 forward KL
    expected = CE_T + 0.5 * (REV[0] + FWD[1]) / 2
    got = bdkd_teacher_loss(TEACHER, STUDENT, TARGETS, teacher_weight=0.5, teacher_balance=True)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    w_r = [sigmoid(g / 0.5) for g in GAP]
    soft = CE_T + sum((1 - w_r[i]) * 2.0 * FWD[i] + w_r[i] * REV[i] for i in range(2)) / 2
    got = bdkd_teacher_loss(TEACHER, STUDENT, TARGETS, teacher_balance=True, balance="soft", forward_weight=2.0,
                            kappa=0.5)  # fmt: skip
    assert got.item() == pytest.approx(soft, abs=1e-6)


def test_balanced_teacher_loss_trains_the_teacher_only():
    s = torch.randn(3, 4).requires_grad_()
    t = torch.randn(3, 4).requires_grad_()
    bdkd_teacher_loss(t, s, torch.tensor([0, 1, 2]), teacher_balance=True, balance="soft").backward()
    assert s.grad is None and t.grad is not None


def test_teacher_loss_temperature_scale():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    at_t = bdkd_teacher_loss(t, s, y, temperature=3.0, teacher_weight=1.0)
    div = bdkd_teacher_loss(t / 3, s / 3, y, temperature=1.0) - torch.nn.functional.cross_entropy(t / 3, y)
    assert at_t.item() == pytest.approx(torch.nn.functional.cross_entropy(t, y).item() + 9 * div.item(), rel=1e-5)


@pytest.mark.parametrize("balance", ["hard", "soft"])
def test_weights_carry_no_gradient(balance):
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(8, 4, generator=g) * 2).requires_grad_()
    t = (torch.randn(8, 4, generator=g) * 2).requires_grad_()
    y = torch.randint(0, 4, (8,), generator=g)
    w_f, w_r = balance_weights(entropy_gap(s, t, 2.0), balance, 0.7, 1.3, 0.5)
    assert not w_f.requires_grad and not w_r.requires_grad
    if balance == "hard":
        assert torch.isin(w_r, torch.tensor([0.0, 1.3])).all() and ((w_f == 0) ^ (w_r == 0)).all()
    else:
        assert torch.allclose(w_f / 0.7 + w_r / 1.3, torch.ones(8))

    loss = bdkd_student_loss(s, t, y, 2.0, balance, 0.7, 1.3, 0.5)
    loss.backward()
    assert t.grad is None  # the teacher is a constant target
    # the gradient equals that of the same loss with the weights frozen as constants
    s2 = s.detach().clone().requires_grad_()
    log_p_s = torch.log_softmax(s2 / 2.0, 1)
    log_p_t = torch.log_softmax(t.detach() / 2.0, 1)
    kl_f = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    kl_r = (log_p_s.exp() * (log_p_s - log_p_t)).sum(1)
    frozen = torch.nn.functional.cross_entropy(s2, y) + 4.0 * (w_f * kl_f + w_r * kl_r).mean()
    frozen.backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)
    if balance == "soft":  # and differs from letting the gradient through the sigmoid weights
        s3 = s.detach().clone().requires_grad_()
        log_p_s3 = torch.log_softmax(s3 / 2.0, 1)
        gap = -(log_p_s3.exp() * log_p_s3).sum(1) + (log_p_t.exp() * log_p_t).sum(1)
        r = torch.sigmoid(gap / 0.5)
        kl_f3 = (log_p_t.exp() * (log_p_t - log_p_s3)).sum(1)
        kl_r3 = (log_p_s3.exp() * (log_p_s3 - log_p_t)).sum(1)
        leaky = torch.nn.functional.cross_entropy(s3, y) + 4.0 * (0.7 * (1 - r) * kl_f3 + 1.3 * r * kl_r3).mean()
        leaky.backward()
        assert not torch.allclose(s.grad, s3.grad, atol=1e-4)


def test_teacher_loss_does_not_reach_the_student():
    s = torch.randn(3, 4).requires_grad_()
    t = torch.randn(3, 4).requires_grad_()
    bdkd_teacher_loss(t, s, torch.tensor([0, 1, 2])).backward()
    assert s.grad is None and t.grad is not None


def test_reduces_to_dml_when_the_student_is_always_more_confident():
    # every student row sharper than its teacher row -> hard balance picks forward KL everywhere
    g = torch.Generator().manual_seed(3)
    t = torch.randn(5, 6, generator=g)
    s = 4 * t + torch.randn(5, 6, generator=g) * 0.1
    y = torch.randint(0, 6, (5,), generator=g)
    assert (entropy_gap(s, t) < 0).all()
    assert bdkd_student_loss(s, t, y).item() == pytest.approx(dml_loss(s, t, y).item(), rel=1e-6)
    reverse = bdkd_teacher_loss(t, s, y, teacher_divergence="reverse")  # KL(p_s || p_t) into the teacher
    assert reverse.item() == pytest.approx(dml_loss(t, s, y).item(), rel=1e-6)


def test_hparams_defaults_and_validation():
    hp = build_hparams("bdkd", {}, "bdkd")
    assert (hp.temperature, hp.balance, hp.teacher_divergence, hp.teacher_weight) == (1.0, "hard", "forward", 1.0)
    assert hp.teacher_balance is False
    with pytest.raises(BenchError, match="teacher_divergence"):
        build_hparams("bdkd", {"teacher_balance": True, "teacher_divergence": "none"}, "bdkd")
    with pytest.raises(BenchError, match="balance"):
        build_hparams("bdkd", {"balance": "medium"}, "bdkd")
    with pytest.raises(BenchError, match="teacher_divergence"):
        build_hparams("bdkd", {"teacher_divergence": "js"}, "bdkd")
    with pytest.raises(BenchError, match="kappa"):
        build_hparams("bdkd", {"kappa": 0}, "bdkd")
