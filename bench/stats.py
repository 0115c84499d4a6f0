"""Statistics behind the verdicts: intervals over seeds, paired and unpaired differences, the probability of
improvement and rliable-style aggregates across the cells of a suite, with stratified-bootstrap intervals.

Pure functions of arrays (NumPy / SciPy); nothing here knows about runs, suites or MLflow (the report builds
the arrays: ``bench.report.verdicts``, ``bench.report.summary``, ``bench.report.compare``). An interval is a
triple ``(estimate, low, high)``; where it is undefined (a single seed: no spread to estimate) ``low`` and
``high`` are NaN, which the report prints as "n=1, no CI", never as ± 0.

The aggregates follow Agarwal et al., "Deep RL at the Edge of the Statistical Precipice" (NeurIPS 2021,
google-research/rliable): the interquartile mean (IQM) of all runs' scores pooled over the cells, the
average over cells of P(X > Y), and intervals from a stratified bootstrap that resamples the seeds of each
(cell, method) independently, seeded so that a report is reproducible.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats as st

Interval = tuple[float, float, float]
NAN = float("nan")


def _values(values) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[~np.isnan(array)]


EQUAL = 1e-6  # values this close, relative to the data's magnitude, are equal (float32 metrics differ in ~1e-7)


def _t_interval(estimate: float, se: float, df: float, confidence: float, scale: float) -> Interval:
    """Student-t interval; ``scale``: the magnitude of the data the estimate comes from."""
    if not np.isfinite(df) or df <= 0:
        return estimate, NAN, NAN
    if se <= EQUAL * scale:  # every value equal (up to float rounding): a zero-width interval
        return estimate, estimate, estimate
    low, high = st.t.interval(confidence, df, loc=estimate, scale=se)
    return estimate, float(low), float(high)


def mean_ci(values, confidence: float = 0.95, scale: float | None = None) -> Interval:
    """Mean and Student-t interval over the (non-NaN) values, e.g. one metric over seeds.

    n = 0 gives ``(nan, nan, nan)``; n = 1 gives ``(value, nan, nan)``: an interval needs a spread. Values
    equal up to ``EQUAL`` relative to ``scale`` (default: their own magnitude) give a zero-width interval."""
    x = _values(values)
    if len(x) == 0:
        return NAN, NAN, NAN
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else NAN
    scale = float(np.abs(x).max()) if scale is None else scale
    return _t_interval(float(x.mean()), se, len(x) - 1, confidence, scale)


def paired_difference_ci(a, b, confidence: float = 0.95) -> Interval:
    """Mean of ``a - b`` with its Student-t interval (the paired t-test's interval), where ``a[i]`` and
    ``b[i]`` are two methods' values with the same seed on the same cell (pair × fraction).

    Why pairing by seed is valid here: a run's seed alone fixes (1) its training subset and validation split
    (``bench.data.fraction_indices`` / ``holdout_indices`` draw from ``default_rng(seed)``, whatever the
    method), (2) the order of the batches and their random crops and flips (``TensorLoader`` draws them from
    its own generator seeded with ``seed`` and the epoch, untouched by the method; ``FolderLoader`` shuffles
    with such a generator, which also seeds its workers' augmentation for a given number of workers), and
    (3) the student's initial weights (``bench.run.lifecycle.Run.prepare`` calls ``seed_everything(seed)``
    right before building the student, before the method builds anything of its own; the engine seeds the
    global generators again before the first step). Offline methods of a pair also share one teacher.
    So the two runs of a pair differ only by the method (its loss, its extra modules and their random draws,
    and floating-point order), and their difference removes the seed's luck of subset, order and
    initialisation that both share. Not covered: an online method's co-trained teacher (initialised after the
    student from the global generator), random draws inside a method (e.g. CRD's negatives, which then
    diverge between methods), and nondeterministic GPU kernels.

    Pairs with a NaN on either side are dropped; fewer than two pairs give an undefined interval."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    both = np.concatenate([a, b])
    return mean_ci(a - b, confidence, scale=float(np.nanmax(np.abs(both))) if np.isfinite(both).any() else 0.0)


def welch_difference_ci(a, b, confidence: float = 0.95) -> Interval:
    """``mean(a) - mean(b)`` with Welch's interval (unequal variances, Welch–Satterthwaite degrees of
    freedom): for two independent sets of runs that share no pairing. Undefined when a side has one value."""
    a, b = _values(a), _values(b)
    if len(a) == 0 or len(b) == 0:
        return NAN, NAN, NAN
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, NAN, NAN
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else np.inf
    return _t_interval(diff, se, df, confidence, float(max(np.abs(a).max(), np.abs(b).max())))


