"""Running a suite: skip finished specs, train the teachers they need once, run every student spec.

``run_suite`` is what ``python -m bench run`` and ``make reproduce-tables`` call. Two executors:

- ``ray`` (the CLI's default): every pending spec is one Ray Tune trial (one ``tune.Tuner`` over the
  spec indices, ``tune.with_resources`` from the suite's ``resources`` or ``--cpus-per-run`` /
  ``--gpus-per-run``; fractional GPUs allowed; torch threads = CPUs per trial), so runs proceed side by
  side on every CPU/GPU of the machine, or of a cluster (``--address`` / ``RAY_ADDRESS``). Each distinct
  teacher spec is a trial of its own, handed out first; a run that distils it is handed out once it
  has ended (``teachers_first``), runs without a teacher fill the other slots meanwhile. Trials report
  each epoch to Tune (``ray.tune.report``) and log to MLflow through our ``Tracker``.
- ``local``: the same specs one after another in this process (debugging, the API default).

Every spec runs through ``run_jobs`` → ``execute_spec`` (build loaders, models and the method,
``method.fit``, log to MLflow), or, for offline runs that share a teacher and batches (``share_teacher``,
on by default), ``execute_lockstep``: one teacher pass per batch for the group, each run still its own
MLflow run, checkpoint and failure. Both isolate failures: a run that raises or diverges is recorded as
failed with its reason and the others go on. Crash safety: a spec holds an exclusive lock on its run
folder while it runs (``spec_lock``; the kernel drops it when the process dies, even on SIGKILL), so an
unfinished MLflow run of a spec nobody holds is resumed from its last epoch checkpoint, in the same
MLflow run; a spec whose lock is held by a live process (another ``bench run``) is waited for.
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.calibration import final_calibration
from bench.data import Splits, data_root, describe_loader, load_dataset
from bench.engine import (
    History,
    Task,
    atomic_save,
    build_task,
    keep_freed_host_memory,
    pick_device,
    seed_everything,
)
from bench.errors import BenchError
from bench.lockstep import LockstepResult, fit_lockstep, lockstep_groups, lockstep_key
from bench.models import create_model
from bench.suites import RunSpec, Suite, TeacherSpec, content_hash, expand
from bench.teachers import TeacherRecord, ensure_teacher, load_teacher, read_state_dict, use_published_teachers
from bench.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
    EpochLogger,
    Tracker,
    default_tracking_uri,
    summary_metric_names,
)

SKIPPED, STOPPED = "SKIPPED", "STOPPED"  # outcome statuses besides MLflow's FINISHED / FAILED / KILLED
EXECUTORS = ("ray", "local")
OBJECT_STORE_BYTES = 128 * 1024**2  # trials exchange only spec lists and metrics


@dataclass
class RunOptions:
    results_dir: Path = Path("results")
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    rerun: bool = False
    tracking_uri: str | None = None
    progress: bool = True  # per-epoch bars of the local executor
    teacher_dir: Path | None = None
    executor: str = "local"  # the CLI defaults to "ray"
    cpus_per_run: float | None = None  # default: the suite's resources.cpus
    gpus_per_run: float | None = None  # default: the suite's resources.gpus, else 1 where the cluster has GPUs
    address: str | None = None  # Ray cluster address (default: $RAY_ADDRESS, else a fresh local instance)
    live: bool | None = None  # refresh the suite's progress line in place (default: stdout is a terminal)
    share_teacher: bool | None = None  # lockstep groups (bench.lockstep); default: the suite's share_teacher
    teacher_cache: bool = True  # FastPaths.teacher_cache
    device_data: bool = True  # FastPaths.device_data

    @property
    def fast(self) -> "FastPaths":
        return FastPaths(self.teacher_cache, self.device_data)


@dataclass(frozen=True)
class FastPaths:
    """Speed switches that change no result, so they are not part of a run's hash (unlike ``recipe.amp``,
    ``channels_last``, ``compile``): each is on by default, has a CLI switch and is tagged in the MLflow run.
    Lockstep groups (``share_teacher``) are the third; they are planned per suite, not per run."""

    teacher_cache: bool = True  # a frozen teacher's per-sample outputs reused where no augmentation
    device_data: bool = True  # tensor datasets (digits, CIFAR) live on the training device, else in host memory


@dataclass
class SuiteReport:
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


@dataclass
class Outcome:
    """How one job ended: status FINISHED / FAILED / KILLED / SKIPPED (finished meanwhile) / STOPPED (by
    the Tune scheduler), its final metrics and error, its MLflow run."""

    key: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the Tune trial's config


def suite_dir(options: RunOptions, suite: Suite) -> Path:
    return options.results_dir / suite.name


def make_tracker(suite: Suite, options: RunOptions, experiment: str | None = None) -> Tracker:
    uri = options.tracking_uri or default_tracking_uri(options.results_dir)
    return Tracker(experiment or suite.name, uri, options.results_dir / "mlartifacts")


def check_inputs(suite: Suite, options: RunOptions) -> Splits:
    """Everything that can be checked before anything is written: data present, checkpoints exist."""
    if options.executor not in EXECUTORS:
        raise BenchError(f"unknown executor {options.executor!r} (known: {', '.join(EXECUTORS)})")
    pick_device(options.device)
    splits = load_dataset(suite.dataset, options.data_root, options.download)
    if options.teacher_dir is not None:  # fills pair.teacher_checkpoint from teachers.yaml (before expand)
        use_published_teachers(suite, options.teacher_dir)
    for pair in suite.pairs:
        if pair.teacher_checkpoint is not None and not Path(pair.teacher_checkpoint).exists():
            raise BenchError(f"{suite.path}: teacher checkpoint {pair.teacher_checkpoint} not found")
    return splits


def teacher_specs(specs: list[RunSpec]) -> list[TeacherSpec]:
    unique: dict[str, TeacherSpec] = {}
    for spec in specs:
        if spec.teacher_spec is not None:
            unique.setdefault(spec.teacher_spec.hash, spec.teacher_spec)
    return list(unique.values())


# --------------------------------------------------------------------------------------------------
# One spec
# --------------------------------------------------------------------------------------------------
@contextmanager
def spec_lock(run_dir: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the spec's run folder exclusively while it runs; wait while a live process holds it.

    ``flock`` locks belong to the open file and the kernel releases them when the holder dies (also on
    SIGKILL), so a RUNNING MLflow run whose lock is free has no live process and may be resumed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{run_dir.name}: another live process runs this spec; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class PreparedRun:
    """A spec ready to train: its MLflow run, loaders, method and epoch hook."""

    spec: RunSpec
    run_id: str
    run_dir: Path
    task: Task
    method: Any  # methods.base.Method
    hooks: EpochLogger


def offline_teacher(spec: RunSpec, teacher: TeacherRecord | None, splits: Splits):
    """The frozen teacher module of an offline method (None for the others). Loaded before the spec's seed
    is set, so that a run that shares a teacher loaded once builds its student and method from the same
    random numbers as a run that loads its own."""
    from methods import get_method

    if get_method(spec.method).teacher_mode != "offline":
        return None
    assert teacher is not None, "offline method without a teacher record"
    return load_teacher(teacher, splits)


def prepare_run(
    spec: RunSpec,
    splits: Splits,
    tracker: Tracker,
    run_id: str,
    resumed: bool,
    run_dir: Path,
    device: torch.device,
    teacher_model,
    progress: bool,
    on_epoch=None,
    fast: FastPaths = FastPaths(),
    train_loader=None,
) -> PreparedRun:
    """Loaders, student and method of ``spec`` (around ``teacher_model`` for an offline method; an online
    method builds its own teacher), seeded by the spec's seed; the ``fast`` paths that change no result
    are tagged in the MLflow run."""
    from methods import MethodContext, build_hparams, get_method

    cls = get_method(spec.method)
    checkpoint = run_dir / "checkpoint.pt"
    if not resumed:
        checkpoint.unlink(missing_ok=True)
    task = build_task(
        splits, spec.fraction, spec.seed, spec.recipe, device,
        checkpoint_path=checkpoint, target_top1=spec.target_top1, progress=progress, description=spec.run_name,
        teacher_cache=fast.teacher_cache, device_data=fast.device_data, train_loader=train_loader,
    )  # fmt: skip
    tracker.set_tags(run_id, {"data": describe_loader(task.train_loader), "malloc_tuning": keep_freed_host_memory()})
    info = splits.info
    seed_everything(spec.seed)
    student = create_model(spec.student, info.num_classes, info.in_channels)
    if cls.teacher_mode == "online":
        teacher_model = create_model(spec.teacher, info.num_classes, info.in_channels)
    hparams = build_hparams(spec.method, spec.hparams, spec.label)
    context = MethodContext(info, task.train_loader.num_samples, spec.recipe.epochs)
    method = cls(student, teacher_model, hparams, context)
    return PreparedRun(spec, run_id, run_dir, task, method, EpochLogger(tracker, run_id, on_epoch))


def finish_run(run: PreparedRun, history, tracker: Tracker, teacher: TeacherRecord | None) -> tuple[str, dict[str, float]]:
    """Final metrics, calibration, the student's weights; ends the MLflow run FINISHED."""
    spec, method = run.spec, run.method
    final = summary_metric_names(history.summary(spec.target_top1))
    final.update({k: float(v) for k, v in method.describe().items()})
    if history.teacher_cache is not None:  # "on" / "off: <reason>", and its hits and misses
        tracker.set_tags(run.run_id, history.teacher_cache.tags())
        final.update(history.teacher_cache.metrics())
    if teacher is not None:
        final["teacher_top1"] = teacher.top1
        tracker.set_tags(run.run_id, teacher.tags())
    extra_metrics, artifacts = final_calibration(method, run.task, run.run_dir)
    final.update(extra_metrics)
    tracker.log_metrics(run.run_id, final, step=spec.recipe.epochs)
    weights = run.run_dir / "student.pt"
    atomic_save(method.student.state_dict(), weights)
    for path in [weights, *artifacts]:
        tracker.log_artifact(run.run_id, path)
    tracker.end(run.run_id, FINISHED)
    return FINISHED, final


