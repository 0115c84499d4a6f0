"""The local executor: the jobs one after another in this process (debugging, pdb, tqdm bars; the API's
default). ``--cpus-per-run`` sets the torch threads. It never imports Ray. A job another ``bench run`` is running
on the same results folder is put off to the end (:func:`others_last`).

Not here: how a job executes (``bench.run.lifecycle``), the Ray executor (``bench.run.ray``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from bench.engine import pick_device
from bench.run.jobs import Job, Outcome, Workload, job_specs, plan_jobs
from bench.run.lifecycle import Workspace, execute as execute_job, prepare_teachers, spec_held
from bench.run.options import share_teacher, suite_dir, torch_threads
from bench.run.progress import Progress


def execute(work: Workload, progress: Progress) -> list[Outcome]:
    """Every pending spec of ``work``: its teachers first (each once), then the jobs; one outcome per spec."""
    options = work.options
    threads_before = torch.get_num_threads()
    if options.cpus_per_run is not None:
        torch.set_num_threads(torch_threads(options.cpus_per_run))
    try:
        ws = Workspace(options, work.splits, work.tracker, pick_device(options.device),
                       suite_dir(options, work.suite) / "runs", work.log)  # fmt: skip
        teachers, teacher_errors = prepare_teachers(work.specs, ws.splits, options, ws.device, work.log)
        outcomes: dict[str, Outcome] = {}
        for job in others_last(plan_jobs(work.specs, share_teacher(work.suite, options)), ws.run_root):
            specs = job_specs(job)
            tkey = specs[0].teacher_spec.hash if specs[0].teacher_spec else None
            for spec in specs:
                progress.start(spec.hash)
            for outcome in execute_job(specs, ws, teachers.get(tkey), teacher_errors.get(tkey),
                                       on_epoch=lambda spec, epoch, _m: progress.epoch(spec.hash, epoch + 1)):  # fmt: skip
                progress.end(outcome)
                outcomes[outcome.key] = outcome
        return [outcomes[s.hash] for s in work.specs]
    finally:
        torch.set_num_threads(threads_before)


def others_last(jobs: list[Job], run_root: Path) -> Iterator[Job]:
    """The jobs in order, except that one a live process (another ``bench run``) holds when its turn comes waits
    until the end (once): two invocations on one results folder share the work instead of queueing behind each
    other. Whatever is still held at the end is waited for, and skipped if it finished meanwhile."""
    later = []
    for job in jobs:
        if any(spec_held(run_root / spec.hash) for spec in job_specs(job)):
            later.append(job)
        else:
            yield job
    yield from later
