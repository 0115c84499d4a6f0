"""Step throughput (images/s) of every registered method on the CIFAR pairs, on a fixed synthetic
CIFAR-shaped batch: one engine training step (forward_train, backward, SGD step), random-init models.

Pairs: those of the suite ``KDBENCH_BENCH_SUITE`` (default ``cifar100-crd``), with each method's
hyperparameters from that suite where it sets them; or ``KDBENCH_BENCH_PAIRS="t:s,t:s"``. Methods:
every registered one, or ``KDBENCH_BENCH_METHODS="kd,dkd"``. Batch ``KDBENCH_BENCH_BATCH`` (default 64).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.engine import Task, TrainingRun
from bench.recipe import Recipe
from bench.errors import BenchError
from methods import get_method, list_methods
from tests.benchmarks.jobs import CIFAR100, CPU, build_method, env_int

FALLBACK_PAIRS = [("resnet32x4", "resnet8x4")]


def suite_pairs() -> list[tuple[str, str, dict]]:
    """(teacher, student, {method label: hparams}) of the benchmark suite's pairs."""
    env = os.environ.get("KDBENCH_BENCH_PAIRS")
    if env:
        return [(*item.strip().split(":"), {}) for item in env.split(",")]
    from bench.suites import load_suite

    try:
        suite = load_suite(os.environ.get("KDBENCH_BENCH_SUITE", "cifar100-crd"))
    except BenchError:
        return [(t, s, {}) for t, s in FALLBACK_PAIRS]
    out = []
    for pair in suite.pairs:
        hps = {m.name: {**m.hparams, **pair.hparams.get(m.label, {})} for m in suite.methods if m.label == m.name}
        hps.update({m.name: None for m in suite.methods if m.label in pair.exclude})  # the suite leaves it out
        out.append((pair.teacher, pair.student, hps))
    return out


def cases():
    names = os.environ.get("KDBENCH_BENCH_METHODS")
    methods = names.split(",") if names else list_methods()
    for teacher, student, hps in suite_pairs():
        for name in methods:
            if name in hps and hps[name] is None:
                continue
            yield pytest.param(name, teacher, student, hps.get(name, {}), id=f"{name}-{teacher}-{student}")


@pytest.mark.parametrize("method,teacher,student,hparams", list(cases()))
def test_step_throughput(benchmark, method, teacher, student, hparams):
    from methods import build_hparams

    batch = env_int("KDBENCH_BENCH_BATCH", 64)
    recipe = Recipe(batch_size=batch)
    try:
        m = build_method(method, teacher, student, 50_000, hparams=build_hparams(method, hparams, method))
    except BenchError as err:  # a documented refusal (e.g. GPD on ShuffleNet's grouped convolutions)
        pytest.skip(f"{method} refuses {teacher}->{student}: {err}")
    run = TrainingRun(m, Task(None, {}, CPU, seed=0, progress=False), recipe)
    run.begin_epoch(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, CIFAR100.num_classes, (batch,), generator=gen)
    args = (x, y)
    if getattr(m, "needs_indices", False):  # e.g. crd: the batch's positions in the training set, as its fit binds
        num_train = m.context.num_train
        m.set_train_targets(torch.arange(num_train) % CIFAR100.num_classes)
        index = torch.randperm(num_train, generator=gen)[:batch]
        args = (x, m.train_labels[index], index)
    benchmark.group = f"step {teacher}->{student}"
    benchmark.pedantic(run.step, args=args, rounds=env_int("KDBENCH_BENCH_ROUNDS", 3), warmup_rounds=1)
    if not benchmark.disabled:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
        benchmark.extra_info["teacher_mode"] = get_method(method).teacher_mode
