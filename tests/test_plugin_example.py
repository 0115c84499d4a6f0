"""The example plugin (``examples/plugin/``) as a user runs it: its suite through the default Ray executor (every
trial loads the plugins from what the driver carries), its KD variant in the tables beside ``kd``, its tiny CNN
(a plain ``nn.Module``) trained as a student by name and through the generic wrapper with FitNet; and its loss
against a value computed by hand."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import plugins
from tests.plugin_fixtures import isolated  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugin"


def test_kd_smooth_loss_by_hand(isolated):
    plugins.load([str(EXAMPLE / "kd_smooth.py")])
    from kd_smooth import kd_smooth_loss

    from methods.kd import kd_loss

    # two classes, T = 1, ε = 0.2: p_t = softmax([0, ln 3]) = [1/4, 3/4] → p̃_t = 0.8·p_t + 0.1 = [0.3, 0.7];
    # p_s = [1/2, 1/2]; KL(p̃_t ‖ p_s) = 0.3·ln(0.6) + 0.7·ln(1.4)
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.3 * math.log(0.6) + 0.7 * math.log(1.4)
    assert kd_smooth_loss(student, teacher, 1.0, 0.2).item() == pytest.approx(expected, rel=1e-5)
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    target = torch.randn(5, 10, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(kd_smooth_loss(logits, target, 4.0, 0.0), kd_loss(logits, target, 4.0))


def test_the_example_suite_runs_under_ray_and_lands_beside_kd(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", str(EXAMPLE / "suite.yaml"), "--results", str(results), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "on Ray Tune" in proc.stdout
    runs = pd.read_csv(results / "plugin-example" / "runs.csv")
    assert (runs.status == "finished").all() and len(runs) == 8
    assert set(runs.student) == {"tinycnn", "TinyCNN(width=8)"}
    assert runs.top1.between(0, 100).all() and runs[runs.method == "fitnet"].top1.notna().all()
    table = (results / "plugin-example" / "tables.md").read_text()
    assert "| pair | fraction | teacher | ce | kd | kd_smooth | fitnet |" in table
    assert "| resnet8→TinyCNN(width=8) | 0.5 |" in table
