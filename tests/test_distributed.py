"""Data-parallel runs without Ray: the global batch split over workers, the hash of existing runs, the checks that
refuse a run before it starts, and, on two gloo processes started here, SyncBatchNorm on CPU and every kind of
method trained on two workers against one process (``bench.distributed``; Ray Train's part: ``test_ddp_ray.py``)."""
from __future__ import annotations

import os
import socket
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench import data
from bench.data import FolderImages, TensorImages, load_dataset
from bench.loaders import FolderLoader, LoaderSpec, TensorLoader
from bench.recipe import Recipe
from bench.errors import BenchError
from bench.run import RunOptions
from bench.run.options import check_workers
from bench.sharding import check_shard, shard_bounds
from bench.suites import content_hash, expand, load_suite, parse_suite
from tests.fixtures import write_image_folder

ROOT = Path(__file__).resolve().parent.parent
INFO = data.DatasetInfo("c", 10, 3, 16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "crop_flip")


# ---- the global batch, split ---------------------------------------------------------------------
@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_the_workers_batches_together_are_exactly_one_process_batch(augment):
    """71 samples, global batch 32 on 2 workers: every batch of every worker, in rank order, is one process's
    batch bit for bit (images with their augmentation, labels, sample indices); the last batch (7) splits 4/3
    and the workers' loss weights make its mean that of the whole batch; evaluation splits the split in blocks."""
    rng = np.random.default_rng(0)
    n = 71
    split = TensorImages(torch.from_numpy(rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)), torch.arange(n) % 10)

    def batches(shard, train=True):
        loader = TensorLoader(split, LoaderSpec(INFO, None, 32, train, augment, seed=3, device="cpu", shard=shard))
        loader.with_indices = train
        loader.set_epoch(4)
        out = []
        for batch in loader:
            out.append((*batch, loader.batch_weight))
        return out

    one = batches(None)
    shards = [batches((rank, 2)) for rank in range(2)]
    assert [len(b[1]) for b in one] == [32, 32, 7]
    assert [[len(b[1]) for b in s] for s in shards] == [[16, 16, 4], [16, 16, 3]]
    for i, whole in enumerate(one):
        for k in range(3):  # x, y, index
            assert torch.equal(torch.cat([shards[0][i][k], shards[1][i][k]]), whole[k])
    assert [b[3] for b in shards[0]] == [1.0, 1.0, 8 / 7] and [b[3] for b in shards[1]] == [1.0, 1.0, 6 / 7]
    evaluation = [batches((rank, 2), train=False) for rank in range(2)]
    assert torch.equal(torch.cat([b[1] for s in evaluation for b in s]), torch.cat([b[1] for b in batches(None, False)]))


def test_folder_loader_workers_take_their_rows_of_one_process_batches(tmp_path):
    write_image_folder(tmp_path / "f", num_classes=3, per_class=5, size=20)
    info = replace(INFO, image_size=16)

    def indices(shard):
        spec = LoaderSpec(info, None, 6, True, "crop_flip", 1, "cpu", shard=shard)
        loader = FolderLoader(FolderImages(tmp_path / "f" / "train", True), spec, workers=0)
        loader.with_indices = True
        loader.set_epoch(2)
        return [b[2] for b in loader]

    one, shards = indices(None), [indices((rank, 2)) for rank in range(2)]
    assert [len(b) for b in one] == [6, 6, 3] and [[len(b) for b in s] for s in shards] == [[3, 3, 2], [3, 3, 1]]
    assert all(torch.equal(torch.cat([a, b]), whole) for a, b, whole in zip(*shards, one))


def test_a_batch_that_does_not_split_is_refused_in_one_line():
    assert shard_bounds(7, 0, 2) == (0, 4) and shard_bounds(7, 1, 2) == (4, 7)
    with pytest.raises(BenchError, match="not divisible by 3 workers"):
        check_shard(100, 64, 3, train=True)
    with pytest.raises(BenchError, match="fewer than the 4 workers"):
        check_shard(66, 64, 4, train=True)  # a last batch of 2
    check_shard(66, 64, 4, train=False)  # evaluation splits any way


# ---- the protocol: hashes and refusals ----------------------------------------------------------
def test_sync_bn_default_keeps_the_hash_of_every_existing_run():
    """``recipe.sync_bn`` (None: on for several workers) is out of the hash and params while None, so the runs of
    `mini` keep their hashes (pinned digests: they change only when a change deliberately gives every run a new
    hash, as the ``tf32`` / ``deterministic`` recipe fields did; update them then); an explicit value is a new run."""
    specs = expand(load_suite("mini"))
    assert content_hash(sorted(s.hash for s in specs)) == "5180ef073366e5b3"
    assert content_hash(sorted({s.teacher_spec.hash for s in specs if s.teacher_spec})) == "da96d5348fe57019"
    assert content_hash(sorted(str(sorted(s.params().items())) for s in specs)) == "1251bf56849a7b3a"
    raw = yaml.safe_load((ROOT / "suites" / "mini.yaml").read_text())
    for value in (True, False):
        changed = expand(parse_suite({**raw, "recipe": {**raw["recipe"], "sync_bn": value}}))
        assert {s.hash for s in changed}.isdisjoint(s.hash for s in specs)
        assert changed[0].params()["recipe.sync_bn"] is value
        assert {s.teacher_spec.hash for s in changed if s.teacher_spec} <= {s.teacher_spec.hash for s in specs
                                                                             if s.teacher_spec}  # fmt: skip
    assert parse_suite({**raw, "resources": {"workers_per_run": 4}}).resources.workers_per_run == 4
    with pytest.raises(BenchError, match="workers_per_run: must be >= 1"):
        parse_suite({**raw, "resources": {"workers_per_run": 0}})


