"""MLflow tracking: one MLflow experiment per suite, one MLflow run per run spec.

The store defaults to ``sqlite:///results/mlflow.db`` (``MLFLOW_TRACKING_URI`` or ``--tracking-uri``
override it). Several processes (Ray trials) write to it at once: a sqlite store is switched to WAL
journaling (readers never block the writer), MLflow itself sets a 20 s busy timeout on each session, and
``with_retry`` retries what still comes back "database is locked" (SQLite returns that at once, without
waiting, when waiting could deadlock); ``tests/test_tracking.py`` proves no row is lost. MLflow creates the
schema on first use: ``store_lock`` (a file lock beside the database) lets one process create or migrate it, and
the experiment, while others wait. A tracking server is asked for ``/health`` before use (``check_server``: one
line, exit 2, when it does not answer) and its client gives up after ~50 s (``HTTP_RETRY_DEFAULTS``). A sqlite file on
a network file system is not safe with several writers (no WAL over NFS): on a cluster use a tracking
server (``MLFLOW_TRACKING_URI=http://head:5000``). Each run carries the spec as params, per-epoch
metrics (``step`` = epoch), tags (spec hash, status, error, and what produced it: ``bench.provenance``), its
data as dataset inputs, and the final student weights as an artifact. The experiment is marked as model
training (``mlflow.experimentKind``, see ``_mark_experiment_kind``). A run is found again by its spec
hash, which is how finished work is skipped and interrupted work resumed in the same MLflow run.
"""
from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from bench.errors import BenchError
from bench.locks import exclusive_lock

T = TypeVar("T")
FINISHED, FAILED, RUNNING, KILLED = "FINISHED", "FAILED", "RUNNING", "KILLED"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's "Machine learning" kind


