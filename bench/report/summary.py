"""The suite-level summary: per method, the probability of improving on the baseline, the interquartile mean (IQM)
of its final-epoch top-1 and how often it ranks first, each over the cells (pair × fraction) of the suite with a
95 % stratified-bootstrap interval (``bench.stats``: seeds resampled within each cell and method; seeded, so a
report is reproducible); the markdown section and ``summary.png``.

P(improve) of a method is the average over the cells both it and the baseline ran of P(X > Y) + ½·P(X = Y),
X one of its seeds and Y one of the baseline's (0.5: no tendency). IQM and rank use the cells every method ran
(a pair's ``exclude`` drops that cell from both), so the methods are compared on the same cells. Not here: the
per-cell verdicts (``bench.report.verdicts``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.cells import cell_runs, interval
from bench.stats import NAN, Interval, aggregate_improvement, aggregate_iqm, rank_first
from bench.suites import Suite


@dataclass
class MethodSummary:
    label: str
    improve: Interval  # P(improve on the baseline); NaN for the baseline itself
    improve_cells: int
    iqm: Interval
    first: Interval  # share of the cells where its mean top-1 is the highest
    cells: int  # cells every method ran (IQM and rank)


def _top1(frame: pd.DataFrame, pair, fraction: float, label: str) -> np.ndarray:
    return cell_runs(frame, pair.teacher, pair.student, fraction, label)["top1"].dropna().to_numpy(dtype=float)


def method_summaries(frame: pd.DataFrame, suite: Suite) -> list[MethodSummary]:
    """One summary per method of the suite (module docstring); none when no cell has runs."""
    labels = [m.label for m in suite.methods]
    grid = {(pair.label, f): {lab: _top1(frame, pair, f, lab) for lab in labels}
            for pair in suite.pairs for f in suite.fractions}  # fmt: skip
    common = [cell for cell in grid.values() if all(len(v) for v in cell.values())]
    if not any(len(v) for cell in grid.values() for v in cell.values()):
        return []
    first = rank_first([[cell[lab] for lab in labels] for cell in common]) if common else None
    out = []
    for k, label in enumerate(labels):
        improve, n_improve = (NAN, NAN, NAN), 0
        if suite.baseline is not None and label != suite.baseline:
            pairs = [(c[label], c[suite.baseline]) for c in grid.values() if len(c[label]) and len(c[suite.baseline])]
            improve, n_improve = aggregate_improvement(pairs), len(pairs)
        iqm = aggregate_iqm([c[label] for c in common]) if common else (NAN, NAN, NAN)
        share = (float(first[0][k]), float(first[1][k]), float(first[2][k])) if first is not None else (NAN, NAN, NAN)
        out.append(MethodSummary(label, improve, n_improve, iqm, share, len(common)))
    return out


def summary_section(summaries: list[MethodSummary], suite: Suite) -> str:
    """Markdown: a row per method with its three aggregates and their intervals."""
    cells = summaries[0].cells
    total = len(suite.pairs) * len(suite.fractions)
    lines = [f"Over the {total} cell(s) (pair × fraction); IQM and rank over the {cells} cell(s) every method ran. "
             "95 % stratified-bootstrap intervals (2000 resamples of the seeds within each cell, seeded).", "",
             f"| method | P(improve on {suite.baseline or '—'}) | cells | IQM top-1 (%) | ranks first (share of "
             "cells) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        improve = "baseline" if s.label == suite.baseline else (interval(*s.improve) if s.improve_cells else "—")
        lines.append(f"| {s.label} | {improve} | {s.improve_cells or '—'} | {interval(*s.iqm)} "
                     f"| {interval(*s.first)} |")
    return "\n".join(lines)


def plot_summary(summaries: list[MethodSummary], suite: Suite, path: Path) -> None:
    """``summary.png``: the three aggregates per method as points with their intervals (as rliable draws them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("improve", f"P(improve on {suite.baseline})", True), ("iqm", "IQM of final test top-1 (%)", False),
              ("first", "share of cells ranked first", True)]  # fmt: skip
    if suite.baseline is None:
        panels = panels[1:]
    labels = [s.label for s in summaries]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(labels) + 1.4), squeeze=False)
    for ax, (field, title, share) in zip(axes.flat, panels):
        for y, s in enumerate(summaries):
            est, low, high = getattr(s, field)
            if math.isnan(est):
                continue
            if not math.isnan(low):
                ax.plot([low, high], [y, y], color="tab:blue", lw=6, alpha=0.35, solid_capstyle="butt")
            ax.plot([est], [y], "o", color="tab:blue", ms=5)
        if share:  # a probability or a share: the whole [0, 1], 0.5 marked for P(improve)
            ax.set_xlim(-0.03, 1.03)
            if field == "improve":
                ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{suite.name}: {summaries[0].cells} cell(s) every method ran, 95 % stratified-bootstrap intervals",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
