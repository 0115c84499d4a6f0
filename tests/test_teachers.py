"""Published teachers (``--teacher-dir``): the manifest, checksum and accuracy checks, refusal with exit 2.

The checkpoint is written by our own model in CRD's published format (``{"model": state_dict, ...}`` at
``<arch>_vanilla/ckpt_epoch_240.pth``) on CIFAR-100 fixture data; its random weights test at about 1 %, so a
temporary ``teachers.yaml`` holding the measured accuracy accepts it and one holding another value refuses it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from bench.data import load_dataset
from bench.engine import build_task, predict
from bench.recipe import Recipe
from bench.errors import BenchError
from bench.metrics import classification_metrics
from bench.models import create_model, is_known_model
from bench.suites import SUITES_DIR, expand, parse_suite
from bench.teachers import (
    TeacherRecord,
    ensure_teacher,
    file_sha256,
    load_manifest,
    manifest_path,
    use_published_teachers,
)

CPU = torch.device("cpu")
CKPT = "resnet8_vanilla/ckpt_epoch_240.pth"
SUITE = {
    "name": "published",
    "dataset": "cifar100",
    "pairs": [{"teacher": "resnet8", "student": "resnet8"}],
    "methods": ["kd"],
    "fractions": [1.0],
    "seeds": [0],
    "recipe": {"epochs": 1, "milestones": [], "batch_size": 50},
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """CIFAR-100 fixture data, a teacher folder with one CRD-format checkpoint, and its measured top-1."""
    from tests.fixtures import write_cifar

    tmp = tmp_path_factory.mktemp("teachers")
    data = write_cifar(tmp / "data", num_classes=100, train_per_class=1, test_per_class=1)
    splits = load_dataset("cifar100", data)
    torch.manual_seed(0)
    model = create_model("resnet8", 100, 3)
    folder = tmp / "teachers"
    (folder / CKPT).parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 240, "accuracy": 0.0}, folder / CKPT)
    task = build_task(splits, 1.0, 0, Recipe(), CPU, progress=False)
    top1 = classification_metrics(*predict(model.eval(), task.eval_loaders["test"]))["top1"]
    return {"tmp": tmp, "data": data, "splits": splits, "dir": folder, "top1": top1}


def write_manifest(folder: Path, top1: float, **extra) -> None:
    entry = {"file": CKPT, "top1": top1, **extra}
    manifest = {"tolerance": 1.0, "datasets": {"cifar100": {"resnet8": entry}}}
    (folder / "teachers.yaml").write_text(yaml.safe_dump(manifest))


def suite_with_teacher_dir(folder: Path, raw: dict = SUITE):
    suite = parse_suite(copy.deepcopy(raw))
    use_published_teachers(suite, folder)
    return suite


def teacher_record(p, results: Path) -> TeacherRecord:
    spec = expand(suite_with_teacher_dir(p["dir"]))[0].teacher_spec
    return ensure_teacher(spec, p["splits"], results, CPU, progress=False, teacher_dir=p["dir"])


def test_the_shipped_manifest_lists_the_crd_teachers_with_their_published_accuracy():
    manifest = load_manifest(manifest_path(None))
    assert manifest_path(None) == SUITES_DIR / "teachers.yaml" and manifest.tolerance == 1.0
    crd = {"wrn_40_2": 75.61, "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "vgg13": 74.64,
           "resnet50": 79.34}  # fmt: skip
    cifar = manifest.datasets["cifar100"]
    assert {m: e.top1 for m, e in cifar.items()} == crd
    arch = {"resnet50": "ResNet50"}  # CRD's directory name for its CIFAR ResNet50
    assert all(e.file == f"{arch.get(m, m)}_vanilla/ckpt_epoch_240.pth" for m, e in cifar.items())
    for dataset in manifest.datasets.values():
        assert all(is_known_model(m) for m in dataset)


def test_teacher_dir_fills_the_checkpoint_of_pairs_without_one(published, tmp_path):
    write_manifest(published["dir"], published["top1"])
    raw = copy.deepcopy(SUITE)
    raw["pairs"].append({"teacher": "resnet8", "student": "resnet14", "teacher_checkpoint": str(tmp_path / "own.pt")})
    suite = suite_with_teacher_dir(published["dir"], raw)
    assert suite.pairs[0].teacher_checkpoint == str((published["dir"] / CKPT).resolve())
    assert suite.pairs[1].teacher_checkpoint == str(tmp_path / "own.pt")  # an explicit checkpoint wins
    # the published file is part of the teacher spec, so student runs differ from runs with a trained teacher
    trained = expand(parse_suite(copy.deepcopy(SUITE)))[0]
    assert expand(suite)[0].hash != trained.hash


def test_a_teacher_within_the_tolerance_is_accepted_and_its_hash_recorded(published, tmp_path):
    write_manifest(published["dir"], published["top1"] + 0.9, sha256=file_sha256(published["dir"] / CKPT))
    record = teacher_record(published, tmp_path)
    assert record.top1 == pytest.approx(published["top1"])
    assert record.sha256 == file_sha256(published["dir"] / CKPT)
    tags = record.tags()
    assert tags["teacher_sha256"] == record.sha256 and tags["teacher_hash"] == record.spec.hash


def test_a_teacher_off_by_more_than_the_tolerance_is_refused_also_when_cached(published, tmp_path):
    write_manifest(published["dir"], published["top1"])
    teacher_record(published, tmp_path)  # evaluated and cached
    write_manifest(published["dir"], published["top1"] + 1.5)
    with pytest.raises(BenchError, match=r"points off the published .* refusing"):
        teacher_record(published, tmp_path)
    write_manifest(published["dir"], published["top1"] - 3.0, tolerance=5.0)  # a per-teacher tolerance
    assert teacher_record(published, tmp_path).top1 == pytest.approx(published["top1"])


def test_a_checksum_mismatch_is_refused(published, tmp_path):
    write_manifest(published["dir"], published["top1"], sha256="0" * 64)
    with pytest.raises(BenchError, match="sha256"):
        teacher_record(published, tmp_path)


def test_a_changed_file_is_evaluated_again(published, tmp_path):
    folder = tmp_path / "dir"
    (folder / CKPT).parent.mkdir(parents=True)
    p = {**published, "dir": folder}
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", 100, 3).state_dict()}, folder / CKPT)
    write_manifest(folder, published["top1"])
    first = teacher_record(p, tmp_path / "results")
    torch.manual_seed(1)
    torch.save({"model": create_model("resnet8", 100, 3).state_dict()}, folder / CKPT)
    write_manifest(folder, 0.0, tolerance=100.0)
    second = teacher_record(p, tmp_path / "results")
    assert second.sha256 != first.sha256 and second.path == first.path


@pytest.mark.parametrize(
    "change,message",
    [({"dataset": "cifar10"}, "no published teachers for dataset 'cifar10'"),
     ({"pairs": [{"teacher": "resnet14", "student": "resnet8"}]}, "no published cifar100 teacher 'resnet14'")],
)  # fmt: skip
def test_teachers_the_manifest_does_not_list_are_refused(published, change, message):
    write_manifest(published["dir"], published["top1"])
    with pytest.raises(BenchError, match=message):
        suite_with_teacher_dir(published["dir"], {**SUITE, **change})


def test_a_missing_file_is_refused(published, tmp_path):
    (tmp_path / "teachers.yaml").write_text((published["dir"] / "teachers.yaml").read_text())
    with pytest.raises(BenchError, match="not found"):
        suite_with_teacher_dir(tmp_path)


def test_cli_refuses_with_exit_2_and_runs_with_the_published_teacher(published, tmp_path, capsys, monkeypatch):
    import mlflow

    from bench.__main__ import main

    suite = tmp_path / "published.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    args = ["run", str(suite), "--data-root", str(published["data"]), "--teacher-dir", str(published["dir"]),
            "--device", "cpu", "--no-progress", "--executor", "local",
            "--results", str(tmp_path / "results")]  # fmt: skip
    write_manifest(published["dir"], published["top1"] + 10.0)
    assert main(args) == 2
    assert "refusing to distil from it" in capsys.readouterr().err
    write_manifest(published["dir"], published["top1"])
    assert main(args) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["published"])
    assert len(runs) == 1 and runs["metrics.teacher_top1"].iloc[0] == pytest.approx(published["top1"])