def fail_run(tracker: Tracker, run_id: str, run_dir: Path, err: BaseException) -> tuple[str, dict[str, str]]:
    """Record a run's failure: ``error.log`` (the traceback), the MLflow run ended FAILED with the reason."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.log").write_text("".join(traceback.format_exception(err)))
    reason = f"{type(err).__name__}: {err}"
    tracker.end(run_id, FAILED, reason)
    return FAILED, {"error": reason}


@contextmanager
def ending_on_interrupt(tracker: Tracker, run_ids: Callable[[], list[str]]) -> Iterator[None]:
    """Ctrl-C or a stop by the Tune scheduler (``SystemExit`` inside ``ray.tune.report``) ends the runs
    still open KILLED (resumable) and propagates."""
    try:
        yield
    except KeyboardInterrupt:
        for run_id in run_ids():
            tracker.end(run_id, KILLED, "interrupted")
        raise
    except SystemExit:
        for run_id in run_ids():
            tracker.end(run_id, KILLED, "stopped early by the Tune scheduler")
        raise


def execute_spec(
    spec: RunSpec,
    splits: Splits,
    tracker: Tracker,
    run_dir: Path,
    device: torch.device,
    teacher: TeacherRecord | None,
    progress: bool = True,
    on_epoch=None,
    fast: FastPaths = FastPaths(),
) -> tuple[str, dict[str, float]]:
    """Run one spec end to end inside its MLflow run; returns (status, final metrics).

    An unfinished MLflow run of the spec continues (same run, from ``checkpoint.pt``); an exception or
    divergence ends it FAILED with the reason (tag ``error``, ``error.log``); Ctrl-C or a stop by the
    Tune scheduler ends it KILLED and propagates."""
    run_id, resumed = tracker.start(spec.run_name, spec.hash, spec.params(), {"device": str(device)})
    with ending_on_interrupt(tracker, lambda: [run_id]):
        try:
            teacher_model = offline_teacher(spec, teacher, splits)
            run = prepare_run(spec, splits, tracker, run_id, resumed, run_dir, device, teacher_model, progress, on_epoch,
                              fast)  # fmt: skip
            history = run.method.fit(run.task, spec.recipe, run.hooks)
            return finish_run(run, history, tracker, teacher)
        except Exception as err:  # isolate: record and go on with the other runs
            return fail_run(tracker, run_id, run_dir, err)


def execute_lockstep(
    specs: list[RunSpec],
    splits: Splits,
    tracker: Tracker,
    run_dirs: dict[str, Path],
    device: torch.device,
    teacher: TeacherRecord,
    progress: bool = True,
    on_epoch: Callable[[RunSpec, int, dict[str, float]], None] | None = None,
    fast: FastPaths = FastPaths(),
) -> dict[str, tuple[str, dict[str, float]]]:
    """Run offline specs that share a teacher and batches in lockstep (:func:`bench.lockstep.fit_lockstep`):
    the teacher is loaded once and runs once per batch for all of them. Each spec keeps its own MLflow run
    (tagged ``share_teacher``), checkpoint, resume and failure, exactly as ``execute_spec``; the results
    equal separate runs (``tests/test_runner_lockstep.py``). Returns (status, final metrics) per spec hash."""
    results: dict[str, tuple[str, dict[str, float]]] = {}
    tags = {"device": str(device), "share_teacher": f"lockstep group of {len(specs)}"}
    opened = [(spec, *tracker.start(spec.run_name, spec.hash, spec.params(), tags)) for spec in specs]

    def still_open() -> list[str]:
        return [run_id for spec, run_id, _ in opened if spec.hash not in results]

    with ending_on_interrupt(tracker, still_open):
        try:
            teacher_model = load_teacher(teacher, splits)
        except Exception as err:
            return {s.hash: fail_run(tracker, run_id, run_dirs[s.hash], err) for s, run_id, _ in opened}
        runs: list[PreparedRun] = []
        for spec, run_id, resumed in opened:
            hook = partial(on_epoch, spec) if on_epoch is not None else None
            shared = runs[0].task.train_loader if runs else None  # one loader: the batches are drawn once
            try:
                runs.append(prepare_run(spec, splits, tracker, run_id, resumed, run_dirs[spec.hash], device,
                                        teacher_model, progress, hook, fast, shared))  # fmt: skip
            except Exception as err:
                results[spec.hash] = fail_run(tracker, run_id, run_dirs[spec.hash], err)
        try:
            trained = fit_lockstep([r.method for r in runs], [r.task for r in runs], [r.spec.recipe for r in runs],
                                   [r.hooks for r in runs], progress=progress,
                                   description=f"lockstep of {len(runs)}: {specs[0].teacher}")  # fmt: skip
        except Exception as err:  # e.g. the group cannot share (BenchError): every run fails with the reason
            trained = [LockstepResult(History(), err) for _ in runs]
        for run, result in zip(runs, trained):
            try:
                if result.error is not None:
                    raise result.error
                tracker.set_tags(run.run_id, {"teacher_passes": str(result.teacher_passes)})
                results[run.spec.hash] = finish_run(run, result.history, tracker, teacher)
            except Exception as err:
                results[run.spec.hash] = fail_run(tracker, run.run_id, run.run_dir, err)
    return results


def run_jobs(
    specs: list[RunSpec],
    splits: Splits,
    tracker: Tracker,
    run_root: Path,
    device: torch.device,
    teacher: TeacherRecord | None,
    teacher_error: str | None,
    rerun: bool = False,
    progress: bool = False,
    on_epoch: Callable[[RunSpec, int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    fast: FastPaths = FastPaths(),
) -> list[Outcome]:
    """Run ``specs`` (one spec, or a lockstep group sharing ``teacher``) under their locks: a spec finished
    meanwhile (by the process we waited for) is SKIPPED, a spec whose teacher failed is recorded FAILED
    with the teacher's error; the others run through ``execute_spec`` (alone) or ``execute_lockstep``."""
    run_dirs = {s.hash: run_root / s.hash for s in specs}
    outcomes: dict[str, Outcome] = {}
    with ExitStack() as locks:
        for spec in sorted(specs, key=lambda s: s.hash):  # one order for every process: no deadlock
            locks.enter_context(spec_lock(run_dirs[spec.hash], log))
        todo = []
        for spec in specs:
            done = None if rerun else tracker.finished_run(spec.hash)
            if done is not None:
                outcomes[spec.hash] = Outcome(spec.hash, SKIPPED, tracker.final_metrics(done), run_id=done)
            elif teacher_error is not None:
                run_id, _ = tracker.start(spec.run_name, spec.hash, spec.params(), {"device": str(device)})
                tracker.end(run_id, FAILED, teacher_error)
                outcomes[spec.hash] = Outcome(spec.hash, FAILED, error=teacher_error, run_id=run_id)
            else:
                todo.append(spec)
        if len(todo) == 1:
            spec = todo[0]
            hook = partial(on_epoch, spec) if on_epoch is not None else None
            results = {spec.hash: execute_spec(spec, splits, tracker, run_dirs[spec.hash], device, teacher, progress, hook,
                                               fast)}  # fmt: skip
        elif todo:
            results = execute_lockstep(todo, splits, tracker, run_dirs, device, teacher, progress, on_epoch,
                                       fast)  # fmt: skip
        for spec in todo:
            status, final = results[spec.hash]
            run_id = next((r.run_id for r in tracker.runs_for(spec.hash) if r.status == status), None)
            metrics = {k: v for k, v in final.items() if k != "error"}
            outcomes[spec.hash] = Outcome(spec.hash, status, metrics, final.get("error", ""), run_id)
    return [outcomes[s.hash] for s in specs]


