"""How one table cell shows several runs (seeds): the formatting every report table shares."""
from __future__ import annotations

import pandas as pd


def mean_std(values: pd.Series, expected: int = 0) -> str:
    """``mean ± std`` (sample std) of the values present, ``(k/n)`` when fewer than ``expected``; "—" if none."""
    values = values.dropna().astype(float)
    if values.empty:
        return "—"
    text = f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")
    return text + (f" ({len(values)}/{expected})" if len(values) < expected else "")
