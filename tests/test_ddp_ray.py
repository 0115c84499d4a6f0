"""One run on two data-parallel workers through the Ray executor (Ray Train inside the Tune trial, gloo, CPU): a
digits DML suite (online: both networks data-parallel; no teacher trial to wait for) is started with
``python -m bench run``, SIGKILLed (its whole process group) between two epochs of
the run, and run again; the run resumes from its checkpoint in the same MLflow run, finishes, logs each metric
once (rank 0 alone writes MLflow), carries its parallelism tags, and matches the same suite run in one process
(same global batch; SyncBatchNorm on: only the reduction order differs). (Refusals before the start:
``test_distributed.py``.)"""
from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench.run import RunOptions, make_tracker, run_suite
from bench.run.progress import Progress
from bench.suites import expand, parse_suite

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 6  # rank 0 may outlive the kill by an epoch or two (see kill_between_epochs)
SUITE = {
    "name": "ddp",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet8", "student": "resnet8"}],
    "methods": ["dml"],
    "fractions": [0.3],  # 435 samples: batches of 64, the last (51) split 26/25 and weighted
    "seeds": [0],
    "recipe": {"epochs": EPOCHS, "milestones": [4], "batch_size": 64},
    "resources": {"workers_per_run": 2},
}
LOSS_TOLERANCE = 1e-4  # relative, first-epoch training loss: the reduction order differs, nothing else
TOP1_TOLERANCE = 1.0  # percentage points of final test top-1 (~4 of the 364 test images)


def status(results: Path, spec_hash: str) -> str | None:
    db = results / "mlflow.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT r.status FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                               "AND t.key = 'spec_hash' AND t.value = ?", (spec_hash,)).fetchone()  # fmt: skip
    except sqlite3.OperationalError:  # tables not created yet
        return None
    return row[0] if row else None


def wait_for_the_lock(path: Path, timeout: float = 120) -> None:
    """Until no process holds the spec's lock: rank 0 holds it while it lives."""
    deadline = time.time() + timeout
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, "rank 0 outlived the SIGKILL of its driver"
                time.sleep(0.05)


def kill_between_epochs(suite_file: Path, results: Path, spec_hash: str, log: Path) -> tuple[float, int]:
    """Start the suite, SIGKILL its process group once the run has checkpointed an epoch and is still RUNNING;
    returns the time rank 0 was gone and the checkpoint's epoch then. The Ray workers are not in the driver's
    process group: they die when they notice that their Ray instance did (rank 0 may finish another epoch first)."""
    checkpoint = results / "ddp" / "runs" / spec_hash / "checkpoint.pt"
    command = [sys.executable, "-m", "bench", "run", str(suite_file), "--results", str(results), "--no-progress",
               "--cpus-per-run", "1"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
            if checkpoint.exists() and status(results, spec_hash) == "RUNNING":
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                break
            time.sleep(0.05)
        else:
            raise AssertionError("timed out waiting for the run's first checkpoint:\n" + log.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_for_the_lock(checkpoint.with_name("lock"))
    return time.time(), torch.load(checkpoint, weights_only=False)["epoch"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-worker run (killed, then resumed under the Ray executor) and the same suite in one process."""
    tmp = tmp_path_factory.mktemp("ddp")
    suite_file = tmp / "ddp.yaml"
    suite_file.write_text(yaml.safe_dump(SUITE))
    suite = parse_suite(SUITE)
    (spec,) = expand(suite)
    results = tmp / "results"
    gone_at, epoch = kill_between_epochs(suite_file, results, spec.hash, tmp / "first.log")
    options = RunOptions(results_dir=results, progress=False, executor="ray", cpus_per_run=1)
    tracker = make_tracker(suite, options)
    (before,) = tracker.runs_for(spec.hash)
    reported: list[tuple[str, int]] = []  # the epochs rank 0 reported, as the driver's progress line saw them
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Progress, "epoch", lambda self, key, epoch: reported.append((key, epoch)))
        report = run_suite(suite, options, log=lambda *_: None)
    assert report.exit_code == 0 and report.finished == [spec.hash]
    one = RunOptions(results_dir=tmp / "one", progress=False, executor="local", cpus_per_run=1, workers_per_run=1)
    assert run_suite(suite, one, log=lambda *_: None).exit_code == 0
    return {"spec": spec, "tracker": tracker, "before": before, "gone_at": gone_at, "epoch": epoch,
            "one": make_tracker(suite, one), "reported": reported}  # fmt: skip


def history(tracker, run_id: str, key: str) -> list:
    return tracker.client.get_metric_history(run_id, key)


@pytest.mark.slow
def test_a_killed_two_worker_run_resumes_from_its_checkpoint_in_the_same_mlflow_run(runs):
    (run,) = runs["tracker"].runs_for(runs["spec"].hash)
    assert runs["before"].status != "FINISHED" and 1 <= runs["epoch"] < EPOCHS
    assert run.run_id == runs["before"].run_id and run.status == "FINISHED" and run.tags["resumed"] == "true"
    steps = history(runs["tracker"], run.run_id, "test_top1")
    assert sorted({m.step for m in steps}) == list(range(1, EPOCHS + 1))
    # rank 0's epochs reach the Tune trial (and the driver's progress line) as a one-process run's do
    assert runs["reported"] == [(runs["spec"].hash, e) for e in range(runs["epoch"] + 1, EPOCHS + 1)]
    for m in steps:  # the checkpointed epochs were not trained again
        if m.step <= runs["epoch"]:
            assert m.timestamp / 1000 < runs["gone_at"] + 1e-3, (m.step, runs["epoch"])


@pytest.mark.slow
def test_rank_0_alone_logs_each_metric_once_and_tags_the_parallelism(runs):
    (run,) = runs["tracker"].runs_for(runs["spec"].hash)
    (single,) = runs["one"].runs_for(runs["spec"].hash)
    assert {k: run.tags[k] for k in ("world_size", "global_batch_size", "per_worker_batch_size", "backend")} == {
        "world_size": "2", "global_batch_size": "64", "per_worker_batch_size": "32", "backend": "gloo"}  # fmt: skip
    assert run.tags["sync_bn"].startswith("on") and single.tags["sync_bn"].startswith("off")
    ours, theirs = runs["tracker"].final_metrics(run.run_id), runs["one"].final_metrics(single.run_id)
    assert set(theirs) == set(ours) and {"top1", "teacher_top1"} <= set(ours)  # DML's peer is evaluated too
    for key in ours:  # one process logs n values: 2 workers must not log 2n (an epoch re-logged after the kill: +1)
        n = len(history(runs["one"], single.run_id, key))
        assert n <= len(history(runs["tracker"], run.run_id, key)) <= n + 1, key


@pytest.mark.slow
def test_two_workers_train_what_one_process_trains_on_the_same_global_batch(runs):
    (run,) = runs["tracker"].runs_for(runs["spec"].hash)
    (single,) = runs["one"].runs_for(runs["spec"].hash)
    assert run.tags["spec_hash"] == single.tags["spec_hash"]  # the same run: world size is not in the hash
    first = {name: [m.value for m in history(t, r.run_id, "train_loss") if m.step == 1][0]
             for name, t, r in (("two", runs["tracker"], run), ("one", runs["one"], single))}  # fmt: skip
    assert first["two"] == pytest.approx(first["one"], rel=LOSS_TOLERANCE)
    top1 = runs["tracker"].final_metrics(run.run_id)["top1"], runs["one"].final_metrics(single.run_id)["top1"]
    assert abs(top1[0] - top1[1]) <= TOP1_TOLERANCE, top1
