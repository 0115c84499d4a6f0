"""Datasets and stratified nested data fractions: the dataset registry (digits embedded; CIFAR-10/100, Imagewoof,
ImageNet from a data root, in their real on-disk formats) and which samples a run trains on (``run_indices``).

Not here: the loaders that turn a split into batches on the training device (``bench.loaders``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bench.errors import BenchError, DuplicateName

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "crop", "crop_flip")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_augment: str


@dataclass
class TensorImages:
    """A whole split in memory: uint8 images (N, C, H, W) and int64 targets (N,)."""

    images: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def target_array(self) -> np.ndarray:
        return self.targets.numpy()


@dataclass
class FolderImages:
    """An ImageFolder split, decoded and transformed by DataLoader workers."""

    root: Path
    train: bool

    def __post_init__(self) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(self.root))

    def __len__(self) -> int:
        return len(self.folder.targets)

    def target_array(self) -> np.ndarray:
        return np.asarray(self.folder.targets, dtype=np.int64)


Images = TensorImages | FolderImages


@dataclass
class Splits:
    info: DatasetInfo
    train: Images
    test: Images


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
DatasetLoader = Callable[[Path | None, bool], Splits]
_DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str):
    """Decorator: register ``fn(root, download) -> Splits`` as dataset ``name`` (built-ins and plugins alike)."""

    def wrap(fn: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS:
            raise DuplicateName("dataset", name, _DATASETS[name].__module__)
        _DATASETS[name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def data_root(root: str | Path | None) -> Path | None:
    """The user's data root: the argument, else ``$KDBENCH_DATA``, else None."""
    root = root or os.environ.get("KDBENCH_DATA")
    return Path(root).expanduser() if root else None


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> Splits:
    if name not in _DATASETS:
        raise BenchError(f"unknown dataset {name!r} (known: {', '.join(list_datasets())})")
    return _DATASETS[name](data_root(root), download)


@register_dataset("digits")
def _digits(root: Path | None, download: bool) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.

    Pixel values 0..16 are rescaled to uint8 0..255. A fixed stratified split (seed 0) keeps 20 % of
    each class (rounded up) as the test set (1433 train / 364 test).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    test_idx = fraction_indices(bunch.target, 0.2, seed=0)
    train_mask = np.ones(len(targets), dtype=bool)
    train_mask[test_idx] = False
    train_idx = np.flatnonzero(train_mask)
    mean = float(images[train_idx].float().mean() / 255)
    std = float(images[train_idx].float().std() / 255)
    info = DatasetInfo("digits", 10, 1, 8, (mean,), (std,), default_augment="none")
    return Splits(
        info,
        TensorImages(images[train_idx], targets[train_idx]),
        TensorImages(images[test_idx], targets[test_idx]),
    )


# What a CIFAR batch pickle may ask for: NumPy arrays (``data``), nothing that could run code.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
}


def _load_cifar_pickle(path: Path) -> dict:
    """A CIFAR batch file through an unpickler that builds NumPy arrays and plain values only (the pattern of
    Python's "Restricting Globals"): a file asking for anything else is refused (``BenchError``) before it runs."""
    import pickle

    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in _CIFAR_GLOBALS:
                raise BenchError(f"{path}: refused to read: its pickle asks for {module}.{name}, which a CIFAR batch "
                                 "file never holds (unpickling it could run code)")  # fmt: skip
            return super().find_class(module, name)

    with open(path, "rb") as fh:
        return ArraysOnly(fh, encoding="latin1").load()


def read_cifar_split(folder: Path, train: bool, num_classes: int) -> TensorImages:
    """Read one split of the CIFAR python pickle format (``data_batch_*``/``test`` in ``folder``)."""
    if num_classes == 10:  # cifar-10-batches-py: data_batch_1..5, test_batch
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:  # cifar-100-python: train, test
        names = ["train"] if train else ["test"]
    images, targets = [], []
    for name in names:
        path = folder / name
        if not path.exists():
            raise BenchError(f"missing {path}; pass --download to fetch the dataset")
        batch = _load_cifar_pickle(path)
        if not isinstance(batch, dict):
            raise BenchError(f"{path} is not a CIFAR batch file (no data/labels)")
        labels = batch.get("labels", batch.get("fine_labels"))
        if "data" not in batch or labels is None:
            raise BenchError(f"{path} is not a CIFAR batch file (no data/labels)")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        targets.extend(labels)
    return TensorImages(torch.from_numpy(np.concatenate(images)), torch.as_tensor(targets, dtype=torch.int64))


