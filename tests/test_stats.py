"""bench.stats against SciPy and against cases computed by hand (including n = 1, where an interval is
undefined)."""
import math

import numpy as np
import pytest
from scipy import stats as st

from bench.stats import (
    aggregate_improvement,
    aggregate_iqm,
    iqm,
    mean_ci,
    paired_difference_ci,
    probability_of_improvement,
    rank_first,
    stratified_bootstrap,
    welch_difference_ci,
)

RNG = np.random.default_rng(7)
SAMPLES = [RNG.normal(90, 2, n) for n in (2, 3, 5, 10)]


@pytest.mark.parametrize("values", SAMPLES)
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_mean_ci_is_scipys_student_t_interval(values, confidence):
    mean, low, high = mean_ci(values, confidence)
    ref = st.t.interval(confidence, len(values) - 1, loc=values.mean(), scale=st.sem(values))
    assert mean == pytest.approx(values.mean())
    assert (low, high) == pytest.approx(ref, rel=1e-12)


def test_mean_ci_by_hand():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])  # sd 1, se 1/√3, t(0.975, 2) = 4.302652729911275
    assert mean == 2.0
    assert (low, high) == pytest.approx((2 - 4.302652729911275 / math.sqrt(3), 2 + 4.302652729911275 / math.sqrt(3)))


def test_one_value_has_no_interval_and_none_is_nan():
    mean, low, high = mean_ci([97.8])
    assert mean == 97.8 and math.isnan(low) and math.isnan(high)  # undefined, not ± 0
    assert all(math.isnan(v) for v in mean_ci([]))
    assert mean_ci([5.0, float("nan")])[0] == 5.0 and math.isnan(mean_ci([5.0, float("nan")])[1])


def test_equal_values_give_a_zero_width_interval():
    assert mean_ci([97.8, 97.8, 97.8]) == (pytest.approx(97.8), pytest.approx(97.8), pytest.approx(97.8))
    a, b = np.array([97.802198, 98.351645]), np.array([98.076922, 98.626375])  # float32 top-1s, one image apart
    mean, low, high = paired_difference_ci(a, b)  # differences −0.274724 and −0.274730: equal but for rounding
    assert low == high == mean


@pytest.mark.parametrize("n", [2, 3, 6])
def test_paired_difference_is_scipys_paired_t_interval(n):
    a, b = RNG.normal(90, 2, n), RNG.normal(89, 2, n)
    diff, low, high = paired_difference_ci(a, b)
    ref = st.ttest_rel(a, b).confidence_interval(0.95)
    assert diff == pytest.approx((a - b).mean())
    assert (low, high) == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_paired_difference_by_hand_and_with_one_pair():
    # differences 1, 2, 3: mean 2, the interval of test_mean_ci_by_hand
    diff, low, high = paired_difference_ci([91.0, 92.0, 93.0], [90.0, 90.0, 90.0])
    assert diff == 2.0 and high - low == pytest.approx(2 * 4.302652729911275 / math.sqrt(3))
    diff, low, high = paired_difference_ci([91.0], [90.0])
    assert diff == 1.0 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        paired_difference_ci([1.0, 2.0], [1.0])


@pytest.mark.parametrize("na,nb", [(2, 2), (3, 5), (10, 4)])
def test_welch_difference_is_scipys_welch_interval(na, nb):
    a, b = RNG.normal(90, 1, na), RNG.normal(88, 3, nb)
    diff, low, high = welch_difference_ci(a, b)
    ref = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert (low, high) == pytest.approx((ref.low, ref.high), rel=1e-10)


def test_welch_by_hand_and_undefined_with_one_run():
    # a = [1, 3], b = [0, 0]: diff 2, se = sqrt(2/2) = 1, df = 1^2 / (1^2 / 1) = 1, t(0.975, 1) = 12.7062047361747
    diff, low, high = welch_difference_ci([1.0, 3.0], [0.0, 0.0])
    assert diff == 2.0 and (low, high) == pytest.approx((2 - 12.7062047361747, 2 + 12.7062047361747))
    diff, low, high = welch_difference_ci([1.0], [0.0, 2.0])
    assert diff == 0.0 and math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(
    "x,y", [([1.0, 2.0, 3.0], [2.0, 2.0]), ([90.1, 90.1, 91.0], [90.1, 89.0, 92.0, 90.5]), ([5.0], [5.0])]
)
def test_probability_of_improvement_is_the_mann_whitney_statistic_over_n_m(x, y):
    expected = st.mannwhitneyu(x, y).statistic / (len(x) * len(y))
    assert probability_of_improvement(x, y) == pytest.approx(expected)


def test_probability_of_improvement_by_hand():
    # pairs (1,2) <, (1,3) <, (2,2) =, (2,3) <: (0 + ½) / 4
    assert probability_of_improvement([1.0, 2.0], [2.0, 3.0]) == 0.125
    assert probability_of_improvement([3.0, 4.0], [1.0, 2.0]) == 1.0


def test_iqm_is_the_25_percent_trimmed_mean():
    assert iqm(np.arange(1.0, 9.0)) == 4.5  # 3, 4, 5, 6
    values = RNG.normal(0, 1, 23)
    assert iqm(values) == pytest.approx(st.trim_mean(values, 0.25))


def test_the_stratified_bootstrap_is_seeded_and_agrees_with_scipys():
    data = RNG.normal(0, 1, 30)

    def mean(arrays):
        return arrays[0].mean(axis=1)

    est, low, high = stratified_bootstrap([data], mean, n_resamples=20000, seed=1)
    assert (est, low, high) == stratified_bootstrap([data], mean, n_resamples=20000, seed=1)
    ref = st.bootstrap((data,), np.mean, method="percentile", n_resamples=20000, rng=np.random.default_rng(2))
    assert est == pytest.approx(data.mean())
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.03)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.03)


def test_a_stratum_of_one_run_is_resampled_as_itself():
    est, low, high = stratified_bootstrap([np.array([3.0]), np.array([1.0, 1.0])],
                                          lambda a: a[0].mean(axis=1) - a[1].mean(axis=1))  # fmt: skip
    assert est == low == high == 2.0


def test_aggregates_by_hand():
    better = [(np.array([2.0, 3.0]), np.array([0.0, 1.0])), (np.array([5.0]), np.array([4.0, 4.5]))]
    assert aggregate_improvement(better) == (1.0, 1.0, 1.0)
    mixed = [(np.array([2.0, 3.0]), np.array([0.0, 1.0])), (np.array([0.0, 1.0]), np.array([2.0, 3.0]))]
    est, low, high = aggregate_improvement(mixed)
    assert est == 0.5 and low == 0.5 == high  # no resample changes the order within a cell
    est, low, high = aggregate_iqm([np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 6.0, 7.0, 8.0])])
    assert est == 4.5 and low < 4.5 < high


def test_rank_first_counts_cells_and_shares_ties():
    cells = [
        [np.array([1.0, 1.0]), np.array([2.0, 2.0]), np.array([0.0, 0.0])],  # method 1 first
        [np.array([3.0, 3.0]), np.array([3.0, 3.0]), np.array([0.0, 0.0])],  # tie of 0 and 1
    ]
    share, low, high = rank_first(cells)
    assert share.tolist() == [0.25, 0.75, 0.0] and low.tolist() == share.tolist() == high.tolist()
    noisy = [[np.array([1.0, 4.0]), np.array([2.9, 3.1])]]  # resampling can put either first
    share, low, high = rank_first(noisy)
    assert share.tolist() == [0.0, 1.0] and low[0] == 0.0 and high[0] == 1.0
