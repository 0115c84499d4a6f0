"""``bdkd``: BD-KD, "Balancing the Divergences for Online Knowledge Distillation" (Amara, Sepahvand, Meyer,
Gross & Clark, arXiv 2212.12965; v2 2024).

Online KD: the teacher (the pair's teacher architecture) and the student train together from scratch, one
SGD step over both per batch; both are evaluated every epoch. The paper's body, equations and code were not
available to us (see ``shared/research/methods.md`` §2): the abstracts say the student's distillation loss
weighs forward and reverse KL sample by sample, guided by the entropy gap between the two predictions, and that
v2 also adjusts the teacher's loss (a secondary summary: "the teacher objective uses reverse KL as a
regularizer"). What follows is **our reading**, every choice a hyperparameter.

Naming, absolute, whichever network is trained: **forward** = KL(p_t‖p_s), **reverse** = KL(p_s‖p_t), with p_t
the teacher's and p_s the student's softened prediction.

Student (``bdkd_student_loss``)::

    L_s = CE(z_s, y) + T² · mean_i [ w_f,i · KL(p_t,i ‖ p_s,i) + w_r,i · KL(p_s,i ‖ p_t,i) ]

with p = softmax(z / T), the teacher detached, and weights from the entropy gap
Δ_i = H(p_s,i) − H(p_t,i) (``balance_weights``, no gradient through them):

- ``balance="hard"`` (default): reverse KL where the student is less confident than the teacher
  (Δ_i > 0), forward KL otherwise: w_r,i = reverse_weight·[Δ_i > 0], w_f,i = forward_weight·[Δ_i ≤ 0];
- ``balance="soft"``: w_r,i = reverse_weight·σ(Δ_i/κ), w_f,i = forward_weight·(1 − σ(Δ_i/κ)).

Teacher (``bdkd_teacher_loss``), the student detached::

    L_t = CE(z_t, y) + teacher_weight · T² · mean_i D_i

- ``teacher_divergence="forward"`` (default): D = KL(p_t‖p_s), the gradient reaching the teacher through its
  own distribution in the *first* argument. This is our reading of the "reverse-KL regulariser": reverse from
  the trained network's side (its own distribution first, the mode-seeking direction for it), and it is the
  reading under which v2 "adjusts the conventional online distillation loss" of the teacher at all: the
  conventional (DML) teacher term is the other one.
- ``teacher_divergence="reverse"``: D = KL(p_s‖p_t), i.e. reverse KL in absolute naming, which is exactly DML's
  teacher term (the teacher fits the detached student's distribution); our reading of v1, which balanced only
  the student's loss, and the literal reading of "reverse KL" with absolute names.
- ``teacher_divergence="none"``: CE alone.
- ``teacher_balance=True``: the same sample-wise balance on the teacher's loss too (v2: "sample-wise weighting
  of forward and reverse KL ... on both the student and teacher losses"): D_i = w_f,i·KL(p_t‖p_s) +
  w_r,i·KL(p_s‖p_t) with the student's weights (the same Δ_i, ``balance``, weights and κ); then
  ``teacher_divergence`` must not be ``"none"`` (it is otherwise unused).

``suites/ablation-bdkd.yaml`` runs these readings side by side on digits (accuracy and calibration).

Choices where the paper is silent to us: T = 1 (DML's plain softmax; with ``balance="hard"`` and
``teacher_divergence="reverse"`` a batch where every Δ_i ≤ 0 gives exactly DML's losses, so ``bdkd`` vs
``dml`` isolates the balancing), entropies computed at the same temperature T as the divergences they
weigh, κ = 1 nat, ``teacher_weight`` = 1 (DML's weight), no warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.config import check_fields
from methods.base import Method, register_method
from methods.kd import kl_per_sample

Balance = Literal["hard", "soft"]
TeacherDivergence = Literal["forward", "reverse", "none"]


def entropy_gap(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Δ_i = H(p_s,i) − H(p_t,i) in nats, p = softmax(z / T); computed without gradient."""
    with torch.no_grad():
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
        return (log_p_t.exp() * log_p_t).sum(dim=1) - (log_p_s.exp() * log_p_s).sum(dim=1)


