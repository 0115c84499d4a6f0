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
from bench.suites import Suite, expand
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
    workers_per_run: int | None = None  # data-parallel workers per run (Ray Train); default: the suite's resources

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


def workers_per_run(suite: Suite, options: RunOptions) -> int:
    return suite.resources.workers_per_run if options.workers_per_run is None else options.workers_per_run


def check_workers(suite: Suite, options: RunOptions) -> None:
    """Several workers per run: the Ray executor, and a global batch that splits evenly over the workers."""
    workers = workers_per_run(suite, options)
    if workers < 1:
        raise BenchError(f"--workers-per-run must be >= 1, got {workers}")
    if workers > 1 and options.executor != "ray":
        raise BenchError(f"{workers} workers per run need the Ray executor (Ray Train starts them): drop --executor "
                         f"{options.executor}")  # fmt: skip
    for spec in expand(suite) if workers > 1 else []:
        if spec.recipe.batch_size % workers:
            raise BenchError(f"{suite.path or suite.name}: recipe.batch_size {spec.recipe.batch_size} ({spec.label}, "
                             f"{spec.student}) is not divisible by {workers} workers per run: batch_size is the "
                             f"global batch, each worker takes batch_size / {workers}")  # fmt: skip


def torch_threads(cpus: float) -> int:
    """Torch threads of a run given ``cpus`` CPUs (at least one)."""
    return max(1, int(cpus))


def check_inputs(suite: Suite, options: RunOptions) -> Splits:
    """Everything that can be checked before anything is written: data present, checkpoints exist, match a listed
    sha256 (checked before they are opened) and load without running code (``bench.checkpoints``)."""
    if options.executor not in EXECUTORS:
        raise BenchError(f"unknown executor {options.executor!r} (known: {', '.join(EXECUTORS)})")
    pick_device(options.device)
    check_workers(suite, options)
    splits = load_dataset(suite.dataset, options.data_root, options.download)
    if options.teacher_dir is not None:  # fills pair.teacher_checkpoint from teachers.yaml (before expand)
        use_published_teachers(suite, options.teacher_dir)
    for path in dict.fromkeys(p.teacher_checkpoint for p in suite.pairs if p.teacher_checkpoint is not None):
        if not Path(path).exists():
            raise BenchError(f"{suite.path}: teacher checkpoint {path} not found")
        read_state_dict(path)
    return splits
