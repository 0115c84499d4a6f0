"""Teacher-output caching: a frozen offline teacher runs on each training sample once, not once per epoch.

**When it applies** (:func:`cache_applies` says why not, in one line, otherwise):

* the method distils an *offline* teacher (``teacher_mode == "offline"``), trains through the engine's loop
  (it does not override ``Method.fit``), the teacher has no trainable parameter and no forward hooks;
* the training loader is a device-resident :class:`~bench.loaders.TensorLoader` (it reports the sample positions
  of each batch in ``last_index``) with ``augment == "none"``: a training sample is the same input tensor row
  in every epoch, only the batch order changes;
* ``recipe.amp`` and ``recipe.compile`` are off, and the run trains in one process (a data-parallel worker sees
  other samples every epoch);
* the cache fits the memory budget (:data:`MEMORY_BUDGET_BYTES` or a quarter of the free CUDA memory,
  whichever is smaller), estimated from one teacher pass on one sample × the number of training samples.

**Why it cannot change the method.** A frozen teacher in eval mode is a fixed function of its input applied
to each sample independently (batch norm uses its running statistics), and without random augmentation its
input for sample i is the same every epoch. So ``teacher.forward_features`` of a training batch equals the
rows of the batch's samples in what it returned in an earlier epoch. Bit for bit only at the same batch
size: the convolution kernels are chosen by shape, and e.g. oneDNN computes a batch of one with another
accumulation order than a batch of 64 (measured: 1e-6 apart, which 15 epochs of training amplify into a
different final accuracy). So the cache stores and serves full batches only (``batch_size`` rows); the last,
smaller batch of an epoch always runs the teacher. At a fixed batch size a sample's output does not depend on
the other samples of the batch (``tests/test_teacher_cache.py`` checks equality bit for bit, also when the
last batch holds one sample). The cache serves a stored output only where all that holds: for the very
tensor object that is the current training batch (bound by the training loop, unmodified since: same
``_version``), of ``batch_size`` rows, with gradients and autocast off, without extra arguments, with the
teacher in eval mode, and only when every row of the batch was stored. Any other call (evaluation, a method running the teacher on a transformed or noised input, a call
with gradients) goes to the real teacher. Stored rows are copies and served rows are fresh gathers, so a
method that edits a teacher output in place cannot alter the cache. The cache holds no state worth
checkpointing: a resumed run refills it in its first epoch.

The switch is ``bench.engine.Task.teacher_cache`` (not a recipe field: the cache changes no result, so it
must not change a run's hash). ``Method.fit`` hands :func:`teacher_cache_for` to ``bench.engine.fit``, which
calls it through its narrow ``TeacherOutputs`` hook; :func:`bench.lockstep.fit_lockstep` puts one cache under
its per-batch :class:`~bench.lockstep.SharedTeacher`. Both report what happened in ``History.teacher_cache``
(:class:`CacheReport`). This module imports the engine's types, never the other way round.

Evaluation passes: no evaluation path runs a frozen offline teacher repeatedly (``Method.eval_models`` of an
offline method is the student alone, GPD's dynamic teacher is trained, ``bench.calibration`` predicts with the
student, a teacher's own test metrics are computed once and stored with it by ``bench.teachers``), so there
is nothing to cache there.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from bench.loaders import TensorLoader
from bench.engine import Task
from bench.recipe import Recipe

MEMORY_BUDGET_BYTES = 1 << 30  # 1 GiB
CUDA_FREE_FRACTION = 0.25  # on CUDA, also at most this share of the free device memory


# --------------------------------------------------------------------------------------------------
# Teacher outputs as trees of tensors (``Features`` dataclasses, lists, tuples)
# --------------------------------------------------------------------------------------------------
def map_tensors(fn: Callable[[Tensor], Any], output: Any) -> Any:
    """``output`` rebuilt with ``fn`` applied to every tensor (lists, tuples and dataclasses are new
    containers; anything else is kept as it is)."""
    if isinstance(output, Tensor):
        return fn(output)
    if isinstance(output, (list, tuple)):
        return type(output)(map_tensors(fn, v) for v in output)
    if hasattr(output, "__dataclass_fields__"):
        return type(output)(**{k: map_tensors(fn, getattr(output, k)) for k in output.__dataclass_fields__})
    return output


def tensor_leaves(output: Any) -> list[Tensor]:
    """The tensors of ``output`` in :func:`map_tensors` order."""
    leaves: list[Tensor] = []
    map_tensors(leaves.append, output)
    return leaves


def _rebuild(template: Any, leaves: list[Tensor]) -> Any:
    it = iter(leaves)
    return map_tensors(lambda _: next(it), template)


@contextmanager
def patched_forward_features(teacher: nn.Module, fn: Callable) -> Iterator[None]:
    """Set ``teacher.forward_features`` (on the instance) to ``fn`` for the block, then put back what was
    there before: another patch of the same instance (nested caches) or the class's method."""
    previous = teacher.__dict__.get("forward_features")
    teacher.forward_features = fn
    try:
        yield
    finally:
        if previous is None:
            del teacher.forward_features
        else:
            teacher.forward_features = previous


