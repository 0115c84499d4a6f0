"""``fitnet``: hint learning (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, hint-based
training, eq. 3).

A regressor ``r`` maps the student's *guided* layer to the shape of the teacher's *hint* layer and the squared
error between them is minimised: ``L_HT = ½ ‖u_h(x) − r(v_g(x))‖²`` (eq. 3).

As benchmarked by CRD (Tian et al. 2020, RepDistiller ``HintLoss``/``ConvReg``, ``--distill hint``) and
mdistiller (``FitNet``), which produced the published CIFAR-100 numbers:

- **Single stage.** FitNets trains the student up to the guided layer on the hint first (stage 1) and then the
  whole student with KD (stage 2). CRD replaces this with one stage: ``CE + β·hint`` from the first epoch,
  ``β = 100`` (``scripts/run_cifar_distill.sh``: ``--distill hint -a 0 -b 100``; mdistiller ``FITNET.LOSS``
  ``CE_WEIGHT 1``, ``FEAT_WEIGHT 100``). No KD term.
- **Hint and guided layer**: the output of the same middle stage of both networks, CRD's ``hint_layer = 2`` in
  its feature list ``[stem, stage 1, stage 2, ...]``, i.e. our ``hint_stage = 1`` (0-based stage index).
- **Regressor** (CRD ``ConvReg``): conv → BatchNorm → ReLU. A 3×3 stride-2 conv when the student map is twice
  the teacher's size, a 4×4 stride-2 transposed conv when it is half, otherwise a valid conv with kernel
  ``(1 + H_s − H_t) × (1 + W_s − W_t)`` (a 1×1 conv for equal sizes). The final ReLU matches the teacher's
  post-ReLU stage outputs.
- **Distance**: mean squared error over all elements (``nn.MSELoss``), i.e. eq. 3 up to the constant ½ and the
  normalisation by the number of elements, which the weight 100 absorbs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError
from methods.base import Method, MethodContext, register_method


def fitnet_loss(regressed_student: Tensor, teacher_hint: Tensor) -> Tensor:
    """Hint loss (FitNets eq. 3, CRD form): mean squared error between ``r(v_g(x))`` and ``u_h(x)``."""
    return F.mse_loss(regressed_student, teacher_hint)


class HintRegressor(nn.Module):
    """CRD's ``ConvReg``: maps a student map of shape ``(C_s, H_s, W_s)`` to the teacher's ``(C_t, H_t, W_t)``."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        s_c, s_h, s_w = student_shape
        t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise BenchError(
                f"fitnet: no regressor from a student map of {s_h}x{s_w} to a teacher map of {t_h}x{t_w} "
                "(supported: equal or larger student maps, or a factor 2 either way); pick another hint_stage"
            )
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


@dataclass
class FitNetHparams:
    hint_stage: int = 1  # 0-based stage index; CRD's hint_layer=2 counts the stem as layer 0
    ce_weight: float = 1.0
    hint_weight: float = 100.0

    def validate(self, where: str) -> None:
        if self.hint_stage < 0:
            raise BenchError(f"{where}.hint_stage: must be >= 0, got {self.hint_stage}")
        if self.hint_weight < 0 or self.ce_weight < 0:
            raise BenchError(f"{where}: loss weights must be >= 0")


@register_method
class FitNet(Method):
    name = "fitnet"
    Hparams = FitNetHparams

    def __init__(self, student, teacher, hparams: FitNetHparams, context: MethodContext) -> None:
        super().__init__(student, teacher, hparams, context)
        stage = hparams.hint_stage
        for role, net in (("student", student), ("teacher", teacher)):
            if stage >= net.num_stages:
                raise BenchError(f"fitnet: hint_stage {stage} does not exist in the {role} ({net.num_stages} stages)")
        s_shape = student.stage_shapes(context.input_shape)[stage]
        t_shape = teacher.stage_shapes(context.input_shape)[stage]
        self.regressor = HintRegressor(s_shape, t_shape)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.student.forward_features(x)
        hint = self.teacher_features(x).stages[self.hp.hint_stage]
        guided = self.regressor(feats.stages[self.hp.hint_stage])
        return feats.logits, {
            "ce": self.hp.ce_weight * F.cross_entropy(feats.logits, y),
            "hint": self.hp.hint_weight * fitnet_loss(guided, hint),
        }