def test_workers_need_the_ray_executor_and_a_global_batch_that_splits():
    suite = load_suite("mini")  # batch 64
    check_workers(suite, RunOptions(executor="ray", workers_per_run=2))
    with pytest.raises(BenchError, match="not divisible by 3 workers per run"):
        check_workers(suite, RunOptions(executor="ray", workers_per_run=3))
    with pytest.raises(BenchError, match="need the Ray executor"):
        check_workers(suite, RunOptions(executor="local", workers_per_run=2))


@pytest.mark.parametrize("args, message", [(["--workers-per-run", "3"], "not divisible by 3 workers per run"),
                                           (["--workers-per-run", "2", "--executor", "local"], "need the Ray executor")])
def test_the_cli_refuses_before_anything_starts_with_one_line_and_exit_2(tmp_path, capsys, args, message):
    from bench.__main__ import main

    assert main(["run", "mini", "--results", str(tmp_path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()


def test_more_workers_than_the_ray_cluster_has_cpus_for_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    """Checked on the cluster's resources as Ray reports them, before any trial starts (here a 2-CPU cluster;
    no Ray instance is started for the test)."""
    from contextlib import nullcontext

    import bench.run.ray as executor
    from bench.__main__ import main

    monkeypatch.setattr(executor, "ray_session", lambda address=None: nullcontext())
    monkeypatch.setattr(executor.ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    assert main(["run", "mini", "--results", str(tmp_path), "--no-progress", "--workers-per-run", "4"]) == 2
    err = capsys.readouterr().err  # (MLflow's own INFO lines as it creates the store, then ours)
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "Traceback" not in err
    assert "a run of 4 workers of 1 CPU(s), 0 GPU(s) needs 4 CPU(s) but the Ray cluster has 2" in err


# ---- two gloo workers started here ----------------------------------------------------------------
# method, hyperparameters, relative tolerance of the first-epoch loss against one process (None: not compared)
METHODS = [
    ("dml", {}, 1e-4),  # online: both networks data-parallel
    ("gpd", {"grad_clip": 0.5}, 1e-4),  # GPD's dynamic teacher; its clip (active at 0.5) on the averaged gradients
    ("stablekd", {}, 1e-4),  # a phase leaves blocks out (unused parameters)
    ("crd", {"nce_k": 64}, None),  # negatives are drawn per worker; the banks must stay equal
    ("dist", {}, None),  # intra-class relation per worker (ddp_note)
]


def _fit(name: str, hparams: dict, distributed) -> dict:
    """One epoch of ``name`` on 15 % of digits, global batch 32: the loss, test top-1 and any memory bank."""
    from bench.engine import build_task, seed_everything
    from bench.models import create_model
    from methods import MethodContext, build_hparams, get_method

    splits = load_dataset("digits")
    recipe = Recipe(epochs=1, batch_size=32, milestones=[], augment="crop_flip")
    task = build_task(splits, 0.15, 0, recipe, torch.device("cpu"), progress=False, distributed=distributed)
    cls = get_method(name)
    seed_everything(0)
    teacher = create_model("resnet8", 10, 1) if cls.teacher_mode != "none" else None
    student = create_model("resnet8", 10, 1)
    context = MethodContext(splits.info, task.train_loader.num_samples, recipe.epochs)
    method = cls(student, teacher, build_hparams(name, hparams, name), context)
    if distributed is not None:
        distributed.prepare(method, recipe)
    history = method.fit(task, recipe)
    banks = {k: v.numpy().copy() for k, v in method.state_dict().items() if k.startswith("memory")}
    return {"loss": history.epochs[0]["train_loss"], "top1": history.epochs[0]["test_top1"], "banks": banks}


def _sync_bn_check(rank: int) -> dict:
    """One CPUSyncBatchNorm step on this worker's half of a batch against BatchNorm on the whole batch."""
    from bench.distributed import CPUSyncBatchNorm, convert_sync_batchnorm

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 3, 4, 4, generator=gen) * 3 + 1, torch.randn(10, 3, 4, 4, generator=gen)
    ref = torch.nn.BatchNorm2d(3)
    ref.weight.data.uniform_(0.5, 1.5, generator=gen)
    synced = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), cuda=False)
    synced[0].load_state_dict(ref.state_dict())
    assert isinstance(synced[0], CPUSyncBatchNorm)
    lo, hi = shard_bounds(10, rank, 2)  # 5 rows each
    whole, part = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
    expected = ref(whole)
    (expected * w).sum().backward()
    out = synced(part)
    (out * w[lo:hi]).sum().backward()
    grads = [p.grad.clone() for p in synced.parameters()]
    for g in grads:
        torch.distributed.all_reduce(g)  # DDP would average the workers' gradients; summed: the whole batch's
    return {
        "out": (out - expected[lo:hi]).abs().max().item(),
        "input_grad": (part.grad - whole.grad[lo:hi]).abs().max().item(),
        "param_grad": max((g - p.grad).abs().max().item() for g, p in zip(grads, ref.parameters())),
        "running": max((synced[0].running_mean - ref.running_mean).abs().max().item(),
                       (synced[0].running_var - ref.running_var).abs().max().item()),  # fmt: skip
    }


def _worker(rank: int, port: int, queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        from bench.distributed import TorchDistributed

        out = {"sync_bn": _sync_bn_check(rank)}
        for name, hparams, _ in METHODS:
            out[name] = _fit(name, hparams, TorchDistributed(torch.device("cpu")))
        torch.distributed.destroy_process_group()
        queue.put((rank, out))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def two_workers() -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, out in results.items():
        assert isinstance(out, dict), f"worker {rank} failed:\n{out}"
    return [results[0], results[1]]


@pytest.mark.slow
def test_cpu_sync_batchnorm_equals_batchnorm_on_the_whole_batch(two_workers):
    for rank in range(2):
        check = two_workers[rank]["sync_bn"]
        assert max(check.values()) < 1e-5, (rank, check)


@pytest.mark.slow
@pytest.mark.parametrize("name, hparams, tolerance", METHODS)
def test_every_kind_of_method_trains_on_two_workers_like_one_process(two_workers, name, hparams, tolerance):
    """The workers agree (their losses are all-reduced, their banks updated with the whole batch's rows); where
    the method has no per-worker part, the first epoch's loss is one process's up to the reduction order."""
    a, b = two_workers[0][name], two_workers[1][name]
    assert a["loss"] == b["loss"] and a["top1"] == b["top1"]
    assert a["banks"].keys() == b["banks"].keys() and all(np.array_equal(a["banks"][k], b["banks"][k]) for k in a["banks"])
    one = _fit(name, hparams, None)
    assert np.isfinite(a["loss"]) and np.isfinite(one["loss"])
    if tolerance is not None:
        assert a["loss"] == pytest.approx(one["loss"], rel=tolerance)


def test_a_run_whose_worker_died_is_ended_failed_with_the_workers_reason(tmp_path):
    """Ray Train reports a failed worker group; rank 0 could not end the MLflow run (it was killed): the trial ends
    it FAILED with the first failed worker's own error (not Ray's wrapper), and keeps rank 0's reason if it had
    recorded one."""
    from bench.run.ray_train import failed
    from bench.tracking import Tracker

    class WorkerError(Exception):  # what Ray hands over: the worker's exception inside a task error
        def __init__(self, cause: BaseException) -> None:
            super().__init__(f"ray.exceptions.RayTaskError: Traceback (most recent call last):\n  ...\n{cause!r}")
            self.cause = cause

    class WorkerGroupError(Exception):
        def __init__(self, failures: dict) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    spec = expand(load_suite("mini"))[0]
    tracker = Tracker("t", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    run_id, _ = tracker.start(spec.run_name, spec.hash, spec.params(), {})
    crash = WorkerGroupError({1: WorkerError(MemoryError("killed\nmore")), 0: WorkerError(RuntimeError("gloo"))})
    outcome = failed(spec, tracker, crash)
    assert (outcome.status, outcome.error, outcome.run_id) == ("FAILED", "RuntimeError: gloo", run_id)
    (run,) = tracker.runs_for(spec.hash)
    assert run.status == "FAILED" and run.tags["error"] == "RuntimeError: gloo"
    assert failed(spec, tracker, WorkerGroupError({1: MemoryError("later")})).error == "RuntimeError: gloo"


def test_the_teacher_cache_is_off_on_several_workers_with_the_reason():
    from types import SimpleNamespace

    from bench.engine import build_task
    from bench.teacher_cache import cache_status
    from tests.benchmarks.jobs import build_method

    splits = load_dataset("digits")
    recipe = Recipe(epochs=1, batch_size=64, milestones=[], augment="none")
    task = build_task(splits, 0.2, 0, recipe, torch.device("cpu"), teacher_cache=True, progress=False)
    method = build_method("kd", "resnet8", "resnet8", task.train_loader.num_samples, info=splits.info, epochs=1)
    assert cache_status(method, task, recipe) == "on"
    task.distributed = SimpleNamespace(world_size=2, rank=0)
    assert cache_status(method, task, recipe) == "off: the run has 2 data-parallel workers (a worker sees other " \
                                                 "samples every epoch)"  # fmt: skip
