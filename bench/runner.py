"""Running a suite: skip finished specs, train the teachers they need once, run every student spec.

``run_suite`` is what ``python -m bench run`` and ``make reproduce-tables`` call. Each spec runs through
``execute_spec`` (build loaders, models and the method, ``method.fit``, log to MLflow), which isolates
failures: a run that raises or diverges is recorded as failed with its reason and the others go on.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.calibration import final_calibration
from bench.data import Splits, load_dataset
from bench.engine import atomic_save, build_task, pick_device, seed_everything
from bench.errors import BenchError
from bench.models import create_model
from bench.suites import RunSpec, Suite, TeacherSpec, expand
from bench.teachers import TeacherRecord, ensure_teacher, load_teacher, read_state_dict
from bench.tracking import FAILED, FINISHED, KILLED, EpochLogger, Tracker, default_tracking_uri, summary_metric_names


@dataclass
class RunOptions:
    results_dir: Path = Path("results")
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    rerun: bool = False
    tracking_uri: str | None = None
    progress: bool = True
    teacher_dir: Path | None = None


@dataclass
class SuiteReport:
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def suite_dir(options: RunOptions, suite: Suite) -> Path:
    return options.results_dir / suite.name


def make_tracker(suite: Suite, options: RunOptions) -> Tracker:
    uri = options.tracking_uri or default_tracking_uri(options.results_dir)
    return Tracker(suite.name, uri, options.results_dir / "mlartifacts")


def check_inputs(suite: Suite, options: RunOptions) -> Splits:
    """Everything that can be checked before anything is written: data present, checkpoints exist."""
    pick_device(options.device)
    splits = load_dataset(suite.dataset, options.data_root, options.download)
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


def execute_spec(
    spec: RunSpec,
    splits: Splits,
    tracker: Tracker,
    run_dir: Path,
    device: torch.device,
    teacher: TeacherRecord | None,
    progress: bool = True,
    on_epoch=None,
) -> tuple[str, dict[str, float]]:
    """Run one spec end to end inside its MLflow run; returns (status, final metrics)."""
    from methods import MethodContext, build_hparams, get_method

    cls = get_method(spec.method)
    run_id, resumed = tracker.start(spec.run_name, spec.hash, spec.params(), {"device": str(device)})
    checkpoint = run_dir / "checkpoint.pt"
    if not resumed:
        checkpoint.unlink(missing_ok=True)
    try:
        task = build_task(
            splits, spec.fraction, spec.seed, spec.recipe, device,
            checkpoint_path=checkpoint, target_top1=spec.target_top1, progress=progress, description=spec.run_name,
        )  # fmt: skip
        info = splits.info
        seed_everything(spec.seed)
        student = create_model(spec.student, info.num_classes, info.in_channels)
        teacher_model = None
        if cls.teacher_mode == "offline":
            assert teacher is not None, "offline method without a teacher record"
            teacher_model = load_teacher(teacher, splits)
        elif cls.teacher_mode == "online":
            teacher_model = create_model(spec.teacher, info.num_classes, info.in_channels)
        hparams = build_hparams(spec.method, spec.hparams, spec.label)
        context = MethodContext(info, task.train_loader.num_samples, spec.recipe.epochs)
        method = cls(student, teacher_model, hparams, context)
        history = method.fit(task, spec.recipe, EpochLogger(tracker, run_id, on_epoch))
        final = summary_metric_names(history.summary(spec.target_top1))
        final.update({k: float(v) for k, v in method.describe().items()})
        if teacher is not None:
            final["teacher_top1"] = teacher.top1
            tracker.set_tags(run_id, {"teacher_hash": teacher.spec.hash})
        extra_metrics, artifacts = final_calibration(method, task, run_dir)
        final.update(extra_metrics)
        tracker.log_metrics(run_id, final, step=spec.recipe.epochs)
        weights = run_dir / "student.pt"
        atomic_save(method.student.state_dict(), weights)
        for path in [weights, *artifacts]:
            tracker.log_artifact(run_id, path)
        tracker.end(run_id, FINISHED)
        return FINISHED, final
    except KeyboardInterrupt:
        tracker.end(run_id, KILLED, "interrupted")
        raise
    except Exception as err:  # isolate: record and go on with the other runs
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.log").write_text(traceback.format_exc())
        tracker.end(run_id, FAILED, f"{type(err).__name__}: {err}")
        return FAILED, {"error": f"{type(err).__name__}: {err}"}


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


def run_suite(suite: Suite, options: RunOptions, log=print) -> SuiteReport:
    splits = check_inputs(suite, options)
    device = pick_device(options.device)
    tracker = make_tracker(suite, options)
    specs = expand(suite)
    report = SuiteReport()
    pending = []
    for spec in specs:
        if not options.rerun and tracker.is_finished(spec.hash):
            report.skipped.append(spec.hash)
        else:
            pending.append(spec)
    log(f"suite {suite.name}: {len(specs)} runs, {len(report.skipped)} already finished, "
        f"{len(pending)} to run on {device}")  # fmt: skip
    teachers, teacher_errors = prepare_teachers(pending, splits, options, device, log)
    for i, spec in enumerate(pending, start=1):
        t0 = time.perf_counter()
        tkey = spec.teacher_spec.hash if spec.teacher_spec else None
        if tkey in teacher_errors:
            run_id, _ = tracker.start(spec.run_name, spec.hash, spec.params(), {"device": str(device)})
            tracker.end(run_id, FAILED, teacher_errors[tkey])
            status, final = FAILED, {"error": teacher_errors[tkey]}
        else:
            try:
                status, final = execute_spec(
                    spec, splits, tracker, suite_dir(options, suite) / "runs" / spec.hash, device,
                    teachers.get(tkey), options.progress,
                )  # fmt: skip
            except KeyboardInterrupt:
                log(f"\ninterrupted: finished runs are kept; run the same command again to resume "
                    f"(the interrupted run continues from its last epoch checkpoint)")  # fmt: skip
                raise
        (report.finished if status == FINISHED else report.failed).append(spec.hash)
        outcome = f"top-1 {final['top1']:.2f}" if status == FINISHED else final["error"]
        log(f"[{i}/{len(pending)}] {status.lower():8s} {spec.run_name}: {outcome} ({time.perf_counter() - t0:.1f} s)")
        sys.stdout.flush()
    return report
