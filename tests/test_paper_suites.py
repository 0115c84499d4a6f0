"""Every shipped suite validates, and every (pair, method) of the CRD-table suites takes a training step.

The smoke test builds each method the way the runner does (the suite's expanded hyperparameters, a fresh
student, the pair's teacher) and runs one ``forward_train`` + backward on a batch of 2 CIFAR-100 images read
from fixture files in the real on-disk format, so every architecture pairing of the CRD table (stage counts,
feature shapes, widths) is exercised by every method, without the runner or MLflow.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.data import load_dataset
from bench.loaders import LoaderSpec, make_loader
from bench.errors import BenchError
from bench.models import create_model
from bench.suites import expand, list_suites, load_suite
from methods import MethodContext, build_hparams, get_method

MANIFEST = "teachers"  # suites/teachers.yaml is the published-teacher manifest, not a suite
CRD_SUITES = ("cifar100-crd",)
# (method, student) combinations a method refuses at construction with a BenchError; the CRD suite
# excludes exactly these (pairs[].exclude). Listed so that a change in either direction shows up here.
UNSUPPORTED = {
    ("gpd", "shufflev1"): "grouped conv",  # ShuffleNetV1's grouped 1x1 convs (GPD widens groups=1 / depthwise only)
    ("gpd", "shufflev2"): "does not reproduce",  # ShuffleNetV2's channel split / shuffle (GPD's IR check)
}


@pytest.mark.parametrize("name", [n for n in list_suites() if n != MANIFEST])
def test_every_shipped_suite_validates(name):
    suite = load_suite(name)
    specs = expand(suite)
    assert specs
    labels = {m.label for m in suite.methods} | {"teacher", "student"}
    for pair in suite.pairs:
        assert set(pair.reference) <= labels, f"{pair.label}: reference keys {set(pair.reference) - labels}"


SUITES = [n for n in list_suites() if n != MANIFEST]


@pytest.mark.parametrize("name", SUITES)
def test_every_reference_says_where_it_comes_from_and_how_it_was_measured(name):
    """Each published number of each shipped suite carries a source and a protocol (printed beside its delta)."""
    suite = load_suite(name)
    for pair in suite.pairs:
        for label, ref in suite.references(pair).items():
            assert ref.source.strip(), f"{pair.label} {label}: no source"
            assert ref.protocol.strip(), f"{pair.label} {label}: no protocol"


def test_suites_with_references_exist_and_the_crd_numbers_are_last_epoch():
    with_refs = [n for n in SUITES if any(p.reference for p in load_suite(n).pairs)]
    assert {"cifar100-crd", "imagenet", "gpd-imagenet", "srd-imagenet"} <= set(with_refs)
    crd = load_suite("cifar100-crd")
    refs = crd.references(crd.pairs[0])
    assert "last epoch" in refs["crd"].protocol and "best epoch" in refs["dkd"].protocol


def test_reference_protocols_are_run_where_the_schema_allows():
    """gpd-imagenet runs its DKD and CE baselines with mdistiller's ImageNet recipe (batch 512, lr 0.2), the
    protocol of its DKD reference numbers; the GPD columns keep GPD's lr 0.1. ReviewKD on ImageNet takes the
    student's pre-activations, as the official ImageNet code."""
    recipes = {(s.label, s.student): s.recipe for s in expand(load_suite("gpd-imagenet"))}
    for (label, _), recipe in recipes.items():
        assert recipe.batch_size == 512
        assert recipe.lr == (0.2 if label in ("ce", "dkd") else 0.1), label
    reviewkd = [s for s in expand(load_suite("imagenet")) if s.method == "reviewkd"]
    assert reviewkd and all(s.hparams["student_preact"] and s.hparams["teacher_preact"] for s in reviewkd)


