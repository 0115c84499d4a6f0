"""A run's lifecycle: one spec from its MLflow run to FINISHED or FAILED, alone or in a lockstep group.

:class:`Run` is one spec's run. Built from the spec, it starts its MLflow run (or resumes the spec's
unfinished one: the curve continues, training restarts from ``checkpoint.pt``); ``prepare`` builds its loaders,
student and method around the teacher, seeded by the spec's seed; ``finish`` records the final metrics,
calibration and weights and ends the MLflow run FINISHED; ``fail`` records the reason (and ``error.log``) and
ends it FAILED. Each step happens once per run.

:func:`execute` runs one job (a spec, or a lockstep group of specs that share a teacher and batches) under the
specs' locks: a spec finished meanwhile is SKIPPED, a spec whose teacher failed is FAILED with the teacher's
error, the others go through the lifecycle. The only difference between a single run and a group is the
training step: the method's own ``fit`` for one run, ``bench.lockstep.fit_lockstep`` (one teacher pass per
batch) for several. A run that raises or diverges fails alone; Ctrl-C, or a stop by the Tune scheduler, ends
the runs still open KILLED (resumable) and propagates.

Crash safety: a spec holds an exclusive lock on its run folder while it runs (:func:`spec_lock`; the kernel
drops it when the process dies, even on SIGKILL), so an unfinished MLflow run of a spec nobody holds is resumed,
and a spec held by a live process (another ``bench run``) is waited for.

On several data-parallel workers (``bench.run.distributed``) every worker builds the same ``Run`` and trains it;
only rank 0 (``Workspace.main``) starts, logs to and ends the MLflow run, writes the checkpoint and the files.

Not here: which jobs exist (``bench.run.jobs``), where they execute (``bench.run.local``, ``bench.run.ray``).
"""
from __future__ import annotations

import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from bench.calibration import final_calibration
from bench.data import Splits, run_indices
from bench.loaders import describe_loader
from bench.distributed import TorchDistributed, run_tags as parallel_tags
from bench.engine import History, atomic_save, build_task, keep_freed_host_memory, seed_everything
from bench.errors import BenchError
from bench.lockstep import fit_lockstep
from bench.locks import exclusive_lock, held_elsewhere
from bench.models import create_model
from bench.plugins import provenance
from bench.provenance import dataset_inputs, run_note, run_tags
from bench.run.jobs import SKIPPED, Outcome, teacher_specs
from bench.run.options import RunOptions
from bench.suites import RunSpec
from bench.teachers import TeacherRecord, ensure_teacher, load_teacher
from bench.tracking import FAILED, FINISHED, KILLED, EpochLogger, Tracker, summary_metric_names
from methods import MethodContext, build_hparams, get_method

OnEpoch = Callable[[RunSpec, int, dict[str, float]], None]


@dataclass
class Workspace:
    """Where runs execute in this process and what they share: the options, data, tracker and device, and
    the folder holding one folder per spec (checkpoint, lock, weights, artifacts)."""

    options: RunOptions
    splits: Splits
    tracker: Tracker
    device: torch.device
    run_root: Path
    log: Callable[[str], None] = print
    distributed: TorchDistributed | None = None  # this process is one of a run's data-parallel workers

    @property
    def main(self) -> bool:
        """Whether this process owns the runs' MLflow side and files: one process, or rank 0 of the workers."""
        return self.distributed is None or self.distributed.rank == 0


class WorkerHooks:
    """The engine hooks of a worker other than rank 0: no MLflow, only the per-epoch callback."""

    def __init__(self, extra: Callable[[int, dict[str, float]], None] | None) -> None:
        self.extra = extra

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.extra is not None:
            self.extra(epoch, metrics)




