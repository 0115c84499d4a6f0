"""Every new method and modifier trains an epoch on digits through the engine; a composed run (all three
modifiers) resumes bit for bit from its checkpoint (CTKD's temperature, DOT's two momentum buffers), and
gives the same result with the teacher cache and in a lockstep group as alone."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.data import load_dataset
from bench.engine import build_task, fit, seed_everything
from bench.recipe import Recipe
from bench.lockstep import fit_lockstep
from bench.models import create_model
from methods import MethodContext, build_hparams, get_method

torch.set_num_threads(1)
SEED = 1
FRACTION = 0.2
NEW = ["mlkd", "mlkd+ls", "wttm", "nkd", "kd+ls", "kd+ctkd", "dkd+ls+ctkd", "kd+dot"]
ALL_THREE = "kd+ls+ctkd+dot"


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher_state():
    seed_everything(100)
    return create_model("resnet8", 10, 1).state_dict()


def make(splits, teacher_state, name, recipe, cache=False, checkpoint: Path | None = None, teacher=None):
    task = build_task(splits, FRACTION, SEED, recipe, torch.device("cpu"), checkpoint_path=checkpoint, progress=False,
                      teacher_cache=cache)  # fmt: skip
    if teacher is None:
        teacher = create_model("resnet8", 10, 1)
        teacher.load_state_dict(teacher_state)
    seed_everything(SEED)
    student = create_model("resnet8", 10, 1)
    hp = build_hparams(name, {"warmup_epochs": 1} if name.startswith("dkd") else {}, name)
    context = MethodContext(splits.info, task.train_loader.num_samples, recipe.epochs)
    return get_method(name)(student, teacher, hp, context), task


def state(method) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.checkpoint_state().items()}


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", NEW)
def test_every_new_method_and_modifier_trains_an_epoch_on_digits(splits, teacher_state, name):
    recipe = Recipe(epochs=1, milestones=[], augment="crop_flip")
    method, task = make(splits, teacher_state, name, recipe)
    before = state(method)
    history = fit(method, task, recipe)
    metrics = history.epochs[-1]
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["test_top1"] <= 100
    assert any(not torch.equal(before[k], v) for k, v in method.checkpoint_state().items() if k.startswith("student."))


def test_a_composed_run_resumes_exactly_from_its_checkpoint(splits, teacher_state, tmp_path):
    recipe = Recipe(epochs=2, milestones=[1], augment="crop_flip")
    straight, task = make(splits, teacher_state, ALL_THREE, recipe)
    fit(straight, task, recipe)

    class StopInSecondEpoch:  # the hook runs before the epoch's checkpoint: epoch 1's is on disk
        def on_epoch_end(self, epoch, metrics):
            if epoch == 1:
                raise KeyboardInterrupt

    path = tmp_path / "checkpoint.pt"
    first, task = make(splits, teacher_state, ALL_THREE, recipe, checkpoint=path)
    with pytest.raises(KeyboardInterrupt):
        fit(first, task, recipe, StopInSecondEpoch())
    saved = torch.load(path, weights_only=True)
    assert "logit_modifiers.1.theta" in saved["method"]
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(saved["optimizer"]["state"][0])
    resumed, task = make(splits, teacher_state, ALL_THREE, recipe, checkpoint=path)
    fit(resumed, task, recipe)
    assert_equal_states(state(resumed), state(straight))
    assert resumed.logit_modifiers[1].theta.item() != 1.0  # the temperature was trained


def test_dot_and_ctkd_runs_give_the_same_result_with_the_teacher_cache_and_in_lockstep(splits, teacher_state):
    recipe = Recipe(epochs=2, milestones=[1], augment="none")
    names = ["kd+dot", "kd+ctkd", "kd"]
    alone = []
    for name in names:
        method, task = make(splits, teacher_state, name, recipe)
        fit(method, task, recipe)
        alone.append(state(method))
    cached, task = make(splits, teacher_state, "kd+dot", recipe, cache=True)
    history = cached.fit(task, recipe)  # Method.fit hands the engine the teacher cache
    assert history.teacher_cache.status == "on" and history.teacher_cache.hits > 0
    assert_equal_states(state(cached), alone[0])
    teacher = create_model("resnet8", 10, 1)
    teacher.load_state_dict(teacher_state)
    group = [make(splits, teacher_state, name, recipe, teacher=teacher) for name in names]
    results = fit_lockstep([m for m, _ in group], [t for _, t in group], recipe)
    assert all(r.error is None for r in results)
    for (method, _), reference in zip(group, alone):
        assert_equal_states(state(method), reference)
