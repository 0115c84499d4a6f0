"""The Ray Tune executor (the CLI's default); with its Ray Train part (``bench.run.ray_train``) and sweeps
(``bench.run.sweep``), the only code that imports Ray.

Every pending spec is one Ray Tune trial, or one per lockstep group (one ``tune.Tuner`` over the job list;
``tune.with_resources`` from the suite's ``resources`` or ``--cpus-per-run`` / ``--gpus-per-run``; fractional
GPUs allowed; torch threads = CPUs per trial), so runs proceed side by side on every CPU/GPU of the machine, or
of a cluster (``--address`` / ``RAY_ADDRESS``). Each distinct teacher spec is a trial of its own, handed out
first; a run that distils it is handed out once it has ended (:func:`teachers_first`), runs without a teacher
fill the other slots meanwhile. A trial executes its job through ``bench.run.lifecycle.execute``, reports each
epoch to Tune (``ray.tune.report``, tagged ``kdb_spec``) and one final result per spec, which the driver turns
into progress events and outcomes. Sweeps (``bench.run.sweep``) use the same trial function and ``tune_jobs``.
With ``--workers-per-run N`` > 1 a run's trial drives N Ray Train workers instead (``bench.run.ray_train``): the
resources are per worker, lockstep groups are off, teacher trials keep their resources.

Not here: how a job executes (``bench.run.lifecycle``), the local executor (``bench.run.local``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import torch
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.search import Searcher

from bench.data import data_root, load_dataset
from bench.errors import BenchError
from bench.plugins import Carried, carried, ensure
from bench.locks import shared_lock
from bench.run.jobs import (
    SKIPPED,
    STOPPED,
    Job,
    LockstepJob,
    Outcome,
    TeacherJob,
    Workload,
    job_specs,
    plan_jobs,
)
from bench.run.lifecycle import Workspace, execute as execute_job, prepare_teachers, spec_held
from bench.run.options import RunOptions, share_teacher, suite_dir, torch_threads, workers_per_run
from bench.run.progress import Progress
from bench.run.ray_train import DRIVER_BUNDLE, Workers, numbers as _numbers, quiet as _quiet, run_on_workers
from bench.suites import RunSpec, Suite
from bench.tracking import FAILED, FINISHED, KILLED, RUNNING, Tracker

OBJECT_STORE_BYTES = 128 * 1024**2  # trials exchange only spec lists and metrics
CONNECT_TIMEOUT_S = 5.0  # a Ray head node that does not accept a connection by then is reported unreachable


def quiet_ray() -> None:
    """Keep Ray's own output out of ours: no Tune tables or result loggers, no worker logs forwarded,
    trials stay in our working directory, Ctrl-C reaches us (Tune would swallow the first one)."""
    for key, value in {
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
        "TUNE_DISABLE_SIGINT_HANDLER": "1",
        "RAY_DEDUP_LOGS": "0",
    }.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


def check_cluster(address: str | None) -> None:
    """The Ray cluster at ``address`` (or ``$RAY_ADDRESS``; none: a fresh local instance, nothing to check)
    accepts a connection on its head node's port within ``CONNECT_TIMEOUT_S``, else one line (``BenchError``).
    Called before anything is written; ``ray.init`` itself would retry an absent cluster for minutes."""
    given = address or os.environ.get("RAY_ADDRESS") or None
    if given is None or given == "local":
        return
    where = f"Ray cluster {given}" + ("" if address else " (RAY_ADDRESS)")
    if given.startswith("ray://"):
        raise BenchError(
            f"Ray Client addresses ({given}) are not supported: Tune would run this driver's loop remotely. Run "
            "the command on a node of the cluster (RAY_ADDRESS=auto) or submit it with `ray job submit`"
        )
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(given)  # "auto": the cluster `ray start` left on this node
    except Exception as err:
        raise BenchError(f"{where}: not an address Ray understands (host:port or auto): {err}") from None
    if resolved is None:
        raise BenchError(f"{where}: no Ray cluster was started on this node; start one (`ray start --head`) and "
                         "check it with `ray status`, or unset RAY_ADDRESS to run on a fresh local instance")  # fmt: skip
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise BenchError(f"{where} cannot be reached at {resolved} ({reason}); check that it is up (`ray status` "
                         f"on its head node) and that this machine reaches port {port}")  # fmt: skip


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Connect to ``address`` (or ``$RAY_ADDRESS``; checked first: :func:`check_cluster`), else start a fresh
    private local Ray instance (never one left over by a killed run); shut it down afterwards. An already
    initialised Ray is reused."""
    quiet_ray()
    if ray.is_initialized():
        yield
        return
    check_cluster(address)
    address = address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(address="local", object_store_memory=OBJECT_STORE_BYTES, **common)
    try:
        yield
    finally:
        ray.shutdown()


