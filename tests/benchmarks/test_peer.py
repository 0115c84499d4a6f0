"""Against a peer: the same KD job through torchdistill 1.1.5 and through kdbench. Target: kdbench ≥ 1.2×
faster on CPU (more on GPU).

**CIFAR job** (``test_kd_epoch_vs_torchdistill``): random-init ``KDBENCH_PEER_PAIR`` (default
resnet56→resnet20); both sides start from the same initial weights (torchdistill gets deep copies, so a
kdbench switch such as NHWC never reaches the peer's modules); same data (a CIFAR-100 folder in the real
on-disk format: kdbench reads it into its device-resident loader, torchdistill through torchvision's
``CIFAR100`` with its per-sample transforms in a DataLoader with ``KDBENCH_PEER_WORKERS`` workers, default
0); same batch size, loss (0.1·CE + 0.9·T²·KL, T=4), optimizer and epochs (one per round, no evaluation).
One case per kdbench recipe of ``KDBENCH_PEER_RECIPES`` (default ``reference,channels_last``, see
``jobs.PEER_RECIPES``): ``reference`` is the same fp32 NCHW computation on both sides and is the row the
target is about; every other case turns on a kdbench switch that changes the float computation, and its
ratio's name says which.

**Digits job** (``test_mini_kd_vs_torchdistill``): the ``mini`` suite's KD job (resnet20→resnet8 on the
embedded 8×8 grayscale digits, batch 64, no augmentation, the suite's recipe and its
``KDBENCH_PEER_DIGITS_EPOCHS`` epochs per round, default all 15), torchdistill fed the same normalised
tensors through a plain torch ``TensorDataset``. kdbench runs with ``task.teacher_cache`` on (the cache
applies exactly here: a frozen teacher and no random augmentation;
``KDBENCH_PEER_DIGITS_CACHE=0`` turns it off to see the rest of the difference); the ratio's name says
whether the cache was on.

torchdistill's side runs in each round's untimed setup, interleaved with kdbench's. torchdistill is a
benchmark-only dependency (``pip install kdbench[bench]``, or ``make bench``, which installs it into
``results/.bench-deps``); without it the tests are skipped with the reason. The ratios are recorded, not
asserted (the peer's speed is not ours to guard) unless ``KDBENCH_MIN_PEER_SPEEDUP`` is set (checked on
the reference and digits rows only).
"""
from __future__ import annotations

import copy
import os

import pytest

from bench.engine import fit
from bench.recipe import Recipe
from tests.benchmarks.jobs import (
    PEER_RECIPE_NOTES,
    build_method,
    build_task_for,
    cifar_fixture,
    env_int,
    mini_kd_job,
    one_epoch,
    peer_recipe,
    peer_recipes,
    timed,
    torchdistill_available,
    torchdistill_box,
    torchdistill_cifar,
    torchdistill_epoch,
    torchdistill_epochs,
    torchdistill_tensors,
)

TEACHER, STUDENT = os.environ.get("KDBENCH_PEER_PAIR", "resnet56:resnet20").split(":")


def require_torchdistill() -> None:
    missing = torchdistill_available()
    if missing:
        pytest.skip(missing)


def check_minimum(speedup: float) -> None:
    minimum = os.environ.get("KDBENCH_MIN_PEER_SPEEDUP")
    if minimum is not None:
        assert speedup >= float(minimum), f"kdbench is {speedup:.3f}x torchdistill's speed"


@pytest.mark.parametrize("kdbench_recipe", peer_recipes())
def test_kd_epoch_vs_torchdistill(benchmark, timings, record_ratio, tmp_path, kdbench_recipe):
    require_torchdistill()
    recipe = peer_recipe(kdbench_recipe, batch_size=64)
    splits = cifar_fixture(tmp_path, per_class=env_int("KDBENCH_PEER_PER_CLASS", 1))
    task = build_task_for(splits, recipe)
    task.eval_loaders = {}  # training only, as the torchdistill side
    method = build_method("kd", TEACHER, STUDENT, task.train_loader.num_samples)
    peer_recipe_ = one_epoch(Recipe(batch_size=64))  # torchdistill: fp32, NCHW
    teacher, student = copy.deepcopy(method.teacher), copy.deepcopy(method.student)
    workers = env_int("KDBENCH_PEER_WORKERS", 0)
    box = torchdistill_box(torchdistill_cifar(tmp_path), teacher, student, peer_recipe_, workers)
    peer: list[float] = []
    warmup = 1

    def setup():
        peer.append(timed(lambda: torchdistill_epoch(box)))

    benchmark.group = "against a peer"
    benchmark.pedantic(
        fit, args=(method, task, one_epoch(recipe)), setup=setup,
        rounds=env_int("KDBENCH_BENCH_ROUNDS", 10), warmup_rounds=warmup,
    )  # fmt: skip
    note = PEER_RECIPE_NOTES[kdbench_recipe]
    name = f"torchdistill / kdbench, CIFAR {TEACHER}→{STUDENT} ({note})"
    speedup = record_ratio(name, peer[warmup:], timings(), ">= 1.2")
    benchmark.extra_info["kdbench_recipe"] = kdbench_recipe
    if kdbench_recipe == "reference":
        check_minimum(speedup)


def test_mini_kd_vs_torchdistill(benchmark, timings, record_ratio):
    require_torchdistill()
    epochs = os.environ.get("KDBENCH_PEER_DIGITS_EPOCHS")
    task, method, recipe = mini_kd_job(int(epochs) if epochs else None, env_int("KDBENCH_PEER_DIGITS_CACHE", 1) != 0)
    teacher, student = copy.deepcopy(method.teacher), copy.deepcopy(method.student)
    box = torchdistill_box(torchdistill_tensors(task.train_loader), teacher, student, recipe, 0)
    # warm both sides up with one epoch (a warm-up round would cost a whole job per side)
    method.fit(task, one_epoch(recipe))  # Method.fit: the engine's loop with the teacher cache where it applies
    torchdistill_epoch(box)
    peer: list[float] = []
    histories = []

    def setup():
        peer.append(timed(lambda: torchdistill_epochs(box, recipe.epochs)))

    def kdbench_job():
        histories.append(method.fit(task, recipe))

    benchmark.group = "against a peer"
    benchmark.pedantic(kdbench_job, setup=setup, rounds=env_int("KDBENCH_PEER_DIGITS_ROUNDS", 3), warmup_rounds=0)
    cache = histories[-1].teacher_cache.status
    job = f"digits mini KD job resnet20→resnet8, {recipe.epochs} epochs"
    name = f"torchdistill / kdbench, {job} (teacher cache: {cache})"
    speedup = record_ratio(name, peer, timings(), ">= 1.2")
    benchmark.extra_info.update({"teacher_cache": cache, "epochs": recipe.epochs})
    check_minimum(speedup)
