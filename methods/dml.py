"""``dml``: Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018), the standard online-KD baseline.

Two networks (the pair's teacher and student architectures, both from scratch) learn together; each
minimises its own cross-entropy plus the KL divergence from its peer's prediction to its own
(paper eq. 1 and 2: L_Θ1 = L_C1 + D_KL(p2 ‖ p1), L_Θ2 = L_C2 + D_KL(p1 ‖ p2)), the peer treated as a
constant target. Both networks are evaluated every epoch (the "teacher" metrics are the peer's).

Our choices where the paper differs from this harness or is silent:
- **Simultaneous update.** Algorithm 1 of the paper updates Θ1, recomputes the predictions and then
  updates Θ2. Here both losses are computed from the same forward pass and summed, and the engine's single
  SGD step updates both networks (as most re-implementations do). Because each loss only reaches its own
  network (the peer is detached), this equals one step of each network's own loss with the same lr.
- ``temperature`` (default 1, i.e. the paper's plain softmax) softens both distributions, with the usual
  T² gradient scale (Hinton et al. 2015); ``kl_weight`` (default 1, the paper's unweighted sum) scales the
  mimicry term of both networks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError
from methods.base import Method, register_method
from methods.kd import kd_loss


def dml_loss(
    logits: Tensor, peer_logits: Tensor, targets: Tensor, temperature: float = 1.0, kl_weight: float = 1.0
) -> Tensor:
    """One network's DML loss: CE(logits, y) + kl_weight·T²·mean_i KL(p_peer,i ‖ p_i), peer detached (eq. 1)."""
    return F.cross_entropy(logits, targets) + kl_weight * kd_loss(logits, peer_logits.detach(), temperature)


@dataclass
class DMLHparams:
    temperature: float = 1.0
    kl_weight: float = 1.0

    def validate(self, where: str) -> None:
        if self.temperature <= 0:
            raise BenchError(f"{where}.temperature: must be > 0, got {self.temperature}")
        if self.kl_weight < 0:
            raise BenchError(f"{where}.kl_weight: must be >= 0, got {self.kl_weight}")


@register_method
class DML(Method):
    name = "dml"
    Hparams = DMLHparams
    teacher_mode = "online"

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        peer_logits = self.teacher(x)
        hp = self.hp
        return logits, {
            "student": dml_loss(logits, peer_logits, y, hp.temperature, hp.kl_weight),
            "teacher": dml_loss(peer_logits, logits, y, hp.temperature, hp.kl_weight),
        }
