"""What a ``run`` / ``sweep`` invocation was asked for (``RunOptions``), and what follows from it alone: the
suite's output folder, its MLflow tracker, and the checks made before anything is written (``check_inputs``).

Not here: a run's lifecycle (``bench.run.lifecycle``), the executors (``bench.run.local``, ``bench.run.ray``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.data import Splits, load_dataset
from bench.engine import FastPaths, pick_device
from bench.errors import BenchError
from bench.provenance import Invocation
from bench.suites import Suite
from bench.teachers import read_state_dict, use_published_teachers
from bench.tracking import Tracker, default_tracking_uri

EXECUTORS = ("ray", "local")


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
    invocation: Invocation | None = None  # set by run_suite / run_sweep: what every run of it records once

    @property
    def fast(self) -> FastPaths:
        return FastPaths(self.teacher_cache, self.device_data)


def suite_dir(options: RunOptions, suite: Suite) -> Path:
    return options.results_dir / suite.name


def make_tracker(suite: Suite, options: RunOptions, experiment: str | None = None) -> Tracker:
    uri = options.tracking_uri or default_tracking_uri(options.results_dir)
    return Tracker(experiment or suite.name, uri, options.results_dir / "mlartifacts")


def share_teacher(suite: Suite, options: RunOptions) -> bool:
    return suite.share_teacher if options.share_teacher is None else options.share_teacher


def torch_threads(cpus: float) -> int:
    """Torch threads of a run given ``cpus`` CPUs (at least one)."""
    return max(1, int(cpus))


def check_inputs(suite: Suite, options: RunOptions) -> Splits:
    """Everything that can be checked before anything is written: data present, checkpoints exist, match a listed
    sha256 (checked before they are opened) and load without running code (``bench.checkpoints``)."""
    if options.executor not in EXECUTORS:
        raise BenchError(f"unknown executor {options.executor!r} (known: {', '.join(EXECUTORS)})")
    pick_device(options.device)
    splits = load_dataset(suite.dataset, options.data_root, options.download)
    if options.teacher_dir is not None:  # fills pair.teacher_checkpoint from teachers.yaml (before expand)
        use_published_teachers(suite, options.teacher_dir)
    for path in dict.fromkeys(p.teacher_checkpoint for p in suite.pairs if p.teacher_checkpoint is not None):
        if not Path(path).exists():
            raise BenchError(f"{suite.path}: teacher checkpoint {path} not found")
        read_state_dict(path)
    return splits
