"""One teacher pass for many students: lockstep training equals separate runs with the same seeds."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor

from bench.data import load_dataset
from bench.engine import build_task, fit, seed_everything
from bench.recipe import Recipe
from bench.errors import BenchError
from bench.lockstep import fit_lockstep
from bench.run.jobs import lockstep_groups
from bench.models import create_model
from methods import MethodContext, get_method
from methods.kd import KD, KDHparams

torch.set_num_threads(1)
SEED = 3
RECIPE = Recipe(epochs=2, batch_size=64, lr=0.05, milestones=[1], augment="crop_flip")


class NoisyKD(KD):
    """KD whose student logits get Gaussian noise: draws from the global RNG every step, so it only
    matches its separate run if each lockstep member keeps its own RNG stream."""

    name = "noisy_kd"

    def forward_train(self, x: Tensor, y: Tensor):
        logits, losses = super().forward_train(x, y)
        losses["noise"] = 0.01 * (logits * torch.randn_like(logits)).mean()
        return logits, losses


class FailingKD(KD):
    name = "failing_kd"

    def forward_train(self, x: Tensor, y: Tensor):
        if self.epoch == 1:
            raise ValueError("boom")
        return super().forward_train(x, y)


class InPlaceKD(KD):
    """Modifies the teacher's output in place: harmless alone, wrong when the output is shared."""

    name = "inplace_kd"

    def forward_train(self, x: Tensor, y: Tensor):
        self.teacher_features(x).logits.mul_(0.5)
        return super().forward_train(x, y)


CONFIGS = [(KD, KDHparams(temperature=4.0)), (KD, KDHparams(temperature=2.0)), (NoisyKD, KDHparams())]


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher_state(splits):
    seed_everything(100)
    return create_model("resnet8", 10, 1).state_dict()


def make_task(splits, checkpoint: Path | None = None):
    return build_task(splits, 0.25, SEED, RECIPE, torch.device("cpu"), checkpoint_path=checkpoint, progress=False)


def make_teacher(teacher_state):
    teacher = create_model("resnet8", 10, 1)
    teacher.load_state_dict(teacher_state)
    return teacher


def make_method(cls, hp, teacher, task, splits):
    seed_everything(SEED)  # as the runner does before building the student
    student = create_model("resnet8", 10, 1)
    return cls(student, teacher, hp, MethodContext(splits.info, task.train_loader.num_samples, RECIPE.epochs))


def separate(splits, teacher_state, configs):
    out = []
    for cls, hp in configs:
        task = make_task(splits)
        method = make_method(cls, hp, make_teacher(teacher_state), task, splits)
        out.append((fit(method, task, RECIPE), method.student.state_dict()))
    return out


def assert_same(history_a, history_b):
    assert len(history_a.epochs) == len(history_b.epochs)
    for a, b in zip(history_a.epochs, history_b.epochs):
        assert set(a) == set(b)
        for key in a:
            if key != "epoch_s":
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


class Recorder:
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append(epoch)


