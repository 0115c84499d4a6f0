"""One run on several data-parallel workers: the engine's :class:`~bench.engine.Distributed` hook over
``torch.distributed``, and SyncBatchNorm that also runs on CPU (gloo).

Whoever starts the workers (Ray Train, ``bench.run.ray_train``) sets up the default process group (NCCL on
GPUs, gloo on CPUs); :class:`TorchDistributed` uses it. ``wrap`` sends the method's ``forward_train`` through
``DistributedDataParallel`` (every trainable module of the method: the student, an online teacher, GPD's dynamic
teacher, projectors, so online methods train both networks data-parallel), looking for unused parameters only
where the method says a step may leave some out (``Method.unused_parameters``: StableKD's phases), and without
DDP's per-step buffer broadcast (CRD's memory banks are buffers; ``sync_buffers`` sends rank 0's buffers before
each evaluation instead).

SyncBatchNorm (``recipe.sync_bn``, default on for several workers): :func:`convert_sync_batchnorm` turns every
BatchNorm of the method into ``torch.nn.SyncBatchNorm`` on CUDA; on CPU, where torch's SyncBatchNorm (and DDP
holding one) refuses to run, into :class:`CPUSyncBatchNorm`, whose :func:`sync_batch_norm` merges the workers'
statistics in one all-reduce (and their gradient sums in one more), so that the workers normalise with the
statistics one process would compute over the whole batch. Methods with their own BatchNorm function (GPD's
``DynamicBatchNorm2d``) call :func:`sync_batch_norm` themselves (``Method.prepare_distributed``).

Not here: how a batch is split (``bench.sharding``), which worker owns the MLflow run (``bench.run.distributed``),
starting the workers (``bench.run.ray_train``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bench.recipe import Recipe


def _several_workers() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SyncBatchNorm(torch.autograd.Function):
    """Batch normalisation with the statistics of every worker's rows together (the CPU counterpart of torch's
    CUDA ``SyncBatchNorm`` function, same maths): forward, one all-reduce of each worker's count, mean and sum of
    squared deviations (merged as Chan et al.'s parallel variance); backward, one all-reduce of the sums of the
    output gradient and of its product with the centred input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,  # type: ignore[override]
                running_var: Tensor | None, momentum: float, eps: float) -> Tensor:  # fmt: skip
        dims, c = [0, *range(2, x.dim())], x.shape[1]
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=dims, correction=0)
        count = x.numel() // max(c, 1)
        rows = torch.zeros(dist.get_world_size(), 2 * c + 1, device=x.device)
        rows[dist.get_rank()] = torch.cat([mean.new_tensor([count]), mean, var * count])
        dist.all_reduce(rows)
        counts, means, m2 = rows[:, :1], rows[:, 1 : c + 1], rows[:, c + 1 :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2.sum(0) + (counts * (means - mean).square()).sum(0)) / n
        if running_mean is not None and running_var is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * n / (n - 1).clamp(min=1)).to(running_var.dtype), momentum)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x32, weight, mean, invstd, n)
        w32 = weight.float() if weight is not None else None
        b32 = bias.float() if bias is not None else None
        return F.batch_norm(x32, mean, var, w32, b32, False, 0.0, eps).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x32, weight, mean, invstd, n = ctx.saved_tensors
        dims, shape, c = [0, *range(2, x32.dim())], (1, -1) + (1,) * (x32.dim() - 2), x32.shape[1]
        dy = grad.float()
        centred = x32 - mean.view(shape)
        sums = torch.cat([dy.sum(dims), (dy * centred).sum(dims)])
        local = sums.clone()
        dist.all_reduce(sums)
        mean_dy, mean_dy_xmu = sums[:c] / n, sums[c:] / n
        scale = invstd if weight is None else invstd * weight.float()
        dx = (dy - mean_dy.view(shape) - centred * (invstd.square() * mean_dy_xmu).view(shape)) * scale.view(shape)
        d_weight = (local[c:] * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        d_bias = local[:c].to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx.to(grad.dtype), d_weight, d_bias, None, None, None, None


def sync_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, training: bool, momentum: float, eps: float) -> Tensor:  # fmt: skip
    """``F.batch_norm`` (same arguments) whose training statistics are those of the batch of every worker
    together: mean and biased variance over all rows of all workers, running statistics updated with the
    unbiased variance, as ``nn.BatchNorm`` does on one process (:class:`_SyncBatchNorm`)."""
    if not (training and _several_workers()):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return _SyncBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm of any dimension whose training statistics are those of every worker's batch
    (:func:`sync_batch_norm`): the CPU counterpart of ``nn.SyncBatchNorm``, which (like DDP on a CPU module
    holding one) refuses CPU tensors."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _several_workers()):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return sync_batch_norm(x, *stats, self.weight, self.bias, True, factor, self.eps)


