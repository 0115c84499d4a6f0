"""Convergence curves: mean test top-1 per epoch for each method, one panel per pair × fraction
(``convergence.png``). Reliability diagrams are in ``bench.report.calibration``."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.suites import Suite
from bench.tracking import Tracker


def plot_convergence(tracker: Tracker, frame: pd.DataFrame, suite: Suite, path: Path) -> None:
    """Mean test top-1 per epoch for each method, one panel per pair × fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, f) for p in suite.pairs for f in suite.fractions]
    cols = min(len(suite.fractions), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    done = frame[frame.status == "finished"]
    for ax, (pair, fraction) in zip(axes.flat, panels):
        sel = done[(done.teacher == pair.teacher) & (done.student == pair.student) & (done.fraction == fraction)]
        for label in [m.label for m in suite.methods]:
            curves = [tracker.metric_history(rid, "test_top1") for rid in sel[sel.label == label].run_id]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = np.mean([c[:length] for c in curves], axis=0)
            ax.plot(range(1, length + 1), mean, label=label)
        if suite.target_top1 is not None:
            ax.axhline(suite.target_top1, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{pair.label}, {fraction:g} of train", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
