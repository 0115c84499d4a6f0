"""One teacher pass for many students: offline methods that share a teacher and a batch order train in
lockstep inside one process.

The methods of one suite that distil the same frozen teacher on the same data (dataset, fraction, seed,
batch size, augmentation) see identical batches, so the teacher's forward pass on a batch is the same for
all of them. ``fit_lockstep`` draws each batch once, lets every method take its optimizer step on it, and
runs the teacher once per batch: the methods are built around one shared teacher module, and
:class:`SharedTeacher` memoises that module's ``forward_features`` (what ``Method.teacher_features``
calls) for the current batch, so the first method computes it and the others reuse it. No method file
changes.

Everything else stays per method, exactly as in separate ``fit`` calls: optimizer, scheduler, history,
hooks (its MLflow run), checkpoint file and resume, and its own RNG stream (the global RNG states are
swapped in and out around each method's work, so a method that draws random numbers sees the same
numbers as when it trains alone). ``tests/test_lockstep.py`` proves the results equal separate runs.
"""
from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from bench.engine import (
    COMPILE_OPTIONS,
    History,
    Hooks,
    Recipe,
    Task,
    TrainingRun,
    prepare_batch,
    progress_bar,
)
from bench.loaders import TensorLoader
from bench.errors import BenchError
from bench.teacher_cache import (
    CacheReport,
    TeacherCache,
    cache_status,
    map_tensors,
    patched_forward_features,
    tensor_leaves,
)

# Recipe fields that decide the batches or the teacher's output, or set process-wide numerics (tf32,
# deterministic): runs in lockstep must agree on them.
SHARED_RECIPE_FIELDS = ("batch_size", "augment", "val_fraction", "amp", "channels_last", "compile", "tf32",
                        "deterministic")  # fmt: skip


@dataclass
class _Entry:
    x: Tensor  # held so that its id cannot be reused while cached
    x_version: int
    output: Any
    versions: list[int]


def _shallow_copy(output: Any) -> Any:
    """A fresh container around the same tensors, so a method that edits the container (not the
    tensors) cannot affect the next method."""
    return map_tensors(lambda t: t, output)


class SharedTeacher:
    """Memoises ``teacher.forward_features`` for the batch being trained on.

    A result is reused only for the very same input tensor object (same version), with gradients off
    and the same autocast state, i.e. exactly where a recomputation would give the same values: the
    teacher is frozen and in eval mode. A method that modified a cached output in place would change what
    the next method sees: ``fit_lockstep`` checks ``intact()`` after every step and stops that method.
    ``hits``/``misses`` count reuses and teacher passes; ``compute_s`` is the time spent in teacher passes.
    ``intact()`` (checked after each method's step) tells whether a method modified a cached output.
    """

    def __init__(self, teacher: nn.Module, compile: bool = False) -> None:
        self.teacher = teacher
        self.compile = compile
        self.cache: dict[tuple, _Entry] = {}
        self.hits = 0
        self.misses = 0
        self.compute_s = 0.0

    @contextmanager
    def active(self) -> Iterator["SharedTeacher"]:
        """Patch the teacher instance's ``forward_features`` for the duration of the block (over a
        :class:`~bench.teacher_cache.TeacherCache`'s patch when one is active: then a memo miss is served
        from the cache where it can)."""
        original: Callable = self.teacher.forward_features
        if self.compile:  # the teacher pass compiled on its own; the memo stays eager Python
            original = torch.compile(original, **COMPILE_OPTIONS)

        def forward_features(x: Tensor, *args, **kwargs):
            if args or kwargs or not isinstance(x, Tensor) or torch.is_grad_enabled():
                return original(x, *args, **kwargs)
            key = (id(x), torch.is_autocast_enabled(x.device.type))
            entry = self.cache.get(key)
            if entry is not None and entry.x is x and entry.x_version == x._version:
                self.hits += 1
                return _shallow_copy(entry.output)
            t0 = time.perf_counter()
            output = original(x)
            self.compute_s += time.perf_counter() - t0
            self.misses += 1
            self.cache[key] = _Entry(x, x._version, output, [t._version for t in tensor_leaves(output)])
            return _shallow_copy(output)

        patch = torch.compiler.disable(forward_features) if self.compile else forward_features
        with patched_forward_features(self.teacher, patch):  # restores an outer patch (a TeacherCache)
            try:
                yield self
            finally:
                self.cache.clear()

    def new_batch(self) -> None:
        self.cache.clear()

    def intact(self) -> bool:
        """False if a cached output was modified in place since it was computed (the entry is dropped,
        so the next method recomputes it)."""
        broken = [k for k, e in self.cache.items() if [t._version for t in tensor_leaves(e.output)] != e.versions]
        for key in broken:
            del self.cache[key]
        return not broken


