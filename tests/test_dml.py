"""DML loss by hand, the peer as a constant target, and online runs (dml, bdkd) through the real engine."""
import math

import pytest
import torch

from bench.data import load_dataset
from bench.engine import build_task
from bench.recipe import Recipe
from bench.models import create_model
from bench.suites import expand, parse_suite
from methods import MethodContext, build_hparams, get_method
from methods.dml import dml_loss


def test_dml_loss_by_hand():
    # one sample, two classes, target 1: p_self = (1/2, 1/2), p_peer = (3/4, 1/4)
    logits = torch.tensor([[0.0, 0.0]])
    peer = torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_peer || p_self)
    assert dml_loss(logits, peer, torch.tensor([1])).item() == pytest.approx(math.log(2.0) + kl, abs=1e-6)
    weighted = dml_loss(logits, peer, torch.tensor([1]), kl_weight=0.5).item()
    assert weighted == pytest.approx(math.log(2.0) + 0.5 * kl, abs=1e-6)


def test_dml_loss_at_temperature_by_hand():
    # T = 2: p_self = softmax((0, 0)/2) = (1/2, 1/2), p_peer = softmax((2 ln 3, 0)/2) = (3/4, 1/4); CE stays at T = 1
    logits = torch.tensor([[0.0, 0.0]])
    peer = torch.tensor([[2 * math.log(3.0), 0.0]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    got = dml_loss(logits, peer, torch.tensor([0]), temperature=2.0).item()
    assert got == pytest.approx(math.log(2.0) + 4 * kl, abs=1e-6)


def test_the_peer_is_a_constant_target():
    logits = torch.randn(4, 5).requires_grad_()
    peer = torch.randn(4, 5).requires_grad_()
    dml_loss(logits, peer, torch.tensor([0, 1, 2, 3])).backward()
    assert peer.grad is None and logits.grad is not None


def test_hparams_validation():
    assert build_hparams("dml", {}, "dml").temperature == 1.0
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="temperature"):
        build_hparams("dml", {"temperature": -1}, "dml")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("name", ["dml", "bdkd"])
def test_one_engine_step_updates_both_nets(digits, name):
    recipe = Recipe(epochs=1, batch_size=64, milestones=[])
    task = build_task(digits, 0.03, 0, recipe, torch.device("cpu"), progress=False)
    assert len(task.train_loader) == 1  # 50 images: exactly one optimizer step
    info = digits.info
    torch.manual_seed(0)
    student = create_model("resnet8", info.num_classes, info.in_channels)
    teacher = create_model("resnet14", info.num_classes, info.in_channels)
    cls = get_method(name)
    method = cls(student, teacher, build_hparams(name, {}, name), MethodContext(info, 50, 1))
    assert cls.teacher_mode == "online" and all(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in method.state_dict().items() if "running" not in k and "num_batches" not in k}
    history = method.fit(task, recipe)
    after = method.state_dict()
    for net in ("student.", "teacher."):
        keys = [k for k in before if k.startswith(net)]
        unchanged = [k for k in keys if torch.equal(before[k], after[k])]
        assert keys and not unchanged, f"{net} parameters not updated: {unchanged[:3]}"
    metrics = history.epochs[-1]
    for key in ("test_top1", "test_ece", "teacher_test_top1", "teacher_test_ece"):
        assert 0 <= metrics[key] <= 100
    assert set(k for k in metrics if k.startswith("train_loss_")) == {"train_loss_student", "train_loss_teacher"}


def test_online_methods_get_no_pretrained_teacher():
    raw = {
        "name": "t", "dataset": "digits", "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
        "methods": ["ce", "kd", "dml", "bdkd"], "fractions": [1.0], "seeds": [0],
    }  # fmt: skip
    specs = {s.method: s for s in expand(parse_suite(raw))}
    assert specs["kd"].teacher_spec is not None
    assert specs["dml"].teacher_spec is None and specs["bdkd"].teacher_spec is None
