"""Shared by the plugin tests: ``isolated`` undoes, after a test, every registration and plugin it loaded in this
process (methods, models, datasets, declared generic models, plugin modules)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import plugins
from bench.models import generic

KD2 = '''"""A test plugin: KD with a weight of its own."""
from dataclasses import dataclass

import torch.nn.functional as F

from methods.base import Method, register_method
from methods.kd import kd_loss


@dataclass
class KD2Hparams:
    weight: float = 1.0


@register_method
class KD2(Method):
    name = "{name}"
    Hparams = KD2Hparams

    def forward_train(self, x, y):
        logits = self.student(x)
        return logits, {{"ce": F.cross_entropy(logits, y), "kd": self.hp.weight * kd_loss(logits, self.teacher_features(x).logits)}}
'''


def write_plugin(folder: Path, stem: str = "kd2", name: str = "kd2", text: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(KD2.format(name=name) if text is None else text)
    return path


@pytest.fixture
def isolated():
    registries = plugins._snapshot()
    loaded = dict(plugins._LOADED)
    declared = dict(generic._DECLARED)
    yield
    for kind, registry in plugins._REGISTRIES.items():
        registry.clear()
        registry.update(registries[kind])
    for name in set(plugins._LOADED) - set(loaded):
        sys.modules.pop(name, None)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)
    generic._DECLARED.clear()
    generic._DECLARED.update(declared)
