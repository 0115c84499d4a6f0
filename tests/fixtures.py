"""Tiny datasets written in the real on-disk formats (no downloads): CIFAR pickles and ImageFolder trees."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar(root: Path, num_classes: int = 100, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    """Write ``cifar-100-python/{train,test,meta}`` (or ``cifar-10-batches-py/``) with random images."""
    rng = np.random.default_rng(0)
    cifar10 = num_classes == 10
    folder = root / ("cifar-10-batches-py" if cifar10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def batch(per_class: int) -> dict:
        labels = np.repeat(np.arange(num_classes), per_class).tolist()
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        key = "labels" if cifar10 else "fine_labels"
        return {"data": data, key: labels, "filenames": [f"img{i}.png" for i in range(len(labels))]}

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh)

    if cifar10:
        for i in range(1, 6):
            dump(f"data_batch_{i}", batch(max(1, train_per_class // 5) if i > 1 else train_per_class))
        dump("test_batch", batch(test_per_class))
        dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        dump("train", batch(train_per_class))
        dump("test", batch(test_per_class))
        dump("meta", {"fine_label_names": [f"c{i}" for i in range(num_classes)]})
    return root


def write_image_folder(root: Path, num_classes: int = 10, per_class: int = 2, size: int = 40, val_dir: str = "val") -> Path:
    """Write ``root/{train,val}/<class>/<n>.JPEG`` as ImageFolder expects (Imagewoof / ImageNet layout)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", val_dir):
        for c in range(num_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    return root
