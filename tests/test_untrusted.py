"""Checkpoints and data files never run code: a file whose pickle would run code (it writes a marker file when
unpickled) is refused, with one line naming the file and what it asked for, and the marker never appears; a
listed sha256 is compared before the file is opened; our own checkpoints (run, teacher) and a file in the
published teachers' layout (RepDistiller / mdistiller ``ckpt_epoch_240.pth``, also in PyTorch's legacy format)
still load."""
from __future__ import annotations

import argparse
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.checkpoints import LEGACY_RUN_CHECKPOINT_TYPES, load_checkpoint
from bench.data import load_dataset
from bench.engine import _rng_state, _set_rng_state
from bench.errors import BenchError
from bench.models import create_model
from bench.suites import expand, parse_suite
from bench.teachers import ensure_teacher, file_sha256, read_state_dict, use_published_teachers

EXEC = r"asks for (builtins\.)?exec\b"  # the global the payload needs (PyTorch names builtins without module)
FORMATS = {"zip": True, "legacy": False}  # torch.save's current format, and the pre-1.6 one of the 2019 teachers


class Payload:
    """Pickles as a call to ``exec`` that writes ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def evil(path: Path, marker: Path, zip_format: bool = True) -> Path:
    """A checkpoint in the published layout whose unpickling would write ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": create_model("resnet8", 10, 1).state_dict(), "epoch": 240, "x": Payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "unpickling ran the payload"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, marker, fmt):
    path = evil(tmp_path / "evil.pth", marker, FORMATS[fmt])
    with pytest.raises(BenchError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused to load") and "\n" not in message
    assert re.search(EXEC, message)
    with pytest.raises(BenchError, match=EXEC):  # the engine's resume path
        load_checkpoint(path, allow=LEGACY_RUN_CHECKPOINT_TYPES)


def test_the_cli_refuses_it_with_exit_2_before_writing_anything(tmp_path, marker, capsys):
    from bench.__main__ import main

    path = evil(tmp_path / "evil.pth", marker)
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "s", "dataset": "digits", "methods": ["kd"], "fractions": [1.0], "seeds": [0],
        "pairs": [{"teacher": "resnet8", "student": "resnet8", "teacher_checkpoint": str(path)}],
        "recipe": {"epochs": 1, "milestones": []},
    }))  # fmt: skip
    results = tmp_path / "results"
    assert main(["run", str(suite), "--executor", "local", "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and re.search(EXEC, err)
    assert not results.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("accuracy", [np.float64(73.51), np.float32(73.51), torch.tensor([73.51])])
def test_a_file_in_the_published_teachers_layout_loads(tmp_path, fmt, accuracy):
    """``{"epoch", "model", "accuracy", "optimizer"}`` (RepDistiller's ``train_teacher.py``), the accuracy a NumPy
    scalar or a tensor, and the training options in some copies."""
    model = create_model("resnet8", 100, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": accuracy, "optimizer": optimizer.state_dict(),
             "opt": argparse.Namespace(model="resnet8", lr_decay_epochs=[150, 180, 210])}  # fmt: skip
    path = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save(state, path, _use_new_zipfile_serialization=FORMATS[fmt])
    loaded = read_state_dict(path)
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_listed_sha256_is_checked_before_the_file_is_opened(tmp_path, marker):
    """The manifest's sha256 differs: refused for the checksum (the file is never unpickled); when it matches, the
    file is opened and refused for what its pickle asks for."""
    folder = tmp_path / "teachers"
    path = evil(folder / "resnet8_vanilla" / "ckpt_epoch_240.pth", marker)
    raw = {"name": "p", "dataset": "digits", "methods": ["kd"], "fractions": [1.0], "seeds": [0],
           "pairs": [{"teacher": "resnet8", "student": "resnet8"}], "recipe": {"epochs": 1, "milestones": []}}  # fmt: skip

    def manifest(sha256: str) -> None:
        entry = {"file": "resnet8_vanilla/ckpt_epoch_240.pth", "top1": 90.0, "sha256": sha256}
        (folder / "teachers.yaml").write_text(yaml.safe_dump({"datasets": {"digits": {"resnet8": entry}}}))

    manifest("0" * 64)
    with pytest.raises(BenchError, match=r"has sha256 .* lists 0{64}; refusing to open it"):
        use_published_teachers(parse_suite(dict(raw)), folder)
    manifest(file_sha256(path))
    suite = parse_suite(dict(raw))
    use_published_teachers(suite, folder)  # the checksum matches
    spec = expand(suite)[0].teacher_spec
    manifest("0" * 64)  # the file changed after the suite was checked: ensure_teacher checks again, first
    splits = load_dataset("digits")
    with pytest.raises(BenchError, match="refusing to open it"):
        ensure_teacher(spec, splits, tmp_path / "results", torch.device("cpu"), False, teacher_dir=folder)
    manifest(file_sha256(path))
    with pytest.raises(BenchError, match=EXEC):
        ensure_teacher(spec, splits, tmp_path / "results", torch.device("cpu"), False, teacher_dir=folder)


def test_our_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": _rng_state()}, tmp_path / "ckpt.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_run_checkpoint_from_before_still_resumes(tmp_path):
    """Run checkpoints written before the NumPy RNG state became a tensor hold it as an array: allowed exactly."""
    np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"epoch": 1, "rng": old}, tmp_path / "checkpoint.pt")
    expected = np.random.rand()
    np.random.seed(0)
    _set_rng_state(load_checkpoint(tmp_path / "checkpoint.pt", allow=LEGACY_RUN_CHECKPOINT_TYPES)["rng"])
    assert np.random.rand() == expected
    with pytest.raises(BenchError, match="numpy"):  # exactly there: not for a teacher checkpoint
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_cifar_batch_file_that_would_run_code_is_refused(tmp_path, marker):
    from tests.fixtures import write_cifar

    root = write_cifar(tmp_path / "data", num_classes=100, train_per_class=1, test_per_class=1)
    train = root / "cifar-100-python" / "train"
    batch = pickle.loads(train.read_bytes())
    with open(train, "wb") as fh:
        pickle.dump({**batch, "batch_label": Payload(marker)}, fh)
    with pytest.raises(BenchError, match=r"train: refused to read: its pickle asks for builtins.exec"):
        load_dataset("cifar100", root)
