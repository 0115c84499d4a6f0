"""Against a peer: the same KD job through torchdistill 1.1.5 and through kdbench. Target: kdbench ≥ 1.2×
faster on CPU (more on GPU).

Same models (random-init ``KDBENCH_PEER_PAIR``, default resnet56→resnet20, the same module objects),
same data (a CIFAR-100 folder in the real on-disk format: kdbench reads it into its device-resident
loader, torchdistill through torchvision's ``CIFAR100`` with its per-sample transforms in a DataLoader
with ``KDBENCH_PEER_WORKERS`` workers, default 0), same batch size, loss (0.1·CE + 0.9·T²·KL, T=4),
optimizer and epochs (one per round, no evaluation). torchdistill's epoch runs in each round's untimed
setup, interleaved with kdbench's. torchdistill is a benchmark-only dependency (``pip install
kdbench[bench]``, or ``make bench``, which installs it into ``results/.bench-deps``); without it the
test is skipped with the reason. The ratio is recorded, not asserted (the peer's speed is not ours to
guard) unless ``KDBENCH_MIN_PEER_SPEEDUP`` is set.
"""
from __future__ import annotations

import os

import pytest

from bench.engine import Recipe, fit
from tests.benchmarks.jobs import (
    build_method,
    build_task_for,
    cifar_fixture,
    env_int,
    one_epoch,
    timed,
    torchdistill_available,
    torchdistill_box,
    torchdistill_epoch,
)

TEACHER, STUDENT = os.environ.get("KDBENCH_PEER_PAIR", "resnet56:resnet20").split(":")


def test_kd_epoch_vs_torchdistill(benchmark, timings, record_ratio, tmp_path):
    missing = torchdistill_available()
    if missing:
        pytest.skip(missing)
    recipe = Recipe(batch_size=64)
    splits = cifar_fixture(tmp_path, per_class=env_int("KDBENCH_PEER_PER_CLASS", 1))
    task = build_task_for(splits, recipe)
    task.eval_loaders = {}  # training only, as the torchdistill side
    method = build_method("kd", TEACHER, STUDENT, task.train_loader.num_samples)
    box = torchdistill_box(tmp_path, method.teacher, method.student, recipe, env_int("KDBENCH_PEER_WORKERS", 0))
    peer: list[float] = []
    warmup = 1

    def setup():
        peer.append(timed(lambda: torchdistill_epoch(box)))

    benchmark.group = "against a peer"
    benchmark.pedantic(
        fit, args=(method, task, one_epoch(recipe)), setup=setup,
        rounds=env_int("KDBENCH_BENCH_ROUNDS", 10), warmup_rounds=warmup,
    )  # fmt: skip
    speedup = record_ratio("torchdistill / kdbench", peer[warmup:], timings(), ">= 1.2")
    minimum = os.environ.get("KDBENCH_MIN_PEER_SPEEDUP")
    if minimum is not None:
        assert speedup >= float(minimum), f"kdbench is {speedup:.3f}x torchdistill's speed"
