"""What executors are given and give back: jobs and their outcomes.

A job is one run spec, a ``LockstepJob`` (offline runs that share a teacher and batches: one teacher pass per
batch for the group, ``bench.lockstep``) or a ``TeacherJob`` (train or load one teacher, before the runs that
distil it). ``plan_jobs`` turns the pending specs of a suite into jobs. An executor (``bench.run.local``,
``bench.run.ray``) takes a :class:`Workload` and returns one :class:`Outcome` per spec, reporting progress
events on the way (``bench.run.progress``).

Not here: how a job executes (``bench.run.lifecycle``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from bench.data import Splits
from bench.lockstep import SHARED_RECIPE_FIELDS, can_share_teacher
from bench.run.options import RunOptions
from bench.suites import RunSpec, Suite, TeacherSpec, content_hash
from bench.tracking import Tracker
from methods import get_method

SKIPPED, STOPPED = "SKIPPED", "STOPPED"  # outcome statuses besides MLflow's FINISHED / FAILED / KILLED
MAX_LOCKSTEP = 8  # students of one group live on the device at once


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


@dataclass
class Workload:
    """An executor's input: the suite's pending specs and what running them needs."""

    suite: Suite
    specs: list[RunSpec]
    splits: Splits
    options: RunOptions
    tracker: Tracker
    log: Callable[[str], None] = print


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


@dataclass(frozen=True)
class TeacherJob:
    """Train (or load) the teacher of ``spec`` once, as a job of its own."""

    spec: RunSpec

    @property
    def key(self) -> str:
        return f"teacher:{self.spec.teacher_spec.hash}"


Job = RunSpec | LockstepJob | TeacherJob


def job_specs(job: RunSpec | LockstepJob) -> list[RunSpec]:
    return list(job.specs) if isinstance(job, LockstepJob) else [job]


def teacher_specs(specs: list[RunSpec]) -> list[TeacherSpec]:
    """The distinct teacher specs the ``specs`` distil, in order."""
    unique: dict[str, TeacherSpec] = {}
    for spec in specs:
        if spec.teacher_spec is not None:
            unique.setdefault(spec.teacher_spec.hash, spec.teacher_spec)
    return list(unique.values())


def lockstep_key(spec: RunSpec) -> tuple | None:
    """Runs of a suite with equal keys can train in lockstep (``None``: the run cannot): offline methods
    that use the engine's loop, with the same teacher spec, dataset, data (fraction, seed) and the recipe
    fields that decide the batches."""
    if spec.teacher_spec is None or not can_share_teacher(get_method(spec.method)):
        return None
    shared = tuple(repr(getattr(spec.recipe, name)) for name in SHARED_RECIPE_FIELDS)
    return (spec.teacher_spec.hash, spec.dataset, spec.fraction, spec.seed, shared)


def lockstep_groups(specs: Sequence[RunSpec], max_group: int | None = None) -> list[list[RunSpec]]:
    """Partition ``specs`` into lockstep groups (in their order); a spec that cannot share is alone.

    ``max_group`` caps a group's size (memory: every student of a group lives on the device at once)."""
    groups: dict[Any, list[RunSpec]] = {}
    order: list[list[RunSpec]] = []
    for i, spec in enumerate(specs):
        key = lockstep_key(spec)
        key = ("alone", i) if key is None else key
        group = groups.get(key)
        if group is None or (max_group is not None and len(group) >= max_group):
            group = groups[key] = []
            order.append(group)
        group.append(spec)
    return order


def plan_jobs(pending: list[RunSpec], share: bool, slots: int = 1) -> list[RunSpec | LockstepJob]:
    """The pending specs as jobs: with ``share``, specs that can share a teacher pass (:func:`lockstep_groups`)
    become one ``LockstepJob``, at most ``MAX_LOCKSTEP`` each, and the groups are split (a smaller cap) until
    there are at least ``slots`` jobs for the parallel workers."""
    if not share:
        return list(pending)
    cap = MAX_LOCKSTEP
    while True:
        groups = lockstep_groups(pending, cap)
        if len(groups) >= slots or cap == 1:
            return [g[0] if len(g) == 1 else LockstepJob(tuple(g)) for g in groups]
        cap -= 1
