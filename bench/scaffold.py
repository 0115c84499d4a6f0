"""``python -m bench new method NAME [--plugin DIR]``: a new method's file and its tests, in the layout every
method follows (a pure loss function of tensors + a thin adapter class).

Into this checkout: ``methods/NAME.py`` (registered when ``methods`` is imported) and ``tests/test_NAME.py``.
With ``--plugin DIR``: ``DIR/NAME.py`` (a plugin: ``--plugin DIR/NAME.py`` or a suite's ``plugins:`` load it)
and ``DIR/test_NAME.py``. The tests check the loss against a value computed by hand and run one epoch on digits
through the Python API. The loss starts as Hinton's KD, so the tests pass before it is changed. Nothing is
overwritten; a bad name writes nothing.

Not here: loading plugins (``bench.plugins``).
"""
from __future__ import annotations

import keyword
from pathlib import Path

from bench.errors import BenchError

METHOD = '''"""``{name}``: <what the method does, and the paper it comes from: authors, venue, year, equation>.

Written by ``python -m bench new method {name}``: the loss below is Hinton et al.'s KD (2015, eq. 2 with the T²
factor of §2) until you change it. Where the paper is silent, say so here under "Our reading of the paper" and
make the choice a hyperparameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError
from methods.base import Method, register_method


def {name}_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """The method's loss, a pure function of tensors: T²·KL(p_t ‖ p_s) with p = softmax(logits / T), summed
    over classes, mean over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * temperature**2


@dataclass
class {camel}Hparams:
    temperature: float = 4.0
    ce_weight: float = 0.1
    loss_weight: float = 0.9

    def validate(self, where: str) -> None:
        if self.temperature <= 0:
            raise BenchError(f"{{where}}.temperature: must be > 0, got {{self.temperature}}")


@register_method
class {camel}(Method):
    """The adapter: student (and teacher) forward, then the loss."""

    name = "{name}"
    Hparams = {camel}Hparams
    teacher_mode = "offline"  # "none": the student alone; "online": the teacher trains with the student

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        teacher_logits = self.teacher_features(x).logits
        hp = self.hp
        return logits, {{
            "ce": hp.ce_weight * F.cross_entropy(logits, y),
            "{name}": hp.loss_weight * {name}_loss(logits, teacher_logits, hp.temperature),
        }}
'''

TEST = '''"""``{name}``: its loss against a value computed by hand, and one epoch on digits end to end."""
import math

import pytest
import torch

{imports}

def test_{name}_loss_matches_a_hand_computed_value():
    # two classes, T = 1: p_t = softmax([0, ln 3]) = [1/4, 3/4], p_s = softmax([0, 0]) = [1/2, 1/2]
    # KL(p_t ‖ p_s) = 1/4 · ln((1/4) / (1/2)) + 3/4 · ln((3/4) / (1/2))
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    assert {name}_loss(student, teacher, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    assert {name}_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_{name}_trains_one_epoch_on_digits(tmp_path):
    from bench import api

    suite = {{
        "name": "{name}-smoke", "dataset": "digits", "pairs": [{{"teacher": "resnet8", "student": "resnet8"}}],
        "methods": ["kd", "{name}"], "fractions": [0.3], "seeds": [0],
        "recipe": {{"epochs": 1, "milestones": [], "batch_size": 128}}, "teacher": {{"recipe": {{"epochs": 1}}}},
    }}
    runs = api.run_suite(suite, plugins=PLUGINS, results_dir=tmp_path, progress=False, log=lambda *_: None)
    assert runs.label.tolist() == ["kd", "{name}"] and (runs.status == "finished").all()
    assert runs.top1.between(0, 100).all()
'''

REPO_IMPORTS = '''from methods.{name} import {name}_loss

PLUGINS: list[str] = []  # methods/ is part of kdbench
'''

PLUGIN_IMPORTS = '''import importlib
from pathlib import Path

from bench.plugins import load

PLUGINS = [str(Path(__file__).with_name("{name}.py"))]
load(PLUGINS)  # registers the method; the file is then importable as module {name}
{name}_loss = importlib.import_module("{name}").{name}_loss
'''


def checkout_root() -> Path:
    """The source checkout kdbench runs from (``methods/`` and ``tests/`` side by side)."""
    import methods

    root = Path(methods.__file__).resolve().parent.parent
    if not ((root / "tests").is_dir() and (root / "pyproject.toml").is_file()):
        raise BenchError(f"kdbench is installed in {root}, not a source checkout: write a plugin with --plugin DIR")
    return root


def new_method(name: str, plugin_dir: Path | None = None) -> list[Path]:
    """Write the method ``name`` and its tests (module docstring); returns the files written."""
    from methods import list_methods

    if not name.isidentifier() or name != name.lower() or keyword.iskeyword(name):
        raise BenchError(f"method name {name!r}: use a lower-case Python identifier (e.g. my_kd)")
    if name in list_methods():
        raise BenchError(f"method {name!r} exists already (`python -m bench list methods`)")
    if plugin_dir is None:
        root = checkout_root()
        method_file, test_file, imports = root / "methods" / f"{name}.py", root / "tests" / f"test_{name}.py", REPO_IMPORTS
    else:
        folder = plugin_dir.expanduser()
        method_file, test_file, imports = folder / f"{name}.py", folder / f"test_{name}.py", PLUGIN_IMPORTS
    for path in (method_file, test_file):
        if path.exists():
            raise BenchError(f"{path} exists already; nothing written")
    camel = "".join(part.capitalize() for part in name.split("_") if part) or name
    method_file.parent.mkdir(parents=True, exist_ok=True)
    method_file.write_text(METHOD.format(name=name, camel=camel))
    test_file.write_text(TEST.format(name=name, imports=imports.format(name=name)))
    return [method_file, test_file]
