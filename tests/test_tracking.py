"""MLflow tracking: concurrent writers on one sqlite store lose no row, resume reuses the unfinished run,
and reading the runs back leaves the process's tracking URI alone."""
import multiprocessing as mp
import os
import sqlite3
import time
from pathlib import Path

import pytest

from bench.tracking import FAILED, FINISHED, Tracker

WRITERS, RUNS, STEPS, KEYS = 4, 2, 10, 4


def tracker(tmp: Path, experiment: str = "conc") -> Tracker:
    return Tracker(experiment, f"sqlite:///{tmp / 'mlflow.db'}", tmp / "mlartifacts")


def write(index: int, tmp: str) -> None:
    """One trial-like writer: runs, per-step metric batches, tags, params, end."""
    t = tracker(Path(tmp))
    for r in range(RUNS):
        run_id, _ = t.start(f"w{index}-r{r}", f"hash-{index}-{r}", {"writer": index, "run": r}, {"w": str(index)})
        for step in range(1, STEPS + 1):
            t.log_metrics(run_id, {f"m{k}": float(100 * index + 10 * r + k + step) for k in range(KEYS)}, step=step)
            t.set_tags(run_id, {"epoch": str(step)})
        t.end(run_id, FINISHED)


def read(tmp: str, stop_at: float) -> None:
    """The driver polling the store meanwhile (as the progress line and the tables do)."""
    t = tracker(Path(tmp))
    while time.time() < stop_at:
        t.runs_by_hash()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One store for the module (creating a sqlite store runs MLflow's migrations: seconds)."""
    return tmp_path_factory.mktemp("store")


def test_concurrent_writers_lose_no_row_and_keep_the_store_intact(store):
    tmp_path = store
    tracker(tmp_path)  # the driver creates the store and the experiment first, as run_suite does
    db = tmp_path / "mlflow.db"
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=write, args=(i, str(tmp_path))) for i in range(WRITERS)]
    procs.append(ctx.Process(target=read, args=(str(tmp_path), time.time() + 5)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(procs)

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ours = ("JOIN runs r ON t.run_uuid = r.run_uuid JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = 'conc'")
    assert conn.execute(f"SELECT count(*) FROM metrics t {ours}").fetchone()[0] == WRITERS * RUNS * STEPS * KEYS
    assert conn.execute(f"SELECT count(*) FROM latest_metrics t {ours}").fetchone()[0] == WRITERS * RUNS * KEYS
    assert conn.execute(f"SELECT r.status, count(*) FROM runs t {ours} GROUP BY r.status").fetchall() == [
        ("FINISHED", WRITERS * RUNS)
    ]
    t = tracker(tmp_path)
    for i in range(WRITERS):
        for r in range(RUNS):
            ((run,),) = [runs for h, runs in t.runs_by_hash().items() if h == f"hash-{i}-{r}"]
            assert run.tags["epoch"] == str(STEPS)
            assert t.metric_history(run.run_id, "m1") == [float(100 * i + 10 * r + 1 + s) for s in range(1, STEPS + 1)]


def test_start_resumes_the_unfinished_run_and_drops_its_stale_error(store):
    t = tracker(store, "resume")
    run_id, resumed = t.start("a", "h1", {"p": 1}, {})
    assert not resumed
    t.log_metrics(run_id, {"top1": 10.0}, step=1)
    t.end(run_id, FAILED, "RuntimeError: boom\nmore lines")
    assert t.client.get_run(run_id).data.tags["error"] == "RuntimeError: boom"
    again, resumed = t.start("a", "h1", {"p": 1}, {})
    assert resumed and again == run_id and "error" not in t.client.get_run(run_id).data.tags
    t.log_metrics(run_id, {"top1": 11.0}, step=1)  # an epoch logged again after a crash: the last value wins
    t.log_metrics(run_id, {"top1": 20.0}, step=2)
    t.end(run_id, FINISHED)
    assert t.is_finished("h1") and t.metric_history(run_id, "top1") == [11.0, 20.0]
    assert t.final_metrics(run_id) == {"top1": 20.0}
    new, resumed = t.start("a", "h1", {"p": 1}, {})  # finished runs are never reopened (--rerun: a new run)
    assert not resumed and new != run_id


def test_search_frame_has_mlflow_columns_and_leaves_the_tracking_uri_alone(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = tracker(store, "frame")
    run_id, _ = t.start("a", "h1", {"p": 1}, {"x": "y"})
    t.log_metrics(run_id, {"top1": 1.5}, step=1)
    frame = t.search()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    row = frame.iloc[0]
    assert row["run_id"] == run_id and row["status"] == "RUNNING" and row["metrics.top1"] == 1.5
    assert row["params.p"] == "1" and row["tags.spec_hash"] == "h1" and row["tags.x"] == "y"
    assert str(frame["start_time"].dtype).startswith("datetime64")
