"""``kd_smooth``: knowledge distillation towards a smoothed teacher. An example plugin, not a published method.

The KD objective of Hinton et al. (2015, eq. 2 with the T² factor of §2; ``methods/kd.py``) with the teacher's
softened distribution mixed with the uniform one before it is matched:

    p̃_t = (1 − ε) · softmax(z_t / T) + ε / C,    L = ce_weight · CE(z_s, y) + kd_weight · T² · KL(p̃_t ‖ softmax(z_s / T))

``smoothing`` (ε) is the method's own hyperparameter; ε = 0 is ``kd`` exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError
from methods.base import Method, register_method
from methods.kd import kl_per_sample


def kd_smooth_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
                   smoothing: float = 0.1) -> Tensor:  # fmt: skip
    """T²·KL(p̃_t ‖ p_s) with p̃_t = (1 − ε)·softmax(z_t / T) + ε / C, summed over classes, mean over the batch."""
    num_classes = teacher_logits.shape[1]
    p_t = (1 - smoothing) * F.softmax(teacher_logits / temperature, dim=1) + smoothing / num_classes
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return kl_per_sample(p_t.log(), log_p_s).mean() * temperature**2


@dataclass
class KDSmoothHparams:
    temperature: float = 4.0
    smoothing: float = 0.1
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def validate(self, where: str) -> None:
        if self.temperature <= 0:
            raise BenchError(f"{where}.temperature: must be > 0, got {self.temperature}")
        if not 0 <= self.smoothing < 1:
            raise BenchError(f"{where}.smoothing: must be in [0, 1), got {self.smoothing}")


@register_method
class KDSmooth(Method):
    name = "kd_smooth"
    Hparams = KDSmoothHparams

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        teacher_logits = self.teacher_features(x).logits
        hp = self.hp
        return logits, {
            "ce": hp.ce_weight * F.cross_entropy(logits, y),
            "kd": hp.kd_weight * kd_smooth_loss(logits, teacher_logits, hp.temperature, hp.smoothing),
        }
