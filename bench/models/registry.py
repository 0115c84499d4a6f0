"""Model registry in the style of timm: ``@register_model`` on a constructor, ``create_model(name)``.

Names are the CRD / mdistiller ones (``resnet8x4``, ``wrn_40_2``, ``vgg13``, ...). Two prefixes reach
outside the zoo: ``tv:<name>`` builds a torchvision ImageNet model and ``timm:<name>`` any timm model,
both wrapped to the same staged interface.
"""
from __future__ import annotations

from typing import Callable

from bench.errors import BenchError, DuplicateName
from bench.models.base import StagedNet

ModelFactory = Callable[..., StagedNet]
_REGISTRY: dict[str, ModelFactory] = {}
_PREFIXES: dict[str, Callable[..., StagedNet]] = {}


def register_model(fn: ModelFactory | None = None, *, name: str | None = None):
    """Register ``fn(num_classes, in_channels, **kwargs) -> StagedNet`` under ``name`` (default fn name)."""

    def wrap(f: ModelFactory) -> ModelFactory:
        key = name or f.__name__
        if key in _REGISTRY:
            raise DuplicateName("model", key, _REGISTRY[key].__module__)
        _REGISTRY[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def register_prefix(prefix: str, factory: Callable[..., StagedNet]) -> None:
    """``factory(name, num_classes, in_channels, **kwargs)`` serves every ``<prefix>:<name>``."""
    if prefix in _PREFIXES:
        raise DuplicateName("model prefix", prefix, _PREFIXES[prefix].__module__)
    _PREFIXES[prefix] = factory


def list_models() -> list[str]:
    return sorted(_REGISTRY) + [f"{p}:<name>" for p in sorted(_PREFIXES)]


def is_known_model(name: str) -> bool:
    if ":" in name:
        return name.split(":", 1)[0] in _PREFIXES
    return name in _REGISTRY


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> StagedNet:
    if ":" in name:
        prefix, inner = name.split(":", 1)
        if prefix not in _PREFIXES:
            raise BenchError(f"unknown model prefix {prefix!r} in {name!r} (known: {sorted(_PREFIXES)})")
        return _PREFIXES[prefix](inner, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name not in _REGISTRY:
        raise BenchError(f"unknown model {name!r}; `python -m bench list models` shows the zoo")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
