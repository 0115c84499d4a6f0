"""``dot``: the Distillation-Oriented Trainer (Zhao, Cui, Song & Liang, "DOT: A Distillation-Oriented Trainer",
ICCV 2023): SGD with two momentum buffers per parameter, one for the gradient of the task loss (momentum
μ − Δ) and one for the gradient of the distillation loss (momentum μ + Δ), so that the distillation gradient
carries more of the optimisation (the paper's momentum update; its equation numbers are not verified here, the
paper body was not available to us: the official code below is our reference).

We follow the official code (megvii-research/mdistiller ``mdistiller/engine/dot.py``
``DistillationOrientedTrainer`` and ``mdistiller/engine/trainer.py`` ``DOT``), step by step:

1. backward of the distillation loss (the sum of every loss but ``ce``), its gradients kept;
2. backward of the task loss ``ce``;
3. for each parameter with a task gradient g: ``d = g + wd·p``; the task buffer becomes ``d`` (first step) or
   ``(μ−Δ)·buf + d`` — or ``μ·buf + d`` where the parameter got no distillation gradient; ``p −= lr·buf``;
4. then for each parameter with a distillation gradient k: the distillation buffer becomes ``k`` (first step,
   without weight decay) or ``(μ+Δ)·buf + k`` where the parameter also got a task gradient (its weight decay
   went with that one), else ``μ·buf + (k + wd·p)``; ``p −= lr·buf``.

Δ is ``delta`` (mdistiller: 0.075 on CIFAR-100, 0.09 on ImageNet). No dampening, no Nesterov, no gradient
clipping (the official trainer has none; a recipe asking for them is refused). Both buffers live in the
optimizer state (``momentum_buffer``, ``momentum_kd_buffer``), so they are checkpointed and a resumed run
continues exactly. The method's losses must hold a task term named ``ce`` and at least one other term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from bench.errors import BenchError
from bench.recipe import Recipe, nothing
from methods.modifiers.base import TrainerFactory, register_trainer

TASK_LOSS = "ce"


class DOTOptimizer(torch.optim.Optimizer):
    """SGD with separate task / distillation momentum (one parameter group, as the official optimizer).

    Use: backward of the distillation loss, :meth:`keep_distillation_grads`, backward of the task loss,
    :meth:`step` (``zero_grad`` between the two backward passes)."""

    def __init__(self, params, lr: float, momentum: float, momentum_kd: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise BenchError("dot: the optimizer takes one parameter group")
        self._kd_grads: dict[nn.Parameter, Tensor] = {}

    @torch.no_grad()
    def keep_distillation_grads(self) -> None:
        """Store the current gradients as the distillation gradients of the next :meth:`step`."""
        self._kd_grads = {p: p.grad for p in self.param_groups[0]["params"] if p.grad is not None}

    @torch.no_grad()
    def step(self, closure=None) -> None:
        group = self.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        m_task, m_kd = group["momentum"], group["momentum_kd"]
        m_mean = (m_task + m_kd) / 2.0
        task = [p for p in group["params"] if p.grad is not None]
        for p in task:
            d = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.clone().detach()
            else:
                buf.mul_(m_task if p in self._kd_grads else m_mean).add_(d)
            p.add_(buf, alpha=-lr)
        task_set = set(task)
        for p, k in self._kd_grads.items():
            state = self.state[p]
            buf = state.get("momentum_kd_buffer")
            if buf is None:
                buf = state["momentum_kd_buffer"] = k.clone().detach()
            elif p in task_set:
                buf.mul_(m_kd).add_(k)
            else:
                buf.mul_(m_mean).add_(k.add(p, alpha=wd) if wd != 0 else k)
            p.add_(buf, alpha=-lr)
        self._kd_grads = {}


class DOTTrainer:
    """The engine's update for ``dot``: two backward passes, one :class:`DOTOptimizer` step."""

    def __init__(self, optimizer: DOTOptimizer) -> None:
        self.optimizer = optimizer

    data_parallel = False  # two backward passes per step: DistributedDataParallel reduces once per forward

    def update(self, losses: dict[str, Tensor], loss: Tensor,
               after_backward: Callable[[], None] = nothing) -> None:
        if TASK_LOSS not in losses or len(losses) < 2:
            raise BenchError(f"dot: needs a task loss {TASK_LOSS!r} and a distillation loss, got {sorted(losses)}")
        distill = sum(v for k, v in losses.items() if k != TASK_LOSS)
        self.optimizer.zero_grad(set_to_none=True)
        distill.backward(retain_graph=True)
        after_backward()
        self.optimizer.keep_distillation_grads()
        self.optimizer.zero_grad(set_to_none=True)
        losses[TASK_LOSS].backward()
        after_backward()
        self.optimizer.step()


@dataclass
class DOTHparams:
    delta: float = 0.075  # Δ: task momentum μ − Δ, distillation momentum μ + Δ

    def validate(self, where: str) -> None:
        if self.delta < 0:
            raise BenchError(f"{where}.delta: must be >= 0, got {self.delta}")


@register_trainer
class DOT(TrainerFactory):
    name = "dot"
    Hparams = DOTHparams
    scope = "it splits the losses into the task term 'ce' and the distillation terms of a frozen teacher"

    @classmethod
    def check_recipe(cls, recipe: "Recipe", where: str) -> None:
        if recipe.nesterov or recipe.grad_clip is not None:
            raise BenchError(f"{where}: the dot trainer has no Nesterov momentum and no gradient clipping "
                             "(recipe.nesterov / recipe.grad_clip)")  # fmt: skip

    @classmethod
    def build(cls, params: list[nn.Parameter], recipe: "Recipe", hparams: DOTHparams) -> DOTTrainer:
        cls.check_recipe(recipe, "dot")
        m, delta = recipe.momentum, hparams.delta
        if not (0 <= m - delta and m + delta < 1):
            raise BenchError(f"dot: momentum {m} ± delta {delta} must stay in [0, 1)")
        return DOTTrainer(DOTOptimizer(params, recipe.lr, m - delta, m + delta, recipe.weight_decay))
