"""``nkd``: Normalized Knowledge Distillation (Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation
to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV
2023). The KD loss is split into a target term and a non-target term, and the non-target term is
*normalised*: the non-target probabilities of each network are divided by their sum (1 − p_target), so the
student matches the teacher's distribution over the wrong classes whatever its target confidence (the paper's
L_NKD; we cite no equation number, the paper body was not available to us, and follow the official code):

    L_NKD = −mean_i T_t,i · log S_t,i  −  γ·λ² · mean_i Σ_{j≠t} T̂_j,i · log Ŝ_j,i

T_t, S_t are the teacher's and student's target probabilities at temperature 1 (the teacher's detached), and
T̂, Ŝ the normalised non-target probabilities at temperature λ, i.e. the softmax over the non-target logits
divided by λ. Trained as CE + L_NKD (the distiller adds it to the student's own loss).

We follow the official code (yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py``): both terms are
cross-entropies (not KLs: they differ by the teacher's entropy, a constant), normalisation by dropping the
target column before the softmax, defaults λ = 1, γ = 1.5 (its ImageNet configs; its CIFAR-100 config uses
λ = 3, γ = 3.5). One stored version of that repository (``mmcls/distillation/losses/nkd.py``) scatters 1
instead of 0 into its mask and so keeps the target class in the "non-target" softmax; we follow the version
that removes it, as the paper defines. Accepts ``ls``, ``ctkd`` (both terms see the modified logits, the
non-target term the modified temperature: our reading, no published number) and the ``dot`` trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from bench.config import check_fields
from methods.base import Method, register_method
from methods.dkd import drop_target


def nkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float | Tensor = 1.0,
    gamma: float = 1.5,
) -> Tensor:
    """Target term at T=1 plus γ·λ² times the cross-entropy of the normalised non-target distributions."""
    index = targets[:, None]
    log_s_target = F.log_softmax(student_logits, dim=1).gather(1, index)
    t_target = F.softmax(teacher_logits, dim=1).gather(1, index).detach()
    target_term = -(t_target * log_s_target).mean()
    log_s_other = F.log_softmax(drop_target(student_logits, targets) / temperature, dim=1)
    t_other = F.softmax(drop_target(teacher_logits, targets) / temperature, dim=1)
    non_target_term = -(t_other * log_s_other).sum(dim=1).mean() * gamma * temperature**2
    return target_term + non_target_term


@dataclass
class NKDHparams:
    temperature: float = 1.0  # λ
    gamma: float = 1.5
    ce_weight: float = 1.0

    def validate(self, where: str) -> None:
        check_fields(self, where, [(self.temperature > 0, "temperature", "must be > 0")])


@register_method
class NKD(Method):
    name = "nkd"
    Hparams = NKDHparams
    accepts = frozenset({"ls", "ctkd", "dot"})

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        hp = self.hp
        view = self.distill_logits(logits, self.teacher_features(x).logits, hp.temperature)
        return logits, {
            "ce": hp.ce_weight * F.cross_entropy(logits, y),
            "nkd": nkd_loss(view.student, view.teacher, y, view.temperature, hp.gamma),
        }