def prepare_teachers(
    specs: list[RunSpec], splits: Splits, options: RunOptions, device: torch.device, log=print
) -> tuple[dict[str, TeacherRecord], dict[str, str]]:
    """Train or load every teacher the specs need (each once). Returns records and per-teacher errors."""
    records, errors = {}, {}
    for tspec in teacher_specs(specs):
        t0 = time.perf_counter()
        try:
            if tspec.checkpoint is not None:
                read_state_dict(tspec.checkpoint)  # fail early with a clear message
            records[tspec.hash] = ensure_teacher(
                tspec, splits, options.results_dir, device, options.progress, teacher_dir=options.teacher_dir
            )
            log(f"teacher {tspec.model} [{tspec.hash}]: test top-1 {records[tspec.hash].top1:.2f} "
                f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        except BenchError:
            raise
        except Exception as err:
            errors[tspec.hash] = f"teacher {tspec.model} failed: {type(err).__name__}: {err}"
            log(errors[tspec.hash])
    return records, errors


# --------------------------------------------------------------------------------------------------
# Progress: one live line per suite
# --------------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts of done / running / failed / pending runs and an ETA, printed by the driver.

    The ETA divides the epochs still to train by the epochs trained per second so far in this session
    (all workers together, so it accounts for parallelism). On a terminal the line is refreshed in place
    every epoch; otherwise (logs, CI) it is appended to the line printed when a run ends."""

    def __init__(
        self,
        name: str,
        specs: list[RunSpec],
        skipped: int,
        log: Callable[[str], None] = print,
        live: bool = False,
        clock: Callable[[], float] = time.monotonic,
        unknown: int = 0,
        unknown_epochs: int = 0,
    ) -> None:
        """``unknown``: jobs not known in advance (sweep trials drawn by Tune), ``unknown_epochs`` each;
        ``add`` makes them known as they start."""
        self.name, self.log, self.live, self.clock = name, log, live, clock
        self.specs = {s.hash: s for s in specs}
        self.remaining = {s.hash: s.recipe.epochs for s in specs}
        self.unknown, self.unknown_epochs = unknown, unknown_epochs
        self.reached: dict[str, int] = {}
        self.skipped, self.finished, self.failed, self.stopped = skipped, 0, 0, 0
        self.running: dict[str, float] = {}
        self.teachers_pending = 0
        self.epochs_trained = 0
        self.first_start: float | None = None

    @property
    def pending(self) -> int:
        return len(self.remaining) - len(self.running) + self.unknown

    def add(self, spec: RunSpec) -> None:
        if spec.hash not in self.specs:
            self.specs[spec.hash] = spec
            self.remaining[spec.hash] = spec.recipe.epochs
            self.unknown = max(self.unknown - 1, 0)

    def eta(self) -> str:
        left = sum(self.remaining.values()) + self.unknown * self.unknown_epochs
        if left == 0:
            return "0s"
        if not self.epochs_trained or self.first_start is None:
            return "?"
        rate = self.epochs_trained / max(self.clock() - self.first_start, 1e-9)
        return _duration(left / rate)

    def line(self) -> str:
        done = self.skipped + self.finished
        total = done + self.failed + self.stopped + len(self.remaining) + self.unknown
        parts = [f"{done}/{total} done" + (f" ({self.skipped} skipped)" if self.skipped else "")]
        parts += [f"{len(self.running)} running", f"{self.failed} failed", f"{self.pending} pending"]
        if self.stopped:
            parts.insert(2, f"{self.stopped} stopped early")
        if self.teachers_pending:
            parts.append(f"{self.teachers_pending} teacher(s) training")
        return f"{self.name}: " + ", ".join(parts) + f", ETA {self.eta()}"

    def _show(self, event: str | None = None) -> None:
        if self.live:
            sys.stdout.write("\r\033[K" + (event + "\n" if event else "") + self.line())
            sys.stdout.flush()
        elif event:
            self.log(f"{event} | {self.line()}")

    def start(self, key: str) -> None:
        if key not in self.remaining or key in self.running:
            return
        self.running[key] = self.clock()
        if self.first_start is None:
            self.first_start = self.clock()
        self._show()

    def epoch(self, key: str, epoch: int) -> None:
        """``epoch``: the number of epochs the run has completed (a resumed run starts above 1)."""
        if key not in self.remaining:
            return
        if key in self.reached:  # the first report of a resumed run is not a whole session's work
            self.epochs_trained += max(epoch - self.reached[key], 0)
        else:
            self.epochs_trained += 1
        self.reached[key] = epoch
        self.remaining[key] = max(self.specs[key].recipe.epochs - epoch, 0)
        if self.live:
            self._show()

    def end(self, outcome: Outcome) -> None:
        key = outcome.key
        if key not in self.remaining:
            return
        started = self.running.pop(key, None)
        del self.remaining[key]
        if outcome.status in (FINISHED, SKIPPED):
            self.finished += 1
        elif outcome.status == STOPPED:
            self.stopped += 1
        else:
            self.failed += 1
        spec = self.specs[key]
        if outcome.status == FINISHED:
            what = f"top-1 {outcome.metrics.get('top1', math.nan):.2f}"
        elif outcome.status == SKIPPED:
            what = "already finished (its MLflow run)"
        elif outcome.status == STOPPED:
            what = "stopped early by the scheduler"
        else:
            what = outcome.error or "no reason recorded"
        took = f" ({self.clock() - started:.1f} s)" if started is not None else ""
        count = self.finished + self.failed + self.stopped
        total = count + len(self.remaining) + self.unknown
        self._show(f"[{count}/{total}] {outcome.status.lower():8s} {spec.run_name}: {what}{took}")

    def close(self) -> None:
        if self.live:
            sys.stdout.write("\r\033[K" + self.line() + "\n")
            sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------
def run_suite(suite: Suite, options: RunOptions, log=print) -> SuiteReport:
    splits = check_inputs(suite, options)
    device = pick_device(options.device)
    tracker = make_tracker(suite, options)
    specs = expand(suite)
    report = SuiteReport()
    known = tracker.runs_by_hash()
    pending, resumable = [], 0
    for spec in specs:
        runs = known.get(spec.hash, [])
        if not options.rerun and any(r.status == FINISHED for r in runs):
            report.skipped.append(spec.hash)
            continue
        pending.append(spec)
        resumable += any(r.status != FINISHED for r in runs) and not options.rerun
    ray_mode = options.executor == "ray" and bool(pending)  # nothing to run: no Ray start-up
    where = "Ray Tune" if ray_mode else str(device)
    log(f"suite {suite.name}: {len(specs)} runs, {len(report.skipped)} already finished, {len(pending)} to run"
        + (f" ({resumable} resume an unfinished MLflow run)" if resumable else "") + f" on {where}")  # fmt: skip
    bars = options.progress and not ray_mode  # the local executor's per-epoch bars own the terminal line
    progress = Progress(suite.name, pending, len(report.skipped), log, live_output(options) and not bars)
    try:  # Ctrl-C: the runs in flight are marked KILLED (execute_spec, tune_jobs); the CLI says how to resume
        if ray_mode:
            outcomes = run_ray(suite, pending, splits, options, tracker, progress, log)
        else:
            outcomes = run_local(suite, pending, splits, options, device, tracker, progress, log)
    finally:
        progress.close()
    for outcome in outcomes:
        if outcome.status in (FINISHED, SKIPPED):
            report.finished.append(outcome.key)
        else:
            report.failed.append(outcome.key)
    return report


def live_output(options: RunOptions) -> bool:
    return sys.stdout.isatty() if options.live is None else options.live


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


@dataclass(frozen=True)
class LockstepJob:
    """Specs that train in lockstep on one teacher pass per batch (``bench.lockstep``), as one job (one Ray
    trial); they share teacher spec, dataset, fraction, seed and batch-deciding recipe fields."""

    specs: tuple[RunSpec, ...]

    @property
    def key(self) -> str:
        return "lockstep:" + content_hash([s.hash for s in self.specs])

    @property
    def teacher_spec(self) -> TeacherSpec | None:
        return self.specs[0].teacher_spec


MAX_LOCKSTEP = 8  # students of one group live on the device at once


def share_teacher(suite: Suite, options: RunOptions) -> bool:
    return suite.share_teacher if options.share_teacher is None else options.share_teacher


def plan_jobs(pending: list[RunSpec], share: bool, slots: int = 1) -> list[RunSpec | LockstepJob]:
    """The pending specs as jobs: with ``share``, specs that can share a teacher pass
    (``bench.lockstep.lockstep_groups``) become one ``LockstepJob``, at most ``MAX_LOCKSTEP`` each, and
    the groups are split (a smaller cap) until there are at least ``slots`` jobs for the parallel workers."""
    if not share:
        return list(pending)
    cap = MAX_LOCKSTEP
    while True:
        groups = lockstep_groups(pending, cap)
        if len(groups) >= slots or cap == 1:
            return [g[0] if len(g) == 1 else LockstepJob(tuple(g)) for g in groups]
        cap -= 1


def job_specs(job: RunSpec | LockstepJob) -> list[RunSpec]:
    return list(job.specs) if isinstance(job, LockstepJob) else [job]


def run_local(
    suite: Suite,
    pending: list[RunSpec],
    splits: Splits,
    options: RunOptions,
    device: torch.device,
    tracker: Tracker,
    progress: Progress,
    log=print,
) -> list[Outcome]:
    """The jobs one after another in this process (``--cpus-per-run`` sets the torch threads)."""
    threads_before = torch.get_num_threads()
    if options.cpus_per_run is not None:
        torch.set_num_threads(_threads(options.cpus_per_run))
    try:
        teachers, teacher_errors = prepare_teachers(pending, splits, options, device, log)
        outcomes: dict[str, Outcome] = {}
        for job in plan_jobs(pending, share_teacher(suite, options)):
            specs = job_specs(job)
            tkey = specs[0].teacher_spec.hash if specs[0].teacher_spec else None
            for spec in specs:
                progress.start(spec.hash)
            for outcome in run_jobs(
                specs, splits, tracker, suite_dir(options, suite) / "runs", device, teachers.get(tkey),
                teacher_errors.get(tkey), options.rerun, options.progress,
                on_epoch=lambda spec, epoch, _m: progress.epoch(spec.hash, epoch + 1), log=log,
                fast=options.fast,
            ):  # fmt: skip
                progress.end(outcome)
                outcomes[outcome.key] = outcome
        return [outcomes[s.hash] for s in pending]
    finally:
        torch.set_num_threads(threads_before)


# --------------------------------------------------------------------------------------------------
# Ray Tune
# --------------------------------------------------------------------------------------------------
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


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a fresh private local Ray instance (never
    one left over by a killed run); shut it down afterwards. An already initialised Ray is reused."""
    quiet_ray()
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise BenchError(
            f"Ray Client addresses ({address}) are not supported: Tune would run this driver's loop remotely. Run "
            "the command on a node of the cluster (RAY_ADDRESS=auto) or submit it with `ray job submit`"
        )
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
    """CPUs and GPUs of one trial: ``--cpus-per-run`` / ``--gpus-per-run``, else the suite's ``resources``;
    GPUs default to 1 per run where the cluster has GPUs (unless ``--device cpu``)."""
    import ray

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
    for name, need in (("CPU", cpus), ("GPU", gpus)):
        if need > total.get(name, 0):
            raise BenchError(
                f"a run needs {need:g} {name}(s) but the Ray cluster has {total.get(name, 0):g}: "
                f"lower --{name.lower()}s-per-run (or the suite's resources)"
            )
    return {"cpu": float(cpus), "gpu": float(gpus)}


def parallel_slots(resources: dict[str, float]) -> int:
    """How many trials of ``resources`` the cluster runs at once (as it is now)."""
    import ray

    total = ray.cluster_resources()
    slots = int(total.get("CPU", 0) // resources["cpu"])
    if resources["gpu"] > 0:
        slots = min(slots, int(total.get("GPU", 0) // resources["gpu"]))
    return max(slots, 1)


@dataclass(frozen=True)
class TeacherJob:
    """Train (or load) the teacher of ``spec`` once, as a trial of its own."""

    spec: RunSpec

    @property
    def key(self) -> str:
        return f"teacher:{self.spec.teacher_spec.hash}"


@dataclass
class JobList:
    """Tune config ``{"job": i, ...}`` → the i-th job."""

    jobs: list[RunSpec | LockstepJob | TeacherJob]

    def __call__(self, config: dict[str, Any]) -> RunSpec | LockstepJob | TeacherJob:
        return self.jobs[config["job"]]


def teachers_first(searcher_base: type) -> type:
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

        def _ready(self, job: RunSpec | LockstepJob | TeacherJob) -> bool:
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

    resolve: Callable[[dict[str, Any]], RunSpec | LockstepJob | TeacherJob]
    experiment: str
    dataset: str
    options: RunOptions  # absolute paths, resolved tracking URI
    run_root: Path
    threads: int
    gpus: float
    metric: str | None = None  # the Tune metric (sweeps): replayed from MLflow for specs already finished


_WORKER_CACHE: dict[tuple, Any] = {}  # per worker process (actors are reused between trials)


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = build()
    return _WORKER_CACHE[key]


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def tune_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: a teacher job, one run spec or a lockstep group. Reports every epoch (tagged
    ``kdb_spec``: a group's runs report in turn), then one final result per spec whose ``kdb_status`` /
    ``kdb_error`` / ``kdb_run_id`` the driver reads."""
    from ray import tune

    torch.set_num_threads(ctx.threads)
    job = ctx.resolve(config)
    opts = ctx.options
    device = torch.device("cuda" if ctx.gpus > 0 else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to our GPU
    splits = _cached(("splits", ctx.dataset, opts.data_root), lambda: load_dataset(ctx.dataset, opts.data_root))

    def quiet(*_: Any) -> None:  # worker output is not forwarded to the driver anyway
        pass

    if isinstance(job, TeacherJob):
        try:
            records, errors = prepare_teachers([job.spec], splits, opts, device, quiet)
        except BenchError as err:
            tune.report({"kdb_status": "BENCH_ERROR", "kdb_error": str(err)})
            return
        error = next(iter(errors.values()), "")
        top1 = next(iter(records.values())).top1 if records else math.nan
        tune.report({"kdb_status": FAILED if error else FINISHED, "kdb_error": error, "teacher_top1": top1})
        return
    specs = job_specs(job)
    tracker = _cached(("tracker", ctx.experiment, opts.tracking_uri), lambda: make_tracker_for(ctx))
    teacher, teacher_error = None, config.get("teacher_error") or None
    if specs[0].teacher_spec is not None and teacher_error is None:  # trained by its own trial: this loads it
        records, errors = prepare_teachers(specs[:1], splits, opts, device, quiet)
        thash = specs[0].teacher_spec.hash
        teacher, teacher_error = records.get(thash), errors.get(thash)
    last: dict[str, dict[str, float]] = {s.hash: {} for s in specs}

    def on_epoch(spec: RunSpec, epoch: int, metrics: dict[str, float]) -> None:
        last[spec.hash] = _numbers(metrics)
        tune.report({**last[spec.hash], "kdb_spec": spec.hash})

    outcomes = run_jobs(specs, splits, tracker, ctx.run_root, device, teacher, teacher_error, opts.rerun, False,
                        on_epoch, quiet, opts.fast)  # fmt: skip
    for spec, outcome in zip(specs, outcomes):
        if outcome.status == SKIPPED and ctx.metric and outcome.run_id:  # a scheduler needs the curve
            for step, value in enumerate(tracker.metric_history(outcome.run_id, ctx.metric), start=1):
                last[spec.hash] = {"epoch": float(step), ctx.metric: value}
                tune.report({**last[spec.hash], "kdb_spec": spec.hash})
        final = {**last[spec.hash], **_numbers(outcome.metrics)}
        tune.report({**final, "kdb_spec": spec.hash, "kdb_status": outcome.status, "kdb_error": outcome.error,
                     "kdb_run_id": outcome.run_id or ""})  # fmt: skip


def make_tracker_for(ctx: TrialContext) -> Tracker:
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


def _progress_callback(ctx: TrialContext, progress: Progress | None, seen: dict[str, dict]):
    """Driver side: trial events → the progress line, and per job key (a spec's hash; ``teacher:<hash>``)
    its config, last result and error. A lockstep trial holds several specs: its results say which."""
    from ray import tune

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
                    progress.teachers_pending = max(progress.teachers_pending - 1, 0)
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
    from ray.tune.result import AUTO_RESULT_KEYS

    metrics = {k: v for k, v in _numbers(result).items() if k not in AUTO_RESULT_KEYS and k != "done"}
    return Outcome(key, str(result.get("kdb_status", STOPPED)), metrics, str(result.get("kdb_error") or ""),
                   str(result.get("kdb_run_id") or "") or None, config or {})  # fmt: skip


def tune_jobs(
    name: str,
    ctx: TrialContext,
    param_space: dict[str, Any],
    resources: dict[str, float],
    storage: Path,
    progress: Progress | None,
    tracker: Tracker | None = None,
    **tune_config: Any,
) -> dict[str, Outcome]:
    """One ``tune.Tuner.fit`` over ``param_space``; returns the outcome of every trial by job key.

    A trial that crashed (its worker died) or was interrupted leaves its MLflow run RUNNING; it is ended
    FAILED (crash) or KILLED (Ctrl-C) here so that the tables show it, and resumes on the next run."""
    from ray import tune

    storage.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(storage / name, ignore_errors=True)
    seen: dict[str, dict] = {}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, ctx=ctx), resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage.resolve()), verbose=0,
            callbacks=[_progress_callback(ctx, progress, seen)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )  # fmt: skip
    try:
        tuner.fit()
    except KeyboardInterrupt:
        if tracker is not None and progress is not None:
            import ray

            ray.shutdown()  # the trials stop before their runs are marked
            for key in list(progress.running):
                _end_unfinished(tracker, key, KILLED, "interrupted")
        raise
    outcomes = {}
    for key, trial in seen.items():
        outcome = _outcome(key, trial["last"], trial["config"])
        if "kdb_status" not in trial["last"] and "error" in trial:
            if tracker is not None and not key.startswith("teacher:"):
                _end_unfinished(tracker, key, FAILED, trial["error"])
            outcome = replace(outcome, status=FAILED, error=trial["error"])
        elif "kdb_status" not in trial["last"] and tracker is not None:  # stopped early: KILLED (resumable)
            _end_unfinished(tracker, key, KILLED, "stopped early by the Tune scheduler")
        outcomes[key] = outcome
    return outcomes


def _end_unfinished(tracker: Tracker, spec_hash: str, status: str, reason: str) -> None:
    for run in tracker.runs_for(spec_hash):
        if run.status == RUNNING:
            tracker.end(run.run_id, status, reason)


def run_ray(
    suite: Suite,
    pending: list[RunSpec],
    splits: Splits,
    options: RunOptions,
    tracker: Tracker,
    progress: Progress,
    log=print,
) -> list[Outcome]:
    """One Tuner over the teacher jobs (one per distinct teacher spec, first) and the pending specs (one
    trial each, or one per lockstep group: ``plan_jobs``), each released once its teacher has been trained
    (``teachers_first``)."""
    from ray.tune.search import Searcher

    with ray_session(options.address):
        resources = trial_resources(suite, options)
        opts = absolute_options(options, tracker)
        storage = suite_dir(opts, suite) / "ray"
        log(f"Ray: {resources['cpu']:g} CPU(s), {resources['gpu']:g} GPU(s) per run; Tune state in {storage}")
        first: dict[str, TeacherJob] = {}
        for spec in pending:
            if spec.teacher_spec is not None:
                first.setdefault(spec.teacher_spec.hash, TeacherJob(spec))
        slots = parallel_slots(resources)
        # the longest jobs (lockstep groups) first, so that none of them is left to run alone at the end
        planned = sorted(plan_jobs(pending, share_teacher(suite, options), slots), key=lambda j: -len(job_specs(j)))
        groups = [j for j in planned if isinstance(j, LockstepJob)]
        if groups:
            log(f"sharing the teacher pass: {sum(len(g.specs) for g in groups)} runs in {len(groups)} lockstep "
                f"group(s) (--no-share-teacher to run them apart)")  # fmt: skip
        jobs = JobList([*first.values(), *planned])
        ctx = TrialContext(
            jobs, suite.name, suite.dataset, opts, suite_dir(opts, suite) / "runs", _threads(resources["cpu"]),
            resources["gpu"],
        )  # fmt: skip
        progress.teachers_pending = len(first)
        outcomes = tune_jobs(
            "runs", ctx, {}, resources, storage, progress, tracker,
            search_alg=teachers_first(Searcher)(jobs), num_samples=len(jobs.jobs),
            max_concurrent_trials=slots,  # else Tune starts one trial (actor) at a time
        )  # fmt: skip
    for job in first.values():
        if outcomes.get(job.key, Outcome(job.key, "")).status == "BENCH_ERROR":
            raise BenchError(outcomes[job.key].error)
    for spec in pending:  # cannot happen unless Tune dropped a trial; say so rather than hide it
        outcomes.setdefault(spec.hash, Outcome(spec.hash, FAILED, error="no result from Ray Tune"))
    return [outcomes[s.hash] for s in pending]
