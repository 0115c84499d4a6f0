"""One run on several data-parallel workers: the lifecycle of ``bench.run.lifecycle``, executed by every worker.

Every worker (one process each, started by Ray Train: ``bench.run.ray_train``) calls :func:`execute` with the same
spec and a ``Workspace`` holding its :class:`~bench.distributed.TorchDistributed`. Rank 0 takes the spec's lock and
decides whether the spec runs (finished meanwhile: SKIPPED; its teacher failed: FAILED) and tells the others;
then every worker builds the same :class:`~bench.run.lifecycle.Run` (rank 0 alone owns its MLflow run and files),
trains it on its share of every batch, and finishes it. An error on any worker ends the whole run: rank 0 records
it when it can (the run resumes from its last checkpoint next time, in the same MLflow run), and the error
propagates so that Ray Train stops the other workers (a survivor would wait in a collective); the Ray trial
records what rank 0 could not (``bench.run.ray_train``). Lockstep groups and the teacher cache are off (tagged):
a worker sees other samples every epoch.

Not here: the process group, DDP and SyncBN (``bench.distributed``); starting the workers (``bench.run.ray_train``).
"""
from __future__ import annotations

from contextlib import nullcontext

from bench.errors import BenchError
from bench.run.jobs import SKIPPED, Outcome
from bench.run.lifecycle import OnEpoch, Run, Workspace, ending_on_interrupt, spec_lock
from bench.suites import RunSpec
from bench.teachers import TeacherRecord, load_teacher


def execute(spec: RunSpec, ws: Workspace, teacher: TeacherRecord | None, teacher_error: str | None,
            on_epoch: OnEpoch | None = None) -> Outcome:  # fmt: skip
    """Run ``spec`` on this worker (every worker of the run calls it); rank 0's outcome is the run's."""
    dist = ws.distributed
    if dist is None:
        raise ValueError("bench.run.distributed.execute needs a Workspace with its distributed context")
    with spec_lock(ws.run_root / spec.hash, ws.log) if ws.main else nullcontext():
        decided = None
        if ws.main:
            done = None if ws.options.rerun else ws.tracker.finished_run(spec.hash)
            if done is not None:
                decided = Outcome(spec.hash, SKIPPED, ws.tracker.final_metrics(done), run_id=done)
            elif teacher_error is not None:
                decided = Run(spec, ws, {"device": str(ws.device)}).fail(teacher_error)
        decided = dist.broadcast_object(decided)
        return decided if decided is not None else train(spec, ws, teacher, on_epoch)


def train(spec: RunSpec, ws: Workspace, teacher: TeacherRecord | None, on_epoch: OnEpoch | None) -> Outcome:
    """One spec through the lifecycle on this worker; an error is recorded by rank 0, then raised."""
    workers = ws.distributed.world_size
    run = Run(spec, ws, {"device": str(ws.device), "share_teacher": f"off: {workers} data-parallel workers"})
    with ending_on_interrupt(ws.tracker, [run]) if ws.main else nullcontext():
        try:
            teacher_model = None
            if spec.teacher_spec is not None:
                if teacher is None:
                    raise BenchError(f"no teacher record for {spec.teacher} (its trial did not report one)")
                teacher_model = load_teacher(teacher, ws.splits)
            run.prepare(teacher_model, on_epoch)
            history = run.method.fit(run.task, spec.recipe, run.hooks)
            return run.finish(history, teacher, {})
        except Exception as err:
            if run.outcome is None:
                run.fail(err)
            raise
