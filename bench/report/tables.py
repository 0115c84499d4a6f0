"""From MLflow runs to the paper-style report of a suite (``write_tables``): ``runs.csv``, ``tables.md`` (which
embeds its pictures), ``summary.csv``, ``summary.png``, ``convergence.png`` and the reliability diagrams.

Accuracy is reported at the final epoch (mean ± std over seeds, or the 95 % interval with ``ci``) and, labelled
separately, at the best epoch, which is what most papers print; then the verdicts: each method against the
suite's baseline, paired by seed, and our numbers against the published ones with where they come from and how
they were measured (``bench.report.verdicts``), and the suite-level summary (``bench.report.summary``). The file
ends with one line on what produced the runs. The report reads runs and writes files; it imports nothing of the
training code.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.report.calibration import calibration_sections, plot_reliability
from bench.report.cells import mean_ci_text, mean_std
from bench.report.frame import produced_by, runs_frame
from bench.report.plots import plot_convergence
from bench.report.summary import method_summaries, plot_summary, summary_section
from bench.report.verdicts import baseline_table, convergence_reference_table, reference_table, summary_frame
from bench.suites import Suite, expand
from bench.tracking import Tracker


def pivot(frame: pd.DataFrame, suite: Suite, metric: str, with_teacher: bool = True, ci: bool = False) -> str:
    """Markdown table: rows pair × fraction, columns method labels, cells mean ± std over seeds (``ci``: mean and
    95 % Student-t interval)."""
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
                cell = (mean_ci_text if ci else mean_std)(done[metric], n_seeds) if len(done) else "—"
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


def markdown(frame: pd.DataFrame, suite: Suite, ci: bool = False, summary: str | None = None) -> str:
    """``tables.md`` (module docstring); ``summary``: the summary section, whose plot ``summary.png`` is beside."""
    r = suite.recipe
    spread = "mean and 95 % Student-t interval over seeds" if ci else "mean ± std over seeds"
    parts = [
        f"# Suite `{suite.name}` — {suite.dataset}",
        suite.description.strip(),
        f"Protocol: {r.epochs} epochs, batch {r.batch_size}, SGD lr {r.lr} (×{r.gamma} at {list(r.milestones)}), "
        f"wd {r.weight_decay}, augment {r.augment}; seeds {suite.seeds}; fractions {suite.fractions} of the "
        f"training set (stratified, nested). Cells: {spread}; (k/n) marks missing runs.",
        "\n".join(f"- {p.label}: recipe {p.recipe}" + (f", not run: {', '.join(p.exclude)}" if p.exclude else "")
                  for p in suite.pairs if p.recipe or p.exclude),
        "## Test top-1 (%), final epoch",
        pivot(frame, suite, "top1", ci=ci),
    ]
    vs = baseline_table(frame, suite)
    if vs:
        parts += [f"## vs baseline: test top-1 (points) minus `{suite.baseline}`'s, final epoch, paired by seed",
                  "Mean difference over the seeds both ran [95 % paired-t interval]; ▲ / ▼: the interval excludes "
                  "0 (better / worse than the baseline). The same seed gives both runs the same training subset, "
                  "batch order and augmentation, and student initialisation.", vs]  # fmt: skip
    parts += [
        "## Test top-1 (%), best epoch (what most papers report; selected on the test set)",
        pivot(frame, suite, "best_top1", ci=ci),
        "## Expected calibration error (%, 15 bins), final epoch",
        pivot(frame, suite, "ece", with_teacher=False),
        "## Test NLL, final epoch",
        pivot(frame, suite, "nll", with_teacher=False),
        *calibration_sections(frame, suite),
    ]
    if suite.target_top1 is not None:
        parts += [
            f"## Convergence: epochs to reach {suite.target_top1:g}% test top-1 (mean over seeds that reach it)",
            convergence_table(frame, suite, suite.baseline or "kd"),
            "![Test top-1 per epoch, mean over seeds](convergence.png)",
            "## Area under the test top-1 curve (mean accuracy over epochs)",
            pivot(frame, suite, "auc_top1", with_teacher=False),
        ]
    else:
        parts += ["## Test top-1 per epoch", "![Test top-1 per epoch, mean over seeds](convergence.png)"]
    ref = reference_table(frame, suite)
    conv = convergence_reference_table(frame, suite)
    if ref or conv:
        parts += ["## Against the published numbers", suite.reference_note.strip(),
                  f"*reproduced*: ours within {suite.tolerance:g} points of the reference (the suite's `tolerance`) "
                  "or the reference inside our 95 % interval; else *below* / *above*. Ours at the epoch the reference "
                  "names (best by default).", ref or "", conv or ""]  # fmt: skip
    if summary:
        parts += ["## Summary", summary, "![Summary: P(improve), IQM and rank with 95 % intervals](summary.png)"]
    failed = frame[frame.status == "failed"]
    if len(failed):
        parts += ["## Failed runs", "\n".join(f"- `{r.spec_hash}` {r.label} {r.teacher}→{r.student} "
                                              f"f{r.fraction:g} s{r.seed}: {r.error}" for r in failed.itertuples())]  # fmt: skip
    parts.append("---\n" + produced_by(frame))
    return "\n\n".join(p for p in parts if p) + "\n"


def write_tables(suite: Suite, tracker: Tracker, out_dir: Path, ci: bool = False) -> pd.DataFrame:
    """Every file of the report (module docstring); returns the runs frame."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(tracker, expand(suite))
    frame.to_csv(out_dir / "runs.csv", index=False)
    summary_frame(frame, suite).to_csv(out_dir / "summary.csv", index=False)
    summaries = method_summaries(frame, suite)
    if summaries:
        plot_summary(summaries, suite, out_dir / "summary.png")
    section = summary_section(summaries, suite) if summaries else None
    (out_dir / "tables.md").write_text(markdown(frame, suite, ci, section))
    plot_convergence(tracker, frame, suite, out_dir / "convergence.png")
    plot_reliability(tracker, frame, suite, out_dir)
    return frame