def default_tracking_uri(results_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


# How long the client insists on a tracking server that does not answer, unless the user sets these: 10 s per
# request, 3 retries after 0, 2 and 4 s (+ up to 1 s jitter each): at most ~50 s, instead of MLflow's defaults
# (120 s, 7 retries, backoff factor 2: several minutes). README, "Trust and safety".
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
HEALTH_TIMEOUT_S = 5.0


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_server(tracking_uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking server answers within ``timeout`` seconds (any HTTP status but a proxy's
    502/503/504 for a server behind it that is down), else one line naming it (``BenchError``). Other stores
    (sqlite, files, Databricks) are not probed."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    health = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            return
    except (urllib.error.URLError, OSError) as err:
        if isinstance(err, urllib.error.HTTPError) and err.code not in (502, 503, 504):
            return  # it answered (e.g. 401 behind basic auth): reachable
        reason = f"HTTP {err.code}" if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
        raise BenchError(
            f"MLflow tracking server {tracking_uri} cannot be reached ({reason}); check that it runs and that "
            f"{health} answers from this machine, or unset MLFLOW_TRACKING_URI / --tracking-uri for the local "
            "sqlite store"
        ) from None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    return Path(tracking_uri[len("sqlite:///") :]) if tracking_uri.startswith("sqlite:///") else None


@contextmanager
def store_lock(db: Path | None) -> Iterator[None]:
    """Hold ``<db>.lock`` while the sqlite store is created or migrated and the experiment created: MLflow
    builds the schema on first use, and two processes doing it at once on a fresh file fail (a
    ``CircularDependencyError``, an alembic version mismatch). A tracking server (``db`` None) needs none."""
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(db.with_name(db.name + ".lock")):
        yield


def enable_wal(db: Path) -> None:
    """Switch a sqlite database to write-ahead logging (persistent, stored in the file)."""

    def switch() -> None:
        with sqlite3.connect(db, timeout=30) as conn:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
        conn.close()

    with_retry(switch)


def with_retry(fn: Callable[[], T], attempts: int = 8, delay: float = 0.2,
               transient: tuple[str, ...] = ("locked", "busy")) -> T:
    """Retry ``fn`` on transient store errors: those whose message contains one of ``transient`` (by default
    sqlite's "database is locked" with concurrent writers)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # mlflow wraps sqlalchemy errors in MlflowException
            if not any(word in str(err).lower() for word in transient) or attempt == attempts - 1:
                raise
            time.sleep(delay * (2**attempt))
    raise AssertionError("unreachable")


@dataclass
class TrackedRun:
    run_id: str
    status: str
    tags: dict[str, str]


class Tracker:
    """A thin layer over ``MlflowClient`` bound to one experiment."""

    def __init__(self, experiment: str, tracking_uri: str, artifact_root: Path) -> None:
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.experiment = experiment
        check_server(tracking_uri)
        self.db = db = sqlite_path(tracking_uri)
        with store_lock(db):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            exp = with_retry(lambda: self.client.get_experiment_by_name(experiment))  # creates the store
            if exp is None:
                location = (artifact_root / experiment).resolve().as_uri()
                try:
                    self.experiment_id = with_retry(lambda: self.client.create_experiment(experiment, location))
                except Exception:  # a tracking server: created concurrently by another process
                    self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            else:
                self.experiment_id = exp.experiment_id
            self._mark_experiment_kind(exp)
            if db is not None:  # the tables exist now
                enable_wal(db)

    def _mark_experiment_kind(self, exp) -> None:
        """Tag the experiment as model training (MLflow 3's ``mlflow.experimentKind``). MLflow 3.17's UI reads it
        only with its GenAI / Model training switch off; with the switch (the default) open the experiment with
        ``?workflowType=machine_learning`` or pick "Model training" once (the browser remembers it)."""
        if exp is None or exp.tags.get(EXPERIMENT_KIND[0]) is None:
            with_retry(lambda: self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND))

    def runs_for(self, spec_hash: str) -> list[TrackedRun]:
        runs = with_retry(
            lambda: self.client.search_runs([self.experiment_id], filter_string=f"tags.spec_hash = '{spec_hash}'")
        )
        return [TrackedRun(r.info.run_id, r.info.status, r.data.tags) for r in runs]

    def all_runs(self) -> list:
        """Every MLflow run of the experiment (paged search)."""
        runs, token = [], None
        while True:
            page = with_retry(
                lambda: self.client.search_runs([self.experiment_id], max_results=10_000, page_token=token)
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def runs_by_hash(self) -> dict[str, list[TrackedRun]]:
        """Every run of the experiment grouped by spec hash (one paged search instead of one per spec)."""
        grouped: dict[str, list[TrackedRun]] = {}
        for r in self.all_runs():
            if "spec_hash" in r.data.tags:
                run = TrackedRun(r.info.run_id, r.info.status, r.data.tags)
                grouped.setdefault(r.data.tags["spec_hash"], []).append(run)
        return grouped

    def is_finished(self, spec_hash: str) -> bool:
        return self.finished_run(spec_hash) is not None

    def finished_run(self, spec_hash: str) -> str | None:
        """The id of a finished run of this spec, if any."""
        return next((r.run_id for r in self.runs_for(spec_hash) if r.status == FINISHED), None)

    def final_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""
        return dict(with_retry(lambda: self.client.get_run(run_id)).data.metrics)

    def start(
        self, run_name: str, spec_hash: str, params: dict[str, Any], tags: dict[str, str]
    ) -> tuple[str, bool]:
        """Reuse the unfinished run of this spec (resume: the curve continues) or create a new one.

        Unfinished = RUNNING (its process was killed: the caller holds the spec's lock, see
        ``bench.run.lifecycle.spec_lock``, so no live process owns it), KILLED (interrupted) or FAILED. A stale
        ``error`` tag of the earlier attempt is removed. Returns ``(run_id, resumed)``."""
        previous = [r for r in self.runs_for(spec_hash) if r.status != FINISHED]
        if previous:
            run = previous[0]
            run_id = run.run_id
            with_retry(lambda: self.client.update_run(run_id, status=RUNNING))
            if "error" in run.tags:
                with_retry(lambda: self.client.delete_tag(run_id, "error"))
            self.set_tags(run_id, {**tags, "resumed": "true", "status": "running"})
            return run_id, True
        base_tags = {
            "spec_hash": spec_hash,
            "mlflow.runName": run_name,
            "status": "running",
            **tags,
        }
        run = with_retry(lambda: self.client.create_run(self.experiment_id, tags=base_tags, run_name=run_name))
        run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            with_retry(lambda: self.client.log_batch(run_id, params=items[start : start + 100]))
        return run_id, False

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        with_retry(lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()]))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for start in range(0, len(items), 500):
            with_retry(lambda: self.client.log_batch(run_id, metrics=items[start : start + 500]))

    def log_inputs(self, run_id: str, datasets: list) -> None:
        """MLflow dataset inputs (``mlflow.entities.DatasetInput``, see ``bench.provenance.dataset_inputs``).

        A dataset is one row per experiment that every run links to, and MLflow finds-or-inserts it in two
        statements: two processes logging the same dataset at once both insert and one fails its run with
        "UNIQUE constraint failed" (seen in ``tests/test_two_at_once.py``). So the sqlite store is written under
        its lock, and a unique-constraint error (a tracking server's own race) is retried: the retry finds the row."""
        with store_lock(self.db):
            with_retry(lambda: self.client.log_inputs(run_id, datasets=datasets),
                       transient=("locked", "busy", "unique"))

    def log_artifact(self, run_id: str, path: Path) -> None:
        with_retry(lambda: self.client.log_artifact(run_id, str(path)))

    def end(self, run_id: str, status: str, error: str | None = None) -> None:
        if error:
            self.set_tags(run_id, {"error": error.splitlines()[0][:500] if error else ""})
        self.set_tags(run_id, {"status": status.lower()})
        with_retry(lambda: self.client.set_terminated(run_id, status=status))

    def search(self):
        """All runs of the experiment as a pandas DataFrame with ``mlflow.search_runs``' columns (run_id,
        status, start_time, ``metrics.*``, ``params.*``, ``tags.*``). Built from our client rather than
        the fluent API, whose ``set_tracking_uri`` would also set ``$MLFLOW_TRACKING_URI`` for the whole
        process (and so redirect every later tracker and subprocess to this store)."""
        import pandas as pd

        rows = []
        for r in self.all_runs():
            row = {
                "run_id": r.info.run_id,
                "experiment_id": r.info.experiment_id,
                "status": r.info.status,
                "artifact_uri": r.info.artifact_uri,
                "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
                "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True) if r.info.end_time else pd.NaT,
            }
            row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in r.data.params.items()})
            row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def metric_history(self, run_id: str, key: str) -> list[float]:
        """Per-epoch values of ``key``, one per step (the last logged value wins after a resume)."""
        history = with_retry(lambda: self.client.get_metric_history(run_id, key))
        by_step = {}
        for m in sorted(history, key=lambda m: m.timestamp):
            by_step[m.step] = m.value
        return [by_step[s] for s in sorted(by_step)]


class EpochLogger:
    """Engine hook: logs each epoch's metrics to the MLflow run (and forwards to an optional callback)."""

    def __init__(self, tracker: Tracker, run_id: str, extra: Callable[[int, dict[str, float]], None] | None = None):
        self.tracker, self.run_id, self.extra = tracker, run_id, extra

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        finite = {k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.tracker.log_metrics(self.run_id, finite, step=epoch + 1)
        if self.extra is not None:
            self.extra(epoch, metrics)


def summary_metric_names(summary: dict[str, float]) -> dict[str, float]:
    """History summary → the run's final metrics: ``test_top1`` → ``top1``, ``teacher_test_ece`` →
    ``teacher_ece``, ``best_test_top1`` → ``best_top1`` (other splits keep their prefix)."""
    return {k.replace("test_", ""): v for k, v in summary.items()}

