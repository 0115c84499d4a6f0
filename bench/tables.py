"""From MLflow runs to the paper-style tables: ``runs.csv``, ``tables.md`` and ``convergence.png``.

Only runs whose spec hash belongs to the suite as it is now are used (editing a suite never mixes stale
runs in); for each spec the latest finished run counts, else its latest attempt (shown as failed).
Accuracy is reported at the final epoch (mean ± std over seeds) and, labelled separately, at the best
epoch, which is what most papers print.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.calibration import calibration_sections, is_online, plot_reliability
from bench.suites import RunSpec, Suite, expand
from bench.tracking import Tracker

RUN_COLUMNS = [
    "dataset", "teacher", "student", "method", "label", "fraction", "seed", "status", "top1", "top5", "nll", "ece",
    "brier", "best_top1", "best_epoch", "epochs_to_target", "auc_top1", "wall_s", "teacher_top1", "extra_params",
    "spec_hash", "run_id", "error",
]  # fmt: skip
STATUS_ORDER = {"FINISHED": 0, "RUNNING": 1, "KILLED": 2, "FAILED": 3}


def runs_frame(tracker: Tracker, specs: list[RunSpec]) -> pd.DataFrame:
    """One row per spec of the suite that has an MLflow run (see module docstring for which run)."""
    raw = tracker.search()
    wanted = {s.hash: s for s in specs}
    if raw.empty or "tags.spec_hash" not in raw:
        return pd.DataFrame(columns=RUN_COLUMNS)
    raw = raw[raw["tags.spec_hash"].isin(wanted)].copy()
    raw["_rank"] = raw["status"].map(STATUS_ORDER).fillna(9)
    raw = raw.sort_values(["_rank", "start_time"], ascending=[True, False]).drop_duplicates("tags.spec_hash")
    rows = []
    for _, r in raw.iterrows():
        spec = wanted[r["tags.spec_hash"]]
        row = {
            "dataset": spec.dataset, "teacher": spec.teacher, "student": spec.student, "method": spec.method,
            "label": spec.label, "fraction": spec.fraction, "seed": spec.seed, "status": r["status"].lower(),
            "spec_hash": spec.hash, "run_id": r["run_id"], "error": r.get("tags.error") or "",
        }  # fmt: skip
        for col in r.index:
            if col.startswith("metrics.") and col[len("metrics.") :] not in row:
                row[col[len("metrics.") :]] = r[col]
        rows.append(row)
    frame = pd.DataFrame(rows)
    extra = [c for c in frame.columns if c not in RUN_COLUMNS and not c.startswith(("train_", "test_", "lr", "epoch"))]
    frame = frame.reindex(columns=RUN_COLUMNS + sorted(extra))
    order = {s.hash: i for i, s in enumerate(specs)}
    return frame.sort_values("spec_hash", key=lambda h: h.map(order)).reset_index(drop=True)


def mean_std(values: pd.Series, expected: int) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    text = f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")
    return text + (f" ({len(values)}/{expected})" if len(values) < expected else "")


def pivot(frame: pd.DataFrame, suite: Suite, metric: str, with_teacher: bool = True) -> str:
    """Markdown table: rows pair × fraction, columns method labels, cells mean ± std over seeds."""
    labels = [m.label for m in suite.methods]
    header = ["pair", "fraction"] + (["teacher"] if with_teacher else []) + labels
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    n_seeds = len(suite.seeds)
    for pair in suite.pairs:
        for fraction in suite.fractions:
            sel = frame[(frame.teacher == pair.teacher) & (frame.student == pair.student) & (frame.fraction == fraction)]
            cells = [pair.label, f"{fraction:g}"]
            if with_teacher:
                teacher = sel[~sel.method.map(is_online)]["teacher_top1"].dropna()  # online teachers: own table
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
                ours = full[(full.teacher == pair.teacher) & ~full.method.map(is_online)]["teacher_top1"].dropna()
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


def write_tables(suite: Suite, tracker: Tracker, out_dir: Path) -> pd.DataFrame:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(tracker, expand(suite))
    frame.to_csv(out_dir / "runs.csv", index=False)
    (out_dir / "tables.md").write_text(markdown(frame, suite))
    plot_convergence(tracker, frame, suite, out_dir / "convergence.png")
    plot_reliability(tracker, frame, suite, out_dir)
    return frame
