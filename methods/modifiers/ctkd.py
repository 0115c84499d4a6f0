"""``ctkd``: curriculum temperature (Li, Li, Yang, Zhang, Jiang, Li, Yang, "Curriculum Temperature for Knowledge
Distillation", AAAI 2023): the distillation temperature is a learnable parameter trained *adversarially*
(it maximises the distillation loss through a gradient reversal layer), and the strength of the reversal
follows an easy-to-hard cosine curriculum over the first epochs (the paper's min–max objective with the
gradient reversal layer and its cosine schedule of λ; equation numbers not verified here, the paper body was not
available to us: the official code below is our reference).

We follow the official code (zhengli97/CTKD: ``models/temp_global.py`` ``Global_T``, ``train_student.py``
``CosineDecay``, ``helper/loops.py``):

- the "global" temperature module is one parameter θ, initialised to 1, and
  ``T = min_temperature + temperature_range · sigmoid(GRL(θ))`` (``--t_start 1 --t_end 20``: T starts at
  1 + 20·σ(1) ≈ 15.6 and can range over (1, 21));
- the gradient reversal layer is the identity forward and multiplies the gradient by −λ backward;
- λ follows ``λ(e) = reversal_min + (reversal_max − reversal_min) · (1 − cos(π·min(e, E)/E)) / 2`` with the
  1-based epoch e and ``E = curriculum_epochs`` (official ``--decay_max 0 --decay_min -1 --decay_loops 10``
  on CIFAR, 5 on ImageNet: their value is our −λ), so λ rises from ≈0.02 in the first epoch to 1 at epoch E;
- θ is trained by the run's optimizer with the student (same learning rate, momentum and weight decay: the
  official ``trainable_list``), and the method's own temperature is not used.

The module is a submodule of the method: θ is checkpointed, counted in ``extra_params``, and its final
temperature is recorded as the metric ``ctkd_temperature``. The instance-wise temperature variant of the
paper is not implemented (the official scripts use the global one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.config import check_fields
from methods.modifiers.base import LogitModifier, LogitView, register_modifier


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-strength`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    return GradientReversal.apply(x, strength)


def reversal_strength(epoch: int, curriculum_epochs: int, low: float = 0.0, high: float = 1.0) -> float:
    """CTKD's cosine curriculum λ at the 0-based ``epoch`` (the official schedule counts epochs from 1)."""
    i = min(max(epoch + 1, 0), curriculum_epochs)
    return low + (high - low) * (1.0 - math.cos(i * math.pi / curriculum_epochs)) / 2.0


def curriculum_temperature(theta: Tensor, strength: float, min_temperature: float, temperature_range: float) -> Tensor:
    """``min_temperature + temperature_range · sigmoid(GRL(θ))``: the temperature, adversarial in θ."""
    return min_temperature + temperature_range * torch.sigmoid(reverse_gradient(theta, strength))


@dataclass
class CTKDHparams:
    min_temperature: float = 1.0  # official --t_start
    temperature_range: float = 20.0  # official --t_end (the temperature lies in (min, min + range))
    init: float = 1.0  # θ at the start (official: torch.ones(1))
    curriculum_epochs: int = 10  # official --decay_loops (10 on CIFAR-100, 5 on ImageNet)
    reversal_min: float = 0.0  # λ before the curriculum (official −decay_max)
    reversal_max: float = 1.0  # λ at the end of the curriculum (official −decay_min)

    def validate(self, where: str) -> None:
        check_fields(self, where, [
            (self.min_temperature > 0, "min_temperature", "must be > 0"),
            (self.temperature_range > 0, "temperature_range", "must be > 0"),
            (self.curriculum_epochs >= 1, "curriculum_epochs", "must be >= 1"),
            (self.reversal_min <= self.reversal_max, "reversal_max", "must be >= reversal_min"),
        ])  # fmt: skip


@register_modifier
class CurriculumTemperature(LogitModifier):
    name = "ctkd"
    Hparams = CTKDHparams
    scope = "it replaces the single temperature a method passes to Method.distill_logits"

    def __init__(self, hparams: CTKDHparams) -> None:
        super().__init__(hparams)
        self.theta = nn.Parameter(torch.full((), float(hparams.init)))

    def temperature(self, epoch: int) -> Tensor:
        hp = self.hp
        strength = reversal_strength(epoch, hp.curriculum_epochs, hp.reversal_min, hp.reversal_max)
        return curriculum_temperature(self.theta, strength, hp.min_temperature, hp.temperature_range)

    def forward(self, view: LogitView, epoch: int) -> LogitView:
        return LogitView(view.student, view.teacher, self.temperature(epoch))

    def describe(self) -> dict[str, float]:
        hp = self.hp
        return {"ctkd_temperature": hp.min_temperature + hp.temperature_range * float(torch.sigmoid(self.theta.detach()))}
