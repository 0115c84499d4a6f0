"""How one table cell shows several runs (seeds): the formatting every report table shares, and the runs of
one cell (``cell_runs``)."""
from __future__ import annotations

import math

import pandas as pd

from bench.stats import mean_ci

NO_CI = "n=1, no CI"  # a single seed: the interval is undefined, never shown as ± 0


def mean_std(values: pd.Series, expected: int = 0) -> str:
    """``mean ± std`` (sample std) of the values present, ``(k/n)`` when fewer than ``expected``; "—" if none."""
    values = values.dropna().astype(float)
    if values.empty:
        return "—"
    text = f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")
    return text + (f" ({len(values)}/{expected})" if len(values) < expected else "")


def interval(estimate: float, low: float, high: float, signed: bool = False, digits: int = 2) -> str:
    """``estimate [low, high]``; ``estimate (n=1, no CI)`` where the interval is undefined; "—" if nothing."""
    if estimate is None or math.isnan(estimate):
        return "—"
    fmt = f"{'+' if signed else ''}.{digits}f"
    if math.isnan(low) or math.isnan(high):
        return f"{estimate:{fmt}} ({NO_CI})"
    return f"{estimate:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def mean_ci_text(values: pd.Series, expected: int = 0) -> str:
    """``mean [95 % CI]`` (Student-t over the values present), ``(k/n)`` when fewer than ``expected``."""
    values = values.dropna().astype(float)
    if values.empty:
        return "—"
    return interval(*mean_ci(values)) + (f" ({len(values)}/{expected})" if len(values) < expected else "")


def cell_runs(frame: pd.DataFrame, teacher: str, student: str, fraction: float, label: str) -> pd.DataFrame:
    """The finished runs of one cell (pair × fraction × method label), indexed by seed."""
    sel = frame[(frame.teacher == teacher) & (frame.student == student) & (frame.fraction == fraction)
                & (frame.label == label) & (frame.status == "finished")]  # fmt: skip
    return sel.set_index("seed")
