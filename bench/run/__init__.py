"""Running suites: options, jobs, a run's lifecycle, the local and Ray executors, progress (see each module)."""
from bench.run.jobs import Outcome
from bench.run.options import RunOptions, make_tracker, suite_dir
from bench.run.suite import SuiteReport, run_suite

__all__ = ["Outcome", "RunOptions", "SuiteReport", "make_tracker", "run_suite", "suite_dir"]
