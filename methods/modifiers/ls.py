"""``ls``: logit standardization (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation",
CVPR 2024): the Z-score ``Z(z) = (z − mean(z)) / std(z)`` of each sample's logits, teacher and student alike,
before the temperature softmax of a logit-based loss (the paper's ``Z``-score pre-process; the paper body
was not available to us, so the official code below is our reference).

We follow the official code (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``
``normalize``): the mean and standard deviation are over the classes of each sample, the standard deviation is
torch's default **unbiased** one (``Tensor.std``, divisor C − 1), and ``eps`` is added to the standard
deviation, not under the square root: ``(z − mean) / (eps + std)`` with ``eps = 1e-7``. (The CTKD variant of
that repository, ``CTKD/distiller_zoo/KD.py``, divides without ``eps``; the difference is 1e-7 relative.)

What it changes is only what a method distils (:meth:`methods.base.Method.distill_logits`): the CE term stays
on the raw student logits, and the method's temperature now divides standardized logits, which is why the
paper's runs use a "base temperature" of 2 or 3 and a KD weight of 9 (CLI flags ``--base-temp``,
``--kd-weight`` of ``tools/train.py``; per pair in its log names). In MLKD the official code standardizes the
instance-level KL terms only (``mdistiller/distillers/MLKD.py``): :mod:`methods.mlkd` does the same.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bench.errors import BenchError
from methods.modifiers.base import LogitModifier, LogitView, register_modifier


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-sample Z-score over the last dimension: ``(z − mean) / (eps + std)``, std unbiased (divisor C − 1)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)


@dataclass
class LSHparams:
    eps: float = 1e-7

    def validate(self, where: str) -> None:
        if self.eps < 0:
            raise BenchError(f"{where}.eps: must be >= 0, got {self.eps}")


@register_modifier
class LogitStandardization(LogitModifier):
    name = "ls"
    Hparams = LSHparams
    scope = "it standardizes the logits a method distils through Method.distill_logits"

    def forward(self, view: LogitView, epoch: int) -> LogitView:
        eps = self.hp.eps
        return LogitView(standardize_logits(view.student, eps), standardize_logits(view.teacher, eps), view.temperature)
