"""The one training loop: SGD + multi-step schedule, per-epoch evaluation, a checkpoint every epoch.

``fit(method, task, recipe, hooks)`` trains ``method`` (a :class:`methods.base.Method`) on ``task``.
Every epoch it evaluates each of ``method.eval_models()`` on every evaluation split, reports the
metrics to ``hooks`` (MLflow, Ray Tune, ...) and atomically writes a checkpoint (method state,
optimizer, scheduler, RNG states, history), from which an interrupted run resumes exactly.

Here too: the ``Recipe``, the ``Task`` a method trains on (``build_task``) and the speed switches that change
no result (``FastPaths``). Not here: who builds runs and logs them (``bench.run``), the teacher-output cache
(``bench.teacher_cache``, which takes part through the narrow :class:`TeacherOutputs` hook), several runs on
shared batches (``bench.lockstep``), data-parallel workers (``bench.distributed``, through the narrow
:class:`Distributed` hook on ``Task.distributed``). The engine imports none of its callers.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from bench.loaders import Loader
from bench.checkpoints import LEGACY_RUN_CHECKPOINT_TYPES, load_checkpoint
from bench.recipe import Recipe, Trainer, apply_numerics, nothing
from bench.errors import BenchError
from bench.metrics import classification_metrics, curve_auc, epochs_to_target


@dataclass
class Task:
    """What a method trains on: the data loaders, the device and where to checkpoint."""

    train_loader: Loader
    eval_loaders: dict[str, Loader]
    device: torch.device
    seed: int
    checkpoint_path: Path | None = None
    target_top1: float | None = None
    progress: bool = True
    description: str = ""
    # Cache a frozen offline teacher's per-sample outputs where that cannot change the result
    # (bench.teacher_cache). Not a recipe field: it changes no result, so it is not part of a run's hash.
    teacher_cache: bool = False
    distributed: "Distributed | None" = None  # this process is one of several data-parallel workers


@dataclass(frozen=True)
class FastPaths:
    """Speed switches that change no result, so they are not part of a run's hash (unlike ``recipe.amp``,
    ``channels_last``, ``compile``): each is on by default, has a CLI switch and is tagged in the MLflow run.
    Lockstep groups (``share_teacher``) are the third; they are planned per suite, not per run."""

    teacher_cache: bool = True  # a frozen teacher's per-sample outputs reused where no augmentation
    device_data: bool = True  # tensor datasets (digits, CIFAR) live on the training device, else in host memory


class Hooks(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


class TeacherOutputs(Protocol):
    """The narrow hook through which a store of the frozen teacher's outputs (``bench.teacher_cache``) takes
    part in the loop: ``active()`` is entered around the epochs, ``bind(x, index)`` sees each training batch and
    its sample positions (``None`` where the loader does not report them) before the step, and ``report()``
    lands in ``History.teacher_cache``. The engine knows nothing else of it."""

    def active(self) -> AbstractContextManager[Any]: ...

    def bind(self, x: torch.Tensor, index: torch.Tensor | None) -> None: ...

    def report(self) -> Any: ...


class Distributed(Protocol):
    """How one run trains on ``world_size`` data-parallel workers (``bench.distributed.TorchDistributed``): each
    worker's loaders yield its share of every batch; ``forward_train`` goes through ``wrap`` (DDP), ``after_backward``
    runs once the gradients are averaged, loss sums are averaged (``mean``), each split is predicted in shards and
    concatenated (``gather``) after ``sync_buffers`` (rank 0's BatchNorm statistics and other buffers); rank 0
    checkpoints, with every worker's RNG state (``gather_object``)."""

    world_size: int
    rank: int

    def wrap(self, method: nn.Module, forward_train: Callable[..., Any]) -> Callable[..., Any]: ...
    def after_backward(self) -> None: ...
    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def gather(self, rows: torch.Tensor) -> torch.Tensor: ...
    def sync_buffers(self, module: nn.Module) -> None: ...
    def gather_object(self, obj: Any) -> list[Any]: ...


@dataclass
class History:
    """Per-epoch metrics (``epochs[i]`` is the dict of epoch i+1) and the run's summary.

    ``teacher_cache``: what the teacher cache did in this process (its ``report()``, a
    ``bench.teacher_cache.CacheReport``; None where no cache took part)."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    teacher_cache: Any = None

    def curve(self, key: str = "test_top1") -> list[float]:
        return [e[key] for e in self.epochs if key in e]

    def summary(self, target_top1: float | None = None, split: str = "test") -> dict[str, float]:
        """Final-epoch metrics, best-epoch accuracy (labelled as such), convergence speed, wall time."""
        if not self.epochs:
            return {}
        last = self.epochs[-1]
        out = {k: v for k, v in last.items() if not k.startswith("train_") and k not in ("lr", "epoch")}
        for prefix in sorted({k[: -len(f"{split}_top1")] for k in last if k.endswith(f"{split}_top1")}):
            curve = self.curve(f"{prefix}{split}_top1")
            best = int(np.argmax(curve))
            out[f"{prefix}best_{split}_top1"] = curve[best]
            out[f"{prefix}best_epoch"] = float(best + 1)
            out[f"{prefix}epochs_to_target"] = epochs_to_target(curve, target_top1)
            out[f"{prefix}auc_{split}_top1"] = curve_auc(curve)
        out["wall_s"] = float(sum(e.get("epoch_s", 0.0) for e in self.epochs))
        out["epochs"] = float(len(self.epochs))
        return out


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU; or an explicit torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict[str, Any]:
    """The global RNG states in a form a weights-only load reads back (``bench.checkpoints``): Python's is a
    tuple of ints, NumPy's key array becomes a tensor, torch's are tensors."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["key"].cpu().numpy().astype(np.uint32)
        numpy_state = (numpy_state["kind"], key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"])
    np.random.set_state(numpy_state)  # a tuple: a checkpoint written before the key was a tensor
    torch.set_rng_state(state["torch"].cpu())  # generators take CPU byte tensors (the checkpoint maps to the device)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


_MALLOC_TUNING: str | None = None  # what keep_freed_host_memory did in this process


def keep_freed_host_memory(threshold: int = 1 << 30) -> str:
    """On glibc, stop returning freed blocks below ``threshold`` to the OS (``mallopt`` M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD, both: raising only the trim threshold makes it worse). By default glibc hands large
    freed blocks (a batch's activations) back and page-faults them in again on the next step: a CPU KD step
    took ~3× the page faults of torchdistill's loop and ran ~1.15× slower for it (``tests/benchmarks``).
    Changes no result; the process keeps up to ``threshold`` of freed memory. Once per process; opt out with
    ``KDBENCH_MALLOC_TUNING=0``. Returns ``"on"`` or ``"off: <why>"`` (the runs' MLflow tag)."""
    global _MALLOC_TUNING
    if _MALLOC_TUNING is None:
        import ctypes
        import platform

        if os.environ.get("KDBENCH_MALLOC_TUNING", "1") == "0":
            _MALLOC_TUNING = "off: KDBENCH_MALLOC_TUNING=0"
        elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            _MALLOC_TUNING = "off: not glibc"
        else:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-3, threshold) == 1 and libc.mallopt(-1, threshold) == 1  # MMAP, then TRIM
            _MALLOC_TUNING = "on" if ok else "off: mallopt refused"
    return _MALLOC_TUNING


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def predict(model: nn.Module, loader: Loader, distributed: Distributed | None = None) -> tuple[torch.Tensor, ...]:
    """Logits and targets of a whole split (model in eval mode); with ``distributed``, every worker predicts its
    shard of the split and all receive the whole split's (a collective: every worker calls it)."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x).float())
        targets.append(y)
    model.train(was_training)
    logits, targets = torch.cat(logits), torch.cat(targets)
    if distributed is not None:
        logits, targets = distributed.gather(logits), distributed.gather(targets)
    return logits.cpu(), targets.cpu()


def evaluate_method(method, loader: Loader, split: str, distributed: Distributed | None = None) -> dict[str, float]:
    """Metrics of every model in ``method.eval_models()``, keyed ``<model>_<split>_<metric>``."""
    out = {}
    for prefix, model in method.eval_models().items():
        logits, targets = predict(model, loader, distributed)
        tag = f"{prefix}_{split}" if prefix else split
        out.update({f"{tag}_{k}": v for k, v in classification_metrics(logits, targets).items()})
    return out


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


# ``torch.compile`` arguments for ``recipe.compile`` (a test swaps in the fast ``eager`` backend).
COMPILE_OPTIONS: dict[str, Any] = {}


def autocast(recipe: Recipe, device: torch.device):
    """bf16 autocast when ``recipe.amp``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.amp)