@contextmanager
def spec_lock(run_dir: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the spec's run folder exclusively while it runs; wait while a live process holds it."""
    with exclusive_lock(run_dir / "lock", lambda: log(f"{run_dir.name}: another live process runs this spec; "
                                                      "waiting for it")):  # fmt: skip
        yield


def spec_held(run_dir: Path) -> bool:
    """Whether a live process runs the spec of ``run_dir`` now (holds its :func:`spec_lock`)."""
    return held_elsewhere(run_dir / "lock")


class Run:
    """One spec's run (module docstring): ``Run(spec, ws, tags)`` → ``prepare`` → train → ``finish`` | ``fail``."""

    def __init__(self, spec: RunSpec, ws: Workspace, tags: dict[str, str]) -> None:
        self.spec, self.ws = spec, ws
        self.run_dir = ws.run_root / spec.hash
        self.run_id, self.resumed = None, False
        if ws.main:
            self.run_id, self.resumed = ws.tracker.start(spec.run_name, spec.hash, spec.params(),
                                                         {**run_tags(ws.options.invocation, ws.device), **tags})  # fmt: skip
            diff = ws.options.invocation.diff if ws.options.invocation is not None else None
            if diff is not None:
                ws.tracker.log_artifact(self.run_id, diff)
        self.outcome: Outcome | None = None  # set when the run ends
        if spec.code and ws.main:
            self.record_code()

    def record_code(self) -> None:
        """The parts not built in (a plugin's method, model, dataset): tags ``code.<role>`` (origin and source
        digest) and their source files as artifacts under ``code/``."""
        tags, files = provenance(self.spec.parts, self.spec.code)
        self.ws.tracker.set_tags(self.run_id, tags)
        if files:
            folder = self.run_dir / "code"
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
            self.ws.tracker.log_artifact(self.run_id, folder)

    def prepare(self, teacher_model: torch.nn.Module | None, on_epoch: OnEpoch | None = None, train_loader=None) -> None:
        """Loaders, student and method (around ``teacher_model`` for an offline method; an online method builds
        its own teacher), seeded by the spec's seed; the fast paths that change no result are tagged.
        ``train_loader``: the group's loader (a lockstep group draws its batches once)."""
        spec, ws = self.spec, self.ws
        cls = get_method(spec.method)
        checkpoint = self.run_dir / "checkpoint.pt"
        if ws.main and not self.resumed:
            checkpoint.unlink(missing_ok=True)
        self.task = build_task(
            ws.splits, spec.fraction, spec.seed, spec.recipe, ws.device, **asdict(ws.options.fast),
            train_loader=train_loader, checkpoint_path=checkpoint, target_top1=spec.target_top1,
            progress=ws.options.progress, description=spec.run_name, distributed=ws.distributed,
        )  # fmt: skip
        info = ws.splits.info
        seed_everything(spec.seed)
        student = create_model(spec.student, info.num_classes, info.in_channels)
        if cls.teacher_mode == "online":
            teacher_model = create_model(spec.teacher, info.num_classes, info.in_channels)
        hparams = build_hparams(spec.method, spec.hparams, spec.label)
        context = MethodContext(info, self.task.train_loader.num_samples, spec.recipe.epochs)
        self.method = cls(student, teacher_model, hparams, context)
        callback = partial(on_epoch, spec) if on_epoch is not None else None
        dist = ws.distributed
        if dist is None:
            parallel = parallel_tags(spec.recipe)
        else:  # SyncBatchNorm, the method's own set-up; then rank 0 has removed a stale checkpoint: all may read
            parallel = dist.tags(spec.recipe, dist.prepare(self.method, spec.recipe))
            parallel.update({"ddp_note": cls.ddp_note} if cls.ddp_note else {})
            dist.barrier()
        if ws.main:
            ws.tracker.set_tags(self.run_id, {"data": describe_loader(self.task.train_loader),
                                              "malloc_tuning": keep_freed_host_memory(), **parallel})  # fmt: skip
            self.record_data(cls.teacher_mode)
        self.hooks = EpochLogger(ws.tracker, self.run_id, callback) if ws.main else WorkerHooks(callback)

    def record_data(self, teacher_mode: str) -> None:
        """The run's data as MLflow dataset inputs (digests of the chosen indices) and its spec as the run's
        note."""
        spec, splits = self.spec, self.ws.splits
        train_targets, test_targets = splits.train.target_array(), splits.test.target_array()
        train, val = run_indices(train_targets, spec.fraction, spec.seed, spec.recipe.val_fraction)
        chosen = {"train": (train, train_targets), "test": (np.arange(len(test_targets)), test_targets)}
        if len(val):
            chosen["val"] = (val, train_targets)
        self.ws.tracker.log_inputs(self.run_id, dataset_inputs(spec.dataset, spec.fraction, spec.seed, chosen))
        self.ws.tracker.set_tags(self.run_id, {"mlflow.note.content": run_note(spec, teacher_mode, len(train))})

    def finish(self, history: History, teacher: TeacherRecord | None, tags: dict[str, str]) -> Outcome:
        """Final metrics, calibration and the student's weights; ends the MLflow run FINISHED (a worker other
        than rank 0 takes part in the calibration's gathered predictions only)."""
        spec, tracker, method = self.spec, self.ws.tracker, self.method
        if not self.ws.main:
            final_calibration(method, self.task, None)
            self.outcome = Outcome(spec.hash, FINISHED)
            return self.outcome
        if tags:
            tracker.set_tags(self.run_id, tags)
        final = summary_metric_names(history.summary(spec.target_top1))
        final.update({k: float(v) for k, v in method.describe().items()})
        if history.teacher_cache is not None:  # "on" / "off: <reason>", and its hits and misses
            tracker.set_tags(self.run_id, history.teacher_cache.tags())
            final.update(history.teacher_cache.metrics())
        if teacher is not None:
            final["teacher_top1"] = teacher.top1
            tracker.set_tags(self.run_id, teacher.tags())
        extra_metrics, artifacts = final_calibration(method, self.task, self.run_dir)
        final.update(extra_metrics)
        tracker.log_metrics(self.run_id, final, step=spec.recipe.epochs)
        weights = self.run_dir / "student.pt"
        atomic_save(method.student.state_dict(), weights)
        for path in [weights, *artifacts]:
            tracker.log_artifact(self.run_id, path)
        tracker.end(self.run_id, FINISHED)
        self.outcome = Outcome(spec.hash, FINISHED, final, run_id=self.run_id)
        return self.outcome

    def fail(self, err: BaseException | str) -> Outcome:
        """End the MLflow run FAILED with the reason (an exception's traceback also goes to ``error.log``)."""
        reason = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else err
        if isinstance(err, BaseException) and self.ws.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "error.log").write_text("".join(traceback.format_exception(err)))
        if self.ws.main:
            self.ws.tracker.end(self.run_id, FAILED, reason)
        self.outcome = Outcome(self.spec.hash, FAILED, error=reason, run_id=self.run_id)
        return self.outcome


