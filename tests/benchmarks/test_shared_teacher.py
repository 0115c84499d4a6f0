"""Shared teacher: k = 4 offline methods trained in lockstep (one teacher pass per batch) vs separately,
on resnet32x4→resnet8x4 with CIFAR-shaped inputs. Target: separate / lockstep ≥ 1.5×; the ideal is
k·(s + t) / (k·s + t) for a student step s and a teacher pass t.

Methods: ``KDBENCH_SHARED_METHODS`` (default four KD temperatures). The separate epochs run in each
round's untimed setup, interleaved with the lockstep epoch. Fails below ``KDBENCH_MIN_SHARED_SPEEDUP``
(default 1.3: under the target by the noise of a loaded machine, so it flags a real regression).
"""
from __future__ import annotations

import os

from bench.recipe import Recipe
from tests.benchmarks.jobs import (
    env_int,
    lockstep_epoch,
    separate_epochs,
    shared_group,
    shared_teacher_methods,
    synthetic_cifar,
    timed,
)

TEACHER, STUDENT = os.environ.get("KDBENCH_SHARED_PAIR", "resnet32x4:resnet8x4").split(":")


def test_lockstep_vs_separate(benchmark, timings, record_ratio):
    recipe = Recipe(batch_size=64)
    data = synthetic_cifar(env_int("KDBENCH_SHARED_IMAGES", 128))
    methods, tasks = shared_group(TEACHER, STUDENT, data, recipe, shared_teacher_methods())
    separate: list[float] = []
    warmup = 1

    def setup():
        separate.append(timed(lambda: separate_epochs(methods, tasks, recipe)))

    benchmark.group = "shared teacher"
    benchmark.pedantic(
        lockstep_epoch, args=(methods, tasks, recipe), setup=setup,
        rounds=env_int("KDBENCH_BENCH_ROUNDS", 5), warmup_rounds=warmup,
    )  # fmt: skip
    speedup = record_ratio(f"separate / lockstep (k={len(methods)})", separate[warmup:], timings(), ">= 1.5")
    benchmark.extra_info["k"] = len(methods)
    assert speedup >= float(os.environ.get("KDBENCH_MIN_SHARED_SPEEDUP", 1.3)), f"lockstep speedup {speedup:.3f}"
