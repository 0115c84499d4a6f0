"""Logit modifiers (``ls``, ``ctkd``) and trainers (``dot``) that suite entries compose onto methods.

One file each; importing this package registers them (:mod:`methods.modifiers.base` explains the two kinds).
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
