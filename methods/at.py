"""``at``: attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017, §3.1).

The spatial attention map of an activation ``A`` (C×H×W) is ``F(A) = Σ_c |A_c|^p`` (§3.1, p = 2); the loss
penalises the distance between the L2-normalised, vectorised maps of student and teacher at several depths
(eq. 2): ``β/2 Σ_j ‖Q_s^j/‖Q_s^j‖ − Q_t^j/‖Q_t^j‖‖_p``.

As benchmarked by CRD (Tian et al. 2020, RepDistiller ``distiller_zoo/AT.py``, ``--distill attention -a 0
-b 1000``) and mdistiller (``AT``: ``P 2``, ``CE_WEIGHT 1``, ``FEAT_WEIGHT 1000``), which produced the published
CIFAR-100 numbers:

- the map is the channel *mean* of ``|A|^p`` (a constant factor 1/C, removed by the normalisation);
- the distance per pair is the *mean squared* difference of the normalised maps over batch and positions
  (eq. 2 uses the un-squared p-norm; the paper's β = 10³ is divided by the number of attention-map elements
  and the batch size, which the mean does), summed over the pairs, weight ``β = 1000``, plus CE with weight 1,
  no KD term;
- the pairs are the outputs of every stage (CRD ``feat[1:-1]``: all stages, not the stem or the pooled
  feature), the i-th stage of the student with the i-th of the teacher, post-ReLU;
- when the spatial sizes differ the larger map is average-pooled to the smaller size (CRD ``at_loss``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError
from methods.base import Method, MethodContext, register_method


def attention_map(activation: Tensor, p: float = 2.0) -> Tensor:
    """``F(A) = mean_c |A_c|^p`` of a (B, C, H, W) activation, flattened to (B, H·W) and L2-normalised."""
    return F.normalize(activation.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_maps: list[Tensor], teacher_maps: list[Tensor], p: float = 2.0) -> Tensor:
    """Σ over stage pairs of mean((Q_s − Q_t)²) with Q the normalised attention maps (CRD's form of eq. 2)."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"at_loss: {len(student_maps)} student maps but {len(teacher_maps)} teacher maps")
    total = student_maps[0].new_zeros(())
    for f_s, f_t in zip(student_maps, teacher_maps):
        s_size, t_size = f_s.shape[-2:], f_t.shape[-2:]
        if s_size[0] > t_size[0]:
            f_s = F.adaptive_avg_pool2d(f_s, t_size)
        elif s_size[0] < t_size[0]:
            f_t = F.adaptive_avg_pool2d(f_t, s_size)
        total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
    return total


@dataclass
class ATHparams:
    p: float = 2.0
    ce_weight: float = 1.0
    at_weight: float = 1000.0

    def validate(self, where: str) -> None:
        if self.p <= 0:
            raise BenchError(f"{where}.p: must be > 0, got {self.p}")
        if self.at_weight < 0 or self.ce_weight < 0:
            raise BenchError(f"{where}: loss weights must be >= 0")


@register_method
class AttentionTransfer(Method):
    name = "at"
    Hparams = ATHparams

    def __init__(self, student, teacher, hparams: ATHparams, context: MethodContext) -> None:
        super().__init__(student, teacher, hparams, context)
        self.require_equal_stages("attention transfer pairs stage i with stage i")

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.student.forward_features(x)
        teacher_stages = self.teacher_features(x).stages
        return feats.logits, {
            "ce": self.hp.ce_weight * F.cross_entropy(feats.logits, y),
            "at": self.hp.at_weight * at_loss(feats.stages, teacher_stages, self.hp.p),
        }
