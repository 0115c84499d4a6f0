"""Teacher-output caching changes no result: cached runs equal uncached ones (also in lockstep and after a
resume) while the teacher runs only in the first epoch, and the cache stays off, saying why, where it could
change the method."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor

from bench.data import load_dataset
from bench.engine import build_task, seed_everything
from bench.recipe import Recipe
from bench.lockstep import SharedTeacher, fit_lockstep
from bench.models import create_model
from bench.teacher_cache import TeacherCache, cache_applies, cache_status, sample_bytes
from methods import MethodContext, get_method
from methods.kd import KD, KDHparams

torch.set_num_threads(1)
SEED = 3
RECIPE = Recipe(epochs=3, batch_size=64, lr=0.05, milestones=[2], augment="none")
# 385 training samples: six batches of 64 and a last batch of ONE sample, which oneDNN computes with another
# accumulation order than a batch of 64 (1e-6 apart): the cache must never serve a row computed at one
# batch size to a batch of another, so cached and uncached runs are equal bit for bit.
FRACTION = 0.265
RTOL, ATOL = 0.0, 0.0


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher_state():
    seed_everything(100)
    return create_model("resnet8", 10, 1).state_dict()


class CountingTeacher:
    """Records the batch size of every real teacher pass (the cache replaces ``forward_features``; every
    real pass still goes through the stem)."""

    def __init__(self, teacher) -> None:
        self.sizes: list[int] = []
        original = teacher.forward_stem

        def forward_stem(x: Tensor) -> Tensor:
            self.sizes.append(x.shape[0])
            return original(x)

        teacher.forward_stem = forward_stem


def make_teacher(teacher_state):
    teacher = create_model("resnet8", 10, 1)
    teacher.load_state_dict(teacher_state)
    return teacher


def make_task(splits, cache: bool, recipe: Recipe = RECIPE, checkpoint: Path | None = None):
    return build_task(splits, FRACTION, SEED, recipe, torch.device("cpu"), checkpoint_path=checkpoint, progress=False,
                      teacher_cache=cache)  # fmt: skip


def make_method(cls, hp, teacher, task, splits, recipe: Recipe = RECIPE):
    seed_everything(SEED)
    student = create_model("resnet8", 10, 1)
    return cls(student, teacher, hp, MethodContext(splits.info, task.train_loader.num_samples, recipe.epochs))


def train(splits, teacher_state, cls, hp, cache: bool, hooks=None, checkpoint: Path | None = None,
          recipe: Recipe = RECIPE):  # fmt: skip
    teacher = make_teacher(teacher_state)
    task = make_task(splits, cache, recipe, checkpoint)
    method = make_method(cls, hp, teacher, task, splits, recipe)
    counter = CountingTeacher(teacher)  # after the method's set-up (FitNet probes the stage shapes)
    history = method.fit(task, recipe, hooks)
    return history, method.student.state_dict(), counter.sizes, task


def assert_same(history_a, history_b):
    assert len(history_a.epochs) == len(history_b.epochs)
    for a, b in zip(history_a.epochs, history_b.epochs):
        assert set(a) == set(b)
        keys = sorted(k for k in a if k != "epoch_s")
        values_a, values_b = (torch.tensor([e[k] for k in keys], dtype=torch.float64) for e in (a, b))
        torch.testing.assert_close(values_a, values_b, rtol=RTOL, atol=ATOL)


def epoch_batch_sizes(task) -> list[int]:
    task.train_loader.set_epoch(0)
    return [len(y) for _, y, *_ in task.train_loader]


def cache_model(task, epochs: int, calls: int = 1, start: int = 0) -> tuple[list[int], int, int, int]:
    """What a per-sample store that serves full batches only must do on ``task``'s batches, for ``calls``
    teacher calls per step on the batch: the sizes of the real teacher passes, and its misses (passes
    stored), hits and bypasses. A full batch with a row not stored yet is computed and stored; the last,
    smaller batch is always computed, and its rows not stored yet are also computed in a batch padded to full
    size (the size they are served at) and stored."""
    loader, filled, full = task.train_loader, set(), task.train_loader.batch_size
    sizes, misses, hits, bypassed = [], 0, 0, 0
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        for _ in loader:
            index = set(loader.last_index.tolist())
            for _ in range(calls):
                stored = index <= filled
                if len(index) != full:
                    sizes += [len(index)] + ([] if stored else [full])
                    bypassed, misses = bypassed + 1, misses + (not stored)
                elif stored:
                    hits += 1
                else:
                    sizes.append(full)
                    misses += 1
                filled |= index
    return sizes, misses, hits, bypassed


class InPlaceKD(KD):
    """Halves the teacher logits in place before KD uses a fresh teacher call: a cache that kept the tensor it
    returned would see halved logits in the next epoch."""

    name = "inplace_kd_cache"

    def forward_train(self, x: Tensor, y: Tensor):
        self.teacher_features(x).logits.mul_(0.5)
        return super().forward_train(x, y)


class FlipKD(KD):
    """Also distils the teacher on the horizontally flipped batch: that input is not the bound training batch,
    so it must go to the real teacher every epoch."""

    name = "flip_kd_cache"

    def forward_train(self, x: Tensor, y: Tensor):
        logits, losses = super().forward_train(x, y)
        losses["flip"] = 0.5 * self.student(x.flip(3)).sub(self.teacher_features(x.flip(3)).logits).pow(2).mean()
        return logits, losses


@pytest.mark.parametrize("name,cls,hp,recipe", [
    ("kd", KD, KDHparams(), RECIPE),
    ("fitnet", get_method("fitnet"), get_method("fitnet").Hparams(), RECIPE),
    # stage maps in NHWC: the cache serves them in the teacher's memory format
    ("fitnet_channels_last", get_method("fitnet"), get_method("fitnet").Hparams(),
     dataclasses.replace(RECIPE, epochs=2, milestones=[1], channels_last=True)),
    ("inplace", InPlaceKD, KDHparams(), RECIPE),
])  # fmt: skip
def test_cached_run_equals_uncached_run_and_teacher_runs_in_the_first_epoch_only(splits, teacher_state, name, cls, hp,
                                                                                  recipe):  # fmt: skip
    plain, plain_state, plain_sizes, task = train(splits, teacher_state, cls, hp, cache=False, recipe=recipe)
    cached, cached_state, cached_sizes, _ = train(splits, teacher_state, cls, hp, cache=True, recipe=recipe)
    assert_same(plain, cached)
    for key, value in plain_state.items():
        torch.testing.assert_close(cached_state[key], value, rtol=RTOL, atol=ATOL)
    sizes = epoch_batch_sizes(task)
    assert sizes == [64] * 6 + [1]
    calls = 2 if cls is InPlaceKD else 1  # InPlaceKD calls the teacher twice per step (the 2nd call: a hit)
    assert plain_sizes == [s for s in sizes for _ in range(calls)] * recipe.epochs
    # one single-sample probe (memory estimate), then the full batches with a sample not stored yet (epoch 1,
    # and in epoch 2 the batch holding epoch 1's last sample) and the last batch of every epoch
    passes, misses, hits, bypassed = cache_model(task, recipe.epochs, calls)
    assert cached_sizes == [1] + passes and len(passes) < len(plain_sizes)
    assert plain.teacher_cache.status == "off: disabled (--no-teacher-cache)"
    report = cached.teacher_cache
    assert report.status == "on" and (report.misses, report.hits, report.bypassed) == (misses, hits, bypassed)


def test_other_inputs_go_to_the_real_teacher(splits, teacher_state):
    plain, _, _, task = train(splits, teacher_state, FlipKD, KDHparams(), cache=False)
    cached, _, sizes, _ = train(splits, teacher_state, FlipKD, KDHparams(), cache=True)
    assert_same(plain, cached)
    batches = epoch_batch_sizes(task)
    # as cache_model, plus the flipped batch of every step (not the bound batch: always the real teacher)
    _, misses, hits, bypassed = cache_model(task, RECIPE.epochs)
    assert len(sizes) == 1 + misses + bypassed + len(batches) * RECIPE.epochs
    report = cached.teacher_cache
    assert (report.misses, report.hits, report.bypassed) == (misses, hits, bypassed + len(batches) * RECIPE.epochs)


class StopAtEpoch:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_resumed_cached_run_equals_uninterrupted_cached_run(splits, teacher_state, tmp_path):
    reference, reference_state, _, task = train(splits, teacher_state, KD, KDHparams(), cache=True)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):  # in epoch 2's hook, before its checkpoint: resume at epoch 2
        train(splits, teacher_state, KD, KDHparams(), cache=True, hooks=StopAtEpoch(1), checkpoint=checkpoint)
    resumed, resumed_state, sizes, _ = train(splits, teacher_state, KD, KDHparams(), cache=True, checkpoint=checkpoint)
    assert_same(reference, resumed)
    for key, value in reference_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=RTOL, atol=ATOL)
    # the resumed process refills the cache from its first epoch (epoch 2) on
    passes, misses, hits, _ = cache_model(task, RECIPE.epochs, start=1)
    assert sizes == [1] + passes
    assert (resumed.teacher_cache.misses, resumed.teacher_cache.hits) == (misses, hits)


def test_lockstep_with_cache_equals_separate_uncached_runs(splits, teacher_state):
    configs = [(KD, KDHparams(temperature=4.0)), (KD, KDHparams(temperature=2.0)),
               (get_method("fitnet"), get_method("fitnet").Hparams())]  # fmt: skip
    reference = [train(splits, teacher_state, cls, hp, cache=False)[:2] for cls, hp in configs]
    teacher = make_teacher(teacher_state)
    tasks = [make_task(splits, cache=True) for _ in configs]
    methods = [make_method(cls, hp, teacher, task, splits) for (cls, hp), task in zip(configs, tasks)]
    counter = CountingTeacher(teacher)
    results = fit_lockstep(methods, tasks, RECIPE)
    passes, _, hits, _ = cache_model(tasks[0], RECIPE.epochs)
    assert counter.sizes == [1] * len(configs) + passes  # a probe per run, then the passes of one run
    for (history, state), result, method in zip(reference, results, methods):
        assert result.error is None
        assert result.teacher_passes == len(passes)
        assert result.history.teacher_cache.status == "on"
        assert result.history.teacher_cache.hits == hits
        assert_same(history, result.history)
        for key, value in state.items():
            torch.testing.assert_close(method.student.state_dict()[key], value, rtol=RTOL, atol=ATOL)
    assert "forward_features" not in teacher.__dict__  # both patches removed


@pytest.mark.parametrize("channels_last", [False, True])
def test_cache_serves_the_bound_batch_by_sample_position(teacher_state, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = make_teacher(teacher_state).eval().to(memory_format=fmt)  # as TrainingRun does
    images = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def batch(positions: list[int]) -> tuple[Tensor, Tensor]:
        return images[positions].contiguous(memory_format=fmt), torch.tensor(positions)

    def real(x: Tensor):
        with torch.no_grad():
            return type(teacher).forward_features(teacher, x)

    cache = TeacherCache(teacher, 10, batch_size=5)
    with cache.active(), torch.no_grad():
        for positions in ([3, 0, 8, 5, 1], [9, 2, 4, 6, 7]):  # the first epoch stores every row
            cache.bind(*batch(positions))
            teacher.forward_features(cache.x)
        cache.bind(*batch([7, 2, 9]))  # a smaller batch: computed at another size, never served from the store
        teacher.forward_features(cache.x)
        assert (cache.misses, cache.hits, cache.bypassed) == (2, 0, 1)
        x, index = batch([7, 2, 9, 0, 5])
        cache.bind(x, index)
        served = teacher.forward_features(x)
        assert (cache.misses, cache.hits) == (2, 1)
        expected = real(x)
        for got, want in zip([*served.stages, served.feature, served.logits],
                             [*expected.stages, expected.feature, expected.logits]):  # fmt: skip
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
            assert got.stride() == want.stride()  # the teacher's memory format
        assert served.stages[0].is_contiguous(memory_format=fmt)
        teacher.forward_features(x.clone())  # an equal tensor that is not the bound batch
        with torch.enable_grad():
            teacher.forward_features(x)  # gradients on
        x.mul_(2.0)  # the bound batch modified in place
        doubled = teacher.forward_features(x)
        torch.testing.assert_close(doubled.logits, real(x).logits)
        assert (cache.misses, cache.hits, cache.bypassed) == (2, 1, 4)


def test_nested_patches_restore_each_other(teacher_state):
    teacher = make_teacher(teacher_state)
    cache, shared = TeacherCache(teacher, 10, 5), SharedTeacher(teacher)
    with cache.active():
        cache_patch = teacher.forward_features
        with shared.active():
            assert teacher.forward_features is not cache_patch
        assert teacher.forward_features is cache_patch  # SharedTeacher put the cache's patch back
    assert "forward_features" not in teacher.__dict__


# ---- where it does not apply ---------------------------------------------------------------------
def reason(splits, teacher_state, recipe: Recipe = RECIPE, name: str = "kd", data=None, **kwargs) -> str | None:
    data = data or splits
    cls = get_method(name)
    task = build_task(data, 1.0 if data is not splits else FRACTION, SEED, recipe, torch.device("cpu"), progress=False,
                      teacher_cache=True)  # fmt: skip
    teacher = make_teacher(teacher_state) if data is splits else create_model("resnet8", data.info.num_classes, 3)
    student = create_model("resnet8", data.info.num_classes, data.info.in_channels)
    method = cls(student, teacher, cls.Hparams(), MethodContext(data.info, task.train_loader.num_samples, 1))
    return cache_applies(method, task, recipe, **kwargs)


def test_cache_applies_only_where_it_cannot_change_the_method(splits, teacher_state, tmp_path):
    from tests.fixtures import write_cifar

    assert reason(splits, teacher_state) is None
    assert reason(splits, teacher_state, dataclasses.replace(RECIPE, augment="auto")) is None  # digits: none
    cifar = load_dataset("cifar10", write_cifar(tmp_path, num_classes=10, train_per_class=5, test_per_class=1))
    assert reason(splits, teacher_state, dataclasses.replace(RECIPE, augment="auto"), data=cifar) == (
        "training augmentation 'crop_flip' is random"
    )
    assert reason(splits, teacher_state, dataclasses.replace(RECIPE, augment="crop")) == (
        "training augmentation 'crop' is random"
    )
    assert "'online'" in reason(splits, teacher_state, name="dml")
    assert "'none'" in reason(splits, teacher_state, name="ce")
    assert "own fit procedure" in reason(splits, teacher_state, name="crd")
    assert reason(splits, teacher_state, dataclasses.replace(RECIPE, amp=True)) == "recipe.amp is on"
    assert reason(splits, teacher_state, dataclasses.replace(RECIPE, compile=True)) == "recipe.compile is on"
    assert "over its budget" in reason(splits, teacher_state, budget_bytes=1000)


def test_memory_estimate_is_one_sample_pass_times_the_training_set(splits, teacher_state):
    teacher = make_teacher(teacher_state).eval()
    per_sample = sample_bytes(teacher, (1, 8, 8), torch.device("cpu"))
    feats = teacher.forward_features(torch.zeros(5, 1, 8, 8))
    assert per_sample * 5 == sum(t.numel() * 4 for t in [*feats.stages, feats.feature, feats.logits])
    task = make_task(splits, cache=True)
    need = per_sample * task.train_loader.num_samples
    assert reason(splits, teacher_state, budget_bytes=need) is None
    assert reason(splits, teacher_state, budget_bytes=need - 1) is not None


def test_off_runs_say_why_and_train_unchanged(splits, teacher_state):
    recipe = dataclasses.replace(RECIPE, epochs=1, milestones=[], augment="crop_flip")
    teacher = make_teacher(teacher_state)
    counter = CountingTeacher(teacher)
    task = make_task(splits, cache=True, recipe=recipe)
    method = make_method(KD, KDHparams(), teacher, task, splits, recipe)
    assert cache_status(method, task, recipe) == "off: training augmentation 'crop_flip' is random"
    history = method.fit(task, recipe)
    assert history.teacher_cache.status == "off: training augmentation 'crop_flip' is random"
    assert history.teacher_cache.metrics() == {} and history.teacher_cache.tags() == {
        "teacher_cache": "off: training augmentation 'crop_flip' is random"
    }
    assert counter.sizes == epoch_batch_sizes(task)  # no probe, a pass per batch
