"""Building typed dataclasses from plain mappings (YAML), with one-line errors that name the field."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from bench.errors import BenchError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int→float widening allowed) and return it."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors, shaped = [], None
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, where)
            except BenchError as err:
                errors.append(str(err))
                if isinstance(value, Mapping) and dataclasses.is_dataclass(option):
                    shaped = err  # a mapping meant for this dataclass: its own error says what is wrong
        if shaped is not None:
            raise shaped
        raise BenchError(f"{where}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise BenchError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise BenchError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BenchError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise BenchError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {str(k): coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BenchError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BenchError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise BenchError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise BenchError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def from_mapping(cls: type[T], mapping: Any, where: str, base: T | None = None) -> T:
    """Instantiate dataclass ``cls`` from ``mapping``; unknown keys and wrong types are BenchErrors.

    Fields missing from ``mapping`` take their value from ``base`` if given, else the default.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise BenchError(f"{where}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(fields)})")
    values = {name: coerce(mapping[name], hints[name], f"{where}.{name}") for name in fields if name in mapping}
    if base is not None:
        values = {**{n: getattr(base, n) for n in fields}, **values}
    try:
        obj = cls(**values)
    except TypeError as err:  # a required field is missing
        raise BenchError(f"{where}: {err}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON-able data (lists, not tuples)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check_fields(obj: Any, where: str, checks: list[tuple[bool, str, str]]) -> None:
    """Raise ``BenchError`` for the first failed ``(ok, field, message)`` check of a config dataclass:
    ``"<where>.<field>: <message>, got <value>"``."""
    for ok, name, msg in checks:
        if not ok:
            raise BenchError(f"{where}.{name}: {msg}, got {getattr(obj, name)!r}")
