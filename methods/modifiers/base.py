"""Modifiers and trainers: what a suite entry composes onto a method (``kd: {modifiers: [ls], trainer: dot}``).

- A **logit modifier** (``ls``, ``ctkd``) transforms the (student logits, teacher logits, temperature) that a
  logit-based method distils, through the one hook ``Method.distill_logits``. It is an ``nn.Module`` of the
  method, so its parameters (CTKD's temperature) are trained, checkpointed and counted in ``extra_params``.
- A **trainer** (``dot``) replaces the engine's default update (``bench.engine.SGDTrainer``): it decides how
  the step's named losses become a parameter update (``Method.make_trainer``).

Each lives in one file of this package and registers itself here; ``methods.base.get_method`` composes a
registered method with them under a name such as ``dkd+ls+ctkd`` or ``kd+dot``. A method lists what it
accepts in ``Method.accepts``; anything else is refused with one line when the suite is validated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.recipe import Recipe, Trainer


@dataclass
class LogitView:
    """What a logit-based method distils: student and teacher logits and the temperature (a float, a 0-dim
    tensor when it is learned, or None for a method without a single temperature)."""

    student: Tensor
    teacher: Tensor
    temperature: float | Tensor | None


class LogitModifier(nn.Module):
    """Base class of logit modifiers: subclasses set ``name``, ``Hparams`` (a dataclass), ``scope`` and implement
    ``forward``.

    ``scope``: what the modifier needs from a method, printed when a method refuses it."""

    name: ClassVar[str]
    Hparams: ClassVar[type]
    scope: ClassVar[str]

    def __init__(self, hparams) -> None:
        super().__init__()
        self.hp = hparams

    def forward(self, view: LogitView, epoch: int) -> LogitView:
        raise NotImplementedError

    def describe(self) -> dict[str, float]:
        """Final values worth recording beside the run's metrics (e.g. a learned temperature)."""
        return {}


class TrainerFactory:
    """Base class of trainers: subclasses set ``name``, ``Hparams``, ``scope`` and implement ``build``."""

    name: ClassVar[str]
    Hparams: ClassVar[type]
    scope: ClassVar[str]

    @classmethod
    def check_recipe(cls, recipe: "Recipe", where: str) -> None:
        """Raise ``BenchError`` for a recipe the trainer cannot follow (checked when a suite is expanded)."""

    @classmethod
    def build(cls, params: list[nn.Parameter], recipe: "Recipe", hparams) -> "Trainer":
        raise NotImplementedError


_MODIFIERS: dict[str, type[LogitModifier]] = {}
_TRAINERS: dict[str, type[TrainerFactory]] = {}


def _register(registry: dict, cls: type) -> type:
    if cls.name in _MODIFIERS or cls.name in _TRAINERS:
        raise ValueError(f"modifier or trainer {cls.name!r} registered twice")
    registry[cls.name] = cls
    return cls


def register_modifier(cls: type[LogitModifier]) -> type[LogitModifier]:
    return _register(_MODIFIERS, cls)


def register_trainer(cls: type[TrainerFactory]) -> type[TrainerFactory]:
    return _register(_TRAINERS, cls)


def get_modifier(name: str) -> type[LogitModifier]:
    if name not in _MODIFIERS:
        raise BenchError(f"unknown modifier {name!r} (known: {', '.join(sorted(_MODIFIERS)) or 'none'})")
    return _MODIFIERS[name]


def get_trainer(name: str) -> type[TrainerFactory]:
    if name not in _TRAINERS:
        raise BenchError(f"unknown trainer {name!r} (known: {', '.join(sorted(_TRAINERS)) or 'none'})")
    return _TRAINERS[name]


def list_modifiers() -> list[str]:
    return sorted(_MODIFIERS)


def list_trainers() -> list[str]:
    return sorted(_TRAINERS)
