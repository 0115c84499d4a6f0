"""``kd``: vanilla knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network", eq. 2 with the T² gradient-scale factor of §2).

Defaults follow the CRD benchmark protocol (Tian et al. 2020): T=4, loss = 0.1·CE + 0.9·KD. Accepts the logit
modifiers ``ls`` and ``ctkd`` (they change what the KD term compares; CE stays on the raw logits) and the
``dot`` trainer (:mod:`methods.modifiers`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from methods.base import Method, register_method


def kl_per_sample(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p_i ‖ q_i) for each row i, from log-probabilities of shape (N, C); returns shape (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 4.0) -> Tensor:
    """T²·KL(p_t ‖ p_s) with p = softmax(logits / T), summed over classes, mean over the batch (T may be a
    0-dim tensor: a learned temperature, :mod:`methods.modifiers.ctkd`)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return kl_per_sample(log_p_t, log_p_s).mean() * temperature**2


def kd_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float | Tensor = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    ce_logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """The KD training objective as two named terms: ``ce_weight``·CE and ``kd_weight``·:func:`kd_loss`.

    ``ce_logits``: the logits of the CE term when they are not the distilled ones (a logit modifier, e.g.
    standardization, transformed those); default ``student_logits``."""
    return {
        "ce": ce_weight * F.cross_entropy(student_logits if ce_logits is None else ce_logits, targets),
        "kd": kd_weight * kd_loss(student_logits, teacher_logits, temperature),
    }


@dataclass
class KDHparams:
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def validate(self, where: str) -> None:
        from bench.errors import BenchError

        if self.temperature <= 0:
            raise BenchError(f"{where}.temperature: must be > 0, got {self.temperature}")


@register_method
class KD(Method):
    name = "kd"
    Hparams = KDHparams
    accepts = frozenset({"ls", "ctkd", "dot"})

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        hp = self.hp
        view = self.distill_logits(logits, self.teacher_features(x).logits, hp.temperature)
        objective = kd_objective(view.student, view.teacher, y, view.temperature, hp.ce_weight, hp.kd_weight, logits)
        return logits, objective
