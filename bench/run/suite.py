"""Running a suite: ``run_suite`` is what ``python -m bench run`` and ``make reproduce-tables`` call.

It checks the inputs (nothing is written before; a Ray cluster or tracking server that does not answer is one
line, exit 2), expands the suite into run specs, skips the finished ones (MLflow holds each spec's hash), and hands the pending ones to an executor: ``ray`` (``bench.run.ray``, the
CLI's default; imported only when chosen) or ``local`` (``bench.run.local``). Progress events from either
feed one line per suite (``bench.run.progress``). Ctrl-C: the runs in flight are ended KILLED by the
lifecycle or the Ray executor, and the CLI says how to resume.

Not here: a run's lifecycle (``bench.run.lifecycle``), the tables (``bench.report``).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace

from bench.engine import pick_device
from bench.provenance import start_invocation
from bench.run.jobs import SKIPPED, Workload
from bench.run.options import RunOptions, check_inputs, make_tracker, suite_dir
from bench.run.progress import Progress
from bench.suites import Suite, expand
from bench.tracking import FINISHED


@dataclass
class SuiteReport:
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def live_output(options: RunOptions) -> bool:
    return sys.stdout.isatty() if options.live is None else options.live


def run_suite(suite: Suite, options: RunOptions, log=print) -> SuiteReport:
    splits = check_inputs(suite, options)
    if options.executor == "ray" and (options.address or os.environ.get("RAY_ADDRESS")):
        from bench.run.ray import check_cluster  # a cluster that is not there: exit 2 before anything is written

        check_cluster(options.address)
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
    if pending and options.invocation is None:  # the environment and git diff, recorded once for these runs
        options = replace(options, invocation=start_invocation(suite_dir(options, suite)))
    bars = options.progress and not ray_mode  # the local executor's per-epoch bars own the terminal line
    progress = Progress(suite.name, pending, len(report.skipped), log, live_output(options) and not bars)
    work = Workload(suite, pending, splits, options, tracker, log)
    try:
        if ray_mode:
            from bench.run import ray as executor  # the only import of Ray: --executor local never starts it
        else:
            from bench.run import local as executor
        outcomes = executor.execute(work, progress)
    finally:
        progress.close()
        if options.invocation is not None:
            options.invocation.wait()
    for outcome in outcomes:  # SKIPPED here: finished meanwhile by another process
        bucket = {FINISHED: report.finished, SKIPPED: report.skipped}.get(outcome.status, report.failed)
        bucket.append(outcome.key)
    return report
