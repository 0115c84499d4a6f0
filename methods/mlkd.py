"""``mlkd``: Multi-Level Logit Distillation (Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023):
the teacher's and student's predictions at several temperatures ("prediction augmentation") are aligned at
three levels — instance (KL of each sample's class distribution), batch (the N×N Gram matrix of the
predictions: which samples look alike) and class (the C×C Gram matrix: which classes co-occur) — summed over
the temperatures (the paper's instance-, batch- and class-level losses; the paper body was not available to
us, so we cite no equation number: the official code below is our reference for every term).

We follow the official code (Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/distillers/KD_ours.py``;
the same file as ``MLKD.py`` in sunshangquan/logit-standardization-KD), where it is specific:

- temperatures ``[T, 3, 5, 2, 6]`` with the base ``T = 4`` (``temperatures``), every term weighted by the KD
  weight (0.9, CE 0.1: mdistiller's ``CFG.KD.LOSS``);
- instance level: T²·KL(p_t ‖ p_s) per temperature (:func:`methods.kd.kd_loss`); batch level:
  ``Σ (P_t P_tᵀ − P_s P_sᵀ)² / N``; class level: ``Σ (P_tᵀ P_t − P_sᵀ P_s)² / C`` (no T² factor);
- **confidence masking as the code does it**: the sample mask keeps the samples whose teacher top-1
  probability (T = 1) is at most the batch median (``np.percentile(…, 50)``; ``le``), the class mask the
  classes whose summed teacher probability is at most the median over classes. The code multiplies the
  already batch-averaged loss by the mask and averages, so each masked term is *scaled by the fraction of
  kept samples (classes)* — about ½ — rather than restricted to them (the per-sample variant is commented
  out there). The instance and batch terms use the sample mask, the class term the class mask;
- with logit standardization (``mlkd+ls``) only the instance-level KL terms see standardized logits; the
  batch and class terms and the masks use the raw ones (logit-standardization ``MLKD.py``).

Our reading: **one view.** The official training also feeds a strong RandAugment(2, 10) view of each batch
(``get_cifar100_dataloaders_strong``) and adds CE and unmasked KL terms on it; our data pipeline produces one
augmented view, so those terms are not computed (a protocol difference the suites state). The official
CIFAR runs are 480 epochs with lr 0.025 (logit-standardization ``configs/cifar100/mlkd/*.yaml``; MLKD issues
#2, #10). Accepts ``ls`` and the ``dot`` trainer; not ``ctkd`` (MLKD has a set of temperatures, not one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.config import check_fields
from methods.base import Method, register_method
from methods.kd import kd_loss


def confidence_masks(teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(sample mask (N,), class mask (C,)): teacher top-1 confidence at most its batch median; summed class
    probability at most its median over classes (medians with linear interpolation, as ``np.percentile``)."""
    p = F.softmax(teacher_logits.detach().float(), dim=1)
    confidence = p.max(dim=1).values
    class_confidence = p.sum(dim=0)
    return confidence <= torch.quantile(confidence, 0.5), class_confidence <= torch.quantile(class_confidence, 0.5)


def batch_consistency_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``Σ (P_t P_tᵀ − P_s P_sᵀ)² / N`` with P = softmax(logits / T) (MLKD's batch level)."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / p_s.shape[0]


def class_consistency_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``Σ (P_tᵀ P_t − P_sᵀ P_s)² / C`` with P = softmax(logits / T) (MLKD's class level)."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / p_s.shape[1]


def mlkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperatures: list[float] | tuple[float, ...] = (4.0, 3.0, 5.0, 2.0, 6.0),
    instance_logits: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The three unweighted MLKD terms summed over ``temperatures``: ``kd`` (instance), ``bc`` (batch), ``cc``
    (class), each scaled by its mask's kept fraction (:func:`confidence_masks`, see the module docstring).

    ``instance_logits``: the (student, teacher) logits of the instance-level KL when they differ from the raw
    ones (a logit modifier's view); the masks and the batch / class terms always use the raw logits."""
    s_inst, t_inst = instance_logits if instance_logits is not None else (student_logits, teacher_logits)
    sample_mask, class_mask = confidence_masks(teacher_logits)
    kept, kept_classes = sample_mask.float().mean(), class_mask.float().mean()
    return {
        "kd": sum(kd_loss(s_inst, t_inst, t) for t in temperatures) * kept,
        "bc": sum(batch_consistency_loss(student_logits, teacher_logits, t) for t in temperatures) * kept,
        "cc": sum(class_consistency_loss(student_logits, teacher_logits, t) for t in temperatures) * kept_classes,
    }


@dataclass
class MLKDHparams:
    temperatures: list[float] = field(default_factory=lambda: [4.0, 3.0, 5.0, 2.0, 6.0])
    ce_weight: float = 0.1
    kd_weight: float = 0.9  # weight of every MLKD term (instance, batch, class)

    def validate(self, where: str) -> None:
        check_fields(self, where, [
            (len(self.temperatures) > 0, "temperatures", "must not be empty"),
            (all(t > 0 for t in self.temperatures), "temperatures", "must all be > 0"),
        ])  # fmt: skip


@register_method
class MLKD(Method):
    name = "mlkd"
    Hparams = MLKDHparams
    accepts = frozenset({"ls", "dot"})

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        teacher_logits = self.teacher_features(x).logits
        hp = self.hp
        view = self.distill_logits(logits, teacher_logits)
        terms = mlkd_loss(logits, teacher_logits, hp.temperatures, (view.student, view.teacher))
        return logits, {"ce": hp.ce_weight * F.cross_entropy(logits, y), **{k: hp.kd_weight * v for k, v in terms.items()}}
