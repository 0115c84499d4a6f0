"""Datasets, stratified nested data fractions, and loaders that yield batches on the training device.

Small datasets (digits, CIFAR-10/100) are held as uint8 tensors on the training device and augmented
batch-wise there (``TensorLoader``): no per-sample PIL work, no worker processes. ImageFolder datasets
(Imagewoof, ImageNet) use torchvision transforms in DataLoader workers (``FolderLoader``).

Both loaders draw their order and augmentation from a generator seeded by ``(seed, epoch)``, so an epoch
replays identically after a resume without saving any data-loader state.

With ``shard=(rank, world)`` a loader is one of ``world`` data-parallel workers' (``bench.distributed``): for
training it draws the same order as one process and yields its contiguous share of every batch (``batch_size``
is the global batch; a ``TensorLoader`` also draws the augmentation of the whole batch, so the shards together
are exactly one process's batch), for evaluation a contiguous block of the split.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError
from bench.sharding import ShardedBatches, check_shard, shard_bounds

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
    def wrap(fn: DatasetLoader) -> DatasetLoader:
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


def read_cifar_split(folder: Path, train: bool, num_classes: int) -> TensorImages:
    """Read one split of the CIFAR python pickle format (``data_batch_*``/``test`` in ``folder``)."""
    import pickle

    if num_classes == 10:  # cifar-10-batches-py: data_batch_1..5, test_batch
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:  # cifar-100-python: train, test
        names = ["train"] if train else ["test"]
    images, targets = [], []
    for name in names:
        path = folder / name
        if not path.exists():
            raise BenchError(f"missing {path}; pass --download to fetch the dataset")
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
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


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------
class Loader(Protocol):
    """Yields ``(x, y)`` batches, or ``(x, y, index)`` when ``with_indices`` is set: ``index`` is each sample's
    position in the loader's subset (0..num_samples-1), whose labels are ``targets`` in that order."""

    num_samples: int
    targets: Tensor
    with_indices: bool

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def __len__(self) -> int: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def crop_flip_draws(b: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The per-sample offsets (2, b) and flips (b,) of :func:`random_crop_flip`, drawn from ``generator``."""
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    return offsets, torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)


def random_crop_flip(
    images: Tensor, padding: int, flip: bool, generator: torch.Generator, draws: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched ``RandomCrop(size, padding)`` (+ ``RandomHorizontalFlip``) on a (B, C, H, W) batch.

    Zero padding, as torchvision's default. Returns the batch and the per-sample offsets (dy, dx) and
    flips drawn from ``generator`` (CPU), so a test can replay them with torchvision per sample; ``draws``:
    given ones instead (a worker's rows of a batch's draws).
    """
    b, c, h, w = images.shape
    offsets, flips = draws if draws is not None else crop_flip_draws(b, padding, flip, generator)
    padded = F.pad(images, (padding, padding, padding, padding))
    dev = images.device
    rows = (offsets[0][:, None] + torch.arange(h)).to(dev)  # (B, H)
    cols = (offsets[1][:, None] + torch.arange(w)).to(dev)  # (B, W)
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return out, offsets, flips


class TensorLoader:
    """Batches of a uint8 split, augmented and normalised on the training device.

    ``resident`` (the default) keeps the split on the training device; ``resident=False`` keeps it in host
    memory and moves one batch per step (``--no-device-data``: for a split that does not fit
    beside the models). Both draw the order and the augmentation from the same CPU generator and apply them
    with the same operations, so they yield the same batches.

    ``last_index`` holds the positions in the split (a CPU tensor) of the samples of the batch yielded
    last, whether or not ``with_indices`` is set (the teacher cache keys on it)."""

    def __init__(
        self,
        data: TensorImages,
        info: DatasetInfo,
        indices: np.ndarray | None,
        batch_size: int,
        train: bool,
        augment: str,
        seed: int,
        device: torch.device | str,
        resident: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> None:
        idx = torch.as_tensor(indices if indices is not None else np.arange(len(data)), dtype=torch.long)
        self.device = torch.device(device)
        self.resident = resident
        self.images = data.images[idx].to(self.device) if self.resident else data.images[idx].contiguous()
        self.targets = data.targets[idx].to(device)
        self.num_samples = len(idx)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.padding = max(1, info.image_size // 8)
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        self.epoch = 0
        self.with_indices = False
        self.last_index: Tensor | None = None  # CPU positions (0..num_samples-1) of the last yielded batch
        self.rank, self.world = shard or (0, 1)
        self.batch_weight = 1.0  # this worker's share of the last global batch × world (1.0 when it splits evenly)
        check_shard(self.num_samples, batch_size, self.world, train)
        # evaluation on several workers: a contiguous block of the split each
        self.block = shard_bounds(self.num_samples, self.rank, self.world) if not train else (0, self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil((self.block[1] - self.block[0]) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        n = len(self.targets)
        gen = epoch_generator(self.seed, self.epoch)
        positions = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        order = positions.to(self.device) if self.train else None
        for first in range(self.block[0], self.block[1], self.batch_size):
            size = min(self.batch_size, self.block[1] - first)
            lo, hi = shard_bounds(size, self.rank, self.world) if self.train else (0, size)
            start, stop = first + lo, first + hi
            self.batch_weight = (hi - lo) * self.world / size if self.train else 1.0
            self.last_index = positions[start:stop]
            sel = order[start:stop] if order is not None else slice(start, stop)
            rows = self.images[sel] if self.resident else self.images[self.last_index].to(self.device)
            x = rows.float().div_(255)
            if self.train and self.augment != "none":
                flip = self.augment == "crop_flip"
                draws = [d[..., lo:hi] for d in crop_flip_draws(size, self.padding, flip, gen)]
                x = random_crop_flip(x, self.padding, flip, gen, draws)[0]
            batch = ((x - self.mean) / self.std, self.targets[sel])
            if self.with_indices:
                index = sel if order is not None else torch.arange(n, device=self.device)[sel]
                batch = (*batch, index)
            yield batch


class FolderLoader:
    """DataLoader over an ImageFolder split (persistent worker processes, pinned memory), moved to the device."""

    def __init__(
        self,
        data: FolderImages,
        info: DatasetInfo,
        indices: np.ndarray | None,
        batch_size: int,
        train: bool,
        augment: str,
        seed: int,
        device: torch.device | str,
        workers: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        from torchvision import transforms as T

        size = info.image_size
        norm = [T.ToTensor(), T.Normalize(info.mean, info.std)]
        if train and augment != "none":
            aug = [T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if augment == "crop_flip" else [])
        else:
            aug = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
        data.folder.transform = T.Compose(aug + norm)
        dataset = data.folder if indices is None else torch.utils.data.Subset(data.folder, indices.tolist())
        targets = data.target_array()
        self.targets = torch.as_tensor(targets if indices is None else targets[indices])
        self.with_indices = False
        dataset = _WithIndex(dataset)
        self.num_samples = len(dataset)
        self.device = torch.device(device)
        self.generator = torch.Generator()
        self.seed, self.train, self.batch_size = seed, train, batch_size
        self.rank, self.world = shard or (0, 1)
        self.batch_weight = 1.0  # as TensorLoader's
        check_shard(self.num_samples, batch_size, self.world, train)
        batches = None  # the DataLoader's own (one process)
        if self.world > 1 and train:  # one process's batches (same sampler, same generator), this worker's rows
            sampler = torch.utils.data.RandomSampler(dataset, generator=self.generator)
            batches = ShardedBatches(torch.utils.data.BatchSampler(sampler, batch_size, False), self.rank, self.world)
        elif self.world > 1:
            dataset = torch.utils.data.Subset(dataset, range(*shard_bounds(self.num_samples, self.rank, self.world)))
        # default: as many workers as this process's CPU share (its torch threads: --cpus-per-run, a Ray
        # trial's CPUs, else the machine's cores), at most 8
        workers = min(8, torch.get_num_threads()) if workers is None else workers
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size if batches is None else 1,
            shuffle=train and batches is None,
            batch_sampler=batches,
            generator=self.generator,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
        )

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for i, (x, y, index) in enumerate(self.loader):
            if self.train and self.world > 1:
                self.batch_weight = len(y) * self.world / min(self.batch_size, self.num_samples - i * self.batch_size)
            batch = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            yield (*batch, index.to(self.device, non_blocking=True)) if self.with_indices else batch


def describe_loader(loader: Loader) -> str:
    """How a loader feeds the device, for the run's MLflow tag ``data``."""
    if isinstance(loader, TensorLoader):
        where = "on the device" if loader.resident else "in host memory, one batch moved per step"
        return f"uint8 tensors {where} ({loader.device.type}), batched augmentation"
    if isinstance(loader, FolderLoader):
        return f"DataLoader over image files, {loader.loader.num_workers} worker(s)"
    return type(loader).__name__


class _WithIndex(torch.utils.data.Dataset):
    """A dataset whose items also carry their position (for loaders' ``with_indices``)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


def make_loader(
    data: Images,
    info: DatasetInfo,
    indices: np.ndarray | None,
    batch_size: int,
    train: bool,
    augment: str,
    seed: int,
    device: torch.device | str,
    device_data: bool = True,
    shard: tuple[int, int] | None = None,
) -> Loader:
    """A ``TensorLoader`` for a tensor split (on the device unless ``device_data`` is false), else a
    ``FolderLoader``; ``shard``: (rank, world) of a data-parallel worker (module docstring)."""
    if augment not in AUGMENTATIONS + ("auto",):
        raise BenchError(f"unknown augment {augment!r} (known: auto, {', '.join(AUGMENTATIONS)})")
    augment = info.default_augment if augment == "auto" else augment
    if isinstance(data, TensorImages):
        return TensorLoader(data, info, indices, batch_size, train, augment, seed, device, device_data, shard)
    return FolderLoader(data, info, indices, batch_size, train, augment, seed, device, shard=shard)
