"""``python -m bench compare A B``: two result sets of one suite (a results folder, a suite's folder, or their
``runs.csv``), cell by cell (pair × fraction × method): both means, B − A with its 95 % interval, and a flag
where B is worse by more than the tolerance **and** significantly so (the interval lies below 0).

Which interval: where both sets have the same seeds of a cell (two or more), the paired t-interval by seed
(``bench.stats.paired_difference_ci``: the same seed fixes the subset, batch order and initialisation, so on
one machine and code the pairs share their luck and an unchanged result differs by exactly 0); otherwise
Welch's interval for two independent sets (``welch_difference_ci``). Pairing stays a valid test when the code
under comparison changed what a seed fixes; it only gains less. One seed per side gives no interval, so such a
cell is shown but never flagged.

Exit codes: 0 nothing regressed, 1 a cell regressed, 2 bad input (a path without runs, two suites, no common
cell). Not here: the tables of one result set (``bench.report.tables``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.report.cells import interval
from bench.stats import Interval, mean_ci, paired_difference_ci, welch_difference_ci

KEY = ["teacher", "student", "fraction", "label"]


@dataclass
class ResultSet:
    path: Path  # the runs.csv
    suite: str | None  # from its `suite` column, else its folder's name; None when unknown
    runs: pd.DataFrame  # the finished runs

    @property
    def produced_by(self) -> str:
        cols = [c for c in ("git_commit", "device_name") if c in self.runs]
        found = [", ".join(sorted({str(v) for v in self.runs[c].dropna()})) for c in cols]
        return "; ".join(f for f in found if f) or "unknown"


def find_runs_csv(path: Path) -> Path:
    """``path`` itself (a CSV), ``path/runs.csv`` (a suite's folder) or the one ``path/*/runs.csv`` (a results
    folder holding one suite)."""
    if path.is_file():
        return path
    if not path.exists():
        raise BenchError(f"{path}: not found")
    if (path / "runs.csv").is_file():
        return path / "runs.csv"
    found = sorted(path.glob("*/runs.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise BenchError(f"{path}: no runs.csv in it or in its sub-folders (give a suite's folder or its runs.csv)")
    names = ", ".join(p.parent.name for p in found)
    raise BenchError(f"{path}: runs of several suites ({names}); give one suite's folder")


def load_result_set(path: Path, metric: str) -> ResultSet:
    csv = find_runs_csv(path)
    try:
        runs = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BenchError(f"{csv}: not a runs.csv ({reason})") from None
    missing = [c for c in [*KEY, "seed", "status", metric] if c not in runs]
    if missing:
        raise BenchError(f"{csv}: not a runs.csv of kdbench (no column {missing[0]!r})")
    suites = sorted({str(s) for s in runs["suite"].dropna()}) if "suite" in runs else []
    if len(suites) > 1:
        raise BenchError(f"{csv}: runs of several suites ({', '.join(suites)})")
    suite = suites[0] if suites else (csv.parent.name if csv.name == "runs.csv" else None)
    return ResultSet(csv, suite, runs[runs.status == "finished"])


@dataclass
class CellComparison:
    cell: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: Interval  # B − A
    test: str  # "paired" (by seed), "Welch", or "" (a side has no finished run)
    regressed: bool

    @property
    def better(self) -> bool:
        return not math.isnan(self.diff[1]) and self.diff[1] > 0


def cell_name(key: tuple) -> str:
    teacher, student, fraction, label = key
    return f"{teacher}→{student} f{float(fraction):g} {label}"


def compare_cells(a: ResultSet, b: ResultSet, metric: str = "top1", tolerance: float = 0.5,
                  confidence: float = 0.95) -> list[CellComparison]:  # fmt: skip
    """Every cell of A or B (module docstring); a cell present on one side only has no difference."""
    groups_a = {k: g.set_index("seed")[metric].dropna().astype(float) for k, g in a.runs.groupby(KEY)}
    groups_b = {k: g.set_index("seed")[metric].dropna().astype(float) for k, g in b.runs.groupby(KEY)}
    out = []
    for key in sorted(set(groups_a) | set(groups_b), key=lambda k: tuple(map(str, k))):
        va, vb = groups_a.get(key, pd.Series(dtype=float)), groups_b.get(key, pd.Series(dtype=float))
        if len(va) and len(vb):
            paired = set(va.index) == set(vb.index) and len(va) > 1
            diff = (paired_difference_ci(vb.sort_index(), va.sort_index(), confidence) if paired
                    else welch_difference_ci(vb, va, confidence))  # fmt: skip
            test = "paired" if paired else "Welch"
        else:
            diff, test = (math.nan, math.nan, math.nan), ""
        regressed = test != "" and diff[0] < -tolerance and diff[2] < 0
        out.append(CellComparison(cell_name(key), len(va), len(vb), mean_ci(va)[0], mean_ci(vb)[0], diff, test,
                                  regressed))  # fmt: skip
    return out


def check_comparable(a: ResultSet, b: ResultSet, cells: list[CellComparison]) -> None:
    if a.suite and b.suite and a.suite != b.suite:
        raise BenchError(f"different suites: {a.path} holds {a.suite!r}, {b.path} holds {b.suite!r}")
    if not any(c.test for c in cells):
        raise BenchError(f"no common cell with finished runs in {a.path} and {b.path}")


def _mean(value: float, n: int) -> str:
    return "—" if n == 0 else f"{value:.2f} ({n})"


def render(a: ResultSet, b: ResultSet, cells: list[CellComparison], metric: str, tolerance: float) -> str:
    lines = [f"A: {a.path} ({len(a.runs)} finished runs; {a.produced_by})",
             f"B: {b.path} ({len(b.runs)} finished runs; {b.produced_by})",
             f"suite {b.suite or a.suite or '?'}, metric {metric}; B − A with its 95 % interval (paired by seed "
             f"where both have the same seeds, else Welch); REGRESSED: B worse by more than {tolerance:g} points and "
             "the interval below 0", "",
             "| cell | A mean (n) | B mean (n) | B − A [95 % CI] | test | |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        flag = "**REGRESSED**" if c.regressed else ("better" if c.better else "")
        if not c.test:
            flag = "only in A" if c.n_a else "only in B"
        diff = interval(*c.diff, signed=True) if c.test else "—"
        lines.append(f"| {c.cell} | {_mean(c.mean_a, c.n_a)} | {_mean(c.mean_b, c.n_b)} | {diff} | {c.test or '—'} "
                     f"| {flag} |")  # fmt: skip
    regressed = [c for c in cells if c.regressed]
    lines += ["", f"{len(regressed)} of {sum(1 for c in cells if c.test)} common cells regressed"
              + (f": {', '.join(c.cell for c in regressed)}" if regressed else "")
              + f"; {sum(c.better for c in cells)} significantly better."]  # fmt: skip
    return "\n".join(lines)


def _no_nan(row: dict) -> dict:
    """NaN → null (JSON has no NaN)."""
    fix = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {k: [fix(x) for x in v] if isinstance(v, (list, tuple)) else fix(v) for k, v in row.items()}


def compare(path_a: Path, path_b: Path, metric: str = "top1", tolerance: float = 0.5,
            json_out: Path | None = None) -> tuple[str, int]:  # fmt: skip
    """The report text and the exit code (0 / 1; bad input raises ``BenchError``)."""
    if tolerance < 0:
        raise BenchError(f"--tolerance must be >= 0 points, got {tolerance:g}")
    a, b = load_result_set(path_a, metric), load_result_set(path_b, metric)
    cells = compare_cells(a, b, metric, tolerance)
    check_comparable(a, b, cells)
    if json_out is not None:
        payload = {"a": str(a.path), "b": str(b.path), "suite": b.suite or a.suite, "metric": metric,
                   "tolerance": tolerance, "cells": [_no_nan(asdict(c)) for c in cells]}  # fmt: skip
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(payload, indent=1))
    return render(a, b, cells, metric, tolerance), int(any(c.regressed for c in cells))