# --------------------------------------------------------------------------------------------------
# When it applies
# --------------------------------------------------------------------------------------------------
def memory_budget(device: torch.device, budget_bytes: int | None = None) -> int:
    """Bytes the cache may take: ``budget_bytes`` if given, else :data:`MEMORY_BUDGET_BYTES`, on CUDA at most
    :data:`CUDA_FREE_FRACTION` of the device's free memory."""
    if budget_bytes is not None:
        return budget_bytes
    budget = MEMORY_BUDGET_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, int(CUDA_FREE_FRACTION * free))
    return budget


@torch.no_grad()
def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def sample_bytes(teacher: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int:
    """Bytes of ``teacher.forward_features`` for one sample (one teacher pass on one zero input)."""
    param = next(teacher.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    output = teacher.forward_features(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    return sum(t.numel() * t.element_size() for t in tensor_leaves(output))


def cache_applies(method, task: Task, recipe: Recipe, budget_bytes: int | None = None) -> str | None:
    """None when the teacher cache applies to training ``method`` on ``task`` with ``recipe``, else the
    one-line reason it does not (module docstring). The cheap checks come first; the memory estimate runs
    the teacher once on one sample (the method must already be on ``task.device``)."""
    mode = method.teacher_mode
    if task.distributed is not None:
        return (f"the run has {task.distributed.world_size} data-parallel workers (a worker sees other samples "
                "every epoch)")  # fmt: skip
    if mode != "offline" or method.teacher is None:
        return f"teacher mode is {mode!r} (only a frozen offline teacher gives the same output every epoch)"
    if not method.trains_with_engine_loop():
        return f"method {method.name!r} has its own fit procedure"
    teacher = method.teacher
    if any(p.requires_grad for p in teacher.parameters()):
        return "the teacher has trainable parameters"
    if any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules()):
        return "the teacher has forward hooks (they would not fire on a cached output)"
    loader = task.train_loader
    if not isinstance(loader, TensorLoader):
        return f"the training loader is a {type(loader).__name__}, not a device-resident TensorLoader"
    if loader.augment != "none":
        return f"training augmentation {loader.augment!r} is random"
    if recipe.amp:
        return "recipe.amp is on"
    if recipe.compile:
        return "recipe.compile is on"
    need = sample_bytes(teacher, tuple(method.context.input_shape), task.device) * loader.num_samples
    budget = memory_budget(task.device, budget_bytes)
    if need > budget:
        return f"the cache would take {need / 2**20:.0f} MiB, over its budget of {budget / 2**20:.0f} MiB"
    return None


def cache_status(method, task: Task, recipe: Recipe, budget_bytes: int | None = None) -> str:
    """``"on"`` or ``"off: <reason>"`` (also when ``task.teacher_cache`` is false)."""
    if not task.teacher_cache:
        return "off: disabled (--no-teacher-cache)"
    reason = cache_applies(method, task, recipe, budget_bytes)
    return "on" if reason is None else f"off: {reason}"


def teacher_cache_for(method, task: Task, recipe: Recipe, budget_bytes: int | None = None) -> "TeacherCache | NoCache":
    """What serves ``method``'s teacher outputs in ``bench.engine.fit`` (its ``TeacherOutputs`` hook): a
    :class:`TeacherCache` where the cache applies, else a :class:`NoCache` that says why not. The method must
    already be on ``task.device``."""
    status = cache_status(method, task, recipe, budget_bytes)
    if status != "on":
        return NoCache(status)
    return TeacherCache(method.teacher, task.train_loader.num_samples, task.train_loader.batch_size)


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
@dataclass
class CacheReport:
    """What the cache did in one ``fit`` (or one lockstep group: the counts are the group's).

    ``hits``: training batches served from the cache; ``misses``: training batches the teacher computed and
    the cache stored; ``bypassed``: other calls, passed to the real teacher."""

    status: str
    hits: int = 0
    misses: int = 0
    bypassed: int = 0

    def tags(self) -> dict[str, str]:
        return {"teacher_cache": self.status}

    def metrics(self) -> dict[str, float]:
        if self.status != "on":
            return {}
        return {"teacher_cache_hits": float(self.hits), "teacher_cache_misses": float(self.misses)}


class NoCache:
    """Where the cache does not apply: takes no part in the loop, and reports why (``"off: <reason>"``)."""

    def __init__(self, status: str) -> None:
        self.status = status

    def active(self) -> AbstractContextManager["NoCache"]:
        return nullcontext(self)

    def bind(self, x: Tensor, index: Tensor | None) -> None:
        pass

    def report(self) -> CacheReport:
        return CacheReport(self.status)


class TeacherCache:
    """Per-sample store of ``teacher.forward_features`` for the training set (see the module docstring).

    Usage: ``with cache.active():`` around training, and ``cache.bind(x, loader.last_index)`` before each
    training step on batch ``x``. Storage (one tensor of ``num_samples`` rows per output tensor, on the
    output's device, dtype and memory format) is allocated at the first stored batch.
    """

    def __init__(self, teacher: nn.Module, num_samples: int, batch_size: int, status: str = "on") -> None:
        self.teacher = teacher
        self.num_samples, self.batch_size = num_samples, batch_size
        self.status = status
        self.template: Any = None  # the first stored output: the structure to rebuild
        self.storage: list[Tensor] = []
        self.channels_last: list[bool] = []
        self.filled = torch.zeros(num_samples, dtype=torch.bool)  # CPU: no device sync to test a batch
        self.x: Tensor | None = None
        self.x_version = -1
        self.index: Tensor | None = None  # CPU positions of the bound batch
        self.device_index: Tensor | None = None
        self.hits = self.misses = self.bypassed = 0
        self.passes = 0  # real teacher passes made through the cache (stored, padded or bypassed)

    def report(self) -> CacheReport:
        return CacheReport(self.status, self.hits, self.misses, self.bypassed)

    def bind(self, x: Tensor, index: Tensor) -> None:
        """Declare ``x`` the current training batch, made of the training samples at positions ``index``."""
        self.x, self.x_version = x, x._version
        self.index, self.device_index = index, None

    def _serves(self, x: Any, args: tuple, kwargs: dict) -> bool:
        return (
            self.status == "on"
            and x is self.x
            and not args
            and not kwargs
            and x._version == self.x_version
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and not self.teacher.training
        )

    def _positions(self, device: torch.device) -> Tensor:
        if self.device_index is None:
            self.device_index = self.index.to(device, non_blocking=True)
        return self.device_index

    def _store(self, output: Any, rows: int | None = None) -> None:
        """Store the output's rows for the bound batch's samples (its first ``rows`` rows: a padded pass)."""
        leaves = tensor_leaves(output)
        if leaves and all(t.dim() > 0 for t in leaves) and rows is not None:
            leaves = [t[:rows] for t in leaves]
        if not leaves or any(t.dim() == 0 or t.shape[0] != len(self.index) for t in leaves):
            self.status = "off: the teacher output is not one row per sample"
            return
        if self.template is None:
            self.template = output
            self.channels_last = [
                t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
                for t in leaves
            ]
            self.storage = [t.new_empty((self.num_samples, *t.shape[1:])) for t in leaves]
        index = self._positions(leaves[0].device)
        for store, t in zip(self.storage, leaves):
            store.index_copy_(0, index, t)
        self.filled[self.index] = True

    def _gather(self) -> Any:
        index = self._positions(self.storage[0].device)
        formats = [torch.channels_last if cl else torch.contiguous_format for cl in self.channels_last]
        rows = [store.index_select(0, index).contiguous(memory_format=f) for store, f in zip(self.storage, formats)]
        return _rebuild(self.template, rows)

    @contextmanager
    def active(self) -> Iterator["TeacherCache"]:
        """Patch the teacher instance's ``forward_features`` for the block (restoring what was there)."""
        original: Callable = self.teacher.forward_features

        def forward_features(x: Tensor, *args, **kwargs):
            if not self._serves(x, args, kwargs):
                self.bypassed += 1
                self.passes += 1
                return original(x, *args, **kwargs)
            stored = self.template is not None and bool(self.filled[self.index].all())
            if len(self.index) != self.batch_size:  # the last, smaller batch: always the real teacher
                self.bypassed += 1
                self.passes += 1
                output = original(x)
                if not stored:  # store its rows as computed in a full-size batch (the size they are served at)
                    self.misses += 1
                    self.passes += 1
                    repeats = -(-self.batch_size // len(self.index))
                    padded = x.repeat(repeats, *[1] * (x.dim() - 1))[: self.batch_size]
                    self._store(original(padded.contiguous(memory_format=_memory_format(x))), rows=len(self.index))
                return output
            if stored:
                self.hits += 1
                return self._gather()
            output = original(x)
            self.misses += 1
            self.passes += 1
            self._store(output)
            return output

        with patched_forward_features(self.teacher, forward_features):
            try:
                yield self
            finally:
                self.x = self.index = self.device_index = None
