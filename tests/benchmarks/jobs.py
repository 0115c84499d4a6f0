"""The jobs the benchmarks time, as plain functions (also usable from a script to repeat a measurement).

Every job runs on one process with the same data and models on both sides of a comparison, so that a
ratio measured within one run is meaningful on a loaded machine even where absolute times are not.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.data import DatasetInfo, Splits, TensorImages, load_dataset
from bench.loaders import LoaderSpec, TensorLoader
from bench.engine import Task, build_task, fit, seed_everything
from bench.recipe import Recipe
from bench.lockstep import fit_lockstep
from bench.models import create_model
from bench.suites import expand, load_suite
from methods import MethodContext, build_hparams, get_method
from methods.kd import kd_loss

CIFAR100 = DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), "crop_flip")
CPU = torch.device("cpu")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def set_threads() -> int:
    """Torch intra-op threads for the benchmarks: ``KDBENCH_BENCH_THREADS`` (default 1; on a shared
    2-core machine 2 threads can be much slower than 1 under contention)."""
    threads = env_int("KDBENCH_BENCH_THREADS", 1)
    torch.set_num_threads(threads)
    return threads


def synthetic_cifar(n: int, seed: int = 0) -> TensorImages:
    """``n`` random CIFAR-shaped uint8 images with balanced labels over 100 classes."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
    return TensorImages(images, torch.arange(n) % CIFAR100.num_classes)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_method(
    name: str,
    teacher_name: str,
    student_name: str,
    num_train: int,
    teacher=None,
    hparams=None,
    seed=0,
    info: DatasetInfo = CIFAR100,
    epochs: int = 240,
):
    """A registered method on random-init models for ``info`` (default CIFAR-100; a frozen random teacher
    costs the same as a trained one)."""
    cls = get_method(name)
    seed_everything(seed)
    if teacher is None and cls.teacher_mode != "none":
        teacher = create_model(teacher_name, info.num_classes, info.in_channels)
    student = create_model(student_name, info.num_classes, info.in_channels)
    hp = hparams if hparams is not None else cls.Hparams()
    return cls(student, teacher, hp, MethodContext(info, num_train, epochs))


def one_epoch(recipe: Recipe) -> Recipe:
    return dataclasses.replace(recipe, epochs=1, milestones=[])


# ---- harness overhead: the engine's epoch vs a bare PyTorch loop -------------------------------------
def train_loader(data: TensorImages, batch_size: int, seed: int = 0) -> TensorLoader:
    return TensorLoader(data, LoaderSpec(CIFAR100, None, batch_size, True, "crop_flip", seed, CPU))


def engine_epoch(method, loader, recipe: Recipe) -> None:
    """One KD epoch through ``bench.engine.fit`` (no evaluation split, no checkpoint, no hooks)."""
    fit(method, Task(loader, {}, CPU, seed=0, progress=False), one_epoch(recipe))


