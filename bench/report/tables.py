"""From MLflow runs to the paper-style report of a suite: ``runs.csv``, ``tables.md``, ``convergence.png`` and
the reliability diagrams (``write_tables``).

Accuracy is reported at the final epoch (mean ± std over seeds) and, labelled separately, at the best
epoch, which is what most papers print; published numbers with where they come from and how they were
measured. The report reads runs and writes files; it imports nothing of the training code.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.report.calibration import calibration_sections, plot_reliability
from bench.report.cells import mean_std
from bench.report.frame import runs_frame
from bench.report.plots import plot_convergence
from bench.suites import Suite, expand
from bench.tracking import Tracker


def pivot(frame: pd.DataFrame, suite: Suite, metric: str, with_teacher: bool = True) -> str:
    """Markdown table: rows pair × fraction, columns method labels, cells mean ± std over seeds."""
    labels = [m.label for m in suite.methods]
    header = ["pair", "fraction"] + (["teacher"] if with_teacher else []) + labels
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    n_seeds = len(suite.seeds)
    online = suite.online_methods()
    for pair in suite.pairs:
        for fraction in suite.fractions:
            sel = frame[(frame.teacher == pair.teacher) & (frame.student == pair.student) & (frame.fraction == fraction)]
            cells = [pair.label, f"{fraction:g}"]
            if with_teacher:
                teacher = sel[~sel.method.isin(online)]["teacher_top1"].dropna()  # online teachers: own table
                cells.append(f"{teacher.iloc[0]:.2f}" if len(teacher) else "—")
            for label in labels:
                runs = sel[sel.label == label]
                done = runs[runs.status == "finished"]
                cell = mean_std(done[metric], n_seeds) if len(done) else "—"
                if (runs.status == "failed").any():
                    cell += f" [{int((runs.status == 'failed').sum())} failed]"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def convergence_table(frame: pd.DataFrame, suite: Suite, reference_label: str = "kd") -> str:
    """Mean epochs to reach the target (runs that never reach it count as not converged)."""
    labels = [m.label for m in suite.methods]
    header = ["pair", "fraction"] + labels
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair in suite.pairs:
        for fraction in suite.fractions:
            sel = frame[(frame.teacher == pair.teacher) & (frame.student == pair.student) & (frame.fraction == fraction)]
            done = sel[sel.status == "finished"]
            means = {}
            for label in labels:
                runs = done[done.label == label]["epochs_to_target"]
                reached = runs.dropna()
                means[label] = reached.mean() if len(reached) else math.nan
            ref = means.get(reference_label, math.nan)
            cells = [pair.label, f"{fraction:g}"]
            for label in labels:
                runs = done[done.label == label]["epochs_to_target"]
                if runs.empty:
                    cells.append("—")
                    continue
                text = f"{means[label]:.1f}" if not math.isnan(means[label]) else "never"
                text += f" ({runs.notna().sum()}/{len(runs)} reached)" if runs.isna().any() else ""
                if label != reference_label and not math.isnan(ref) and not math.isnan(means[label]):
                    text += f", ×{ref / means[label]:.2f} vs {reference_label}"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_table(frame: pd.DataFrame, suite: Suite) -> str | None:
    """Ours (final and best epoch) next to the published number and where it comes from, for every
    pair × method with one."""
    rows = []
    full = frame[(frame.fraction == max(suite.fractions)) & (frame.status == "finished")]
    for pair in suite.pairs:
        for label, ref in suite.references(pair).items():
            column = "ce" if label == "student" else label  # the student baseline is the `ce` column
            sel = full[(full.teacher == pair.teacher) & (full.student == pair.student) & (full.label == column)]
            if label == "teacher":
                ours = full[(full.teacher == pair.teacher) & ~full.method.isin(suite.online_methods())]["teacher_top1"].dropna()
                final = f"{ours.iloc[0]:.2f}" if len(ours) else "—"
                best, delta = "—", (f"{ours.iloc[0] - ref.top1:+.2f}" if len(ours) else "—")
            else:
                final = mean_std(sel["top1"], len(suite.seeds)) if len(sel) else "—"
                best = mean_std(sel["best_top1"], len(suite.seeds)) if len(sel) else "—"
                delta = f"{sel['best_top1'].mean() - ref.top1:+.2f}" if len(sel) else "—"
            where = "; ".join(part for part in (ref.source, ref.protocol) if part) or "—"
            rows.append(f"| {pair.label} | {label} | {final} | {best} | {ref.top1:.2f} | {delta} | {where} |")
    if not rows:
        return None
    head = ("| pair | method | ours (final) | ours (best epoch) | reference | best − reference | reference from; "
            "how measured |\n|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def markdown(frame: pd.DataFrame, suite: Suite) -> str:
    r = suite.recipe
    parts = [
        f"# Suite `{suite.name}` — {suite.dataset}",
        suite.description.strip(),
        f"Protocol: {r.epochs} epochs, batch {r.batch_size}, SGD lr {r.lr} (×{r.gamma} at {list(r.milestones)}), "
        f"wd {r.weight_decay}, augment {r.augment}; seeds {suite.seeds}; fractions {suite.fractions} of the "
        f"training set (stratified, nested). Cells: mean ± std over seeds; (k/n) marks missing runs.",
        "\n".join(f"- {p.label}: recipe {p.recipe}" + (f", not run: {', '.join(p.exclude)}" if p.exclude else "")
                  for p in suite.pairs if p.recipe or p.exclude),
        "## Test top-1 (%), final epoch",
        pivot(frame, suite, "top1"),
        "## Test top-1 (%), best epoch (what most papers report; selected on the test set)",
        pivot(frame, suite, "best_top1"),
        "## Expected calibration error (%, 15 bins), final epoch",
        pivot(frame, suite, "ece", with_teacher=False),
        "## Test NLL, final epoch",
        pivot(frame, suite, "nll", with_teacher=False),
        *calibration_sections(frame, suite),
    ]
    if suite.target_top1 is not None:
        parts += [
            f"## Convergence: epochs to reach {suite.target_top1:g}% test top-1 (mean over seeds that reach it)",
            convergence_table(frame, suite),
            "## Area under the test top-1 curve (mean accuracy over epochs)",
            pivot(frame, suite, "auc_top1", with_teacher=False),
        ]
    ref = reference_table(frame, suite)
    if ref:
        parts += ["## Against the published numbers", suite.reference_note.strip(), ref]
    failed = frame[frame.status == "failed"]
    if len(failed):
        parts += ["## Failed runs", "\n".join(f"- `{r.spec_hash}` {r.label} {r.teacher}→{r.student} "
                                              f"f{r.fraction:g} s{r.seed}: {r.error}" for r in failed.itertuples())]  # fmt: skip
    return "\n\n".join(p for p in parts if p) + "\n"


def write_tables(suite: Suite, tracker: Tracker, out_dir: Path) -> pd.DataFrame:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(tracker, expand(suite))
    frame.to_csv(out_dir / "runs.csv", index=False)
    (out_dir / "tables.md").write_text(markdown(frame, suite))
    plot_convergence(tracker, frame, suite, out_dir / "convergence.png")
    plot_reliability(tracker, frame, suite, out_dir)
    return frame
