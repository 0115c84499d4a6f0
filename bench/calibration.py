"""Calibration reporting for every run: reliability bins of the final student on the test split.

``final_calibration`` runs after training (see ``bench.runner.execute_spec``); its bins are saved as
``reliability.json`` in the run folder and logged to MLflow, from which the tables draw reliability
diagrams.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.engine import Task, predict
from bench.metrics import reliability_bins


def final_calibration(method, task: Task, run_dir: Path) -> tuple[dict[str, float], list[Path]]:
    """Extra final metrics and artifact files for one finished run."""
    logits, targets = predict(method.student, task.eval_loaders["test"])
    path = run_dir / "reliability.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reliability_bins(logits, targets)))
    return {}, [path]
