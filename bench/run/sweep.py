"""Running a sweep (``python -m bench sweep SUITE``): search the suite's ``sweep:`` space with Ray Tune (one
trial per sampled config and seed, through the Ray executor's trial function), select on the validation split,
then re-run the best config and the suite's own with the suite's seeds through the Ray executor.

The schema and selection: ``bench.sweep``; the files: ``bench.report.sweep``.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from bench.engine import pick_device
from bench.errors import BenchError
from bench.provenance import start_invocation
from bench.report.sweep import SweepReport, final_frame, trial_frame, write_outputs
from bench.run import ray as ray_executor
from bench.run.jobs import Workload
from bench.run.lifecycle import prepare_teachers
from bench.run.options import RunOptions, check_inputs, make_tracker, suite_dir, torch_threads, workers_per_run
from bench.run.progress import Progress
from bench.run.ray import TrialContext, absolute_options, parallel_slots, ray_session, trial_resources, tune_jobs
from bench.run.suite import live_output
from bench.suites import RunSpec, Suite
from bench.sweep import Dimension, Sweep, SweepResolver, final_runs, parse_sweep, select_best, trial_label


def tune_domain(dim: Dimension) -> Any:
    """One axis of the space as a Tune domain (tied values travel as lists)."""
    if dim.kind == "grid":
        return tune.grid_search([list(v) if len(dim.names) > 1 else v for v in dim.values])
    if dim.kind == "choice":
        return tune.choice([list(v) if len(dim.names) > 1 else v for v in dim.values])
    low, high = dim.values
    if dim.integer:
        return (tune.randint if dim.kind == "uniform" else tune.lograndint)(int(low), int(high) + 1)
    return (tune.uniform if dim.kind == "uniform" else tune.loguniform)(low, high)


def tune_space(sweep: Sweep) -> dict[str, Any]:
    """Tune's ``param_space``: every seed (grid) × the axes ``p0``, ``p1``, ... (``SweepResolver`` reads it)."""
    space = {"seed": tune.grid_search(list(sweep.seeds))}
    space.update({f"p{i}": tune_domain(dim) for i, dim in enumerate(sweep.dims)})
    return space


def run_sweep(suite: Suite, options: RunOptions, log=print) -> SweepReport:
    """Search, select on validation, re-run the best and the suite's config with the suite's seeds."""
    sweep = parse_sweep(suite)
    settings = sweep.settings
    splits = check_inputs(suite, options)
    ray_executor.check_cluster(options.address)  # before anything is written
    device = pick_device(options.device)
    tracker = make_tracker(suite, options, experiment=f"{suite.name}-sweep")
    main_tracker = make_tracker(suite, options)
    out = suite_dir(options, suite)
    options = replace(options, invocation=options.invocation or start_invocation(out))  # recorded once for all runs
    log(f"sweep {suite.name}: {sweep.num_trials} trials of {settings.method} on {sweep.base.teacher}→"
        f"{sweep.base.student}, fraction {sweep.base.fraction:g}, selecting on {settings.metric} ({settings.mode}) "
        f"of a {settings.val_fraction:g} validation split")  # fmt: skip
    if sweep.base.teacher_spec is not None:  # the one teacher, before Ray starts (cached by its hash)
        before = torch.get_num_threads()
        torch.set_num_threads(torch_threads(options.cpus_per_run or suite.resources.cpus))
        try:
            _, errors = prepare_teachers([sweep.base], splits, options, device, log)
        finally:
            torch.set_num_threads(before)
        if errors:
            raise BenchError(next(iter(errors.values())))
    t0 = time.perf_counter()
    with ray_session(options.address):
        resources = trial_resources(suite, options)
        workers = workers_per_run(suite, options)
        opts = absolute_options(options, tracker)
        ctx = TrialContext(
            SweepResolver(sweep), tracker.experiment, suite.dataset, opts, suite_dir(opts, suite) / "runs",
            torch_threads(resources["cpu"]), resources["gpu"], metric=settings.metric, workers=workers,
            cpus=resources["cpu"],
        )  # fmt: skip
        concurrent = settings.max_concurrent
        if workers > 1:  # a trial drives its workers and holds no CPU: at most as many as fit the cluster
            concurrent = min(concurrent or parallel_slots(resources, workers), parallel_slots(resources, workers))
        scheduler = None
        if settings.asha is not None:
            scheduler = ASHAScheduler(time_attr="epoch", max_t=sweep.base.recipe.epochs,
                                      grace_period=settings.asha.grace_period,
                                      reduction_factor=settings.asha.reduction_factor,
                                      stop_last_trials=False)  # a trial at its last epoch finishes its run  # fmt: skip
        progress = Progress(f"{suite.name} sweep", [], 0, log, live_output(options), unknown=sweep.num_trials,
                            unknown_epochs=sweep.base.recipe.epochs)  # fmt: skip
        outcomes = tune_jobs(
            "sweep", ctx, tune_space(sweep), resources, suite_dir(opts, suite) / "ray", progress, tracker,
            metric=settings.metric, mode=settings.mode, scheduler=scheduler, num_samples=settings.num_samples,
            search_alg=BasicVariantGenerator(random_state=settings.search_seed),
            max_concurrent_trials=concurrent,
        )  # fmt: skip
        progress.close()
        trials = trial_frame(sweep, outcomes.values(), tracker)
        log(f"search: {len(trials)} trials in {time.perf_counter() - t0:.0f} s "
            f"({(trials.status == 'finished').sum()} finished, {(trials.status == 'stopped').sum()} stopped early, "
            f"{(trials.status == 'failed').sum()} failed)")  # fmt: skip
        best = select_best(sweep, trials)
        final_specs: list[RunSpec] = []
        if best is not None:
            final_specs = final_runs(suite, sweep, best["values"])
            pending = [s for s in final_specs if options.rerun or not main_tracker.is_finished(s.hash)]
            log(f"best: {trial_label(settings.method, best['values'])} with {settings.metric} {best['mean']:.2f} "
                f"(over {best['n']} trial(s)); on test with seeds {suite.seeds}, next to the suite's own "
                f"{settings.method}: {len(pending)} of {len(final_specs)} runs to do")  # fmt: skip
            if pending:
                live_progress = Progress(f"{suite.name} final", pending, len(final_specs) - len(pending), log,
                                         live_output(options))  # fmt: skip
                ray_executor.execute(Workload(suite, pending, splits, options, main_tracker, log), live_progress)
                live_progress.close()
    final = final_frame(final_specs, main_tracker)
    failed = int((trials.status == "failed").sum()) + int((final.status != "finished").sum())
    report = SweepReport(trials, best, final, failed)
    report.files = write_outputs(suite, sweep, report, out)
    options.invocation.wait()
    log(f"wrote {', '.join(str(p) for p in report.files)}")
    return report


