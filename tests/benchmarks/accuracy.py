"""Accuracy regression: a suite's ``runs.csv`` (mean top-1 over seeds per pair × fraction × method) against
a stored baseline.

A cell fails when its mean top-1 dropped more than ``max(k · σ, floor)`` below the baseline mean, σ the
std over the baseline's seeds (k = 2, floor = 0.5 points: CPU runs with the same seeds reproduce exactly,
so a drop past that is a change in the code, not noise). Improvements and cells without a baseline are
reported, never failed.

Update the baseline after an intended change:
``python -m tests.benchmarks.accuracy --update results/nightly/mini/mini/runs.csv``
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

BASELINE = Path(__file__).resolve().parent / "baseline" / "mini.json"
KEY_COLUMNS = ["teacher", "student", "label", "fraction"]


@dataclass
class CellCheck:
    cell: str
    mean: float
    baseline: float | None
    baseline_std: float | None
    seeds: int
    tolerance: float | None

    @property
    def drop(self) -> float | None:
        return None if self.baseline is None else self.baseline - self.mean

    @property
    def ok(self) -> bool:
        return self.baseline is None or self.drop <= self.tolerance


def cell_name(row) -> str:
    return f"{row['teacher']}->{row['student']} f{float(row['fraction']):g} {row['label']}"


def summarize(runs_csv: Path) -> dict[str, dict[str, float]]:
    """Mean, std (ddof=1) and count of the finished runs' top-1 per cell."""
    frame = pd.read_csv(runs_csv)
    frame = frame[frame["status"] == "finished"]
    out = {}
    for _, group in frame.groupby(KEY_COLUMNS):
        values = group["top1"].astype(float)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[cell_name(group.iloc[0])] = {"mean": float(values.mean()), "std": std, "seeds": int(len(values))}
    return out


def compare(current: dict, baseline: dict, k: float = 2.0, floor: float = 0.5) -> list[CellCheck]:
    checks = []
    for cell, now in sorted(current.items()):
        base = baseline.get(cell)
        tol = None if base is None else max(k * base["std"], floor)
        checks.append(CellCheck(cell, now["mean"], base and base["mean"], base and base["std"], now["seeds"], tol))
    return checks


def markdown(checks: list[CellCheck]) -> str:
    lines = ["| cell | mean top-1 | baseline | drop | tolerance | |", "|---|---|---|---|---|---|"]
    for c in checks:
        if c.baseline is None:
            lines.append(f"| {c.cell} | {c.mean:.2f} | — | — | — | no baseline |")
        else:
            status = "ok" if c.ok else "**DROP**"
            lines.append(f"| {c.cell} | {c.mean:.2f} | {c.baseline:.2f} ± {c.baseline_std:.2f} | {c.drop:+.2f} "
                         f"| {c.tolerance:.2f} | {status} |")  # fmt: skip
    return "\n".join(lines)


def load_baseline(path: Path = BASELINE) -> dict:
    return json.loads(path.read_text())["cells"]


def write_baseline(runs_csv: Path, path: Path = BASELINE) -> dict:
    cells = summarize(runs_csv)
    if not cells or any(math.isnan(c["mean"]) for c in cells.values()):
        raise SystemExit(f"{runs_csv}: no finished runs to take as the baseline")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": runs_csv.name, "cells": cells}, indent=1, sort_keys=True) + "\n")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_csv", type=Path)
    parser.add_argument("--update", action="store_true", help="write the baseline from RUNS_CSV")
    args = parser.parse_args(argv)
    if args.update:
        print(f"wrote {BASELINE} ({len(write_baseline(args.runs_csv))} cells)")
        return 0
    checks = compare(summarize(args.runs_csv), load_baseline())
    print(markdown(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
