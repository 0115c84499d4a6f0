"""Crash safety with a real SIGKILL: kill ``python -m bench run`` (Ray executor, its whole process group)
while one run is finished and the other is half-way, start the same command again, and check that the
interrupted run resumed from its last epoch checkpoint in the same MLflow run, the finished one was not
repeated, there is exactly one MLflow run per spec, and runs.csv equals that of an uninterrupted run
with the same seeds bit for bit (CPU, one thread per run)."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bench.run import RunOptions, make_tracker, run_suite
from bench.suites import expand, parse_suite
from bench.report import runs_frame

ROOT = Path(__file__).resolve().parent.parent
SUITE = {
    "name": "crash",
    "dataset": "digits",
    "pairs": [{"teacher": "wrn_16_1", "student": "wrn_16_1"}],
    "methods": ["ce", "kd"],
    "fractions": [0.5],
    "seeds": [0, 1],  # 4 runs on 2 workers: a third run is half-way while the first has finished
    "recipe": {"epochs": 5, "milestones": [3], "batch_size": 64},
    "teacher": {"recipe": {"epochs": 2, "milestones": [1]}},
    "target_top1": 50,
}
RUNNING = "RUNNING"
SAME = ["dataset", "teacher", "student", "method", "fraction", "seed", "status", "spec_hash"]
TIMING = {"wall_s", "run_id"}


def command(suite_file: Path, results: Path) -> list[str]:
    return [sys.executable, "-m", "bench", "run", str(suite_file), "--results", str(results), "--executor", "ray",
            "--cpus-per-run", "1", "--no-progress"]  # fmt: skip


def run_dirs(results: Path) -> list[Path]:
    return sorted((results / "crash" / "runs").glob("*")) if (results / "crash" / "runs").exists() else []


def statuses(results: Path) -> dict[str, str]:
    """Spec hash → MLflow status, read straight from the sqlite store (WAL: readers do not block)."""
    db = results / "mlflow.db"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute(
                "SELECT t.value, r.status FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid AND t.key = 'spec_hash'"
            ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    return dict(rows)


def kill_mid_run(suite_file: Path, results: Path, log: Path) -> tuple[float, dict[str, float], dict[str, int]]:
    """Start the run, SIGKILL its process group once a run has finished (in MLflow) and another is between
    epochs. Returns the kill time, the finished runs' weight mtimes and the interrupted runs' checkpoint
    epochs."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command(suite_file, results), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
            status = statuses(results)
            finished = [h for h, s in status.items() if s == "FINISHED"]
            halfway = [d for d in run_dirs(results) if (d / "checkpoint.pt").exists() and status.get(d.name) == RUNNING]
            if finished and halfway:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = time.time()
                proc.wait(timeout=30)
                break
            time.sleep(0.05)
        else:
            raise AssertionError("timed out waiting for a finished and a half-way run")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    status = statuses(results)
    done = {d.name: (d / "student.pt").stat().st_mtime for d in run_dirs(results) if status.get(d.name) == "FINISHED"}
    epochs = {
        d.name: torch.load(d / "checkpoint.pt", weights_only=True)["epoch"]
        for d in run_dirs(results)
        if (d / "checkpoint.pt").exists() and status.get(d.name) == "RUNNING"
    }
    return killed_at, done, epochs


def reference_runs(tmp: Path) -> pd.DataFrame:
    """The same suite uninterrupted, in this process, one thread (as each Ray trial of 1 CPU), as runs.csv
    would hold it."""
    suite = parse_suite(SUITE)
    options = RunOptions(results_dir=tmp, progress=False, executor="local", cpus_per_run=1)
    assert run_suite(suite, options, log=lambda *_: None).exit_code == 0
    runs_frame(make_tracker(suite, options), expand(suite)).to_csv(tmp / "runs.csv", index=False)
    return pd.read_csv(tmp / "runs.csv")


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    suite_file = tmp_path / "crash.yaml"
    suite_file.write_text(yaml.safe_dump(SUITE))
    results = tmp_path / "results"
    killed_at, done_before, interrupted = kill_mid_run(suite_file, results, tmp_path / "first.log")
    assert done_before and interrupted and all(e >= 1 for e in interrupted.values())

    tracker = make_tracker(parse_suite(SUITE), RunOptions(results_dir=results))
    stale = {h: [r.status for r in runs] for h, runs in tracker.runs_by_hash().items()}
    assert all(stale[h] == ["RUNNING"] for h in interrupted), stale  # left RUNNING by the SIGKILL

    second = subprocess.run(command(suite_file, results), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{len(done_before)} already finished" in second.stdout
    assert "resume an unfinished MLflow run" in second.stdout

    runs = tracker.runs_by_hash()
    assert len(runs) == 4 and all(len(r) == 1 and r[0].status == "FINISHED" for r in runs.values()), runs
    for name, mtime in done_before.items():  # finished before the kill: not run again
        assert (results / "crash" / "runs" / name / "student.pt").stat().st_mtime == mtime
        assert runs[name][0].tags.get("resumed") != "true"
    for name, epoch in interrupted.items():  # resumed in the same MLflow run from its checkpoint
        run = runs[name][0]
        assert run.tags.get("resumed") == "true"
        history = tracker.client.get_metric_history(run.run_id, "test_top1")
        assert sorted({m.step for m in history}) == list(range(1, SUITE["recipe"]["epochs"] + 1))
        for m in history:  # checkpointed epochs were not trained again after the kill
            if m.step <= epoch:
                assert m.timestamp / 1000 < killed_at + 1e-3, (name, m.step, epoch)

    resumed = pd.read_csv(results / "crash" / "runs.csv")
    reference = reference_runs(tmp_path / "reference")
    assert (resumed.status == "finished").all() and len(resumed) == 4
    metrics = [c for c in reference.columns if c not in TIMING and c not in SAME and c != "error"]
    assert {"top1", "nll", "ece", "best_top1", "auc_top1", "teacher_top1"} <= set(metrics)
    pd.testing.assert_frame_equal(resumed[SAME], reference[SAME])
    pd.testing.assert_frame_equal(resumed[metrics], reference[metrics], check_exact=True)
