"""Data-parallel scaling: a digits KD job (``KDBENCH_DDP_PAIR``, default resnet32x4 → resnet8x4, the whole digits
training set, global batch ``KDBENCH_DDP_BATCH``, default 128) trained one epoch by one process and by two
data-parallel workers of one thread each (gloo, SyncBatchNorm on, as ``--workers-per-run 2`` trains it). Target:
one / two workers ≥ 1.6×. The default pair gives each step enough work for the workers' synchronisation (one
all-reduce per BatchNorm layer forward and backward, one for the gradients) not to dominate; the mini suite's
resnet20 → resnet8 steps take ~10 ms on 8×8 images, where ~20 sync points per step do.

The two workers are started once (``torch.multiprocessing``, the process group Ray Train would set up) and kept
for every round; each round times the one-process epoch (rank 0 alone, rank 1 idle) and then the two-worker epoch,
back to back, so both see the same machine load (the ratio per round, its median over rounds). A third epoch per
round, two processes each training a worker's share without talking to each other (half the data, half the batch),
measures what two processes get on the machine at all (``two_apart_ratio``, 2 on two idle cores), so that
``ddp_efficiency`` = speed-up / that ratio separates the cost of DDP and SyncBN from a busy machine. What it leaves
out: starting the workers (Ray Train's actors and process group, seconds per run, paid once per run). With
``KDBENCH_DDP_SYNC_BN=0`` the workers keep BatchNorm per worker (``recipe.sync_bn: false``). Fails when
``ddp_efficiency`` is below ``KDBENCH_MIN_DDP_EFFICIENCY`` (default 0.5), the part of the speed-up that is ours:
the speed-up itself is bounded by the idle cores of the machine (two independent processes got 0.9-1.8× of one on
our shared one), and on CPU SyncBatchNorm pays gloo's latency twice per BatchNorm layer and step (measured here:
1.3 ms per all-reduce of 8 floats), where NCCL on GPUs takes microseconds.
"""
from __future__ import annotations

import os
import socket
import statistics
import time

import pytest
import torch

from tests.benchmarks.jobs import env_int

TEACHER, STUDENT = os.environ.get("KDBENCH_DDP_PAIR", "resnet32x4:resnet8x4").split(":")


def kd_epoch(distributed, batch_size: int, sync_bn: bool, fraction: float = 1.0) -> float:
    """Seconds of one KD epoch on ``fraction`` of digits (training only: no evaluation split, no checkpoint)."""
    from dataclasses import replace

    from bench.data import load_dataset
    from bench.engine import build_task
    from bench.recipe import Recipe
    from tests.benchmarks.jobs import build_method

    splits = load_dataset("digits")
    recipe = Recipe(epochs=1, batch_size=batch_size, milestones=[], sync_bn=sync_bn)
    task = build_task(splits, fraction, 0, recipe, torch.device("cpu"), progress=False, distributed=distributed,
                      teacher_cache=False)  # fmt: skip
    task = replace(task, eval_loaders={})
    method = build_method("kd", TEACHER, STUDENT, task.train_loader.num_samples, info=splits.info, epochs=1)
    if distributed is not None:
        distributed.prepare(method, recipe)
        distributed.barrier()
    t0 = time.perf_counter()
    method.fit(task, recipe)
    if distributed is not None:
        distributed.barrier()
    return time.perf_counter() - t0


def _worker(rank: int, port: int, orders, results, batch_size: int, sync_bn: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from bench.distributed import TorchDistributed

    distributed = TorchDistributed(torch.device("cpu"))
    while (order := orders[rank].get()) is not None:
        if order == "one":
            seconds = kd_epoch(None, batch_size, sync_bn) if rank == 0 else 0.0
        elif order == "apart":  # each a worker's share of the work, without talking to the other
            seconds = kd_epoch(None, batch_size // 2, sync_bn, fraction=0.5)
        else:
            seconds = kd_epoch(distributed, batch_size, sync_bn)
        results.put((rank, order, seconds))
    torch.distributed.destroy_process_group()


def test_two_workers_vs_one_process(benchmark, record_ratio):
    import torch.multiprocessing as mp

    if benchmark.disabled:
        pytest.skip("benchmarks are disabled: run with --benchmark-enable (make bench)")
    batch_size, sync_bn = env_int("KDBENCH_DDP_BATCH", 128), os.environ.get("KDBENCH_DDP_SYNC_BN", "1") != "0"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    orders, results = [ctx.Queue(), ctx.Queue()], ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, orders, results, batch_size, sync_bn)) for r in range(2)]
    for p in procs:
        p.start()

    seconds: dict[str, list[float]] = {"one": [], "two": [], "apart": []}  # as the workers time their epoch

    def run(order: str) -> None:
        for q in orders:
            q.put(order)
        seconds[order].append(max(results.get(timeout=600)[2] for _ in procs))

    def setup() -> None:  # untimed by pytest-benchmark: the two other epochs of the round
        run("one")
        run("apart")

    warmup = 1
    try:
        benchmark.group = "data parallel"
        benchmark.pedantic(run, args=("two",), setup=setup, rounds=env_int("KDBENCH_BENCH_ROUNDS", 5),
                           warmup_rounds=warmup)  # fmt: skip
    finally:
        for q in orders:
            q.put(None)
        for p in procs:
            p.join(timeout=60)
    one, apart = seconds["one"][warmup:], seconds["apart"][warmup:]
    speedup = record_ratio("one process / two workers", one, seconds["two"][warmup:], ">= 1.6")
    capacity = statistics.median(o / a for o, a in zip(one, apart))  # what two processes get here at all
    efficiency = speedup / capacity
    benchmark.extra_info.update({"batch_size": batch_size, "sync_bn": sync_bn, "load_1min": os.getloadavg()[0],
                                 "one_s": statistics.median(one), "two_apart_ratio": capacity,
                                 "ddp_efficiency": efficiency})  # fmt: skip
    assert efficiency >= float(os.environ.get("KDBENCH_MIN_DDP_EFFICIENCY", 0.5)), (
        f"data parallel: {speedup:.2f}x where two independent processes get {capacity:.2f}x")
