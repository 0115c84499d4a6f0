"""``srd``: the loss against the formula, numerical edge cases, the projector in the optimizer, every switch on
every pair of the shipped SRD suites, and the suites themselves."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from bench.data import DatasetInfo, load_dataset
from bench.engine import build_task, fit
from bench.recipe import Recipe, make_optimizer
from bench.errors import BenchError
from bench.models import create_model
from bench.suites import expand, load_suite, resolve_suite_path
from methods import MethodContext, build_hparams, get_method
from methods.srd import DISTANCES, NORMALISATIONS, PROJECTORS, SRDHparams, log_sum_power, srd_loss

SRD_SUITES = ("srd-imagenet", "srd-cifar100", "ablation-srd")
SWITCHES = list(itertools.product(NORMALISATIONS, DISTANCES, PROJECTORS))
TINY32 = torch.finfo(torch.float32).tiny


def _kl_by_hand(s: list[list[float]], t: list[list[float]], temperature: float) -> float:
    total = 0.0
    for row_s, row_t in zip(s, t):
        es = [math.exp(v / temperature) for v in row_s]
        et = [math.exp(v / temperature) for v in row_t]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / len(s)


@pytest.mark.parametrize("exponent", [4.0, 3.0, 1.0])
def test_srd_loss_matches_the_hand_computed_formula(exponent):
    fs = [[1.0, 2.0], [0.0, -1.0]]
    ft = [[0.0, 0.5], [1.0, 1.0]]
    ls = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    lt = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    temperature = 2.0
    power_sum = sum(abs(a - b) ** exponent for ra, rb in zip(fs, ft) for a, b in zip(ra, rb))
    expected = 2.0 * math.log(power_sum) + _kl_by_hand(ls, lt, temperature)  # no T² factor
    got = srd_loss(torch.tensor(fs), torch.tensor(ft), torch.tensor(ls), torch.tensor(lt), exponent, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.5, 4.0, 8.0])
def test_log_sum_power_value_and_gradient_match_the_plain_formula_in_float64(exponent):
    torch.manual_seed(0)
    delta = torch.randn(6, 5, dtype=torch.float64) * 3
    ours = delta.clone().float().requires_grad_(True)
    plain = delta.clone().requires_grad_(True)
    log_sum_power(ours, exponent).backward()
    torch.log(plain.abs().pow(exponent).sum()).backward()
    assert log_sum_power(ours.detach(), exponent).item() == pytest.approx(
        torch.log(delta.abs().pow(exponent).sum()).item(), rel=1e-6
    )
    torch.testing.assert_close(ours.grad.double(), plain.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-8, 1e-12])
@pytest.mark.parametrize("exponent", [4.0, 8.0])
def test_tiny_differences_of_normalised_features_stay_finite_in_float32(scale, exponent):
    """f̂_s = f̂_t + δ with O(1) features: float32 keeps only part of δ (or none of it at 1e-12)."""
    torch.manual_seed(0)
    teacher = torch.randn(4, 16)
    student = (teacher + (torch.rand(4, 16) + 0.5) * scale).requires_grad_(True)
    represented = (student - teacher).detach().double()
    zeros = torch.zeros(4, 3)
    loss = srd_loss(student, teacher, zeros, zeros, exponent)
    if represented.abs().max() > 0:
        assert loss.item() == pytest.approx(2.0 * torch.log(represented.abs().pow(exponent).sum()).item(), rel=1e-5)
    else:
        assert loss.item() == pytest.approx(2.0 * exponent * math.log(TINY32), rel=1e-6)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_tiny_differences_on_their_own_scale_float32():
    """Differences of 1e-8 and 1e-12 held directly (not as a difference of O(1) values)."""
    for scale, exponent in itertools.product([1e-8, 1e-12, 1e-20], [4.0, 8.0]):
        delta = ((torch.arange(12.0).view(3, 4) + 1) * scale).requires_grad_(True)
        plain = torch.log(delta.detach().pow(exponent).sum())
        ours = log_sum_power(delta, exponent)
        exact = math.log(sum(((i + 1) * scale) ** exponent for i in range(12)))
        assert ours.item() == pytest.approx(exact, rel=1e-5)
        ours.backward()
        assert torch.isfinite(delta.grad).all() and (delta.grad > 0).all()
        if (12 * scale) ** exponent < 1e-46:  # every term underflows in float32
            assert torch.isinf(plain)  # the plain formula fails where ours does not


def test_zero_difference_gives_the_documented_floor_with_zero_gradient():
    features = torch.randn(3, 5)
    student = features.clone().requires_grad_(True)
    logits = torch.randn(3, 4)
    for exponent in (1.0, 4.0):
        student.grad = None
        loss = srd_loss(student, features, logits, logits, exponent)
        assert loss.item() == pytest.approx(2.0 * exponent * math.log(TINY32), rel=1e-6)
        loss.backward()
        assert torch.equal(student.grad, torch.zeros_like(student.grad))


def test_one_sample_batch_loss_is_finite():
    torch.manual_seed(0)
    fs, ft = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8)
    loss = srd_loss(fs, ft, torch.randn(1, 5), torch.randn(1, 5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
DIGITS_INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), "none")


def _method(hparams: dict | None = None, teacher: str = "resnet20", student: str = "resnet8", info=DIGITS_INFO):
    torch.manual_seed(0)
    s = create_model(student, info.num_classes, info.in_channels)
    t = create_model(teacher, info.num_classes, info.in_channels)
    hp = build_hparams("srd", hparams or {}, "test")
    return get_method("srd")(s, t, hp, MethodContext(info, 100, 1))


def test_default_method_loss_is_ce_plus_srd_loss_on_batchnormed_features():
    method = _method()
    method.train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    _, losses = method.forward_train(x, y)
    with torch.no_grad():
        s = method.student.forward_features(x)
        t = method.teacher.forward_features(x)
        f_s = F.batch_norm(method.projector(s.feature), None, None, training=True, eps=1e-4)
        f_t = F.batch_norm(t.feature, None, None, training=True, eps=1e-4)
        expected = F.cross_entropy(s.logits, y) + srd_loss(f_s, f_t, s.logits, t.logits, 4.0, 1.0)
    assert set(losses) == {"ce", "feature", "kd"}
    assert sum(losses.values()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_weights_scale_the_terms():
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    base = _method().train().forward_train(x, y)[1]
    scaled = _method({"ce_weight": 0.5, "feature_weight": 2.0, "kd_weight": 3.0}).train().forward_train(x, y)[1]
    for key, w in (("ce", 0.5), ("feature", 2.0), ("kd", 3.0)):
        assert scaled[key].item() == pytest.approx(w * base[key].item(), rel=1e-5)


def test_one_sample_batch_uses_running_statistics_and_trains():
    method = _method({"projector": "mlp"})
    method.train()
    norms = [m for m in method.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 3  # the mlp's hidden BN + one normalisation per side
    before = [m.running_mean.clone() for m in norms]
    _, losses = method.forward_train(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    loss = sum(losses.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in method.trainable_parameters() if p.grad is not None)
    assert method.projector[0].weight.grad.abs().sum() > 0
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))  # not updated by one sample
    assert all(m.training for m in norms)  # back in training mode afterwards
    method.forward_train(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert not all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))


def test_projector_is_trained_by_the_engine():
    """The first official release left the projector out of the optimizer; here one engine step moves it."""
    torch.manual_seed(0)
    splits = load_dataset("digits")
    recipe = Recipe(epochs=1, batch_size=64, milestones=[])
    task = build_task(splits, 0.03, 0, recipe, torch.device("cpu"), progress=False)
    assert len(task.train_loader) == 1  # exactly one optimizer step
    method = _method()
    trainable = {id(p) for p in method.trainable_parameters()}
    assert {id(p) for p in method.projector.parameters()} <= trainable
    assert method.extra_parameters() == 64 * 64 + 64
    weight, bias = method.projector.weight.detach().clone(), method.projector.bias.detach().clone()
    student_before = copy.deepcopy(method.student.state_dict())
    history = fit(method, task, recipe)
    assert not torch.equal(method.projector.weight, weight) and not torch.equal(method.projector.bias, bias)
    assert any(not torch.equal(v, student_before[k]) for k, v in method.student.state_dict().items())
    assert math.isfinite(history.epochs[-1]["train_loss"]) and "train_loss_feature" in history.epochs[-1]


def test_checkpoint_state_round_trips_projector_and_statistics():
    method = _method()
    method.train().forward_train(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    state = method.checkpoint_state()
    assert {"projector.weight", "student_norm.running_mean", "teacher_norm.running_var"} <= set(state)
    assert not any(k.startswith("teacher.") for k in state)
    other = _method()
    other.load_checkpoint_state(state)
    assert torch.equal(other.teacher_norm.running_mean, method.teacher_norm.running_mean)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"normalisation": "layernorm"}, "normalisation: must be one of batchnorm, l2, none"),
        ({"distance": "cosine"}, "distance: must be one of softmax_logsum, l2, l1"),
        ({"projector": "conv"}, "projector: must be one of linear, mlp, none"),
        ({"exponent": 0.5}, "exponent: must be >= 1"),
        ({"temperature": 0}, "temperature: must be > 0"),
        ({"kd_weight": -1}, "kd_weight: must be a finite number >= 0"),
    ],
)
def test_bad_hparams_are_one_line_errors(values, message):
    with pytest.raises(BenchError, match=message):
        build_hparams("srd", values, "srd")


def test_projector_none_needs_equal_widths():
    with pytest.raises(BenchError, match="projector 'none' needs equal feature widths.*64.*128"):
        _method({"projector": "none"}, teacher="wrn_16_2", student="resnet8")


# --------------------------------------------------------------------------------------------------
# Every switch combination on every pair of the shipped suites
# --------------------------------------------------------------------------------------------------
# Small stand-ins for the suites' datasets: the pair's models at a small input and few classes.
SMALL_INPUT = {"digits": (1, 8), "cifar100": (3, 32), "imagenet": (3, 64)}


def _shipped_pairs() -> list[tuple[str, str, str]]:
    """(dataset, teacher, student) of every pair in the SRD suites, read from the YAML as it is (so that a suite
    that does not validate fails its own test below, not the collection)."""
    pairs = {}
    for name in SRD_SUITES:
        raw = yaml.safe_load(resolve_suite_path(name).read_text())
        for pair in raw["pairs"]:
            pairs.setdefault((raw["dataset"], pair["teacher"], pair["student"]), None)
    return list(pairs)


@pytest.mark.parametrize("dataset, teacher_name, student_name", _shipped_pairs())
def test_every_switch_combination_builds_and_trains_one_step(dataset, teacher_name, student_name):
    channels, size = SMALL_INPUT[dataset]
    info = DatasetInfo(dataset, 5, channels, size, (0.5,) * channels, (0.25,) * channels, "none")
    torch.manual_seed(0)
    student = create_model(student_name, info.num_classes, channels)
    teacher = create_model(teacher_name, info.num_classes, channels)
    x, y = torch.randn(3, channels, size, size), torch.tensor([0, 1, 4])
    for normalisation, distance, projector in SWITCHES:
        hp = SRDHparams(normalisation=normalisation, distance=distance, projector=projector, exponent=2.0)
        if projector == "none" and student.feature_dim != teacher.feature_dim:
            with pytest.raises(BenchError, match="projector 'none'"):
                get_method("srd")(student, teacher, hp, MethodContext(info, 3, 1))
            continue
        method = get_method("srd")(student, teacher, hp, MethodContext(info, 3, 1)).train()
        optimizer = make_optimizer(method.trainable_parameters(), Recipe(lr=0.01))
        head = [p.detach().clone() for p in method.projector.parameters()]
        fc = [p.detach().clone() for p in method.student.parameters()][-1]
        _, losses = method.forward_train(x, y)
        loss = sum(losses.values())
        assert torch.isfinite(loss), (normalisation, distance, projector, losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert not torch.equal([p for p in method.student.parameters()][-1], fc)
        assert all(not torch.equal(p, h) for p, h in zip(method.projector.parameters(), head))


def test_shipped_srd_suites_validate_and_references_name_their_columns():
    for name in SRD_SUITES:
        suite = load_suite(name)
        labels = {m.label for m in suite.methods}
        assert "srd" in labels and expand(suite)
        for pair in suite.pairs:
            assert set(pair.reference) <= labels | {"teacher", "student"}, (name, pair.reference)
    imagenet = load_suite("srd-imagenet")
    assert imagenet.pairs[0].reference["srd"] == 71.63
    assert {"kd", "dkd", "ce"} <= {m.label for m in imagenet.methods}
    ablation = load_suite("ablation-srd")
    exponents = {m.hparams.get("exponent") for m in ablation.methods if m.name == "srd"}
    assert {1, 2, 4, 8} <= exponents
    values = {(k, m.hparams.get(k)) for m in ablation.methods if m.name == "srd" for k in m.hparams}
    for switch, table in (("normalisation", NORMALISATIONS), ("distance", DISTANCES), ("projector", PROJECTORS)):
        default = getattr(SRDHparams(), switch)
        assert {v for k, v in values if k == switch} == set(table) - {default}, switch