def trial_resources(suite: Suite, options: RunOptions) -> dict[str, float]:
    """CPUs and GPUs of one trial (of each worker of a run on several): ``--cpus-per-run`` / ``--gpus-per-run``,
    else the suite's ``resources``; GPUs default to 1 per run where the cluster has GPUs (unless ``--device cpu``).
    A run of N workers must fit the cluster N times."""
    total = ray.cluster_resources()
    cpus = options.cpus_per_run if options.cpus_per_run is not None else suite.resources.cpus
    if options.gpus_per_run is not None:
        gpus = options.gpus_per_run
    elif suite.resources.gpus > 0:
        gpus = suite.resources.gpus
    else:
        gpus = 1.0 if total.get("GPU", 0) > 0 and options.device != "cpu" else 0.0
    if cpus <= 0 or gpus < 0:
        raise BenchError(f"resources per run must be > 0 CPUs and >= 0 GPUs, got {cpus} CPUs, {gpus} GPUs")
    if gpus > 0 and options.device == "cpu":
        raise BenchError(f"--device cpu with {gpus} GPU(s) per run: drop one of them")
    if gpus > 1 and gpus != int(gpus):
        raise BenchError(f"GPUs per run above 1 must be whole, got {gpus}")
    workers = workers_per_run(suite, options)
    if workers > 1 and gpus != int(gpus):
        raise BenchError(f"each of {workers} workers per run needs whole GPUs (NCCL), got {gpus}")
    what = f"a run of {workers} workers of {cpus:g} CPU(s), {gpus:g} GPU(s)" if workers > 1 else "a run"
    for name, need in (("CPU", cpus * workers), ("GPU", gpus * workers)):
        if need > total.get(name, 0):
            raise BenchError(
                f"{what} needs {need:g} {name}(s) but the Ray cluster has {total.get(name, 0):g}: "
                f"lower --{name.lower()}s-per-run{' or --workers-per-run' if workers > 1 else ''} (or the suite's "
                "resources)"
            )
    return {"cpu": float(cpus), "gpu": float(gpus)}


