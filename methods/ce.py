"""``ce``: the student trained alone with cross-entropy (the baseline every KD table starts from)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from methods.base import Method, register_method


@register_method
class CrossEntropy(Method):
    name = "ce"
    teacher_mode = "none"

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y)}
