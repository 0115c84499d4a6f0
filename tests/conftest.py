"""Shared test set-up: one torch thread (tiny models are slower with two on a loaded 2-core box), and one real run
of a tiny digits suite through the CLI (``tiny_suite_run``) that the end-to-end, provenance and compare tests
read."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def cifar100_root(tmp_path):
    from tests.fixtures import write_cifar

    return write_cifar(tmp_path / "data", num_classes=100, train_per_class=3, test_per_class=1)


ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "name": "tiny",
    "description": "two epochs on digits",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet8", "student": "resnet8", "reference": {"kd": 50.0}}],
    "methods": ["ce", "kd"],
    "fractions": [0.5],
    "seeds": [0, 1, 2],
    "recipe": {"epochs": 2, "milestones": [1], "batch_size": 128},
    "teacher": {"recipe": {"epochs": 2}},
    "target_top1": 20,
}


def bench_cli(*args, cwd=ROOT):
    """``python -m bench ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def tiny_suite_run(tmp_path_factory):
    """``bench run`` of ``TINY`` (6 runs) into a fresh results folder: (suite file, results folder, process)."""
    tmp = tmp_path_factory.mktemp("e2e")
    suite = tmp / "tiny.yaml"
    suite.write_text(yaml.safe_dump(TINY))
    results = tmp / "results"
    proc = bench_cli("run", str(suite), "--results", str(results), "--executor", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return suite, results, proc