def prepare_batch(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The input batch in the recipe's memory format (NHWC for ``channels_last``)."""
    if recipe.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class TrainingRun:
    """One method's training state: optimizer, scheduler, history, RNG state and checkpoint.

    ``fit`` drives one run over the task's batches; :func:`bench.lockstep.fit_lockstep` drives several on
    shared batches. Both call the same three steps: ``begin_epoch``, ``step`` per batch, ``end_epoch``.
    """

    def __init__(self, method, task: Task, recipe: Recipe, hooks: Hooks | None = None) -> None:
        self.method, self.task, self.recipe, self.hooks = method, task, recipe, hooks
        keep_freed_host_memory()
        apply_numerics(recipe, task.device)
        method.to(task.device)
        if recipe.channels_last:
            method.to(memory_format=torch.channels_last)
        self.params = method.trainable_parameters()
        self.trainer: Trainer = method.make_trainer(self.params, recipe)
        self.optimizer = self.trainer.optimizer
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(recipe.milestones), recipe.gamma)
        self.history, self.start = History(), 0
        self.dist = dist = task.distributed
        if dist is not None and not self.trainer.data_parallel:
            raise BenchError(f"method {method.name!r}: its trainer does not run on several data-parallel workers "
                             "(it takes two backward passes per step); train it with --workers-per-run 1")  # fmt: skip
        rank = dist.rank if dist is not None else 0
        seed_everything(task.seed + 1_000_003 * rank)  # rank 0 draws what one process draws; the others their own
        ckpt_path = task.checkpoint_path
        if ckpt_path is not None and ckpt_path.exists():
            state = load_checkpoint(ckpt_path, task.device, allow=LEGACY_RUN_CHECKPOINT_TYPES)
            method.load_checkpoint_state(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.history = History(state["history"])
            self.start = state["epoch"]
            ranks = state.get("rng_ranks") or [state["rng"]]  # a worker of another world size keeps its seed
            if rank < len(ranks):
                _set_rng_state(ranks[rank])
        self.forward_train = torch.compile(method.forward_train, **COMPILE_OPTIONS) if recipe.compile else method.forward_train
        if dist is not None:
            self.forward_train = dist.wrap(method, self.forward_train)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def begin_epoch(self, epoch: int) -> None:
        self.method.train()
        self.method.on_epoch_start(epoch)
        self.sums, self.steps = {}, 0

    def step(self, x: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor, weight: float = 1.0) -> None:
        """One optimizer step on a batch (already in the recipe's memory format, see ``prepare_batch``).
        ``extra``: what the loader yields after ``(x, y)`` (e.g. sample indices), passed to ``forward_train``.
        ``weight``: a data-parallel worker's share of an unevenly split global batch × the number of workers
        (the loader's ``batch_weight``), so that the averaged gradient is that of the global batch's mean loss."""
        with autocast(self.recipe, self.task.device):
            _, losses = self.forward_train(x, y, *extra)
            if weight != 1.0:
                losses = {name: value * weight for name, value in losses.items()}
            loss = sum(losses.values())
        self.trainer.update(losses, loss, self.dist.after_backward if self.dist is not None else nothing)
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach()
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss.detach()
        self.steps += 1

    def end_epoch(self, epoch: int, train_s: float) -> dict[str, float]:
        """Epoch metrics, evaluation, hooks and the checkpoint; ``train_s`` is the training phase's time."""
        t0 = time.perf_counter()
        steps, dist = max(self.steps, 1), self.dist
        sums = dist.mean(self.sums) if dist is not None else self.sums  # every worker: the global batches' means
        train = {f"train_{k}" if k == "loss" else f"train_loss_{k}": float(v) / steps for k, v in sums.items()}
        if not math.isfinite(train.get("train_loss", 0.0)):
            raise DivergenceError(f"training loss is {train['train_loss']} at epoch {epoch + 1}")
        metrics = {"epoch": float(epoch + 1), "lr": self.optimizer.param_groups[0]["lr"], **train}
        self.scheduler.step()
        if dist is not None:
            dist.sync_buffers(self.method)
        with autocast(self.recipe, self.task.device):
            for split, loader in self.task.eval_loaders.items():
                metrics.update(evaluate_method(self.method, loader, split, dist))
        metrics["epoch_s"] = train_s + time.perf_counter() - t0
        self.history.epochs.append(metrics)
        if self.hooks is not None:  # before the checkpoint: a crash in between re-logs the epoch (same step)
            self.hooks.on_epoch_end(epoch, metrics)
        rng_ranks = dist.gather_object(_rng_state()) if dist is not None else None
        if self.task.checkpoint_path is not None and (dist is None or dist.rank == 0):
            atomic_save(
                {
                    "epoch": epoch + 1,
                    "method": self.method.checkpoint_state(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": _rng_state(),
                    "history": self.history.epochs,
                    **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
                },
                self.task.checkpoint_path,
            )
        return metrics


def progress_bar(enabled: bool, epochs: int, start: int, desc: str):
    """A tqdm bar over epochs, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, initial=start, desc=desc, unit="ep", leave=False)


def fit(method, task: Task, recipe: Recipe, hooks: Hooks | None = None,
        teacher_outputs: TeacherOutputs | None = None) -> History:  # fmt: skip
    """Train ``method`` for ``recipe.epochs`` epochs, resuming from ``task.checkpoint_path`` if present;
    ``teacher_outputs`` (e.g. a ``bench.teacher_cache.TeacherCache``) takes part through its hook."""
    run = TrainingRun(method, task, recipe, hooks)
    loader = task.train_loader
    bar = progress_bar(task.progress, recipe.epochs, run.start, task.description or method.name)
    try:
        with teacher_outputs.active() if teacher_outputs is not None else nullcontext():
            for epoch in range(run.start, recipe.epochs):
                t0 = time.perf_counter()
                run.begin_epoch(epoch)
                loader.set_epoch(epoch)
                for x, y, *extra in loader:
                    x = prepare_batch(x, recipe)
                    if teacher_outputs is not None:
                        teacher_outputs.bind(x, getattr(loader, "last_index", None))
                    run.step(x, y, *extra, weight=getattr(loader, "batch_weight", 1.0))
                metrics = run.end_epoch(epoch, time.perf_counter() - t0)
                if bar is not None:
                    top1 = metrics.get("test_top1", float("nan"))
                    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", top1=f"{top1:.1f}")
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if teacher_outputs is not None:
        run.history.teacher_cache = teacher_outputs.report()
    return run.history


def build_task(
    splits,
    fraction: float,
    seed: int,
    recipe: Recipe,
    device: torch.device,
    *,
    teacher_cache: bool = False,
    device_data: bool = True,
    train_loader: Loader | None = None,
    distributed: Distributed | None = None,
    **task_fields: Any,
) -> Task:
    """Loaders for one run: a stratified ``fraction`` of the training pool (after carving the seeded
    validation split when ``recipe.val_fraction`` > 0), the test split, and the validation split.
    ``teacher_cache`` / ``device_data``: the :class:`FastPaths` (``**asdict(fast)``); ``train_loader``: an
    existing loader of those same batches to use instead (a lockstep group's); ``distributed``: this process
    is one of several workers, its loaders yield its share of each batch (``batch_size`` is the global batch);
    ``task_fields``: the other :class:`Task` fields (``checkpoint_path``, ``target_top1``, ``progress``,
    ``description``)."""
    from bench.data import run_indices
    from bench.loaders import LoaderSpec, make_loader

    shard = (distributed.rank, distributed.world_size) if distributed is not None else None
    train_idx, val = run_indices(splits.train.target_array(), fraction, seed, recipe.val_fraction)
    info = splits.info

    def loader(data, indices, train: bool) -> Loader:
        bs = recipe.batch_size if train else recipe.eval_batch_size
        augment = recipe.augment if train else "none"
        return make_loader(data, LoaderSpec(info, indices, bs, train, augment, seed, device, shard), device_data)

    eval_loaders = {"test": loader(splits.test, None, False)}
    if len(val):
        eval_loaders["val"] = loader(splits.train, val, False)
    return Task(
        train_loader=train_loader if train_loader is not None else loader(splits.train, train_idx, True),
        eval_loaders=eval_loaders,
        device=device,
        seed=seed,
        teacher_cache=teacher_cache,
        distributed=distributed,
        **task_fields,
    )