def parallel_slots(resources: dict[str, float], workers: int = 1) -> int:
    """How many trials of ``resources`` (each of ``workers`` workers) the cluster runs at once (as it is now)."""
    total = ray.cluster_resources()
    slots = int(total.get("CPU", 0) // (resources["cpu"] * workers))
    if resources["gpu"] > 0:
        slots = min(slots, int(total.get("GPU", 0) // (resources["gpu"] * workers)))
    return max(slots, 1)


def trial_request(ctx: "TrialContext", resources: dict[str, float]) -> Any:
    """``tune.with_resources``' request: ``resources`` per trial; with several workers per run, a run's trial is
    their driver and holds none of them (``bench.run.ray_train``), a teacher's trial keeps them."""
    if ctx.workers == 1:
        return resources
    own = tune.PlacementGroupFactory([{"CPU": resources["cpu"], "GPU": resources["gpu"]}])
    driver = tune.PlacementGroupFactory([DRIVER_BUNDLE])
    return lambda config: own if isinstance(ctx.resolve(config), TeacherJob) else driver


@dataclass
class JobList:
    """Tune config ``{"job": i, ...}`` → the i-th job."""

    jobs: list[Job]

    def __call__(self, config: dict[str, Any]) -> Job:
        return self.jobs[config["job"]]


def teachers_first(searcher_base: type = Searcher) -> type:
    """A Tune ``Searcher`` that hands out the jobs of a ``JobList`` in order, teacher jobs first, and a
    run that distils a teacher only once that teacher's trial has ended (with its error, if it failed,
    in the config: ``teacher_error``). One ``Tuner`` for the whole suite, so worker processes (and
    their imports) are reused from trial to trial and no CPU waits for a teacher."""

    class TeachersFirst(searcher_base):
        def __init__(self, jobs: JobList) -> None:
            super().__init__()
            self.jobs = jobs.jobs
            self.order = sorted(range(len(self.jobs)), key=lambda i: not isinstance(self.jobs[i], TeacherJob))
            self.teacher_done: dict[str, str] = {}  # teacher hash → error ("" when fine)
            self.by_trial: dict[str, int] = {}

        def _ready(self, job: Job) -> bool:
            if isinstance(job, TeacherJob) or job.teacher_spec is None:
                return True
            thash = job.teacher_spec.hash
            has_job = any(isinstance(j, TeacherJob) and j.spec.teacher_spec.hash == thash for j in self.jobs)
            return not has_job or thash in self.teacher_done

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if not self.order:
                return searcher_base.FINISHED
            for pos, index in enumerate(self.order):
                job = self.jobs[index]
                if self._ready(job):
                    del self.order[pos]
                    self.by_trial[trial_id] = index
                    thash = job.teacher_spec.hash if not isinstance(job, TeacherJob) and job.teacher_spec else None
                    return {"job": index, "teacher_error": self.teacher_done.get(thash, "")}
            return None  # the remaining runs wait for a teacher still training

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            job = self.jobs[self.by_trial[trial_id]]
            if isinstance(job, TeacherJob):
                status = (result or {}).get("kdb_status")
                reason = (result or {}).get("kdb_error") or "the teacher's trial crashed (see the Ray logs)"
                self.teacher_done[job.spec.teacher_spec.hash] = "" if status == FINISHED and not error else reason

    return TeachersFirst


@dataclass
class TrialContext:
    """What a trial needs, shipped once through the object store (``tune.with_parameters``)."""

    resolve: Callable[[dict[str, Any]], Job]
    experiment: str
    dataset: str
    options: RunOptions  # absolute paths, resolved tracking URI
    run_root: Path
    threads: int
    gpus: float
    metric: str | None = None  # the Tune metric (sweeps): replayed from MLflow for specs already finished
    plugins: Carried = field(default_factory=carried)  # what the driver loaded: loaded first in every trial
    workers: int = 1  # data-parallel workers per run (Ray Train), each with ``cpus`` CPUs and ``gpus`` GPUs
    cpus: float = 1.0

    def ray_train(self) -> Workers:
        return Workers(self.experiment, self.dataset, self.options, self.run_root, self.workers, self.cpus,
                       self.gpus, self.threads, self.plugins)  # fmt: skip


_WORKER_CACHE: dict[tuple, Any] = {}  # per worker process (actors are reused between trials)


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = build()
    return _WORKER_CACHE[key]


def tune_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: a teacher job, one run spec or a lockstep group. Reports every epoch (tagged
    ``kdb_spec``: a group's runs report in turn), then one final result per spec whose ``kdb_status`` /
    ``kdb_error`` / ``kdb_run_id`` the driver reads."""
    ensure(ctx.plugins)  # the plugins' methods, models and datasets, before the job names them
    torch.set_num_threads(ctx.threads)
    job = ctx.resolve(config)
    opts = ctx.options
    own_gpu = ctx.gpus > 0 and (ctx.workers == 1 or isinstance(job, TeacherJob))  # a driver trial holds none
    device = torch.device("cuda" if own_gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to our GPU
    splits = _cached(("splits", ctx.dataset, opts.data_root), lambda: load_dataset(ctx.dataset, opts.data_root))
    if isinstance(job, TeacherJob):
        try:
            records, errors = prepare_teachers([job.spec], splits, opts, device, _quiet)
        except BenchError as err:
            tune.report({"kdb_status": "BENCH_ERROR", "kdb_error": str(err)})
            return
        error = next(iter(errors.values()), "")
        top1 = next(iter(records.values())).top1 if records else math.nan
        tune.report({"kdb_status": FAILED if error else FINISHED, "kdb_error": error, "teacher_top1": top1})
        return
    specs = job_specs(job)
    tracker = _cached(("tracker", ctx.experiment, opts.tracking_uri), lambda: trial_tracker(ctx))
    teacher, teacher_error = None, config.get("teacher_error") or None
    if specs[0].teacher_spec is not None and teacher_error is None:  # trained by its own trial: this loads it
        records, errors = prepare_teachers(specs[:1], splits, opts, device, _quiet)
        thash = specs[0].teacher_spec.hash
        teacher, teacher_error = records.get(thash), errors.get(thash)
    last: dict[str, dict[str, float]] = {s.hash: {} for s in specs}

    def on_epoch(spec: RunSpec, epoch: int, metrics: dict[str, float]) -> None:
        last[spec.hash] = _numbers(metrics)
        tune.report({**last[spec.hash], "kdb_spec": spec.hash})

    if ctx.workers > 1:  # one spec: its workers report their epochs to this trial themselves
        outcomes = [run_on_workers(specs[0], ctx.ray_train(), teacher, teacher_error, tracker)]
    else:
        outcomes = execute_job(specs, Workspace(opts, splits, tracker, device, ctx.run_root, _quiet), teacher,
                               teacher_error, on_epoch)  # fmt: skip
    for spec, outcome in zip(specs, outcomes):
        if outcome.status == SKIPPED and ctx.metric and outcome.run_id:  # a scheduler needs the curve
            for step, value in enumerate(tracker.metric_history(outcome.run_id, ctx.metric), start=1):
                last[spec.hash] = {"epoch": float(step), ctx.metric: value}
                tune.report({**last[spec.hash], "kdb_spec": spec.hash})
        final = {**last[spec.hash], **_numbers(outcome.metrics)}
        tune.report({**final, "kdb_spec": spec.hash, "kdb_status": outcome.status, "kdb_error": outcome.error,
                     "kdb_run_id": outcome.run_id or ""})  # fmt: skip


def trial_tracker(ctx: TrialContext) -> Tracker:
    return Tracker(ctx.experiment, ctx.options.tracking_uri, ctx.options.results_dir / "mlartifacts")


def absolute_options(options: RunOptions, tracker: Tracker) -> RunOptions:
    """Options as a trial on any node sees them: absolute paths, the resolved tracking URI, no bars."""
    return replace(
        options,
        results_dir=options.results_dir.resolve(),
        data_root=str(data_root(options.data_root).resolve()) if data_root(options.data_root) else None,
        teacher_dir=options.teacher_dir.resolve() if options.teacher_dir else None,
        tracking_uri=tracker.uri,
        download=False,  # the driver downloaded already (check_inputs)
        progress=False,
    )


def _progress_callback(ctx: TrialContext, progress: Progress | None, seen: dict[str, dict]) -> tune.Callback:
    """Driver side: trial events → progress events, and per job key (a spec's hash; ``teacher:<hash>``)
    its config, last result and error. A lockstep trial holds several specs: its results say which."""

    def keys_of(trial) -> list[str]:
        job = ctx.resolve(trial.config)
        return [job.key] if isinstance(job, TeacherJob) else [s.hash for s in job_specs(job)]

    class ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            job = ctx.resolve(trial.config)
            for key in keys_of(trial):
                seen[key] = {"config": dict(trial.config), "last": {}}
            if progress is not None and not isinstance(job, TeacherJob):
                for spec in job_specs(job):
                    progress.add(spec)
                    progress.start(spec.hash)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            key = str(result.get("kdb_spec") or keys_of(trial)[0])
            seen[key]["last"] = dict(result)
            if "kdb_status" in result:
                if progress is not None and key.startswith("teacher:"):
                    progress.teacher_done()
                elif progress is not None:
                    progress.end(_outcome(key, result))
            elif progress is not None and "epoch" in result:
                progress.epoch(key, int(result["epoch"]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            for key in keys_of(trial):
                if "kdb_status" not in seen[key]["last"] and progress is not None:  # stopped by the scheduler
                    progress.end(Outcome(key, STOPPED))

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = _first_line(getattr(trial, "error_msg", None) or "see the Ray logs")
            for key in keys_of(trial):
                seen[key]["error"] = f"trial crashed: {reason}"
                if progress is not None and "kdb_status" not in seen[key]["last"]:
                    progress.end(Outcome(key, FAILED, error=seen[key]["error"]))

    return ProgressCallback()


def _first_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _outcome(key: str, result: dict[str, Any], config: dict[str, Any] | None = None) -> Outcome:
    """A trial's outcome from its last result (the final report, or the last epoch of a stopped trial)."""
    metrics = {k: v for k, v in _numbers(result).items() if k not in AUTO_RESULT_KEYS and k != "done"}
    return Outcome(key, str(result.get("kdb_status", STOPPED)), metrics, str(result.get("kdb_error") or ""),
                   str(result.get("kdb_run_id") or "") or None, config or {})  # fmt: skip


def tune_jobs(
    name: str,
    ctx: TrialContext,
    param_space: dict[str, Any],
    resources: dict[str, float],  # per trial (per worker of a run on several: ``trial_request``)
    storage: Path,
    progress: Progress | None,
    tracker: Tracker | None = None,
    **tune_config: Any,
) -> dict[str, Outcome]:
    """One ``tune.Tuner.fit`` over ``param_space``; returns the outcome of every trial by job key.

    A trial that crashed (its worker died) or was interrupted leaves its MLflow run RUNNING; it is ended
    FAILED (crash) or KILLED (Ctrl-C) here so that the tables show it, and resumes on the next run."""
    seen: dict[str, dict] = {}
    with tune_folder(storage, name) as folder:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(tune_trial, ctx=ctx), trial_request(ctx, resources)),
            param_space=param_space,
            tune_config=tune.TuneConfig(reuse_actors=True, **tune_config),
            run_config=tune.RunConfig(
                name=folder.name, storage_path=str(storage.resolve()), verbose=0,
                callbacks=[_progress_callback(ctx, progress, seen)],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )  # fmt: skip
        try:
            tuner.fit()
        except KeyboardInterrupt:
            if tracker is not None and progress is not None:
                ray.shutdown()  # the trials stop before their runs are marked
                for key in list(progress.running):
                    _end_unfinished(tracker, key, KILLED, "interrupted")
            raise
    outcomes = {}
    for key, trial in seen.items():
        outcome = _outcome(key, trial["last"], trial["config"])
        if "kdb_status" not in trial["last"] and "error" in trial:
            if tracker is not None and not key.startswith("teacher:") and not spec_held(ctx.run_root / key):
                _end_unfinished(tracker, key, FAILED, trial["error"])
            outcome = replace(outcome, status=FAILED, error=trial["error"])
        elif "kdb_status" not in trial["last"] and tracker is not None and not spec_held(ctx.run_root / key):
            _end_unfinished(tracker, key, KILLED, "stopped early by the Tune scheduler")  # resumable
        outcomes[key] = outcome
    return outcomes


@contextmanager
def tune_folder(storage: Path, name: str) -> Iterator[Path]:
    """A Tune experiment folder of this invocation alone (``storage/<name>-XXXX``): two ``bench run`` on one
    results folder each have theirs. The folders of invocations that ended are removed by the next one that
    starts while no other is running (each holds ``storage/<name>.lock`` shared while it runs)."""

    def remove_ended() -> None:
        for old in [storage / name, *storage.glob(f"{name}-*")]:
            shutil.rmtree(old, ignore_errors=True)

    storage.mkdir(parents=True, exist_ok=True)
    with shared_lock(storage / f"{name}.lock", remove_ended):
        yield Path(tempfile.mkdtemp(prefix=f"{name}-", dir=storage))


def _end_unfinished(tracker: Tracker, spec_hash: str, status: str, reason: str) -> None:
    """End the spec's RUNNING run (callers leave alone a spec another live ``bench run`` holds: ``spec_held``)."""
    for run in tracker.runs_for(spec_hash):
        if run.status == RUNNING:
            tracker.end(run.run_id, status, reason)


def execute(work: Workload, progress: Progress) -> list[Outcome]:
    """One Tuner over the teacher jobs (one per distinct teacher spec, first) and the pending specs (one
    trial each, or one per lockstep group: ``plan_jobs``), each released once its teacher has been trained
    (:func:`teachers_first`); one outcome per spec."""
    suite, options, log = work.suite, work.options, work.log
    with ray_session(options.address):
        resources = trial_resources(suite, options)
        workers = workers_per_run(suite, options)
        opts = absolute_options(options, work.tracker)
        storage = suite_dir(opts, suite) / "ray"
        each = f"{workers} data-parallel workers per run (Ray Train), each with " if workers > 1 else ""
        log(f"Ray: {each}{resources['cpu']:g} CPU(s), {resources['gpu']:g} GPU(s) per run; Tune state in {storage}")
        first: dict[str, TeacherJob] = {}
        for spec in work.specs:
            if spec.teacher_spec is not None:
                first.setdefault(spec.teacher_spec.hash, TeacherJob(spec))
        slots = parallel_slots(resources, workers)
        share = share_teacher(suite, options) and workers == 1  # a worker sees other samples every epoch
        # the longest jobs (lockstep groups) first, so that none of them is left to run alone at the end
        planned = sorted(plan_jobs(work.specs, share, slots), key=lambda j: -len(job_specs(j)))
        groups = [j for j in planned if isinstance(j, LockstepJob)]
        if groups:
            log(f"sharing the teacher pass: {sum(len(g.specs) for g in groups)} runs in {len(groups)} lockstep "
                f"group(s) (--no-share-teacher to run them apart)")  # fmt: skip
        jobs = JobList([*first.values(), *planned])
        ctx = TrialContext(jobs, suite.name, suite.dataset, opts, suite_dir(opts, suite) / "runs",
                           torch_threads(resources["cpu"]), resources["gpu"], workers=workers,
                           cpus=resources["cpu"])  # fmt: skip
        progress.teachers_pending = len(first)
        outcomes = tune_jobs(
            "runs", ctx, {}, resources, storage, progress, work.tracker,
            search_alg=teachers_first()(jobs), num_samples=len(jobs.jobs),
            max_concurrent_trials=slots,  # else Tune starts one trial (actor) at a time
        )  # fmt: skip
    for job in first.values():
        if outcomes.get(job.key, Outcome(job.key, "")).status == "BENCH_ERROR":
            raise BenchError(outcomes[job.key].error)
    for spec in work.specs:  # cannot happen unless Tune dropped a trial; say so rather than hide it
        outcomes.setdefault(spec.hash, Outcome(spec.hash, FAILED, error="no result from Ray Tune"))
    return [outcomes[s.hash] for s in work.specs]
