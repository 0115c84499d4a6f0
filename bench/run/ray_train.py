"""Ray Train for one run on several data-parallel workers (``--workers-per-run N``), started from the run's Tune trial.

Ray 2.60 runs Ray Train V2, which supports a ``TorchTrainer`` started inside a Tune function trainable: the trial
(``bench.run.ray.tune_trial``) becomes the run's driver. :func:`run_on_workers` starts a ``TorchTrainer`` of N
workers (``ScalingConfig``: the suite's or ``--cpus-per-run`` / ``--gpus-per-run`` resources *per worker*, in a
placement group of Ray Train's own; ``TorchConfig``: NCCL on GPUs, gloo on CPUs), whose process group it sets
up, on one machine or across a Ray cluster alike. Each worker (:func:`worker_loop`) loads the data, builds its
:class:`~bench.distributed.TorchDistributed` and executes the spec (``bench.run.distributed.execute``); rank 0
writes MLflow and reports every epoch with ``ray.train.report`` (every worker calls it, as Ray Train requires;
``TuneReportCallback`` forwards rank 0's to the trial, so progress and Tune schedulers see the epochs as from a
one-process run). Rank 0's outcome comes back as the trainer's return value. A worker that fails (or dies) fails
the run: Ray Train stops the others and the trial ends the MLflow run FAILED if rank 0 could not.

The trial itself holds no CPU or GPU while its workers train (:data:`DRIVER_BUNDLE`, a token of Ray's logical
memory: Tune needs a non-empty bundle, and Ray Train V2 places the workers in a placement group of its own, not in
the trial's), so concurrency is bounded by ``max_concurrent_trials`` (runs that fit the cluster at once).

Not here: the Tune executor (``bench.run.ray``), a run's lifecycle on a worker (``bench.run.distributed``).
"""
from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer, get_device
from ray.tune.integration.ray_train import TuneReportCallback

from bench.data import load_dataset
from bench.distributed import TorchDistributed
from bench.plugins import Carried, carried, ensure
from bench.run.distributed import execute
from bench.run.jobs import Outcome
from bench.run.lifecycle import Workspace
from bench.run.options import RunOptions
from bench.suites import RunSpec
from bench.teachers import TeacherRecord
from bench.tracking import FAILED, RUNNING, Tracker

DRIVER_BUNDLE = {"memory": 1 << 20}  # a trial that drives Ray Train workers: no CPU, no GPU


@dataclass
class Workers:
    """What every worker of a run needs (shipped with the trainer's config)."""

    experiment: str
    dataset: str
    options: RunOptions  # absolute paths, resolved tracking URI
    run_root: Path
    count: int  # workers per run
    cpus: float  # per worker
    gpus: float  # per worker (whole)
    threads: int  # torch threads per worker
    plugins: Carried = field(default_factory=carried)  # what the driver loaded: loaded first in every worker

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus > 0 else "gloo"

    def tracker(self) -> Tracker:
        return Tracker(self.experiment, self.options.tracking_uri, self.options.results_dir / "mlartifacts")


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (what Tune reports carry)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def quiet(*_: Any) -> None:  # worker output is not forwarded to the driver anyway
    pass


def worker_loop(config: dict[str, Any]) -> Outcome:
    """One Ray Train worker: its share of the run (module docstring); returns its outcome (rank 0's counts)."""
    workers: Workers = config["workers"]
    ensure(workers.plugins)  # the plugins' methods, models and datasets, before the spec names them
    torch.set_num_threads(workers.threads)
    device = get_device() if workers.gpus > 0 else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    dist = TorchDistributed(device)
    opts = workers.options
    tracker = workers.tracker() if dist.rank == 0 else None
    ws = Workspace(opts, load_dataset(workers.dataset, opts.data_root), tracker, device, workers.run_root, quiet, dist)

    def on_epoch(spec: RunSpec, epoch: int, metrics: dict[str, float]) -> None:
        ray.train.report({**numbers(metrics), "kdb_spec": spec.hash} if dist.rank == 0 else {})

    return execute(config["spec"], ws, config["teacher"], config["teacher_error"], on_epoch)


def run_on_workers(spec: RunSpec, workers: Workers, teacher: TeacherRecord | None, teacher_error: str | None,
                   tracker: Tracker) -> Outcome:  # fmt: skip
    """Train ``spec`` on ``workers.count`` Ray Train workers from inside a Tune trial; rank 0's outcome."""
    resources = {"CPU": workers.cpus, **({"GPU": workers.gpus} if workers.gpus > 0 else {})}
    storage = workers.run_root.parent / "ray" / "train"
    name = f"{spec.hash}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"workers": workers, "spec": spec, "teacher": teacher, "teacher_error": teacher_error},
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=workers.gpus > 0,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=workers.backend),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=0)),
    )  # fmt: skip
    try:
        return trainer.fit().return_value
    except TrainingFailedError as err:
        return failed(spec, tracker, err)
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)


def failed(spec: RunSpec, tracker: Tracker, err: BaseException) -> Outcome:
    """The outcome of a run whose workers failed: rank 0's recorded reason, else the first failed worker's error in
    one line (its own exception's, or Ray's: a worker killed for memory, a dead node), with which the MLflow run is
    ended FAILED where rank 0 could not end it."""
    failures = getattr(err, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else err
    cause = cause.cause if isinstance(getattr(cause, "cause", None), BaseException) else cause  # RayTaskError
    lines = [line for line in str(cause).splitlines() if line.strip()]
    reason = f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]
    run_id = None
    for run in tracker.runs_for(spec.hash):
        if run.status == RUNNING:
            tracker.end(run.run_id, FAILED, reason)
            run_id = run.run_id
        elif run.status == FAILED and run_id is None:
            run_id, reason = run.run_id, run.tags.get("error", reason)
    return Outcome(spec.hash, FAILED, error=reason, run_id=run_id)