def probability_of_improvement(x, y) -> float:
    """P(X > Y) + ½·P(X = Y) over all pairs of a value of ``x`` and one of ``y``: the Mann–Whitney U
    statistic of ``x`` divided by n·m. 0.5 means no tendency either way."""
    x, y = _values(x), _values(y)
    if len(x) == 0 or len(y) == 0:
        return NAN
    return float(_improvement(x[None, :], y[None, :])[0])


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise P(X > Y) + ½·P(X = Y) of (R, n) and (R, m) arrays."""
    gt = (x[:, :, None] > y[:, None, :]).mean(axis=(1, 2))
    eq = (x[:, :, None] == y[:, None, :]).mean(axis=(1, 2))
    return gt + 0.5 * eq


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50 % (``scipy.stats.trim_mean(values, 0.25)``)."""
    x = _values(values)
    return float(st.trim_mean(x, 0.25)) if len(x) else NAN


def stratified_bootstrap(
    strata: Sequence[np.ndarray],
    statistic: Callable[[list[np.ndarray]], np.ndarray],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile intervals of ``statistic`` under a bootstrap that resamples every stratum (the seeds of one
    (cell, method)) with replacement, independently of the others.

    ``statistic`` is vectorised: it gets one ``(R, n_i)`` array per stratum (R resamples, or R = 1 for the
    estimate on the data) and returns an array whose first axis is R. Returns ``(estimate, low, high)``, each
    of the statistic's shape without that axis. The generator is seeded: the same data give the same
    interval. A stratum of one value is resampled as itself."""
    data = [np.asarray(s, dtype=float).ravel() for s in strata]
    estimate = np.asarray(statistic([s[None, :] for s in data]), dtype=float)[0]
    rng = np.random.default_rng(seed)
    resampled = [s[rng.integers(0, len(s), (n_resamples, len(s)))] for s in data]
    draws = np.asarray(statistic(resampled), dtype=float)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha], axis=0)
    return estimate, low, high


def aggregate_improvement(cells: Sequence[tuple[np.ndarray, np.ndarray]], confidence: float = 0.95,
                          n_resamples: int = 2000, seed: int = 0) -> Interval:  # fmt: skip
    """The average over cells of P(X > Y) (``x``: a method's seeds in the cell, ``y``: the baseline's), with
    a stratified-bootstrap interval."""
    cells = [(_values(x), _values(y)) for x, y in cells]
    cells = [(x, y) for x, y in cells if len(x) and len(y)]
    if not cells:
        return NAN, NAN, NAN
    strata = [s for cell in cells for s in cell]

    def statistic(arrays: list[np.ndarray]) -> np.ndarray:
        return np.mean([_improvement(arrays[2 * i], arrays[2 * i + 1]) for i in range(len(cells))], axis=0)

    est, low, high = stratified_bootstrap(strata, statistic, confidence, n_resamples, seed)
    return float(est), float(low), float(high)


def aggregate_iqm(cells: Sequence[np.ndarray], confidence: float = 0.95, n_resamples: int = 2000,
                  seed: int = 0) -> Interval:  # fmt: skip
    """IQM of one method's runs pooled over the cells (each array: its seeds in one cell), with a
    stratified-bootstrap interval."""
    strata = [v for v in (_values(c) for c in cells) if len(v)]
    if not strata:
        return NAN, NAN, NAN

    def statistic(arrays: list[np.ndarray]) -> np.ndarray:
        return st.trim_mean(np.concatenate(arrays, axis=1), 0.25, axis=1)

    est, low, high = stratified_bootstrap(strata, statistic, confidence, n_resamples, seed)
    return float(est), float(low), float(high)


def rank_first(cells: Sequence[Sequence[np.ndarray]], confidence: float = 0.95, n_resamples: int = 2000,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """How often each method has the highest mean in a cell, as a fraction of the cells (a tie shares the
    cell equally), with stratified-bootstrap intervals. ``cells[c][k]``: method k's seeds in cell c, every
    method present in every cell. Returns ``(fraction, low, high)``, one entry per method."""
    cells = [[_values(v) for v in cell] for cell in cells]
    if not cells or any(len(v) == 0 for cell in cells for v in cell):
        raise ValueError("rank_first needs every method's values in every cell")
    k = len(cells[0])
    strata = [v for cell in cells for v in cell]

    def statistic(arrays: list[np.ndarray]) -> np.ndarray:
        total = 0.0
        for c in range(len(cells)):
            means = np.stack([a.mean(axis=1) for a in arrays[c * k : (c + 1) * k]], axis=1)  # (R, k)
            best = means == means.max(axis=1, keepdims=True)
            total = total + best / best.sum(axis=1, keepdims=True)
        return total / len(cells)

    return stratified_bootstrap(strata, statistic, confidence, n_resamples, seed)