def bare_epoch(student, teacher, loader, recipe: Recipe, temperature=4.0, ce_weight=0.1, kd_weight=0.9) -> None:
    """The same computation as the engine's KD epoch, written as the minimal PyTorch loop."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    student.train()
    teacher.eval()
    loader.set_epoch(0)
    for x, y in loader:
        logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = ce_weight * F.cross_entropy(logits, y) + kd_weight * kd_loss(logits, teacher_logits, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ---- against a peer: the same KD job through torchdistill ------------------------------------------
# kdbench recipes of the peer benchmark, by label: the switches turned on over the reference recipe.
# "reference" is the same fp32 NCHW computation as torchdistill's; the others are kdbench switches
# that change the float computation (NHWC reorders the convolutions' sums, amp computes in bf16), so
# their rows say so and never stand in for the reference ratio.
PEER_RECIPES: dict[str, dict[str, bool]] = {
    "reference": {},
    "channels_last": {"channels_last": True},
    "amp": {"amp": True},
    "amp+channels_last": {"amp": True, "channels_last": True},
}
PEER_RECIPE_NOTES = {
    "reference": "reference recipe: the same fp32 NCHW computation",
    "channels_last": "--channels-last switch: NHWC, conv sums reordered; torchdistill NCHW",
    "amp": "--amp switch: bf16 autocast; torchdistill fp32",
    "amp+channels_last": "--amp --channels-last switches: bf16 NHWC; torchdistill fp32 NCHW",
}


def peer_recipes() -> list[str]:
    """The kdbench recipes the CIFAR peer benchmark runs: ``KDBENCH_PEER_RECIPES`` (comma-separated labels
    of :data:`PEER_RECIPES`), default ``reference,channels_last``."""
    spec = os.environ.get("KDBENCH_PEER_RECIPES", "reference,channels_last")
    labels = [x.strip() for x in spec.split(",") if x.strip()]
    unknown = [x for x in labels if x not in PEER_RECIPES]
    if unknown:
        raise ValueError(f"KDBENCH_PEER_RECIPES: unknown {unknown} (known: {', '.join(PEER_RECIPES)})")
    return labels


def peer_recipe(label: str, **base) -> Recipe:
    return Recipe(**base, **PEER_RECIPES[label])


def torchdistill_available() -> str | None:
    """None if torchdistill 1.1.5 imports, else why not."""
    try:
        import torchdistill
    except ImportError as err:
        return f"torchdistill is not installed ({err}); `make bench` installs it into {peer_deps_dir()}"
    if torchdistill.__version__ != "1.1.5":
        return f"torchdistill {torchdistill.__version__} found, the benchmark pins 1.1.5"
    return None


def peer_deps_dir() -> Path:
    return Path(os.environ.get("KDBENCH_BENCH_DEPS", "results/.bench-deps"))


def cifar_fixture(root: Path, per_class: int) -> Splits:
    """A CIFAR-100 folder in the real on-disk format, read by kdbench's loader."""
    from tests.fixtures import write_cifar

    write_cifar(root, 100, train_per_class=per_class, test_per_class=1)
    return load_dataset("cifar100", root)


def torchdistill_cifar(root: Path):
    """The CIFAR-100 fixture as torchdistill's sample CIFAR configs read it: torchvision ``CIFAR100`` with
    RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize per sample."""
    import torchvision
    from torchvision import transforms as T

    class FixtureCIFAR100(torchvision.datasets.CIFAR100):
        # the fixture is in the real format but not the real files: skip the md5 checks
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            self.classes = [str(i) for i in range(CIFAR100.num_classes)]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR100.mean, CIFAR100.std)])  # fmt: skip
    return FixtureCIFAR100(str(root), train=True, download=False, transform=transform)


def torchdistill_tensors(loader: TensorLoader) -> torch.utils.data.TensorDataset:
    """The training samples of a no-augmentation ``TensorLoader`` as a plain torch Dataset of the same
    normalised float tensors (the loader's own arithmetic, applied once to the whole split)."""
    x = loader.images.float().div_(255)
    return torch.utils.data.TensorDataset((x - loader.mean) / loader.std, loader.targets)


def torchdistill_box(dataset, teacher, student, recipe: Recipe, workers: int):
    """torchdistill's ``DistillationBox`` for the KD job on ``dataset``, configured as its sample CIFAR
    configs are: the dataset in a DataLoader (RandomSampler), ``KDLoss`` (α=0.1 CE + 0.9 T²·KL, T=4), SGD
    and MultiStepLR (``recipe``'s batch size, optimizer and schedule)."""
    import torchdistill.core.interfaces.forward_proc  # noqa: F401  (registers the forward processes)
    from torchdistill.core.distillation import DistillationBox

    teacher.eval()
    config = {
        "num_epochs": recipe.epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": recipe.batch_size, "num_workers": workers},
            "requires_supp": True,
        },
        "teacher": {"requires_grad": False, "forward_proc": "forward_batch_only"},
        "student": {"requires_grad": True, "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {"lr": recipe.lr, "momentum": recipe.momentum,
                                               "weight_decay": recipe.weight_decay}},  # fmt: skip
        "scheduler": {"key": "MultiStepLR", "kwargs": {"milestones": list(recipe.milestones), "gamma": recipe.gamma}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": 4.0, "alpha": 0.1, "reduction": "batchmean",
            }}, "weight": 1.0}}},
        },  # fmt: skip
    }
    return DistillationBox(teacher, student, {"train": dataset}, config, CPU, None, False, 1)


