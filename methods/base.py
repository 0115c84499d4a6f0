"""The method interface (in the style of mdistiller's ``Distiller``) and the method registry.

A method is an ``nn.Module`` that owns the student, the teacher (frozen for offline methods, trained for
online ones) and any extra trainable modules (projectors, adapters, memory banks). Most methods only
implement ``forward_train(x, y) -> (student_logits, {loss_name: tensor})``; the shared engine
(:mod:`bench.engine`) supplies ``fit`` and ``evaluate``. Methods with their own procedure override
``on_epoch_start`` / ``eval_models`` / ``fit`` for the part that differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from bench import engine
from bench.config import from_mapping
from bench.data import DatasetInfo
from bench.engine import History, Hooks, Recipe, Task
from bench.errors import BenchError
from bench.models import Features, StagedNet, count_parameters
from bench.teacher_cache import teacher_cache_for

TeacherMode = Literal["none", "offline", "online"]


@dataclass
class NoHparams:
    """A method without hyperparameters."""


@dataclass
class MethodContext:
    """What a method may need to know about its run besides the models."""

    info: DatasetInfo
    num_train: int
    epochs: int
    input_shape: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.input_shape:
            self.input_shape = (self.info.in_channels, self.info.image_size, self.info.image_size)


class Method(nn.Module):
    """Base class: subclasses set ``name``, ``Hparams``, ``teacher_mode`` and implement ``forward_train``.

    ``teacher_mode``: ``"none"`` (student alone), ``"offline"`` (a trained, frozen teacher) or
    ``"online"`` (teacher and student trained together from scratch).
    """

    name: ClassVar[str]
    Hparams: ClassVar[type] = NoHparams
    teacher_mode: ClassVar[TeacherMode] = "offline"
    # how the method differs when one run trains on several data-parallel workers (tagged ``ddp_note``); ""
    # = it does not (the global batch is the protocol)
    ddp_note: ClassVar[str] = ""
    # some trainable parameters take no part in some steps (DDP must then look for them every step)
    unused_parameters: ClassVar[bool] = False

    def __init__(self, student: StagedNet, teacher: StagedNet | None, hparams, context: MethodContext) -> None:
        super().__init__()
        if self.teacher_mode != "none" and teacher is None:
            raise BenchError(f"method {self.name!r} needs a teacher")
        self.student = student
        self.teacher = teacher if self.teacher_mode != "none" else None
        self.hp = hparams
        self.context = context
        self.epoch = 0
        if self.teacher is not None and self.teacher_mode == "offline":
            self.teacher.requires_grad_(False)
            self.teacher.eval()

    # ---- what subclasses implement -------------------------------------------------------------
    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (0-based): schedules, warm-ups, block partitions."""
        self.epoch = epoch

    def prepare_distributed(self, distributed, sync_bn: bool) -> None:
        """Called on every worker of a data-parallel run before training (``bench.distributed.TorchDistributed``,
        after the BatchNorm layers became SyncBatchNorm when ``sync_bn``): a method with state shared across the
        batch (CRD's memory bank) or its own gradient or BatchNorm handling (GPD) adapts here."""

    def eval_models(self) -> dict[str, nn.Module]:
        """Models evaluated each epoch; "" is the student, whose metrics are the run's result."""
        models: dict[str, nn.Module] = {"": self.student}
        if self.teacher_mode == "online":
            models["teacher"] = self.teacher
        return models

    # ---- shared helpers ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        if self.teacher is not None and self.teacher_mode == "offline":
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_features(self, x: Tensor) -> Features:
        """Frozen teacher forward (offline methods). ``no_grad`` rather than ``inference_mode``: the
        outputs enter losses whose backward saves them."""
        return self.teacher.forward_features(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def extra_parameters(self) -> int:
        """Parameters of the method's own modules (projectors, adapters, ...), not student or teacher."""
        skip = {id(p) for m in (self.student, self.teacher) if m is not None for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def checkpoint_state(self) -> dict[str, Tensor]:
        """State to checkpoint: everything but a frozen offline teacher (which has its own file)."""
        state = self.state_dict()
        if self.teacher_mode == "offline":
            state = {k: v for k, v in state.items() if not k.startswith("teacher.")}
        return state

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (self.teacher_mode == "offline" and k.startswith("teacher."))]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match method {self.name}: missing={missing} unexpected={unexpected}")

    def require_equal_stages(self, reason: str) -> None:
        """Methods that pair student stage i with teacher stage i need the same number of stages."""
        s, t = self.student.num_stages, self.teacher.num_stages
        if s != t:
            raise BenchError(f"{self.name}: student has {s} stages and teacher {t}; {reason}, so both need the same number")

    def describe(self) -> dict[str, int]:
        return {
            "student_params": count_parameters(self.student),
            "extra_params": self.extra_parameters(),
        }

    # ---- the uniform interface -----------------------------------------------------------------
    def fit(self, task: Task, recipe: Recipe, hooks: Hooks | None = None) -> History:
        """The engine's loop, handed the teacher-output cache (``bench.teacher_cache``) where it applies; the
        method goes to its device first, where the cache's memory probe runs the teacher."""
        self.to(task.device)
        return engine.fit(self, task, recipe, hooks, teacher_cache_for(self, task, recipe))

    def evaluate(self, task: Task, split: str = "test") -> dict[str, float]:
        return engine.evaluate_method(self, task.eval_loaders[split], split)

    @classmethod
    def trains_with_engine_loop(cls) -> bool:
        """Whether the method trains through ``Method.fit`` as it is (a method overriding ``fit`` prepares
        something there that a shared loop, the teacher cache or a lockstep group would skip)."""
        return cls.fit is Method.fit


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise BenchError(f"unknown method {name!r} (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


def build_hparams(method: str, values: dict | None, where: str):
    """Validated hyperparameter dataclass of ``method`` from a mapping (defaults for missing keys)."""
    return from_mapping(get_method(method).Hparams, values or {}, where)
