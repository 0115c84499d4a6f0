"""The method interface (in the style of mdistiller's ``Distiller``), the method registry and composition.

A method is an ``nn.Module`` that owns the student, the teacher (frozen for offline methods, trained for
online ones) and any extra trainable modules (projectors, adapters, memory banks). Most methods only
implement ``forward_train(x, y) -> (student_logits, {loss_name: tensor})``; the shared engine
(:mod:`bench.engine`) supplies ``fit`` and ``evaluate``. Methods with their own procedure override
``on_epoch_start`` / ``eval_models`` / ``fit`` for the part that differs.

**Composition.** ``get_method("dkd+ls+ctkd")`` is DKD with the logit modifiers ``ls`` and ``ctkd``;
``get_method("kd+dot")`` is KD trained by the ``dot`` trainer (:mod:`methods.modifiers`). The composed class
is a subclass of the registered method whose ``Hparams`` gain one field per modifier / trainer, named after
it and holding its hyperparameters, so they are part of a run's hash and of its MLflow params. Logit-based
methods get what they distil through :meth:`Method.distill_logits`, which applies the logit modifiers in
order (nothing without modifiers: the defaults are unchanged bit for bit); the engine asks
:meth:`Method.make_trainer` how to turn the losses into an update. A method lists the modifiers and trainers
it accepts in ``accepts``; any other is refused with a one-line ``BenchError``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, make_dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from bench import engine
from bench.config import from_mapping
from bench.data import DatasetInfo
from bench.engine import History, Hooks, Task
from bench.recipe import Recipe, SGDTrainer, Trainer
from bench.errors import BenchError, DuplicateName
from bench.models import Features, StagedNet, count_parameters
from bench.teacher_cache import teacher_cache_for
from methods.modifiers.base import LogitView, get_modifier, get_trainer, list_trainers

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
    # Names of the logit modifiers and trainers (methods.modifiers) this method accepts; others are refused.
    accepts: ClassVar[frozenset[str]] = frozenset()
    # Set on composed classes only (get_method("kd+ls+dot")): the modifiers applied, the trainer used.
    modifier_names: ClassVar[tuple[str, ...]] = ()
    trainer_name: ClassVar[str | None] = None
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
        self.logit_modifiers = nn.ModuleList(get_modifier(n)(getattr(hparams, n)) for n in self.modifier_names)

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

    def distill_logits(self, student: Tensor, teacher: Tensor, temperature: float | None = None) -> LogitView:
        """The logits a logit-based method distils and its temperature, after the run's logit modifiers (in
        the order the suite lists them); the inputs themselves when there are none. The task loss (CE) stays
        on the raw student logits."""
        view = LogitView(student, teacher, temperature)
        for modifier in self.logit_modifiers:
            view = modifier(view, self.epoch)
        return view

    def make_trainer(self, params: list[nn.Parameter], recipe: Recipe) -> Trainer:
        """How the engine turns this method's losses into an update: the composed trainer, else plain SGD."""
        if self.trainer_name is None:
            return SGDTrainer(params, recipe)
        return get_trainer(self.trainer_name).build(params, recipe, getattr(self.hp, self.trainer_name))

    @classmethod
    def check_recipe(cls, recipe: Recipe, where: str) -> None:
        """Raise ``BenchError`` when the method's trainer cannot follow ``recipe`` (e.g. DOT and Nesterov)."""
        if cls.trainer_name is not None:
            get_trainer(cls.trainer_name).check_recipe(recipe, where)

    @torch.no_grad()
    def teacher_features(self, x: Tensor, preact: bool = False) -> Features:
        """Frozen teacher forward (offline methods). ``no_grad`` rather than ``inference_mode``: the
        outputs enter losses whose backward saves them. ``preact`` also returns the pre-activation stage
        outputs; such a call is not a plain ``forward_features(x)``, so a shared teacher pass or the teacher
        cache (which serve only those) leave it to the teacher."""
        return self.teacher.forward_features(x, preact=True) if preact else self.teacher.forward_features(x)

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

    def describe(self) -> dict[str, float]:
        out: dict[str, float] = {
            "student_params": count_parameters(self.student),
            "extra_params": self.extra_parameters(),
        }
        for modifier in self.logit_modifiers:
            out.update(modifier.describe())
        return out

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
    """Class decorator: register a ``Method`` subclass under its ``name`` (built-ins and plugins alike)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise BenchError(f"register_method: {cls!r} is not a subclass of methods.base.Method")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise BenchError(f"register_method: {cls.__qualname__} has no `name` (a non-empty string class attribute)")
    if cls.name in _METHODS:
        raise DuplicateName("method", cls.name, _METHODS[cls.name].__module__)
    if COMPOSE in cls.name:
        raise BenchError(f"register_method: {cls.name!r} contains {COMPOSE!r}, which composes modifiers (kd+ls)")
    _METHODS[cls.name] = cls
    return cls


COMPOSE = "+"  # joins a method with its modifiers and trainer: "dkd+ls+ctkd", "kd+dot"


def compose_name(method: str, modifiers: list[str] | tuple[str, ...] = (), trainer: str | None = None) -> str:
    return COMPOSE.join([method, *modifiers, *([trainer] if trainer else [])])


def split_name(name: str) -> tuple[str, tuple[str, ...], str | None]:
    """``"dkd+ls+ctkd+dot"`` → ``("dkd", ("ls", "ctkd"), "dot")``; ``BenchError`` for an unknown part, a
    repeated one, two trainers or a modifier after the trainer."""
    method, *parts = name.split(COMPOSE)
    modifiers: list[str] = []
    trainer = None
    for part in parts:
        if part in modifiers or part == trainer:
            raise BenchError(f"{name!r}: {part!r} given twice")
        if part in list_trainers():
            if trainer is not None:
                raise BenchError(f"{name!r}: two trainers ({trainer}, {part})")
            trainer = part
        elif trainer is not None:
            raise BenchError(f"{name!r}: the trainer {trainer!r} comes last")
        else:
            get_modifier(part)
            modifiers.append(part)
    return method, tuple(modifiers), trainer


def get_method(name: str) -> type[Method]:
    """The registered method ``name``, or the composed class of ``"method+modifier...+trainer"``."""
    method, modifiers, trainer = split_name(name)
    if method not in _METHODS:
        raise BenchError(f"unknown method {method!r} (known: {', '.join(sorted(_METHODS))})")
    if not modifiers and trainer is None:
        return _METHODS[method]
    return _composed(_METHODS[method], modifiers, trainer)


@functools.cache
def _composed(cls: type[Method], modifiers: tuple[str, ...], trainer: str | None) -> type[Method]:
    parts = [*((m, get_modifier(m)) for m in modifiers), *([(trainer, get_trainer(trainer))] if trainer else [])]
    for part, kind in parts:
        if part not in cls.accepts:
            takers = ", ".join(m for m in sorted(_METHODS) if part in _METHODS[m].accepts) or "none"
            raise BenchError(f"method {cls.name!r} does not accept {part!r} ({kind.scope}; methods that do: {takers})")
    name = compose_name(cls.name, modifiers, trainer)
    clash = {p for p, _ in parts} & {f.name for f in fields(cls.Hparams)}
    if clash:
        raise ValueError(f"{cls.name}: hyperparameter {sorted(clash)[0]!r} has the name of a modifier or trainer")
    hparams = make_dataclass(
        f"{cls.Hparams.__name__}[{name}]",
        [(part, kind.Hparams, field(default_factory=kind.Hparams)) for part, kind in parts],
        bases=(cls.Hparams,),
        namespace={"__module__": cls.Hparams.__module__},
    )
    namespace = {"name": name, "Hparams": hparams, "modifier_names": modifiers, "trainer_name": trainer,
                 "__module__": cls.__module__, "__doc__": f"{cls.name} composed with {', '.join(p for p, _ in parts)}."}  # fmt: skip
    return type(f"{cls.__name__}[{name}]", (cls,), namespace)


def list_methods() -> list[str]:
    return sorted(_METHODS)


def build_hparams(method: str, values: dict | None, where: str):
    """Validated hyperparameter dataclass of ``method`` from a mapping (defaults for missing keys)."""
    return from_mapping(get_method(method).Hparams, values or {}, where)
