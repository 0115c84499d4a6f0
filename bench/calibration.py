"""Calibration reporting for every run: reliability bins, post-hoc temperature scaling, tables and diagrams.

After training, ``final_calibration`` (called by ``bench.runner.execute_spec``) saves the reliability bins of
the final student on the test split as ``reliability.json`` (run folder and MLflow artifact) and, when the
recipe holds out a validation split (``val_fraction`` > 0), fits a post-hoc temperature on it (Guo et al.
2017, "On Calibration of Modern Neural Networks", §4.2) and logs the test ECE/NLL after scaling
(``ece_ts``, ``nll_ts``, ``temperature_ts``). The table builder (``bench.tables``) adds the sections of
``calibration_sections`` and the per-pair reliability diagrams of ``plot_reliability``, both built from
MLflow (and the run folders) only.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.engine import Task, predict
from bench.metrics import classification_metrics, reliability_bins

if TYPE_CHECKING:
    import pandas as pd

    from bench.suites import Suite
    from bench.tracking import Tracker

RELIABILITY_FILE = "reliability.json"


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


def final_calibration(method, task: Task, run_dir: Path) -> tuple[dict[str, float], list[Path]]:
    """Extra final metrics and artifact files for one finished run (see module docstring).

    Without a validation split no temperature is fitted (fitting it on the test split would flatter it);
    the tables say so."""
    logits, targets = predict(method.student, task.eval_loaders["test"])
    path = run_dir / RELIABILITY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reliability_bins(logits, targets)))
    metrics: dict[str, float] = {}
    if "val" in task.eval_loaders:
        temperature = fit_temperature(*predict(method.student, task.eval_loaders["val"]))
        scaled = classification_metrics(logits / temperature, targets)
        metrics = {"temperature_ts": temperature, "ece_ts": scaled["ece"], "nll_ts": scaled["nll"]}
    return metrics, [path]


# --------------------------------------------------------------------------------------------------
# Tables and reliability diagrams (called from bench.tables)
# --------------------------------------------------------------------------------------------------
def is_online(method: str) -> bool:
    """Whether a registered method trains its teacher together with the student."""
    from methods import get_method

    return get_method(method).teacher_mode == "online"


def pool_bins(bins: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Reliability bins of several runs (e.g. seeds) merged as if their test predictions were pooled."""
    n_bins = len(bins[0]["count"])
    count = [sum(b["count"][i] for b in bins) for i in range(n_bins)]

    def weighted(key: str) -> list[float]:
        return [sum(b["count"][i] * b[key][i] for b in bins) / count[i] if count[i] else 0.0 for i in range(n_bins)]

    return {"count": count, "confidence": weighted("confidence"), "accuracy": weighted("accuracy")}


def bins_ece(bins: dict[str, list[float]]) -> float:
    """ECE (percent) from reliability bins: sum_b |B_b|/N·|acc_b − conf_b|."""
    total = sum(bins["count"])
    gaps = (n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]))
    return 100.0 * sum(gaps) / total if total else math.nan


