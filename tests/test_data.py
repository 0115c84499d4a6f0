import numpy as np
import pytest
import torch

from bench.data import fraction_indices, holdout_indices, load_dataset
from bench.loaders import LoaderSpec, make_loader
from bench.errors import BenchError
from tests.fixtures import write_cifar, write_image_folder


def test_digits_is_the_fixed_stratified_split():
    splits = load_dataset("digits")
    assert splits.info.num_classes == 10 and splits.info.in_channels == 1 and splits.info.image_size == 8
    assert len(splits.train) == 1433 and len(splits.test) == 364
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (1, 8, 8)
    counts = np.bincount(splits.test.target_array(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ceil(20 %) of each class
    again = load_dataset("digits")
    assert torch.equal(splits.test.targets, again.test.targets)


@pytest.mark.parametrize("fraction", [0.1, 0.4, 1.0])
def test_fraction_is_stratified_and_deterministic(fraction):
    targets = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    idx = fraction_indices(targets, fraction, seed=3)
    assert np.array_equal(idx, fraction_indices(targets, fraction, seed=3))
    assert len(np.unique(idx)) == len(idx)
    per_class = np.bincount(targets[idx], minlength=10)
    expected = np.ceil(fraction * np.bincount(targets)).astype(int)
    assert np.array_equal(per_class, expected)


def test_fractions_are_nested_and_seed_dependent():
    targets = np.random.default_rng(0).integers(0, 7, 1000)
    small, large = set(fraction_indices(targets, 0.2, 5)), set(fraction_indices(targets, 0.4, 5))
    assert small < large
    assert set(fraction_indices(targets, 0.4, 6)) != large


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_fraction_outside_unit_interval_is_rejected(bad):
    with pytest.raises(BenchError):
        fraction_indices(np.zeros(10), bad, 0)


def test_holdout_is_disjoint_and_complete():
    targets = np.repeat(np.arange(4), 25)
    pool, val = holdout_indices(targets, 0.2, seed=1)
    assert set(pool).isdisjoint(val) and len(pool) + len(val) == 100
    assert np.array_equal(np.bincount(targets[val]), [5, 5, 5, 5])


def test_cifar100_reads_the_torchvision_on_disk_format(tmp_path):
    root = write_cifar(tmp_path, num_classes=100, train_per_class=2, test_per_class=1)
    splits = load_dataset("cifar100", root)
    assert splits.info.num_classes == 100 and splits.train.images.shape == (200, 3, 32, 32)
    assert splits.test.targets.tolist() == list(range(100))


def test_cifar10_reads_all_five_batches(tmp_path):
    root = write_cifar(tmp_path, num_classes=10, train_per_class=5, test_per_class=1)
    splits = load_dataset("cifar10", root)
    assert len(splits.train) == 10 * 5 + 4 * 10 and len(splits.test) == 10


def test_missing_dataset_errors_are_one_line_bench_errors(tmp_path):
    with pytest.raises(BenchError, match="needs a data root"):
        load_dataset("cifar100", None)
    with pytest.raises(BenchError, match="--download"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(BenchError, match="missing folder"):
        load_dataset("imagewoof", tmp_path)
    with pytest.raises(BenchError, match="unknown dataset"):
        load_dataset("mnist")


def test_image_folder_loader_yields_normalised_224_batches(tmp_path):
    write_image_folder(tmp_path / "imagewoof", num_classes=10, per_class=2, size=40)
    splits = load_dataset("imagewoof", tmp_path)
    assert len(splits.train) == 20
    loader = make_loader(splits.train, LoaderSpec(splits.info, np.arange(0, 20, 2), 4, True, "auto", 0, "cpu"))
    loader.set_epoch(0)
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 10
    x, _ = batches[0]
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's cores
@pytest.mark.parametrize("threads, workers", [(1, 1), (3, 3), (16, 8)])
def test_image_folder_workers_follow_the_process_cpu_share(tmp_path, threads, workers):
    """A Ray trial (or --cpus-per-run) sets the torch threads to its CPUs: the loader's workers follow."""
    write_image_folder(tmp_path / "imagewoof", num_classes=10, per_class=1, size=8)
    splits = load_dataset("imagewoof", tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loader = make_loader(splits.train, LoaderSpec(splits.info, None, 4, True, "auto", 0, "cpu"))
    finally:
        torch.set_num_threads(before)
    assert loader.loader.num_workers == workers


def test_image_folder_with_wrong_class_count_is_rejected(tmp_path):
    write_image_folder(tmp_path, num_classes=3, per_class=1, size=8)
    with pytest.raises(BenchError, match="3 classes, expected 10"):
        load_dataset("imagewoof", tmp_path)


def test_tensor_loader_order_depends_on_seed_and_epoch_only():
    splits = load_dataset("digits")

    def first_targets(seed, epoch):
        loader = make_loader(splits.train, LoaderSpec(splits.info, None, 32, True, "crop", seed, "cpu"))
        loader.set_epoch(epoch)
        x, y = next(iter(loader))
        return x, y

    x1, y1 = first_targets(0, 3)
    x2, y2 = first_targets(0, 3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first_targets(0, 4)[1], y1)


def test_eval_loader_covers_the_split_in_order():
    splits = load_dataset("digits")
    loader = make_loader(splits.test, LoaderSpec(splits.info, None, 100, False, "crop_flip", 0, "cpu"))
    ys = torch.cat([y for _, y in loader])
    assert torch.equal(ys, splits.test.targets)
