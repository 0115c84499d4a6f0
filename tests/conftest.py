"""Shared test set-up: one torch thread (tiny models are slower with two on a loaded 2-core box)."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def cifar100_root(tmp_path):
    from tests.fixtures import write_cifar

    return write_cifar(tmp_path / "data", num_classes=100, train_per_class=3, test_per_class=1)