def torchdistill_epoch(box, epoch: int = 0) -> None:
    """torchdistill's training epoch, as in its example ``train_one_epoch``."""
    box.pre_epoch_process(epoch=epoch)
    for sample_batch, targets, supp_dict in box.train_data_loader:
        sample_batch, targets = sample_batch.to(CPU), targets.to(CPU)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss)
    box.post_epoch_process()


def torchdistill_epochs(box, epochs: int) -> None:
    for epoch in range(epochs):
        torchdistill_epoch(box, epoch)


def mini_kd_job(epochs: int | None = None, teacher_cache: bool = True):
    """The ``mini`` suite's KD job on digits (resnet20→resnet8, fraction 1, seed 0): its task (no
    evaluation split, ``task.teacher_cache`` as given), a method on random-init models and the recipe
    (``epochs`` overrides the suite's, keeping the milestones below it)."""
    suite = load_suite("mini")
    spec = next(s for s in expand(suite) if s.method == "kd" and (s.teacher, s.student) == ("resnet20", "resnet8")
                and s.fraction == 1.0 and s.seed == 0)  # fmt: skip
    recipe = spec.recipe
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs, milestones=[m for m in recipe.milestones if m < epochs])
    splits = load_dataset(suite.dataset)
    task = build_task(splits, spec.fraction, spec.seed, recipe, CPU, progress=False, teacher_cache=teacher_cache)
    task.eval_loaders = {}  # training only, as the torchdistill side
    hp = build_hparams("kd", spec.hparams, spec.label)
    method = build_method("kd", spec.teacher, spec.student, task.train_loader.num_samples, hparams=hp,
                          seed=spec.seed, info=splits.info, epochs=recipe.epochs)  # fmt: skip
    return task, method, recipe


# ---- shared teacher: k offline methods in lockstep vs separately ------------------------------------
def shared_teacher_methods() -> list[tuple[str, dict]]:
    """The k offline methods (name, hparams) of the shared-teacher benchmark: ``KDBENCH_SHARED_METHODS``
    (comma-separated ``name`` or ``name:hp=v``), default four KD temperatures (k = 4)."""
    spec = os.environ.get("KDBENCH_SHARED_METHODS", "kd:temperature=1,kd:temperature=2,kd:temperature=4,kd:temperature=8")
    out = []
    for item in spec.split(","):
        name, _, rest = item.strip().partition(":")
        hp = {k: float(v) for k, v in (kv.split("=") for kv in rest.split(";") if kv)}
        out.append((name, hp))
    return out


def shared_group(teacher_name: str, student_name: str, data: TensorImages, recipe: Recipe, methods):
    """k methods around one teacher module and their k tasks (one loader, as the runner would share)."""
    seed_everything(0)
    teacher = create_model(teacher_name, CIFAR100.num_classes, 3)
    loader = train_loader(data, recipe.batch_size)
    built, tasks = [], []
    for name, hp in methods:
        built.append(build_method(name, teacher_name, student_name, len(data), teacher, build_hparams(name, hp, name)))
        tasks.append(Task(loader, {}, CPU, seed=0, progress=False))
    return built, tasks


def separate_epochs(methods, tasks, recipe: Recipe) -> None:
    for method, task in zip(methods, tasks):
        fit(method, task, one_epoch(recipe))


def lockstep_epoch(methods, tasks, recipe: Recipe) -> None:
    results = fit_lockstep(methods, tasks, one_epoch(recipe))
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise errors[0]


def build_task_for(splits: Splits, recipe: Recipe) -> Task:
    return build_task(splits, 1.0, 0, one_epoch(recipe), CPU, progress=False)
