"""``dkd``: Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation",
CVPR 2022, eq. 7: KD = TCKD + (1 − p_t^T)·NCKD, trained as α·TCKD + β·NCKD).

- TCKD: KL between the binary distributions b = [p_target, p_not-target] of teacher and student;
- NCKD: KL between the distributions over the non-target classes only (softmax renormalised without the target).

Both use temperature-softened softmax and are multiplied by T², as in mdistiller (the authors' code,
``mdistiller/distillers/DKD.py``). Defaults are mdistiller's CIFAR-100 protocol: CE weight 1, α=1, β=8, T=4 and a
linear warm-up of the DKD term over 20 epochs (factor ``min(epoch / 20, 1)`` with mdistiller's 1-based epoch,
so 1/20 in the first epoch). β is set per pair in the suites (mdistiller configs: 2 for resnet56→resnet20 and
resnet110→resnet32, 6 for the WRN, VGG and vgg13→MobileNetV2 pairs, 8 otherwise; ImageNet: β=0.5 for
ResNet34→ResNet18, 2 for ResNet50→MobileNet-V1, T=1, warm-up 1 epoch).

Numerics: the binary log-probabilities are computed in log space (``logsumexp`` over the non-target logits) and
the non-target distribution by dropping the target column; mdistiller takes ``log`` of summed probabilities and
masks the target logit with −1000. The two are equal in exact arithmetic.

Accepts the logit modifiers ``ls`` and ``ctkd`` (on both TCKD and NCKD; the logit-standardization and CTKD
repositories apply them so) and the ``dot`` trainer (:mod:`methods.modifiers`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError
from methods.base import Method, register_method


def drop_target(logits: Tensor, targets: Tensor) -> Tensor:
    """The (N, C−1) logits of the non-target classes of each row, in class order."""
    batch, classes = logits.shape
    return logits[~F.one_hot(targets, classes).bool()].view(batch, classes - 1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float | Tensor = 4.0,
) -> Tensor:
    """T²·(α·KL(b_T ‖ b_S) + β·KL(p̂_T ‖ p̂_S)), mean over the batch (DKD eq. 7 with the α, β weights)."""
    s = student_logits / temperature
    t = teacher_logits / temperature
    s_other = drop_target(s, targets)
    t_other = drop_target(t, targets)

    def binary_log_probs(logits: Tensor, other: Tensor) -> Tensor:
        log_z = torch.logsumexp(logits, dim=1, keepdim=True)
        log_target = logits.gather(1, targets[:, None]) - log_z
        log_other = torch.logsumexp(other, dim=1, keepdim=True) - log_z
        return torch.cat([log_target, log_other], dim=1)

    log_b_s, log_b_t = binary_log_probs(s, s_other), binary_log_probs(t, t_other)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1).mean()
    log_q_s, log_q_t = F.log_softmax(s_other, dim=1), F.log_softmax(t_other, dim=1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """mdistiller's ``min(epoch / warmup, 1)`` for our 0-based ``epoch`` (mdistiller counts epochs from 1)."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


@dataclass
class DKDHparams:
    ce_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20

    def validate(self, where: str) -> None:
        if self.temperature <= 0:
            raise BenchError(f"{where}.temperature: must be > 0, got {self.temperature}")
        if self.warmup_epochs < 0:
            raise BenchError(f"{where}.warmup_epochs: must be >= 0, got {self.warmup_epochs}")


@register_method
class DKD(Method):
    name = "dkd"
    Hparams = DKDHparams
    accepts = frozenset({"ls", "ctkd", "dot"})

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        hp = self.hp
        view = self.distill_logits(logits, self.teacher_features(x).logits, hp.temperature)
        weight = warmup_factor(self.epoch, hp.warmup_epochs)
        return logits, {
            "ce": hp.ce_weight * F.cross_entropy(logits, y),
            "dkd": weight * dkd_loss(view.student, view.teacher, y, hp.alpha, hp.beta, view.temperature),
        }
