"""A suite's ``methods:`` list: each entry names a method, composed with logit modifiers and a trainer where the
entry says so (``kd: {modifiers: [ls]}`` → the method ``kd+ls``, :mod:`methods.modifiers`), with its label,
hyperparameter overrides (a modifier's under its name) and recipe overrides. ``method_entries`` validates the
list with one-line errors naming the field; the rest of the suite schema is ``bench.suites``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError
from methods import build_hparams, compose_name, get_method
from methods.modifiers.base import get_modifier, get_trainer


@dataclass
class MethodEntry:
    """One column of the table: a method (a registered one, or one composed with modifiers and a trainer:
    ``dkd+ls+ctkd``), its label, hyperparameter overrides (a modifier's under its name) and recipe overrides
    (applied after the pair's)."""

    name: str
    label: str
    hparams: dict[str, Any] = field(default_factory=dict)
    teacher_mode: str = "offline"  # the method's: "none", "offline" or "online" (the tables need to know)
    recipe: dict[str, Any] = field(default_factory=dict)  # recipe overrides of this method (after the pair's)


def merge_hparams(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``; a modifier's mapping is merged key by key, not replaced."""
    return {**base, **{k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in override.items()}}  # fmt: skip


COMPOSITION_KEYS = ("modifiers", "trainer")  # beside a method's hyperparameters in a suite entry


def _named(item: Any, what: str, where: str) -> tuple[str, dict[str, Any]]:
    """A modifier / trainer given as ``name`` or ``{name: {hyperparameter: value}}``."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        ((name, values),) = item.items()
        if isinstance(name, str) and (values is None or isinstance(values, dict)):
            return name, dict(values or {})
    raise BenchError(f"{where}: expected a {what} name or {{{what}: {{hyperparameter: value}}}}, got {item!r}")


def _compose(name: str, composition: dict[str, Any], hparams: dict[str, Any], where: str) -> tuple[str, dict]:
    """The composed method name (``kd+ls+dot``) and the hyperparameters with each modifier's under its name."""
    raw = composition.get("modifiers") or []
    if not isinstance(raw, list):
        raise BenchError(f"{where}.modifiers: expected a list, got {raw!r}")
    modifiers = [_named(m, "modifier", f"{where}.modifiers[{i}]") for i, m in enumerate(raw)]
    trainer = composition.get("trainer")
    trainer = _named(trainer, "trainer", f"{where}.trainer") if trainer is not None else None
    for key, (part, _), check in [*(("modifiers", m, get_modifier) for m in modifiers),
                                  *([("trainer", trainer, get_trainer)] if trainer else [])]:  # fmt: skip
        try:
            check(part)
        except BenchError as err:
            raise BenchError(f"{where}.{key}: {err}") from None
    parts = modifiers + ([trainer] if trainer else [])
    composed = compose_name(name, [m for m, _ in modifiers], trainer[0] if trainer else None)
    return composed, {**hparams, **{part: values for part, values in parts}}


def method_entries(raw: Any, where: str) -> list[MethodEntry]:
    """The validated entries of a suite's ``methods:`` list (module docstring)."""
    if not isinstance(raw, list) or not raw:
        raise BenchError(f"{where}: must be a non-empty list of methods")
    entries = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        label, composition, recipe = None, {}, {}
        if isinstance(item, str):
            name, hparams = item, {}
        elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
            ((name, hparams),) = item.items()
            if hparams is not None and not isinstance(hparams, dict):
                raise BenchError(f"{w}.{name}: expected a mapping of hyperparameters, got {hparams!r}")
            hparams = dict(hparams or {})
            composition = {k: hparams.pop(k) for k in COMPOSITION_KEYS if k in hparams}
        elif isinstance(item, dict) and "name" in item:
            item = dict(item)
            name = item.pop("name")
            label = item.pop("label", None)
            hparams = item.pop("hparams", None) or {}
            recipe = item.pop("recipe", {}) or {}
            composition = {k: item.pop(k) for k in COMPOSITION_KEYS if k in item}
            if item:
                raise BenchError(f"{w}: unknown key {sorted(item)[0]!r} (allowed: name, label, hparams, recipe, "
                                 "modifiers, trainer)")  # fmt: skip
            if not isinstance(recipe, dict):
                raise BenchError(f"{w}.recipe: expected a mapping of recipe fields, got {recipe!r}")
        else:
            raise BenchError(f"{w}: expected a method name or a mapping {{name: {{hparam: value}}}}")
        if not isinstance(name, str):
            raise BenchError(f"{w}: method name must be a string, got {name!r}")
        if not isinstance(hparams, dict):
            raise BenchError(f"{w}.hparams: expected a mapping, got {hparams!r}")
        name, hparams = _compose(name, composition, hparams, w)
        try:
            cls = get_method(name)
        except BenchError as err:
            raise BenchError(f"{w}: {err}") from None
        build_hparams(name, hparams, f"{w}.{name}")  # validate now
        entries.append(MethodEntry(name, str(label if label is not None else name), dict(hparams), cls.teacher_mode,
                                   dict(recipe)))  # fmt: skip
    labels = [e.label for e in entries]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise BenchError(f"{where}: label {dupes[0]!r} used twice; give entries distinct `label`s")
    return entries
