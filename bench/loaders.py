"""Loaders that yield batches on the training device.

Small datasets (digits, CIFAR-10/100) are held as uint8 tensors on the training device and augmented
batch-wise there (``TensorLoader``): no per-sample PIL work, no worker processes. ImageFolder datasets
(Imagewoof, ImageNet) use torchvision transforms in DataLoader workers (``FolderLoader``).

Both loaders draw their order and augmentation from a generator seeded by ``(seed, epoch)``, so an epoch
replays identically after a resume without saving any data-loader state.

With ``shard=(rank, world)`` a loader is one of ``world`` data-parallel workers' (``bench.distributed``): for
training it draws the same order as one process and yields its contiguous share of every batch (``batch_size``
is the global batch; a ``TensorLoader`` also draws the augmentation of the whole batch, so the shards together
are exactly one process's batch), for evaluation a contiguous block of the split.

Not here: the datasets themselves and the data fractions (``bench.data``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.data import AUGMENTATIONS, DatasetInfo, FolderImages, Images, TensorImages
from bench.errors import BenchError
from bench.sharding import ShardedBatches, check_shard, shard_bounds


class Loader(Protocol):
    """Yields ``(x, y)`` batches, or ``(x, y, index)`` when ``with_indices`` is set: ``index`` is each sample's
    position in the loader's subset (0..num_samples-1), whose labels are ``targets`` in that order."""

    num_samples: int
    targets: Tensor
    with_indices: bool

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class LoaderSpec:
    """What a loader yields, whatever holds the images: which samples (``indices`` into the split, None: all),
    in batches of ``batch_size`` (the global batch when sharded), shuffled and augmented (``augment``) when
    ``train``, drawn from ``seed``; on ``device``; ``shard``: (rank, world) of a data-parallel worker."""

    info: DatasetInfo
    indices: np.ndarray | None
    batch_size: int
    train: bool
    augment: str
    seed: int
    device: torch.device | str
    shard: tuple[int, int] | None = None


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

    def __init__(self, data: TensorImages, spec: LoaderSpec, resident: bool = True) -> None:
        info, indices, batch_size, train, shard = spec.info, spec.indices, spec.batch_size, spec.train, spec.shard
        idx = torch.as_tensor(indices if indices is not None else np.arange(len(data)), dtype=torch.long)
        self.device = device = torch.device(spec.device)
        self.resident = resident
        self.images = data.images[idx].to(self.device) if self.resident else data.images[idx].contiguous()
        self.targets = data.targets[idx].to(device)
        self.num_samples = len(idx)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, spec.augment, spec.seed
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

    def __init__(self, data: FolderImages, spec: LoaderSpec, workers: int | None = None) -> None:
        from torchvision import transforms as T

        info, indices, batch_size, train, augment, shard = (
            spec.info, spec.indices, spec.batch_size, spec.train, spec.augment, spec.shard)  # fmt: skip
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
        self.device = torch.device(spec.device)
        self.generator = torch.Generator()
        self.seed, self.train, self.batch_size = spec.seed, train, batch_size
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


def make_loader(data: Images, spec: LoaderSpec, device_data: bool = True) -> Loader:
    """A ``TensorLoader`` for a tensor split (on the device unless ``device_data`` is false), else a
    ``FolderLoader``; ``spec.augment`` may be ``auto`` (the dataset's default)."""
    if spec.augment not in AUGMENTATIONS + ("auto",):
        raise BenchError(f"unknown augment {spec.augment!r} (known: auto, {', '.join(AUGMENTATIONS)})")
    if spec.augment == "auto":
        spec = replace(spec, augment=spec.info.default_augment)
    if isinstance(data, TensorImages):
        return TensorLoader(data, spec, resident=device_data)
    return FolderLoader(data, spec)
