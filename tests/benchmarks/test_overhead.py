"""Harness overhead: one KD epoch through ``bench.engine.fit`` vs a bare, minimal PyTorch loop doing the
same computation (same models, loader, batches, loss, SGD step). Target: engine / bare ≤ 1.03.

The bare loop runs in each round's untimed setup, interleaved with the engine's epoch. The test fails
when the overhead exceeds ``KDBENCH_MAX_OVERHEAD`` (default 1.10: above the target plus the noise of a
loaded machine, so it flags a real regression, not a busy neighbour)."""
from __future__ import annotations

import os

from bench.recipe import Recipe
from tests.benchmarks.jobs import bare_epoch, build_method, engine_epoch, env_int, synthetic_cifar, timed, train_loader

TEACHER, STUDENT = os.environ.get("KDBENCH_OVERHEAD_PAIR", "resnet56:resnet20").split(":")


def test_engine_overhead_vs_bare_loop(benchmark, timings, record_ratio):
    recipe = Recipe(batch_size=64)
    data = synthetic_cifar(env_int("KDBENCH_OVERHEAD_IMAGES", 128))
    loader = train_loader(data, recipe.batch_size)
    method = build_method("kd", TEACHER, STUDENT, len(data))
    bare: list[float] = []
    warmup = 1

    def setup():
        bare.append(timed(lambda: bare_epoch(method.student, method.teacher, loader, recipe)))

    benchmark.group = "harness overhead"
    benchmark.pedantic(
        engine_epoch, args=(method, loader, recipe), setup=setup,
        rounds=env_int("KDBENCH_BENCH_ROUNDS", 10), warmup_rounds=warmup,
    )  # fmt: skip
    ratio = record_ratio("engine / bare loop", timings(), bare[warmup:], "<= 1.03")
    assert ratio <= float(os.environ.get("KDBENCH_MAX_OVERHEAD", 1.10)), f"engine overhead {ratio:.3f}"
