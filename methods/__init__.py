"""Distillation methods: one module per method, each a pure loss function plus a thin adapter.

Importing this package registers every method; ``get_method(name)`` returns its class.
"""
import importlib
import pkgutil

from methods.base import (
    Method,
    MethodContext,
    build_hparams,
    compose_name,
    get_method,
    list_methods,
    register_method,
    split_name,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "MethodContext", "build_hparams", "compose_name", "get_method", "list_methods", "register_method",
           "split_name"]
