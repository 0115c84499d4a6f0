"""A sweep's files: ``sweep.csv`` (every trial), ``sweep.md`` (space, best config, sensitivity per
hyperparameter, the test results of the best and the suite's own config) and ``sweep.png``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.report.cells import mean_std
from bench.suites import RunSpec, Suite
from bench.sweep import Dimension, Sweep, SweepResolver, fmt, trial_label
from bench.tracking import FINISHED


@dataclass
class SweepReport:
    trials: pd.DataFrame
    best: dict[str, Any] | None
    final: pd.DataFrame
    failed: int = 0
    files: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.best is None else 0


def trial_frame(sweep: Sweep, outcomes, tracker) -> pd.DataFrame:
    """One row per search trial: seed, swept values, status, epochs, validation metrics, MLflow run.
    MLflow is the truth for the status (a trial stopped while replaying a finished run is finished)."""
    resolver = SweepResolver(sweep)
    rows = []
    for outcome in outcomes:
        if not outcome.config:
            continue
        values = resolver.values(outcome.config)
        status, metrics = outcome.status, outcome.metrics
        done = tracker.finished_run(outcome.key) if status != FINISHED else outcome.run_id
        if done is not None and status != FINISHED:
            status, metrics = FINISHED, {**metrics, **tracker.final_metrics(done)}
        row: dict[str, Any] = {"seed": outcome.config["seed"]}
        row.update({d.label: values[d.names[0]] if len(d.names) == 1 else fmt([values[n] for n in d.names])
                    for d in sweep.dims})  # fmt: skip
        row.update({"status": {"SKIPPED": "finished"}.get(status, status.lower()), "epochs": metrics.get("epoch")})
        row.update({k: v for k, v in sorted(metrics.items()) if k.startswith("val_")})
        run_id = outcome.run_id or done or next((r.run_id for r in tracker.runs_for(outcome.key)), "")
        row.update({"spec_hash": outcome.key, "run_id": run_id, "error": outcome.error})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["seed", *[d.label for d in sweep.dims], "status", "epochs", sweep.settings.metric])
    return frame.sort_values(["seed", *[d.label for d in sweep.dims]], kind="stable").reset_index(drop=True)


def final_frame(specs: list[RunSpec], tracker) -> pd.DataFrame:
    rows = []
    for spec in specs:
        runs = tracker.runs_for(spec.hash)
        done = next((r for r in runs if r.status == FINISHED), None)
        metrics = tracker.final_metrics(done.run_id) if done else {}
        rows.append({"config": spec.label, "seed": spec.seed, "status": "finished" if done else
                     (runs[0].status.lower() if runs else "missing"), **{k: metrics.get(k) for k in
                     ("top1", "best_top1", "ece", "nll")}, "spec_hash": spec.hash,
                     "run_id": done.run_id if done else ""})  # fmt: skip
    return pd.DataFrame(rows, columns=["config", "seed", "status", "top1", "best_top1", "ece", "nll", "spec_hash",
                                       "run_id"])  # fmt: skip


def _bins(dim: Dimension, values: pd.Series) -> pd.Series:
    """Grid / choice values as they are; sampled ones in up to four quantile bins."""
    if not dim.continuous:
        return values.map(fmt)
    edges = np.unique(np.quantile(values.astype(float), np.linspace(0, 1, 5)))
    if len(edges) < 2:
        return values.map(fmt)
    index = np.clip(np.searchsorted(edges, values.astype(float), side="right") - 1, 0, len(edges) - 2)
    return pd.Series([f"[{fmt(edges[i])}, {fmt(edges[i + 1])}]" for i in index], index=values.index)


def sensitivity(sweep: Sweep, trials: pd.DataFrame, dim: Dimension) -> str:
    """Metric by value of one hyperparameter, over the finished trials (all other values pooled)."""
    metric = sweep.settings.metric
    done = trials[trials.status == "finished"]
    lines = [f"| {dim.label} | trials | {metric} mean ± std | best | stopped / failed |", "|---|---|---|---|---|"]
    if done.empty:
        return "\n".join(lines)
    keys = _bins(dim, trials[dim.label])
    order = [fmt(v if len(dim.names) == 1 else list(v)) for v in dim.values] if not dim.continuous else sorted(
        set(keys), key=lambda k: float(k.strip("[").split(",")[0]))  # fmt: skip
    best = max if sweep.settings.mode == "max" else min
    for key in order:
        sel = done[keys.loc[done.index] == key]
        other = trials[(keys == key) & (trials.status != "finished")]
        cell = f"{best(sel[metric]):.2f}" if len(sel) else "—"
        lines.append(f"| {key} | {len(sel)} | {mean_std(sel[metric])} | {cell} | "
                     f"{(other.status == 'stopped').sum()} / {(other.status == 'failed').sum()} |")  # fmt: skip
    return "\n".join(lines)


def plot(sweep: Sweep, trials: pd.DataFrame, path: Path) -> None:
    """The metric against each swept value: one panel per hyperparameter, a dot per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.settings.metric
    fig, axes = plt.subplots(1, len(sweep.dims), figsize=(4.2 * len(sweep.dims), 3.4), squeeze=False)
    for ax, dim in zip(axes.flat, sweep.dims):
        styles = (("finished", dict(marker="o", alpha=0.8)), ("stopped", dict(marker="x", alpha=0.6)))
        for status, style in styles:  # a stopped trial's value is that of the epoch it was stopped at
            sel = trials[(trials.status == status) & trials[metric].notna()] if metric in trials else trials[:0]
            if sel.empty:
                continue
            if dim.continuous:
                x = sel[dim.label].astype(float)
            else:
                positions = {fmt(v if len(dim.names) == 1 else list(v)): i for i, v in enumerate(dim.values)}
                x = sel[dim.label].map(lambda v: positions[fmt(v)])
            ax.scatter(x, sel[metric], label=f"{status} ({len(sel)})", **style)
        done = trials[(trials.status == "finished")] if metric in trials else trials[:0]
        if not dim.continuous and len(done):
            keys = done[dim.label].map(fmt)
            means = [done[keys == fmt(v if len(dim.names) == 1 else list(v))][metric].mean() for v in dim.values]
            ax.plot(range(len(dim.values)), means, color="black", lw=1, label="mean")
            ax.set_xticks(range(len(dim.values)), [fmt(v if len(dim.names) == 1 else list(v)) for v in dim.values])
        if dim.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(dim.label)
        ax.set_ylabel(f"{metric} ({'higher' if sweep.settings.mode == 'max' else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(suite: Suite, sweep: Sweep, report: SweepReport) -> str:
    st, base, trials = sweep.settings, sweep.base, report.trials
    metric = st.metric
    counts = {s: int((trials.status == s).sum()) for s in ("finished", "stopped", "failed")}
    scheduler = (f"ASHA (grace period {st.asha.grace_period} epochs, reduction factor {st.asha.reduction_factor:g})"
                 if st.asha else "none (every trial trains all epochs)")  # fmt: skip
    parts = [
        f"# Sweep `{suite.name}` — `{st.method}` on {base.teacher}→{base.student}, {suite.dataset}, "
        f"{base.fraction:.0%} of the training set",
        f"Selection: `{metric}` ({st.mode}) at the final epoch, on a validation split of {st.val_fraction:g} of the "
        f"training set (stratified, seeded by the trial's seed) that the trials do not train on; the test split is "
        f"never used to select. Recipe: {base.recipe.epochs} epochs, batch {base.recipe.batch_size}, lr "
        f"{base.recipe.lr}. Search seeds {sweep.seeds}, {st.num_samples} sample(s), scheduler: {scheduler}. "
        f"Trials: {len(trials)} ({counts['finished']} finished, {counts['stopped']} stopped early, "
        f"{counts['failed']} failed).",
        "## Search space",
        "| hyperparameter | kind | values |\n|---|---|---|\n" + "\n".join(
            f"| {d.label} | {d.kind} | {', '.join(fmt(v) for v in d.values)} |" for d in sweep.dims),
    ]  # fmt: skip
    if report.best is None:
        parts.append("## Best config\n\nNo trial finished: nothing to select.")
    else:
        best = report.best
        parts += [
            "## Best config",
            f"`{trial_label(st.method, best['values'])}`: {metric} {best['mean']:.2f} (mean of {best['n']} trial(s)).",
        ]
    for dim in sweep.dims:
        parts += [f"## Sensitivity: {metric} by {dim.label}", sensitivity(sweep, trials, dim)]
    if len(report.final):
        lines = ["| config | seeds | test top-1 (final) | test top-1 (best epoch) | ECE | NLL |", "|" + "---|" * 6]
        for config, sel in report.final.groupby("config", sort=False):
            done = sel[sel.status == "finished"]
            lines.append(f"| {config} | {len(done)}/{len(sel)} | {mean_std(done.top1)} | {mean_std(done.best_top1)} "
                         f"| {mean_std(done.ece)} | {mean_std(done.nll)} |")  # fmt: skip
        parts += [
            f"## On test: the best config and the suite's own `{st.method}`, seeds {suite.seeds}",
            f"Both re-run with the suite's recipe ({base.fraction:.0%} of the training set, no validation split held "
            f"out); final epoch, mean ± std over seeds.",
            "\n".join(lines),
        ]
    failed = trials[trials.status == "failed"]
    if len(failed):
        listed = "\n".join(f"- `{r.spec_hash}` seed {r.seed}: {r.error}" for r in failed.itertuples())
        parts += ["## Failed trials", listed]
    parts.append("![metric against each swept value](sweep.png)")
    return "\n\n".join(parts) + "\n"


def write_outputs(suite: Suite, sweep: Sweep, report: SweepReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep.csv", out / "sweep.md", out / "sweep.png"]
    report.trials.to_csv(paths[0], index=False)
    paths[1].write_text(markdown(suite, sweep, report))
    plot(sweep, report.trials, paths[2])
    return paths