@dataclass
class Trained:
    """What training gave one prepared run: its history, or the error that stopped it, and tags to record."""

    history: History
    error: BaseException | None = None
    tags: dict[str, str] = field(default_factory=dict)


@contextmanager
def ending_on_interrupt(tracker: Tracker, runs: list[Run]) -> Iterator[None]:
    """Ctrl-C or a stop by the Tune scheduler (``SystemExit`` inside ``ray.tune.report``) ends the runs
    still open KILLED (resumable) and propagates."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as stop:
        reason = "interrupted" if isinstance(stop, KeyboardInterrupt) else "stopped early by the Tune scheduler"
        for run in runs:
            if run.outcome is None:
                tracker.end(run.run_id, KILLED, reason)
        raise


def train(runs: list[Run], ws: Workspace, group: bool) -> list[Trained]:
    """The one step where a single run and a lockstep group differ."""
    if not group:
        (run,) = runs
        try:
            return [Trained(run.method.fit(run.task, run.spec.recipe, run.hooks))]
        except Exception as err:  # isolate: recorded as this run's failure
            return [Trained(History(), err)]
    try:
        results = fit_lockstep([r.method for r in runs], [r.task for r in runs], [r.spec.recipe for r in runs],
                               [r.hooks for r in runs], progress=ws.options.progress,
                               description=f"lockstep of {len(runs)}: {runs[0].spec.teacher}")  # fmt: skip
    except Exception as err:  # e.g. the group cannot share (BenchError): every run fails with the reason
        return [Trained(History(), err) for _ in runs]
    return [Trained(r.history, r.error, {"teacher_passes": str(r.teacher_passes)}) for r in results]


def run_specs(specs: list[RunSpec], ws: Workspace, teacher: TeacherRecord | None, on_epoch: OnEpoch | None) -> list[Outcome]:
    """Each spec through the lifecycle; one teacher module (loaded once) and one loader for a group."""
    group = len(specs) > 1
    tags = {"device": str(ws.device), **({"share_teacher": f"lockstep group of {len(specs)}"} if group else {})}
    runs = [Run(spec, ws, tags) for spec in specs]
    with ending_on_interrupt(ws.tracker, runs):
        try:  # loaded before any seed is set: a run builds its student from the same numbers alone or in a group
            teacher_model = None
            if specs[0].teacher_spec is not None:
                if teacher is None:
                    raise BenchError(f"no teacher record for {specs[0].teacher} (its trial did not report one)")
                teacher_model = load_teacher(teacher, ws.splits)
        except Exception as err:
            return [run.fail(err) for run in runs]
        prepared: list[Run] = []
        for run in runs:
            try:
                run.prepare(teacher_model, on_epoch, prepared[0].task.train_loader if group and prepared else None)
                prepared.append(run)
            except Exception as err:
                run.fail(err)
        for run, trained in zip(prepared, train(prepared, ws, group) if prepared else []):
            try:
                if trained.error is not None:
                    raise trained.error
                run.finish(trained.history, teacher, trained.tags)
            except Exception as err:
                run.fail(err)
    return [run.outcome for run in runs]


def execute(specs: list[RunSpec], ws: Workspace, teacher: TeacherRecord | None, teacher_error: str | None,
            on_epoch: OnEpoch | None = None) -> list[Outcome]:  # fmt: skip
    """Run one job's ``specs`` (one spec, or a lockstep group sharing ``teacher``) under their locks (module
    docstring); one outcome per spec, in order."""
    outcomes: dict[str, Outcome] = {}
    with ExitStack() as locks:
        for spec in sorted(specs, key=lambda s: s.hash):  # one order for every process: no deadlock
            locks.enter_context(spec_lock(ws.run_root / spec.hash, ws.log))
        todo = []
        for spec in specs:
            done = None if ws.options.rerun else ws.tracker.finished_run(spec.hash)
            if done is not None:
                outcomes[spec.hash] = Outcome(spec.hash, SKIPPED, ws.tracker.final_metrics(done), run_id=done)
            elif teacher_error is not None:
                outcomes[spec.hash] = Run(spec, ws, {"device": str(ws.device)}).fail(teacher_error)
            else:
                todo.append(spec)
        if todo:
            outcomes.update((o.key, o) for o in run_specs(todo, ws, teacher, on_epoch))
    return [outcomes[s.hash] for s in specs]


def prepare_teachers(specs: list[RunSpec], splits: Splits, options: RunOptions, device: torch.device,
                     log: Callable[[str], None] = print) -> tuple[dict[str, TeacherRecord], dict[str, str]]:  # fmt: skip
    """Train or load every teacher the specs need (each once). Returns records and per-teacher errors; a
    ``BenchError`` (bad input: a checkpoint that cannot be read) propagates."""
    records, errors = {}, {}
    for tspec in teacher_specs(specs):
        t0 = time.perf_counter()
        try:
            records[tspec.hash] = ensure_teacher(tspec, splits, options.results_dir, device, options.progress,
                                                 teacher_dir=options.teacher_dir)  # fmt: skip
            log(f"teacher {tspec.model} [{tspec.hash}]: test top-1 {records[tspec.hash].top1:.2f} "
                f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        except BenchError:
            raise
        except Exception as err:
            errors[tspec.hash] = f"teacher {tspec.model} failed: {type(err).__name__}: {err}"
            log(errors[tspec.hash])
    return records, errors
