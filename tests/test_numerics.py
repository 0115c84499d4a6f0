"""Numerics switches (``recipe.tf32``, ``recipe.deterministic``, ``--deterministic``): the torch flags they set
(CUDA mocked by passing a CUDA device, which only flags are set for), the run's record, and CPU runs unchanged."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from bench.data import load_dataset
from bench.engine import build_task, fit, seed_everything
from bench.recipe import Recipe, apply_numerics
from bench.models import create_model
from methods import MethodContext
from methods.ce import CrossEntropy

CUDA = torch.device("cuda")  # apply_numerics only sets flags for it: no GPU is needed to check them


def flags() -> dict[str, object]:
    return {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }


@pytest.fixture(autouse=True)
def restore_flags(monkeypatch):
    """Each test starts from PyTorch's defaults (cuDNN TF32 on, matmul TF32 off) and leaves them so."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True  # as a user script might have set it
    torch.use_deterministic_algorithms(False)
    yield
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(False)


def test_defaults_are_reference_numerics():
    recipe = Recipe()
    assert recipe.tf32 is False and recipe.deterministic is False


def test_cpu_default_changes_no_setting():
    before = flags()
    apply_numerics(Recipe(), torch.device("cpu"))
    assert flags() == before


def test_cuda_reference_run_turns_tf32_off():
    apply_numerics(Recipe(), CUDA)
    got = flags()
    assert not got["matmul_tf32"] and not got["cudnn_tf32"]  # cuDNN's TF32 default was on
    assert not got["deterministic"] and not got["cudnn_deterministic"]
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    apply_numerics(Recipe(tf32=True), CUDA)
    assert flags()["matmul_tf32"] and flags()["cudnn_tf32"]


@pytest.mark.parametrize("device", [CUDA, torch.device("cpu")])
def test_deterministic_sets_cudnn_and_torch(device):
    apply_numerics(Recipe(deterministic=True), device)
    got = flags()
    assert got["cudnn_deterministic"] and not got["cudnn_benchmark"]
    assert got["deterministic"] and got["warn_only"]
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") == (device.type == "cuda")
    apply_numerics(Recipe(), device)  # the next run of the process gets its own recipe's settings
    assert not flags()["deterministic"] and not flags()["cudnn_deterministic"]


def test_recorded_on_the_run_and_part_of_its_hash():
    from bench.__main__ import build_parser, with_speed_flags
    from bench.suites import expand, load_suite

    suite = load_suite("mini")
    spec = expand(suite)[0]
    assert spec.params()["recipe.tf32"] is False and spec.params()["recipe.deterministic"] is False
    det = expand(with_speed_flags(suite, build_parser().parse_args(["run", "mini", "--deterministic"])))[0]
    assert det.recipe.deterministic and det.params()["recipe.deterministic"] is True
    assert det.hash != spec.hash and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    tf32 = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, tf32=True))
    assert tf32.params()["recipe.tf32"] is True and tf32.hash != spec.hash


def _train(recipe: Recipe) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    splits = load_dataset("digits")
    seed_everything(3)
    task = build_task(splits, 0.2, 0, recipe, torch.device("cpu"), progress=False)
    context = MethodContext(splits.info, task.train_loader.num_samples, 1)
    method = CrossEntropy(create_model("resnet8", 10, 1), None, None, context)
    history = fit(method, task, recipe)
    return history.epochs[-1], method.student.state_dict()


def test_a_cpu_run_is_the_same_with_deterministic_algorithms():
    """The training loop applies the recipe's switches (TrainingRun), and on a CPU they change no bit."""
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, milestones=[], augment="crop_flip")
    plain_metrics, plain_state = _train(recipe)
    assert not torch.are_deterministic_algorithms_enabled()
    det_metrics, det_state = _train(dataclasses.replace(recipe, deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()  # set by the run
    assert det_metrics["train_loss"] == plain_metrics["train_loss"]
    assert det_metrics["test_nll"] == plain_metrics["test_nll"]
    assert all(torch.equal(det_state[k], v) for k, v in plain_state.items())