@dataclass
class LockstepResult:
    """What ``fit`` would have returned for one method, or the error that stopped it."""

    history: History
    error: BaseException | None = None
    teacher_passes: int = 0  # teacher passes computed for the whole group (each shared by its runs)
    # the group's teacher cache report is in ``history.teacher_cache``


@dataclass
class _Member:
    run: TrainingRun
    rng: dict[str, Any]
    result: LockstepResult
    busy_s: float = 0.0
    epochs: int = 0
    active: bool = True


def _snapshot() -> dict[str, Any]:
    """The global RNG streams (Python, NumPy, torch CPU and CUDA); NumPy through its bit generator,
    which is twice as fast to read and write as ``np.random.get_state``."""
    state = {"python": random.getstate(), "numpy": np.random.mtrand._rand._bit_generator.state,
             "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.mtrand._rand._bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class _RngSlots:
    """Gives each member its own global RNG streams: ``use(member)`` saves the streams of the member
    that had them and installs ``member``'s (nothing to do when it already has them); ``close()``
    puts back the streams from before."""

    def __init__(self) -> None:
        self.outer = _snapshot()
        self.current: _Member | None = None

    def use(self, member: _Member) -> None:
        if self.current is member:
            return
        if self.current is not None:
            self.current.rng = _snapshot()
        _restore(member.rng)
        self.current = member

    def close(self) -> None:
        if self.current is not None:
            self.current.rng = _snapshot()
        _restore(self.outer)
        self.current = None


def _same_batches(a, b) -> bool:
    """Whether two training loaders yield the same batches: the same loader object, or two
    device-resident loaders over equal samples with the same batch size, seed and augmentation."""
    if a is b:
        return True
    if not (isinstance(a, TensorLoader) and isinstance(b, TensorLoader)):
        return False
    keys = ("num_samples", "batch_size", "seed", "train", "augment", "padding", "device", "resident")
    if any(getattr(a, k) != getattr(b, k) for k in keys):
        return False
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("images", "targets", "mean", "std"))


def can_share_teacher(cls: type) -> bool:
    """Offline methods trained by the engine's loop (a method overriding ``fit`` prepares something
    there that the lockstep loop would skip)."""
    return cls.teacher_mode == "offline" and cls.trains_with_engine_loop()


def check_lockstep(methods: Sequence[nn.Module], tasks: Sequence[Task], recipes: Sequence[Recipe]) -> None:
    """Raise ``BenchError`` unless the runs can share one teacher pass per batch."""
    if not methods or not (len(methods) == len(tasks) == len(recipes)):
        raise BenchError("fit_lockstep: need one task and one recipe per method (and at least one method)")
    for m in methods:
        if not can_share_teacher(type(m)):
            raise BenchError(f"fit_lockstep: method {m.name!r} cannot train in lockstep: it is not an offline "
                             f"method (teacher_mode={m.teacher_mode}) or it has its own fit procedure")  # fmt: skip
    teacher = methods[0].teacher
    if any(m.teacher is not teacher for m in methods):
        raise BenchError("fit_lockstep: the methods must be built around one shared teacher module object")
    for name in SHARED_RECIPE_FIELDS:
        values = {repr(getattr(r, name)) for r in recipes}
        if len(values) > 1:
            raise BenchError(f"fit_lockstep: recipe.{name} differs between the runs ({', '.join(sorted(values))})")
    first = tasks[0]
    for task in tasks[1:]:
        if task.device != first.device:
            raise BenchError("fit_lockstep: the runs must share the device")
        if not _same_batches(task.train_loader, first.train_loader):
            raise BenchError("fit_lockstep: the runs' training loaders do not yield the same batches "
                             "(share one loader, or build them from the same data, fraction, seed and recipe)")  # fmt: skip


def _stop(member: _Member, err: BaseException) -> None:
    member.active, member.result.error = False, err


def _guarded(member: _Member, slots: _RngSlots, fn: Callable[[], Any]) -> None:
    """Run ``fn`` with ``member``'s RNG streams; an exception stops that member only."""
    slots.use(member)
    try:
        fn()
    except Exception as err:
        _stop(member, err)


