"""The optimisation recipe (``Recipe``: epochs, batch, SGD, schedule, augmentation, speed and numerics switches),
the process-wide numerics it asks for (``apply_numerics``), and how a step turns a method's losses into an update
(``Trainer``; ``SGDTrainer`` is the default, ``methods/modifiers/dot.py`` another).

Not here: the loop that runs them (``bench.engine``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

from bench.config import check_fields, to_dict


@dataclass
class Recipe:
    """Optimisation recipe; defaults are the CRD CIFAR-100 protocol (Tian et al. 2020)."""

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    augment: str = "auto"
    grad_clip: float | None = None
    eval_batch_size: int = 512
    val_fraction: float = 0.0
    # Speed switches, all off by default (a reference run never turns them on silently). Each is a
    # recipe field, so it is part of the run's hash and logged as an MLflow param (``recipe.amp`` ...).
    amp: bool = False  # bf16 autocast of the forward passes (teacher, student, losses) and evaluation
    channels_last: bool = False  # NHWC memory format for the models and the input batches
    compile: bool = False  # torch.compile of the method's training forward (``forward_train``)
    # Numerics on CUDA (``apply_numerics``; nothing changes on a CPU): TF32 matmuls and convolutions only when
    # asked for (a reference run computes in full fp32); ``deterministic`` = deterministic cuDNN, no cuDNN
    # benchmark, ``torch.use_deterministic_algorithms`` (warn only). Recipe fields, so part of the run's hash
    # and its MLflow params (``recipe.tf32``, ``recipe.deterministic``).
    tf32: bool = False
    deterministic: bool = False
    # SyncBatchNorm across a run's data-parallel workers (--workers-per-run); None: on when there are several.
    # batch_size is the global batch, so N workers with synced BatchNorm train one process's protocol.
    sync_bn: bool | None = None
    # fields left out of a run's hash and params while at this value (added later: old runs keep their hash)
    HASH_NEUTRAL: ClassVar[dict[str, Any]] = {"sync_bn": None}

    def identity(self) -> dict[str, Any]:
        """The fields as they enter a run's hash and params (``HASH_NEUTRAL`` ones left out at their value)."""
        return {k: v for k, v in to_dict(self).items() if self.HASH_NEUTRAL.get(k, ...) != v}

    def validate(self, where: str) -> None:
        from bench.data import AUGMENTATIONS

        checks = [
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (all(0 < m < self.epochs for m in self.milestones), "milestones", f"must lie in (0, epochs={self.epochs})"),
            (list(self.milestones) == sorted(self.milestones), "milestones", "must be increasing"),
            (self.augment in AUGMENTATIONS + ("auto",), "augment", f"must be one of auto, {', '.join(AUGMENTATIONS)}"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0"),
            (0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)"),
        ]
        check_fields(self, where, checks)


def apply_numerics(recipe: Recipe, device: torch.device) -> None:
    """Set the process-wide numerics switches of ``recipe`` (see its ``tf32`` / ``deterministic`` fields).

    On CUDA: ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` =
    ``recipe.tf32`` (PyTorch's own defaults differ: cuDNN convolutions use TF32 unless told otherwise); with
    ``recipe.deterministic`` also ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` if unset (cuBLAS reads it when it starts,
    so the CLI's ``--deterministic`` is set before any CUDA work). On every device: ``cudnn.deterministic``
    and ``torch.use_deterministic_algorithms(warn_only=True)`` follow ``recipe.deterministic``, which turns
    ``cudnn.benchmark`` off. A CPU run with the default recipe changes no setting: no cuDNN, no TF32, and
    deterministic algorithms stay off as they are by default."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = recipe.tf32
        torch.backends.cudnn.allow_tf32 = recipe.tf32
        if recipe.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = recipe.deterministic
    if recipe.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(False)


def make_optimizer(params: list[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=recipe.nesterov
    )


def nothing() -> None:
    """The ``after_backward`` of a run in one process."""
    pass


class Trainer(Protocol):
    """How a training step turns a method's named losses into a parameter update (``TrainingRun.step``).

    ``optimizer`` is what the scheduler drives and the checkpoint saves. A method chooses its trainer
    (``Method.make_trainer``); :class:`SGDTrainer` is the default, ``methods/modifiers/dot.py`` another."""

    optimizer: torch.optim.Optimizer

    data_parallel: bool  # whether it runs on several data-parallel workers (one backward pass per step)

    def update(self, losses: dict[str, torch.Tensor], loss: torch.Tensor,
               after_backward: Callable[[], None] = nothing) -> None:
        """One update from the step's named ``losses`` and their sum ``loss``; ``after_backward`` after each
        backward pass (a data-parallel run's gradient hooks)."""
        ...


class SGDTrainer:
    """The default update: backward of the summed losses, optional gradient clipping, one SGD step."""

    data_parallel = True

    def __init__(self, params: list[nn.Parameter], recipe: Recipe) -> None:
        self.params, self.recipe = params, recipe
        self.optimizer = make_optimizer(params, recipe)

    def update(self, losses: dict[str, torch.Tensor], loss: torch.Tensor,
               after_backward: Callable[[], None] = nothing) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        after_backward()
        if self.recipe.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip)
        self.optimizer.step()
