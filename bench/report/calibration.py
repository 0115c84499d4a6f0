"""Calibration in the report: student top-1 beside ECE, the online teachers, ECE after post-hoc temperature
scaling (``calibration_sections``), and a reliability diagram per pair (``plot_reliability``), from the
reliability bins each run saved (``bench.calibration.final_calibration`` computes them when a run ends).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pandas as pd

from bench.metrics import RELIABILITY_FILE
from bench.report.cells import mean_std
from bench.suites import Suite
from bench.tracking import Tracker


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


def load_reliability(tracker: Tracker, run_id: str, run_dir: Path) -> dict[str, list[float]] | None:
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


def plot_reliability(tracker: Tracker, frame: pd.DataFrame, suite: Suite, out_dir: Path) -> list[Path]:
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


def _table(frame: pd.DataFrame, suite: Suite, labels: list[str], metrics: tuple[str, str]) -> str:
    """Rows pair × fraction, columns ``labels``, cells "metric₀ / metric₁" (mean ± std over finished seeds)."""
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


def calibration_sections(frame: pd.DataFrame, suite: Suite) -> list[str]:
    """Markdown sections: student top-1 next to ECE; the online teachers; ECE after temperature scaling."""
    labels = [m.label for m in suite.methods]
    parts = ["## Student test top-1 (%) / ECE (%), final epoch", _table(frame, suite, labels, ("top1", "ece"))]
    done = frame[(frame.status == "finished") & (frame.fraction == max(suite.fractions))]
    parts += [f"![Reliability diagrams, {p.label}]({reliability_path(Path(), p.teacher, p.student).name})"
              for p in suite.pairs if ((done.teacher == p.teacher) & (done.student == p.student)).any()]  # fmt: skip
    online = [m.label for m in suite.methods if m.teacher_mode == "online"]
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