def _lockstep_epoch(epoch: int, group: list[_Member], loader, recipe: Recipe, shared: SharedTeacher,
                    slots: _RngSlots, cache: TeacherCache | None) -> None:  # fmt: skip
    """One epoch of every member of ``group`` on the shared batches."""
    t0 = time.perf_counter()
    for member in group:
        member.busy_s = 0.0
        _guarded(member, slots, lambda: member.run.begin_epoch(epoch))
    loader.set_epoch(epoch)
    for x, y, *extra in loader:
        x = prepare_batch(x, recipe)
        x_version = x._version
        shared.new_batch()
        if cache is not None:
            cache.bind(x, loader.last_index)
        for member in group:
            if not member.active:
                continue
            t1, paid = time.perf_counter(), shared.compute_s
            _guarded(member, slots, lambda: member.run.step(x, y, *extra))
            member.busy_s += time.perf_counter() - t1 - (shared.compute_s - paid)
            if not shared.intact():
                _stop(member, RuntimeError(
                    f"method {member.run.method.name!r} modified the shared teacher features in place; "
                    "it cannot train in lockstep (clone the teacher output before modifying it)"))  # fmt: skip
            if x._version != x_version:
                raise RuntimeError(f"method {member.run.method.name!r} modified the input batch in place; "
                                   "it cannot train in lockstep")  # fmt: skip
    alive = [m for m in group if m.active]
    shared_s = (time.perf_counter() - t0 - sum(m.busy_s for m in group)) / max(len(alive), 1)
    for member in alive:
        _guarded(member, slots, lambda: member.run.end_epoch(epoch, member.busy_s + shared_s))


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def fit_lockstep(
    methods: Sequence[nn.Module],
    tasks: Sequence[Task],
    recipes: Recipe | Sequence[Recipe],
    hooks: Sequence[Hooks | None] | None = None,
    progress: bool = False,
    description: str = "lockstep",
) -> list[LockstepResult]:
    """Train offline ``methods`` (built around one teacher module object) in lockstep on shared batches.

    ``tasks[i]``/``recipes[i]``/``hooks[i]`` are what ``fit(methods[i], tasks[i], recipes[i], hooks[i])``
    would get; each task has its own checkpoint path (resume works per run, also if the runs stopped at
    different epochs) and all training loaders must yield the same batches (``tasks[0]``'s is iterated).
    Recipes may differ in the optimisation (lr, epochs, ...), not in ``SHARED_RECIPE_FIELDS``.

    A run that raises (e.g. diverges) is stopped and its error returned; the others go on.
    ``KeyboardInterrupt`` stops all; each run resumes from its last checkpoint.

    Each run's ``epoch_s`` is its own step and evaluation time plus an equal share of the shared work
    (drawing the batch, the teacher pass), so the ``epoch_s`` of a group sum to its wall time.

    Where the teacher cache applies to every run (``Task.teacher_cache``, :mod:`bench.teacher_cache`), one
    :class:`~bench.teacher_cache.TeacherCache` under the per-batch :class:`SharedTeacher` serves the memo's
    misses after the first epoch: the group runs the teacher once per batch of its first epoch only. Each
    run's ``history.teacher_cache`` holds the group's report; ``teacher_passes`` counts real teacher passes.
    """
    recipes = [recipes] * len(methods) if isinstance(recipes, Recipe) else list(recipes)
    hooks = list(hooks) if hooks is not None else [None] * len(methods)
    check_lockstep(methods, tasks, recipes)
    teacher = methods[0].teacher
    shared = SharedTeacher(teacher, compile=recipes[0].compile)
    share = not _has_hooks(teacher)  # hooks would not fire on a reused pass: then every method runs it
    if not share:
        warnings.warn("fit_lockstep: the teacher has forward hooks; its passes are not shared", stacklevel=2)

    results: list[LockstepResult] = []
    members: list[_Member] = []
    slots = _RngSlots()
    for method, task, recipe, hook in zip(methods, tasks, recipes, hooks):
        try:
            run = TrainingRun(method, task, recipe, hook)  # seeds the global RNG for this run, as fit does
        except Exception as err:  # e.g. an unreadable checkpoint: this run fails, the others go on
            results.append(LockstepResult(History(), err))
            continue
        results.append(LockstepResult(run.history))
        members.append(_Member(run, _snapshot(), results[-1], epochs=recipe.epochs))
    _restore(slots.outer)

    loader = tasks[0].train_loader
    recipe0 = recipes[0]
    statuses = [cache_status(m.run.method, m.run.task, m.run.recipe) for m in members]  # "on" / "off: <why>"
    status = next((s for s in statuses if s != "on"), "on")  # on for all members or for none
    cache = TeacherCache(teacher, loader.num_samples, loader.batch_size) if members and status == "on" else None
    last = max((m.epochs for m in members), default=0)
    first_epoch = min((m.run.start for m in members), default=0)
    bar = progress_bar(progress, last, first_epoch, description)

    try:
        with cache.active() if cache is not None else nullcontext(), shared.active() if share else nullcontext():
            for epoch in range(first_epoch, last):
                group = [m for m in members if m.active and m.run.start <= epoch < m.epochs]
                if group:
                    _lockstep_epoch(epoch, group, loader, recipe0, shared, slots, cache)
                if bar is not None:
                    bar.update(1)
    finally:
        slots.close()
        if bar is not None:
            bar.close()
    report = cache.report() if cache is not None else CacheReport(status)
    for result in results:
        # every memo miss reaches the cache when there is one, which counts its own real passes
        result.teacher_passes = cache.passes if cache is not None else shared.misses
    for member in members:
        member.result.history.teacher_cache = report
    return results