def load_reliability(tracker: "Tracker", run_id: str, run_dir: Path) -> dict[str, list[float]] | None:
    """A run's reliability bins: its MLflow artifact (tied to the exact run), else its run folder's copy."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = tracker.client.download_artifacts(run_id, RELIABILITY_FILE, tmp)
            return json.loads(Path(local).read_text())
    except Exception:  # artifact store moved or unreachable, artifact never logged
        path = run_dir / RELIABILITY_FILE
        return json.loads(path.read_text()) if path.exists() else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def reliability_path(out_dir: Path, teacher: str, student: str) -> Path:
    return out_dir / f"reliability-{_slug(teacher)}-{_slug(student)}.png"


def plot_reliability(tracker: "Tracker", frame: "pd.DataFrame", suite: "Suite", out_dir: Path) -> list[Path]:
    """``reliability-<teacher>-<student>.png`` per pair: one panel per method (its student on the test split,
    largest fraction, seeds pooled), accuracy bars, gap bars to the mean confidence, and the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fraction = max(suite.fractions)
    done = frame[(frame.status == "finished") & (frame.fraction == fraction)]
    labels = [m.label for m in suite.methods]
    written = []
    for pair in suite.pairs:
        sel = done[(done.teacher == pair.teacher) & (done.student == pair.student)]
        if sel.empty:
            continue
        fig, axes = plt.subplots(1, len(labels), figsize=(3.0 * len(labels), 3.2), squeeze=False)
        for ax, label in zip(axes.flat, labels):
            runs = sel[sel.label == label]
            found = [load_reliability(tracker, r.run_id, out_dir / "runs" / r.spec_hash) for r in runs.itertuples()]
            found = [b for b in found if b is not None]
            ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            if not found:
                ax.set_title(f"{label}\n(no runs)", fontsize=9)
                continue
            bins = pool_bins(found)
            width = 1.0 / len(bins["count"])
            centers = [(i + 0.5) * width for i in range(len(bins["count"]))]
            used = [i for i, n in enumerate(bins["count"]) if n > 0]
            acc = [bins["accuracy"][i] for i in used]
            conf = [bins["confidence"][i] for i in used]
            x = [centers[i] for i in used]
            ax.bar(x, acc, width=width, color="tab:blue", edgecolor="black", lw=0.5, label="outputs")
            gap = [c - a for a, c in zip(acc, conf)]
            ax.bar(x, gap, bottom=acc, width=width, color="tab:red", alpha=0.35, edgecolor="tab:red",
                   hatch="//", lw=0.5, label="gap")  # fmt: skip
            ax.set_title(f"{label}\nECE {bins_ece(bins):.2f}% ({len(found)} seed{'s' * (len(found) > 1)})", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
        fig.suptitle(f"{pair.label}, test split, {fraction:g} of train", fontsize=10)
        fig.tight_layout()
        path = reliability_path(out_dir, pair.teacher, pair.student)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _table(frame: "pd.DataFrame", suite: "Suite", labels: list[str], metrics: tuple[str, str]) -> str:
    """Rows pair × fraction, columns ``labels``, cells "metric₀ / metric₁" (mean ± std over finished seeds)."""
    from bench.tables import mean_std

    header = ["pair", "fraction", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair in suite.pairs:
        for fraction in suite.fractions:
            sel = frame[(frame.teacher == pair.teacher) & (frame.student == pair.student) & (frame.fraction == fraction)]
            cells = [pair.label, f"{fraction:g}"]
            for label in labels:
                done = sel[(sel.label == label) & (sel.status == "finished")]
                values = [mean_std(done[m], len(suite.seeds)) if m in done else "—" for m in metrics]
                cells.append(" / ".join(values) if len(done) else "—")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_sections(frame: "pd.DataFrame", suite: "Suite") -> list[str]:
    """Markdown sections: student top-1 next to ECE; the online teachers; ECE after temperature scaling."""
    labels = [m.label for m in suite.methods]
    parts = ["## Student test top-1 (%) / ECE (%), final epoch", _table(frame, suite, labels, ("top1", "ece"))]
    online = [m.label for m in suite.methods if is_online(m.name)]
    if online:
        parts += [
            "## Online teachers (trained with the student from scratch): test top-1 (%) / ECE (%), final epoch",
            _table(frame, suite, online, ("teacher_top1", "teacher_ece")),
        ]
    if suite.recipe.val_fraction > 0 and "ece_ts" in frame and frame["ece_ts"].notna().any():
        parts += [
            "## Post-hoc temperature scaling (T fitted on the validation split): student ECE (%) before / after",
            _table(frame, suite, labels, ("ece", "ece_ts")),
        ]
    else:
        parts.append("Post-hoc temperature scaling: not run (it needs a validation split: `recipe.val_fraction` > 0).")
    return parts