def test_lockstep_equals_separate_runs_with_one_teacher_pass_per_batch(splits, teacher_state):
    reference = separate(splits, teacher_state, CONFIGS)
    teacher = make_teacher(teacher_state)
    calls = {"n": 0}
    original = teacher.forward_stem

    def counting_stem(x):
        calls["n"] += 1
        return original(x)

    teacher.forward_stem = counting_stem
    tasks = [make_task(splits) for _ in CONFIGS]
    methods = [make_method(cls, hp, teacher, task, splits) for (cls, hp), task in zip(CONFIGS, tasks)]
    hooks = [Recorder() for _ in CONFIGS]
    results = fit_lockstep(methods, tasks, RECIPE, hooks)

    batches = len(tasks[0].train_loader) * RECIPE.epochs
    assert calls["n"] == batches  # one teacher pass per batch for all three methods
    assert all(r.teacher_passes == batches for r in results)
    for (history, state), result, method, hook in zip(reference, results, methods, hooks):
        assert result.error is None
        assert_same(history, result.history)
        assert hook.epochs == [0, 1]
        for key, value in state.items():
            torch.testing.assert_close(method.student.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    # the shared epoch time is split among the runs, not counted k times
    assert all(r.history.epochs[0]["epoch_s"] > 0 for r in results)


class StopAfterFirstEpoch:
    def on_epoch_end(self, epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt


def test_lockstep_resumes_each_run_from_its_own_checkpoint(splits, teacher_state, tmp_path):
    reference = separate(splits, teacher_state, CONFIGS)
    paths = [tmp_path / f"run{i}" / "checkpoint.pt" for i in range(len(CONFIGS))]

    def attempt(hooks):
        teacher = make_teacher(teacher_state)
        tasks = [make_task(splits, p) for p in paths]
        methods = [make_method(cls, hp, teacher, task, splits) for (cls, hp), task in zip(CONFIGS, tasks)]
        return fit_lockstep(methods, tasks, RECIPE, hooks)

    # the last run is interrupted in its first epoch's hook, before its checkpoint: the first two
    # runs resume at epoch 2, the last one at epoch 1
    with pytest.raises(KeyboardInterrupt):
        attempt([None, None, StopAfterFirstEpoch()])
    assert paths[0].exists() and paths[1].exists() and not paths[2].exists()
    results = attempt(None)
    for (history, _), result in zip(reference, results):
        assert result.error is None
        assert_same(history, result.history)


def test_a_failing_run_stops_alone(splits, teacher_state):
    configs = [(KD, KDHparams()), (FailingKD, KDHparams())]
    reference = separate(splits, teacher_state, configs[:1])
    teacher = make_teacher(teacher_state)
    tasks = [make_task(splits) for _ in configs]
    methods = [make_method(cls, hp, teacher, task, splits) for (cls, hp), task in zip(configs, tasks)]
    ok, failed = fit_lockstep(methods, tasks, RECIPE)
    assert ok.error is None
    assert_same(reference[0][0], ok.history)
    assert isinstance(failed.error, ValueError) and len(failed.history.epochs) == 1


def test_in_place_change_of_shared_teacher_output_is_caught(splits, teacher_state):
    configs = [(InPlaceKD, KDHparams()), (KD, KDHparams())]
    reference = separate(splits, teacher_state, configs)
    teacher = make_teacher(teacher_state)
    tasks = [make_task(splits) for _ in configs]
    methods = [make_method(cls, hp, teacher, task, splits) for (cls, hp), task in zip(configs, tasks)]
    bad, good = fit_lockstep(methods, tasks, RECIPE)
    assert isinstance(bad.error, RuntimeError) and "in place" in str(bad.error)
    assert good.error is None
    assert_same(reference[1][0], good.history)  # the other method recomputed the teacher pass


def test_lockstep_refuses_runs_that_cannot_share(splits, teacher_state):
    task = make_task(splits)
    a = make_method(KD, KDHparams(), make_teacher(teacher_state), task, splits)
    b = make_method(KD, KDHparams(), make_teacher(teacher_state), task, splits)
    with pytest.raises(BenchError, match="one shared teacher"):
        fit_lockstep([a, b], [task, task], RECIPE)
    b.teacher = a.teacher
    with pytest.raises(BenchError, match="batch_size"):
        fit_lockstep([a, b], [task, task], [RECIPE, dataclasses.replace(RECIPE, batch_size=32)])
    other = build_task(splits, 0.25, SEED + 1, RECIPE, torch.device("cpu"), progress=False)
    with pytest.raises(BenchError, match="same batches"):
        fit_lockstep([a, b], [task, other], RECIPE)
    ce = get_method("ce")(create_model("resnet8", 10, 1), None, None, a.context)
    with pytest.raises(BenchError, match="offline"):
        fit_lockstep([a, ce], [task, task], RECIPE)

    class OwnFit(KD):  # prepares something in fit, which the lockstep loop would skip
        name = "own_fit"

        def fit(self, task, recipe, hooks=None):
            return super().fit(task, recipe, hooks)

    own = OwnFit(create_model("resnet8", 10, 1), a.teacher, KDHparams(), a.context)
    with pytest.raises(BenchError, match="own fit procedure"):
        fit_lockstep([a, own], [task, task], RECIPE)


def test_lockstep_groups_of_a_suite():
    from bench.suites import expand, parse_suite

    suite = parse_suite({
        "name": "g", "dataset": "digits", "fractions": [0.5, 1.0], "seeds": [0, 1],
        "pairs": [{"teacher": "resnet20", "student": "resnet8"}, {"teacher": "wrn_16_2", "student": "resnet8"}],
        "methods": ["ce", "kd", {"name": "kd", "label": "kd_t2", "hparams": {"temperature": 2.0}}],
        "recipe": {"epochs": 2, "milestones": [1]},
    })  # fmt: skip
    specs = expand(suite)
    groups = lockstep_groups(specs)
    assert sorted(len(g) for g in groups) == [1] * 8 + [2] * 8  # 8 ce runs alone; kd + kd_t2 per (pair, f, seed)
    for group in groups:
        if len(group) == 2:
            assert {s.label for s in group} == {"kd", "kd_t2"}
            assert len({(s.teacher_spec.hash, s.fraction, s.seed) for s in group}) == 1
        else:
            assert group[0].method == "ce"
    assert all(len(g) == 1 for g in lockstep_groups(specs, max_group=1))


def test_a_run_whose_checkpoint_cannot_be_read_fails_alone(splits, teacher_state, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    teacher = make_teacher(teacher_state)
    tasks = [make_task(splits), make_task(splits, broken)]
    methods = [make_method(KD, KDHparams(), teacher, task, splits) for task in tasks]
    ok, failed = fit_lockstep(methods, tasks, RECIPE)
    assert ok.error is None and len(ok.history.epochs) == RECIPE.epochs
    assert failed.error is not None and failed.history.epochs == []
