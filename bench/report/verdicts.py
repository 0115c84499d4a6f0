"""Verdicts in the report: each method against the suite's baseline (paired by seed), our accuracy against the
published one (*reproduced*, *below*, *above*), the same for published convergence figures, and the rows of
``summary.csv``.

A published top-1 is *reproduced* when our mean is within the suite's ``tolerance`` (points) of it or it lies
inside our 95 % interval; otherwise ours is *below* or *above* it. Ours is taken at the epoch the reference
names (``best``, the default, or ``final``). Epochs to the target are *reproduced* within one epoch (their
resolution) or inside our interval; a speed-up (the baseline's epochs to target over the method's, per seed,
geometric mean) when the published one lies inside our interval. Intervals: ``bench.stats``; which seed pairs
with which: ``bench.stats.paired_difference_ci``. Not here: the suite-level aggregates (``bench.report.summary``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.references import Reference
from bench.report.cells import cell_runs, interval, mean_ci_text
from bench.stats import Interval, mean_ci, paired_difference_ci
from bench.suites import Pair, Suite

EPOCH_METRIC = {"best": "best_top1", "final": "top1"}
SUMMARY_COLUMNS = [
    "teacher", "student", "method", "fraction", "n_seeds", "top1_mean", "top1_std", "top1_ci_low", "top1_ci_high",
    "baseline", "delta", "delta_ci_low", "delta_ci_high", "reference", "reference_source", "reference_delta",
    "verdict",
]  # fmt: skip


def verdict(mean: float, low: float, high: float, reference: float, tolerance: float) -> str:
    """*reproduced* when |mean − reference| ≤ tolerance or the reference lies in [low, high], else *below* /
    *above*; "—" without a mean."""
    if math.isnan(mean):
        return "—"
    if abs(mean - reference) <= tolerance or (not math.isnan(low) and low <= reference <= high):
        return "reproduced"
    return "below" if mean < reference else "above"


def paired_to_baseline(frame: pd.DataFrame, pair: Pair, fraction: float, label: str, baseline: str,
                       metric: str = "top1") -> tuple[Interval, int]:  # fmt: skip
    """``label`` − ``baseline`` on one cell, paired by seed over the seeds both finished; and how many."""
    a = cell_runs(frame, pair.teacher, pair.student, fraction, label)[metric].dropna()
    b = cell_runs(frame, pair.teacher, pair.student, fraction, baseline)[metric].dropna()
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return (math.nan, math.nan, math.nan), 0
    return paired_difference_ci(a.loc[seeds].astype(float), b.loc[seeds].astype(float)), len(seeds)


def marked(diff: Interval, n: int, expected: int) -> str:
    """A difference with its interval, ▲ / ▼ where the interval excludes 0, and how many seeds paired. Every
    seed giving the same difference (a zero-width interval: with few seeds and accuracy counted in whole test
    images, often one image) is said so and not marked: no spread was measured, so none is excluded."""
    if not math.isnan(diff[1]) and diff[1] == diff[2]:
        text = f"{diff[0]:+.2f} (the same on each seed)"
    else:
        text = interval(*diff, signed=True)
        if not math.isnan(diff[1]) and (diff[1] > 0 or diff[2] < 0):
            text += " ▲" if diff[1] > 0 else " ▼"
    return text + (f" ({n}/{expected} paired)" if 0 < n < expected else "")


def baseline_table(frame: pd.DataFrame, suite: Suite) -> str | None:
    """Rows pair × fraction, a column per method but the baseline: final-epoch top-1 minus the baseline's."""
    if suite.baseline is None:
        return None
    labels = [m.label for m in suite.methods if m.label != suite.baseline]
    header = ["pair", "fraction", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair in suite.pairs:
        for fraction in suite.fractions:
            cells = [pair.label, f"{fraction:g}"]
            for label in labels:
                diff, n = paired_to_baseline(frame, pair, fraction, label, suite.baseline)
                cells.append(marked(diff, n, len(suite.seeds)) if n else "—")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column(label: str) -> str:
    return "ce" if label == "student" else label  # the student baseline is the `ce` column


def _where(ref: Reference) -> str:
    return "; ".join(part for part in (ref.source, ref.protocol) if part) or "—"


def reference_rows(frame: pd.DataFrame, suite: Suite) -> list[dict]:
    """One row per pair × label with a published top-1 (largest fraction): ours (final and at the reference's
    epoch, with intervals), the reference, the delta and the verdict."""
    rows = []
    fraction = max(suite.fractions)
    for pair in suite.pairs:
        for label, ref in suite.references(pair).items():
            if ref.top1 is None:
                continue
            if label == "teacher":  # one number, no seeds: the tolerance alone decides
                done = frame[(frame.teacher == pair.teacher) & (frame.fraction == fraction)
                             & (frame.status == "finished") & ~frame.method.isin(suite.online_methods())]
                done = done["teacher_top1"].dropna()
                ours = float(done.iloc[0]) if len(done) else math.nan
                final, at, ci = (f"{ours:.2f}" if len(done) else "—"), ours, (ours, math.nan, math.nan)
            else:
                runs = cell_runs(frame, pair.teacher, pair.student, fraction, _column(label))
                metric = EPOCH_METRIC[ref.epoch]
                final = mean_ci_text(runs["top1"], len(suite.seeds)) if len(runs) else "—"
                ci = mean_ci(runs[metric]) if len(runs) else (math.nan, math.nan, math.nan)
                at = ci[0]
            rows.append({"pair": pair, "label": label, "final": final, "ours": ci, "epoch": ref.epoch, "ref": ref,
                         "delta": at - ref.top1, "verdict": verdict(*ci, ref.top1, suite.tolerance)})  # fmt: skip
    return rows


def reference_table(frame: pd.DataFrame, suite: Suite) -> str | None:
    """Ours next to the published top-1 and where it comes from, with the verdict, for every cell with one."""
    rows = reference_rows(frame, suite)
    if not rows:
        return None
    lines = ["| pair | method | ours (final) | ours (at the reference's epoch) | reference | ours − reference | "
             "verdict | reference from; how measured |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ours = interval(*r["ours"]) if r["label"] != "teacher" else r["final"]
        delta = "—" if math.isnan(r["delta"]) else f"{r['delta']:+.2f}"
        lines.append(f"| {r['pair'].label} | {r['label']} | {r['final']} | {ours} ({r['epoch']}) | {r['ref'].top1:.2f} "
                     f"| {delta} | **{r['verdict']}** | {_where(r['ref'])} |")  # fmt: skip
    return "\n".join(lines)


def _speedup(frame: pd.DataFrame, pair: Pair, fraction: float, label: str, baseline: str) -> tuple[Interval, int]:
    """Geometric mean over seeds of the baseline's epochs to target over ``label``'s, with its interval (a
    paired t-interval of the log ratios), over the seeds where both reached the target."""
    (diff, low, high), n = paired_to_baseline(frame, pair, fraction, baseline, label, "log_epochs_to_target")
    return (math.exp(diff), math.exp(low), math.exp(high)) if n else (math.nan,) * 3, n


def convergence_reference_table(frame: pd.DataFrame, suite: Suite) -> str | None:
    """Ours next to published convergence figures (epochs to the suite's target, or a speed-up over the
    baseline), with verdicts (module docstring)."""
    if suite.target_top1 is None:
        return None
    frame = frame.assign(log_epochs_to_target=np.log(frame["epochs_to_target"].astype(float)))
    fraction, lines = max(suite.fractions), []
    for pair in suite.pairs:
        for label, ref in suite.references(pair).items():
            runs = cell_runs(frame, pair.teacher, pair.student, fraction, _column(label))["epochs_to_target"]
            reached = f" ({runs.notna().sum()}/{len(runs)} reached)" if runs.isna().any() else ""
            if ref.epochs_to_target is not None:
                ours = mean_ci(runs)
                never = "above" if len(runs) else "—"  # no seed reached the target: slower than any figure
                text = verdict(*ours, ref.epochs_to_target, 1.0) if runs.notna().any() else never
                text = {"below": "below (faster)", "above": "above (slower)"}.get(text, text)
                lines.append(f"| {pair.label} | {label} | epochs to {suite.target_top1:g} % | "
                             f"{interval(*ours, digits=1)}{reached} | {ref.epochs_to_target:g} | **{text}** "
                             f"| {_where(ref)} |")  # fmt: skip
            if ref.speedup is not None and suite.baseline is not None:
                ours, n = _speedup(frame, pair, fraction, _column(label), suite.baseline)
                text = verdict(*ours, ref.speedup, 1e-6 * ref.speedup) if n else "—"  # equal up to rounding
                lines.append(f"| {pair.label} | {label} | speed-up vs {suite.baseline} (epochs to "
                             f"{suite.target_top1:g} %) | ×{interval(*ours)} ({n} seeds reached both) "
                             f"| ×{ref.speedup:g} | **{text}** | {_where(ref)} |")  # fmt: skip
    if not lines:
        return None
    head = ("| pair | method | figure | ours [95 % CI] | reference | verdict | reference from; how measured |\n"
            "|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(lines)


def summary_frame(frame: pd.DataFrame, suite: Suite) -> pd.DataFrame:
    """``summary.csv``: one row per (teacher, student, method, fraction); ``SUMMARY_COLUMNS``."""
    references = {(r["pair"].label, _column(r["label"])): r
                  for r in reference_rows(frame, suite) if r["label"] != "teacher"}  # fmt: skip
    rows = []
    for pair in suite.pairs:
        for fraction in suite.fractions:
            for label in [m.label for m in suite.methods if m.label not in pair.exclude]:
                top1 = cell_runs(frame, pair.teacher, pair.student, fraction, label)["top1"].dropna().astype(float)
                mean, low, high = mean_ci(top1)
                std = top1.std(ddof=1) if len(top1) > 1 else math.nan
                row = {"teacher": pair.teacher, "student": pair.student, "method": label, "fraction": fraction,
                       "n_seeds": len(top1), "top1_mean": mean, "top1_std": std, "top1_ci_low": low,
                       "top1_ci_high": high, "baseline": suite.baseline or ""}  # fmt: skip
                if suite.baseline is not None and label != suite.baseline:
                    (row["delta"], row["delta_ci_low"], row["delta_ci_high"]), _ = paired_to_baseline(
                        frame, pair, fraction, label, suite.baseline)  # fmt: skip
                ref = references.get((pair.label, label)) if fraction == max(suite.fractions) else None
                if ref is not None:
                    parts = (ref["ref"].source, ref["ref"].protocol, f"ours at the {ref['epoch']} epoch")
                    where = "; ".join(p for p in parts if p)
                    row.update(reference=ref["ref"].top1, reference_source=where,
                               reference_delta=ref["delta"], verdict=ref["verdict"])  # fmt: skip
                rows.append(row)
    return pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