def _cpu_sync(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a :class:`CPUSyncBatchNorm` holding the same parameters and
    buffers (as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)  # fmt: skip
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _cpu_sync(child))
    return out


def convert_sync_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Every BatchNorm of ``module`` synced across the workers: torch's ``nn.SyncBatchNorm`` on CUDA, else
    :class:`CPUSyncBatchNorm`. Same parameters, buffers and state-dict keys, so checkpoints and saved students
    are unchanged."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module) if cuda else _cpu_sync(module)


class _Forward(nn.Module):
    """The module DDP wraps: the method (its trainable parameters) with ``forward`` = its training forward."""

    def __init__(self, method: nn.Module, forward_train: Callable[..., Any]) -> None:
        super().__init__()
        self.method = method
        self.forward_train = forward_train

    def forward(self, *args: Any) -> Any:
        return self.forward_train(*args)


class TorchDistributed:
    """The engine's ``Distributed`` hook on the default process group (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.backend = dist.get_backend()
        self._after_backward: list[Callable[[], None]] = []
        # where collectives run: NCCL needs CUDA tensors, gloo takes CPU ones
        self._comm = device if self.backend == "nccl" else torch.device("cpu")

    # ---- what a run and its method set up ------------------------------------------------------
    def prepare(self, method: nn.Module, recipe: Recipe) -> bool:
        """Before training: SyncBatchNorm (``recipe.sync_bn``, default on), then the method's own set-up
        (``prepare_distributed``: CRD's memory bank, GPD's clip and BatchNorm). Returns whether BN is synced."""
        sync = recipe.sync_bn if recipe.sync_bn is not None else self.world_size > 1
        if sync:
            convert_sync_batchnorm(method, self.device.type == "cuda")
        method.prepare_distributed(self, sync)
        return sync

    def register_after_backward(self, hook: Callable[[], None]) -> None:
        """``hook`` runs after every backward, once DDP has averaged the gradients (GPD's clip)."""
        self._after_backward.append(hook)

    # ---- the engine's hook ----------------------------------------------------------------------
    def wrap(self, method: nn.Module, forward_train: Callable[..., Any]) -> Callable[..., Any]:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(_Forward(method, forward_train), device_ids=ids, forward_sync_buffers=False,
                                       find_unused_parameters=getattr(method, "unused_parameters", False))  # fmt: skip

    def after_backward(self) -> None:
        for hook in self._after_backward:
            hook()

    def mean(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        names = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64) for k in names]).to(self._comm)
        dist.all_reduce(stacked)
        return dict(zip(names, (stacked / self.world_size).cpu()))

    def gather(self, rows: Tensor) -> Tensor:
        """Every worker's ``rows`` (sizes may differ), concatenated in rank order, on every worker."""
        size = torch.tensor([rows.shape[0]], device=self._comm)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=self._comm)
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(rows.device)

    def all_mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over the workers (same shape on every worker)."""
        out = tensor.detach().to(self._comm, copy=True)
        dist.all_reduce(out)
        return (out / self.world_size).to(tensor.device)

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers on every worker (BatchNorm statistics differ between workers without SyncBN; the
        others, CRD's banks, GPD's EMA, are equal already)."""
        for buffer in module.buffers():
            self._broadcast(buffer)

    def _broadcast(self, tensor: Tensor) -> None:
        staged = tensor.to(self._comm)
        dist.broadcast(staged, src=0)
        if staged.data_ptr() != tensor.data_ptr():
            tensor.copy_(staged)

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every worker."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def tags(self, recipe: Recipe, synced: bool) -> dict[str, str]:
        return run_tags(recipe, self.world_size, self.backend, synced)


def run_tags(recipe: Recipe, world_size: int = 1, backend: str = "none (one process)",
             synced: bool = False) -> dict[str, str]:  # fmt: skip
    """The MLflow tags that say how a run was parallelised (every run carries them)."""
    how = "on" if synced else "off"
    reason = ("one worker" if world_size == 1 else "recipe.sync_bn: false") if not synced else (
        "recipe.sync_bn: true" if recipe.sync_bn else f"default for {world_size} workers")  # fmt: skip
    return {
        "world_size": str(world_size),
        "global_batch_size": str(recipe.batch_size),
        "per_worker_batch_size": str(recipe.batch_size // world_size),
        "sync_bn": f"{how} ({reason})",
        "backend": backend,
    }
