"""Benchmark set-up: torch threads (``KDBENCH_BENCH_THREADS``, default 1) and the ratio record.

A comparison benchmark times its kdbench side through pytest-benchmark (so ``--benchmark-compare``
guards it night to night) and the other side in the round's untimed ``setup``, interleaved, so both
see the same machine load; ``record_ratio`` stores the median per-round ratio in the benchmark's ``extra_info``,
from which ``tests/benchmarks/report.py`` writes the nightly report.
"""
from __future__ import annotations

import statistics

import pytest

from tests.benchmarks.jobs import set_threads

set_threads()


@pytest.fixture
def timings(benchmark):
    """Round timings of the benchmarked function (skips when benchmarks are disabled)."""
    if benchmark.disabled:
        pytest.skip("benchmarks are disabled: run with --benchmark-enable (make bench)")

    def data() -> list[float]:
        return list(benchmark.stats.stats.data)

    return data


@pytest.fixture
def record_ratio(benchmark):
    def record(name: str, numerator: list[float], denominator: list[float], target: str) -> float:
        """The median over rounds of ``numerator[i] / denominator[i]`` (the two sides of one round ran
        back to back, so each round's ratio cancels the machine's slow load changes), its range, and the
        ratio of the medians."""
        per_round = sorted(n / d for n, d in zip(numerator, denominator))
        ratio = statistics.median(per_round)
        benchmark.extra_info.update({
            "ratio_name": name, "ratio": ratio, "ratio_min": per_round[0], "ratio_max": per_round[-1],
            "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
            "ratio_target": target, "numerator_median_s": statistics.median(numerator),
            "denominator_median_s": statistics.median(denominator), "rounds": len(per_round),
        })  # fmt: skip
        return ratio

    return record