def balance_weights(
    gap: Tensor, balance: Balance = "hard", forward_weight: float = 1.0, reverse_weight: float = 1.0, kappa: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-sample (w_f, w_r) from the entropy gap Δ (see module docstring); detached from the graph."""
    gap = gap.detach()
    if balance == "hard":
        reverse = (gap > 0).to(gap.dtype)
    elif balance == "soft":
        reverse = torch.sigmoid(gap / kappa)
    else:
        raise ValueError(f"balance must be 'hard' or 'soft', got {balance!r}")
    return forward_weight * (1 - reverse), reverse_weight * reverse


def balanced_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    balance: Balance = "hard",
    forward_weight: float = 1.0,
    reverse_weight: float = 1.0,
    kappa: float = 1.0,
) -> Tensor:
    """Per sample: w_f,i·KL(p_t,i‖p_s,i) + w_r,i·KL(p_s,i‖p_t,i), weights from Δ_i. Gradients reach whichever
    logits the caller did not detach."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    gap = entropy_gap(student_logits, teacher_logits, temperature)
    w_f, w_r = balance_weights(gap, balance, forward_weight, reverse_weight, kappa)
    return w_f * kl_per_sample(log_p_t, log_p_s) + w_r * kl_per_sample(log_p_s, log_p_t)


def bdkd_student_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    balance: Balance = "hard",
    forward_weight: float = 1.0,
    reverse_weight: float = 1.0,
    kappa: float = 1.0,
) -> Tensor:
    """CE + T²·mean_i[w_f,i KL(p_t,i‖p_s,i) + w_r,i KL(p_s,i‖p_t,i)], teacher detached, weights from Δ_i."""
    distill = balanced_divergence(
        student_logits, teacher_logits.detach(), temperature, balance, forward_weight, reverse_weight, kappa
    )
    return F.cross_entropy(student_logits, targets) + temperature**2 * distill.mean()


def bdkd_teacher_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    teacher_weight: float = 1.0,
    teacher_divergence: TeacherDivergence = "forward",
    teacher_balance: bool = False,
    balance: Balance = "hard",
    forward_weight: float = 1.0,
    reverse_weight: float = 1.0,
    kappa: float = 1.0,
) -> Tensor:
    """CE + teacher_weight·T²·mean_i D_i, student detached; D = KL(p_t‖p_s) ("forward"), KL(p_s‖p_t)
    ("reverse"), 0 ("none"), or with ``teacher_balance`` the student's balanced mix of both (the balance
    arguments are used only then)."""
    ce = F.cross_entropy(teacher_logits, targets)
    if teacher_divergence == "none":
        return ce
    student_logits = student_logits.detach()
    if teacher_balance:
        div = balanced_divergence(
            student_logits, teacher_logits, temperature, balance, forward_weight, reverse_weight, kappa
        )
    else:
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
        log_p_s = F.log_softmax(student_logits / temperature, dim=1)
        if teacher_divergence == "forward":
            div = kl_per_sample(log_p_t, log_p_s)
        elif teacher_divergence == "reverse":
            div = kl_per_sample(log_p_s, log_p_t)
        else:
            raise ValueError(f"teacher_divergence must be 'forward', 'reverse' or 'none', got {teacher_divergence!r}")
    return ce + teacher_weight * temperature**2 * div.mean()


@dataclass
class BDKDHparams:
    temperature: float = 1.0
    balance: Balance = "hard"
    forward_weight: float = 1.0
    reverse_weight: float = 1.0
    kappa: float = 1.0
    teacher_weight: float = 1.0
    teacher_divergence: TeacherDivergence = "forward"  # absolute naming: KL(p_t‖p_s) into the teacher
    teacher_balance: bool = False

    def validate(self, where: str) -> None:
        checks = [
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.kappa > 0, "kappa", "must be > 0"),
            (self.forward_weight >= 0, "forward_weight", "must be >= 0"),
            (self.reverse_weight >= 0, "reverse_weight", "must be >= 0"),
            (self.teacher_weight >= 0, "teacher_weight", "must be >= 0"),
            (not (self.teacher_balance and self.teacher_divergence == "none"), "teacher_divergence",
             "must not be 'none' with teacher_balance: true (the balanced teacher term needs a divergence)"),
        ]  # fmt: skip
        check_fields(self, where, checks)


@register_method
class BDKD(Method):
    name = "bdkd"
    Hparams = BDKDHparams
    teacher_mode = "online"

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        teacher_logits = self.teacher(x)
        hp = self.hp
        student = bdkd_student_loss(
            logits, teacher_logits, y, hp.temperature, hp.balance, hp.forward_weight, hp.reverse_weight, hp.kappa
        )
        teacher = bdkd_teacher_loss(
            teacher_logits, logits, y, hp.temperature, hp.teacher_weight, hp.teacher_divergence, hp.teacher_balance,
            hp.balance, hp.forward_weight, hp.reverse_weight, hp.kappa,
        )  # fmt: skip
        return logits, {"student": student, "teacher": teacher}