def _cifar(name: str, cls_name: str, num_classes: int, mean, std) -> DatasetLoader:
    """CIFAR in torchvision's on-disk layout (``cifar-10-batches-py/`` or ``cifar-100-python/``).

    ``download=True`` fetches and md5-checks the archive through torchvision; the pickles are then read
    directly (so a folder in the real format, e.g. a test fixture, loads without the download checksums).
    """

    def load(root: Path | None, download: bool) -> Splits:
        import torchvision

        if root is None:
            raise BenchError(f"dataset {name!r} needs a data root: pass --data-root DIR or set KDBENCH_DATA")
        cls = getattr(torchvision.datasets, cls_name)
        folder = root / cls.base_folder
        if download and not folder.is_dir():
            try:
                cls(str(root), train=True, download=True)
            except OSError as err:  # no network
                raise BenchError(f"{name}: download into {root} failed: {err}") from None
        if not folder.is_dir():
            raise BenchError(f"{name}: no {cls.base_folder}/ under {root}; pass --download to fetch it")
        info = DatasetInfo(name, num_classes, 3, 32, mean, std, default_augment="crop_flip")
        return Splits(info, read_cifar_split(folder, True, num_classes), read_cifar_split(folder, False, num_classes))

    return register_dataset(name)(load)


# CRD's normalisation for CIFAR-100; the usual one for CIFAR-10.
_cifar("cifar100", "CIFAR100", 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
_cifar("cifar10", "CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _image_folder(name: str, num_classes: int, val_dir: str = "val") -> DatasetLoader:
    def load(root: Path | None, download: bool) -> Splits:
        if download:
            raise BenchError(f"{name}: cannot be downloaded automatically; place it under --data-root")
        if root is None:
            raise BenchError(f"dataset {name!r} needs a data root: pass --data-root DIR or set KDBENCH_DATA")
        base = root / name if (root / name / "train").is_dir() else root
        for split in ("train", val_dir):
            if not (base / split).is_dir():
                raise BenchError(f"{name}: missing folder {base / split} (expected {base}/train and {base}/{val_dir})")
        train, test = FolderImages(base / "train", True), FolderImages(base / val_dir, False)
        if len(train.folder.classes) != num_classes:
            raise BenchError(f"{name}: {base / 'train'} has {len(train.folder.classes)} classes, expected {num_classes}")
        info = DatasetInfo(name, num_classes, 3, 224, IMAGENET_MEAN, IMAGENET_STD, default_augment="crop_flip")
        return Splits(info, train, test)

    return register_dataset(name)(load)


_image_folder("imagewoof", 10)
_image_folder("imagenet", 1000)


# --------------------------------------------------------------------------------------------------
# Fractions and held-out splits
# --------------------------------------------------------------------------------------------------
def fraction_indices(targets, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified ``fraction`` of the samples, sorted.

    Per class, the samples are permuted by a generator seeded with ``seed`` and the first
    ``ceil(fraction * n_class)`` (at least one) are kept. The permutation does not depend on
    ``fraction``, so subsets are nested: the 20 % subset is inside the 40 % subset for the same seed.
    """
    if not 0.0 < fraction <= 1.0:
        raise BenchError(f"fraction must be in (0, 1], got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        members = members[rng.permutation(len(members))]
        keep.append(members[: max(1, math.ceil(fraction * len(members)))])
    return np.sort(np.concatenate(keep))


def holdout_indices(targets, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (train pool, validation): a stratified ``val_fraction`` held out."""
    targets = np.asarray(targets)
    if val_fraction <= 0:
        return np.arange(len(targets)), np.array([], dtype=np.int64)
    val = fraction_indices(targets, val_fraction, seed=10_000 + seed)
    mask = np.ones(len(targets), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def run_indices(targets, fraction: float, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A run's training subset and validation split (positions in the training split): the seeded
    validation split is carved first, then the stratified ``fraction`` of what remains."""
    targets = np.asarray(targets)
    pool, val = holdout_indices(targets, val_fraction, seed)
    return pool[fraction_indices(targets[pool], fraction, seed)], val
