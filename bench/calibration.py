"""Calibration measured when a run ends: reliability bins and post-hoc temperature scaling.

After training, ``final_calibration`` (called by ``bench.run.lifecycle.Run.finish``) saves the reliability bins of
the final student on the test split as ``reliability.json`` (run folder and MLflow artifact) and, when the
recipe holds out a validation split (``val_fraction`` > 0), fits a post-hoc temperature on it (Guo et al.
2017, "On Calibration of Modern Neural Networks", §4.2) and logs the test ECE/NLL after scaling
(``ece_ts``, ``nll_ts``, ``temperature_ts``). The report (``bench.report.calibration``) builds its sections and
the per-pair reliability diagrams from MLflow (and the run folders) only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.engine import Task, predict
from bench.metrics import RELIABILITY_FILE, classification_metrics, reliability_bins


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T)."""
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def final_calibration(method, task: Task, run_dir: Path | None) -> tuple[dict[str, float], list[Path]]:
    """Extra final metrics and artifact files for one finished run (see module docstring).

    Without a validation split no temperature is fitted (fitting it on the test split would flatter it);
    the tables say so. On several data-parallel workers every worker calls it (each predicts its shard, all
    receive the whole split's predictions) and only rank 0 passes ``run_dir`` (the others get nothing)."""
    logits, targets = predict(method.student, task.eval_loaders["test"], task.distributed)
    val = predict(method.student, task.eval_loaders["val"], task.distributed) if "val" in task.eval_loaders else None
    if run_dir is None:
        return {}, []
    path = run_dir / RELIABILITY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reliability_bins(logits, targets)))
    metrics: dict[str, float] = {}
    if val is not None:
        temperature = fit_temperature(*val)
        scaled = classification_metrics(logits / temperature, targets)
        metrics = {"temperature_ts": temperature, "ece_ts": scaled["ece"], "nll_ts": scaled["nll"]}
    return metrics, [path]