def test_the_crd_suites_hold_the_13_pairs_of_the_crd_table_with_the_crd_recipes():
    pairs = {}
    for name in CRD_SUITES:
        suite = load_suite(name)
        assert (suite.recipe.epochs, suite.recipe.batch_size, suite.recipe.milestones) == (240, 64, [150, 180, 210])
        assert [m.label for m in suite.methods] == [
            "ce", "kd", "fitnet", "at", "dkd", "dist", "crd", "reviewkd", "srd", "stablekd", "gpd", "bdkd",
            "kd+ls", "kd+ctkd", "kd+ls+ctkd", "dkd+ls", "mlkd", "mlkd+ls", "wttm", "nkd", "kd+dot"]  # fmt: skip
        lr = {(s.teacher, s.student): s.recipe.lr for s in expand(suite)}
        for pair in suite.pairs:
            pairs[(pair.teacher, pair.student)] = (lr[pair.teacher, pair.student], pair)
    assert len(pairs) == 13
    light = {"mobilenetv2", "shufflev1", "shufflev2"}
    assert all(lr == (0.01 if student in light else 0.05) for (_, student), (lr, _) in pairs.items())
    assert all({"teacher", "student", "kd", "fitnet", "at", "crd"} <= set(p.reference) for _, p in pairs.values())
    dkd_beta = {k: p.hparams["dkd"]["beta"] for k, (_, p) in pairs.items()}
    assert dkd_beta[("resnet56", "resnet20")] == 2.0 and dkd_beta[("vgg13", "vgg8")] == 6.0
    assert dkd_beta[("resnet32x4", "resnet8x4")] == 8.0


def test_the_crd_suite_excludes_exactly_the_pairs_gpd_refuses(cifar_batch):
    info, *_ = cifar_batch
    suite = load_suite("cifar100-crd")
    excluded = {(m, p.student) for p in suite.pairs for m in p.exclude}
    assert excluded == set(UNSUPPORTED)
    teacher = create_model("resnet32x4", info.num_classes, info.in_channels)
    context = MethodContext(info, 100, suite.recipe.epochs)
    for (method, student), message in UNSUPPORTED.items():
        student_model = create_model(student, info.num_classes, info.in_channels)
        with pytest.raises(BenchError, match=message):
            get_method(method)(student_model, teacher, build_hparams(method, {}, method), context)


@pytest.fixture(scope="module")
def cifar_batch(tmp_path_factory):
    """Two CIFAR-100 training images (positions 0 and 1 of the training set), their labels, all labels."""
    from tests.fixtures import write_cifar

    root = write_cifar(tmp_path_factory.mktemp("cifar"), num_classes=100, train_per_class=1, test_per_class=1)
    splits = load_dataset("cifar100", root)
    loader = make_loader(splits.train, LoaderSpec(splits.info, None, 2, False, "none", 0, "cpu"))
    x, y = next(iter(loader))
    return splits.info, x, y, splits.train.targets


def _pairs():
    for name in CRD_SUITES:
        for spec_pair in load_suite(name).pairs:
            pair_id = f"{spec_pair.teacher}->{spec_pair.student}"
            yield pytest.param(name, spec_pair.teacher, spec_pair.student, id=pair_id)


@pytest.mark.parametrize("suite_name,teacher_name,student_name", list(_pairs()))
def test_every_method_of_the_crd_suites_takes_a_training_step(cifar_batch, suite_name, teacher_name, student_name):
    info, x, y, train_targets = cifar_batch
    suite = load_suite(suite_name)
    pair = (teacher_name, student_name)
    specs = [s for s in expand(suite) if (s.teacher, s.student) == pair and s.seed == suite.seeds[0]]
    torch.manual_seed(0)
    frozen_teacher = create_model(teacher_name, info.num_classes, info.in_channels)
    context = MethodContext(info, len(train_targets), suite.recipe.epochs)
    for spec in specs:
        cls = get_method(spec.method)
        teacher = {"offline": lambda: frozen_teacher, "none": lambda: None,
                   "online": lambda: create_model(teacher_name, info.num_classes, info.in_channels)}[cls.teacher_mode]
        student = create_model(student_name, info.num_classes, info.in_channels)
        hparams = build_hparams(spec.method, spec.hparams, spec.label)
        method = cls(student, teacher(), hparams, context)
        method.train()
        method.on_epoch_start(0)
        args = (x, y)
        if getattr(cls, "needs_indices", False):
            method.set_train_targets(train_targets)
            args = (x, y, torch.arange(len(y)))
        logits, losses = method.forward_train(*args)
        loss = sum(losses.values())
        assert logits.shape == (2, info.num_classes), spec.label
        assert math.isfinite(loss.item()), f"{spec.label}: {losses}"
        loss.backward()
        grads = [p.grad for p in method.trainable_parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"{spec.label}: no gradient reached the parameters"
        assert all(p.grad is None for p in frozen_teacher.parameters()), f"{spec.label} changed the frozen teacher"
