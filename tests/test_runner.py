"""The runner in-process (local executor): failure isolation (a diverging run, a raising run), exit codes,
skip-finished, retry of failed runs in the same MLflow run, Ctrl-C, the spec lock, the progress line and
the teachers-first trial order of the Ray executor."""
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pandas as pd
import pytest
import torch.nn.functional as F
import yaml

from bench.__main__ import main
from bench.run import Outcome, RunOptions, run_suite
from bench.run.jobs import TeacherJob
from bench.run.lifecycle import spec_lock
from bench.run.progress import Progress
from bench.suites import expand, parse_suite
from bench.tracking import FINISHED, Tracker
from methods import list_methods
from methods.base import Method, register_method

INTERRUPT = {"armed": False}


@dataclass
class FlakyHparams:
    fail_at_epoch: int = 2  # 1-based epoch whose training raises


class Flaky(Method):
    """Test-only method: cross-entropy, but raises at the start of ``fail_at_epoch`` (after a checkpoint),
    or raises KeyboardInterrupt once when the test arms ``INTERRUPT``."""

    name = "flaky"
    Hparams = FlakyHparams
    teacher_mode = "none"

    def forward_train(self, x, y):
        if INTERRUPT["armed"]:
            INTERRUPT["armed"] = False
            raise KeyboardInterrupt
        if self.epoch + 1 >= self.hp.fail_at_epoch:
            raise RuntimeError(f"boom at epoch {self.epoch + 1}")
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y)}


if "flaky" not in list_methods():
    register_method(Flaky)

SUITE = {
    "name": "iso",
    "dataset": "digits",
    "pairs": [{"teacher": "wrn_16_1", "student": "wrn_16_1"}],
    "methods": [
        "ce",
        {"name": "kd", "label": "kd-diverge", "hparams": {"kd_weight": 1.0e30}},  # loss overflows: NaN
        {"name": "flaky", "label": "flaky"},
    ],
    "fractions": [0.3],
    "seeds": [0],
    "recipe": {"epochs": 2, "milestones": [1], "batch_size": 128},
    "teacher": {"recipe": {"epochs": 1, "milestones": []}},
}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iso")
    path = tmp / "iso.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    results = tmp / "results"
    code = main(["run", str(path), "--executor", "local", "--results", str(results), "--no-progress"])
    return path, results, code


def tracker_of(results) -> Tracker:
    return Tracker("iso", f"sqlite:///{results / 'mlflow.db'}", results / "mlartifacts")


def test_failures_are_isolated_recorded_with_reason_and_exit_1(first_run):
    path, results, code = first_run
    assert code == 1
    runs = pd.read_csv(results / "iso" / "runs.csv").set_index("label")
    assert runs.loc["ce", "status"] == "finished" and 0 <= runs.loc["ce", "top1"] <= 100
    assert runs.loc["kd-diverge", "status"] == "failed"
    assert runs.loc["kd-diverge", "error"].startswith("DivergenceError: training loss is")
    assert runs.loc["flaky", "status"] == "failed" and runs.loc["flaky", "error"] == "RuntimeError: boom at epoch 2"
    assert pd.isna(runs.loc["flaky", "top1"])
    table = (results / "iso" / "tables.md").read_text()
    assert "— [1 failed]" in table and "## Failed runs" in table and "boom at epoch 2" in table
    tracker = tracker_of(results)
    for label in ("kd-diverge", "flaky"):
        run = tracker.client.get_run(runs.loc[label, "run_id"])
        assert run.info.status == "FAILED" and run.data.tags["error"] == runs.loc[label, "error"]
        assert "Traceback" in (results / "iso" / "runs" / runs.loc[label, "spec_hash"] / "error.log").read_text()


def test_rerun_skips_finished_and_retries_failed_in_the_same_mlflow_run(first_run):
    path, results, _ = first_run
    suite = parse_suite(SUITE)
    tracker = tracker_of(results)
    before = {h: [r.run_id for r in runs] for h, runs in tracker.runs_by_hash().items()}
    lines: list[str] = []
    report = run_suite(suite, RunOptions(results_dir=results, progress=False), log=lines.append)
    ce, diverge, flaky = (s.hash for s in expand(suite))
    assert report.skipped == [ce] and sorted(report.failed) == sorted([diverge, flaky]) and not report.finished
    assert "3 runs, 1 already finished, 2 to run (2 resume an unfinished MLflow run)" in lines[0]
    after = tracker.runs_by_hash()
    assert {h: [r.run_id for r in runs] for h, runs in after.items()} == before  # no new MLflow run
    assert after[flaky][0].tags["resumed"] == "true"  # continued from its epoch-1 checkpoint
    assert len(tracker.client.get_metric_history(after[flaky][0].run_id, "test_top1")) == 1

    report = run_suite(suite, RunOptions(results_dir=results, progress=False, rerun=True), log=lines.append)
    assert ce in report.finished
    assert [r.status for r in tracker.runs_for(ce)] == [FINISHED, FINISHED]  # --rerun: a new MLflow run


def test_ctrl_c_marks_the_run_killed_says_how_to_resume_and_the_next_run_resumes(first_run, tmp_path, capsys):
    raw = {**SUITE, "name": "intr", "methods": [{"name": "flaky", "label": "flaky", "hparams": {"fail_at_epoch": 9}}]}
    path = tmp_path / "intr.yaml"
    path.write_text(yaml.safe_dump(raw))
    results = first_run[1]  # the same store (a new sqlite store costs seconds of migrations), another suite
    INTERRUPT["armed"] = True
    code = main(["run", str(path), "--executor", "local", "--results", str(results), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 130 and "run the same command again to resume" in captured.err, captured.out + captured.err
    tracker = Tracker("intr", f"sqlite:///{results / 'mlflow.db'}", results / "mlartifacts")
    assert len(tracker.runs_by_hash()) == 1, captured.out + captured.err
    ((run,),) = tracker.runs_by_hash().values()
    assert run.status == "KILLED" and run.tags["error"] == "interrupted"
    assert main(["run", str(path), "--executor", "local", "--results", str(results), "--no-progress"]) == 0
    ((again,),) = tracker.runs_by_hash().values()
    assert again.run_id == run.run_id and again.status == "FINISHED" and "error" not in again.tags


def test_spec_lock_waits_for_a_live_holder_and_is_freed_by_sigkill(tmp_path):
    held = threading.Event()

    def hold():
        with spec_lock(tmp_path, log=lambda *_: None):
            held.set()
            time.sleep(0.5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    messages: list[str] = []
    t0 = time.perf_counter()
    with spec_lock(tmp_path, log=messages.append):
        waited = time.perf_counter() - t0
    thread.join()
    assert waited > 0.3 and "another live process runs this spec" in messages[0]

    lock = str(tmp_path / "lock")
    code = f"import fcntl,time; f=open({lock!r},'w'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=1); time.sleep(9)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.perf_counter()
    with spec_lock(tmp_path, log=messages.append):
        assert time.perf_counter() - t0 < 1.0 and len(messages) == 1  # no wait: the dead holder's lock is gone


def test_progress_line_counts_and_eta():
    suite = parse_suite({**SUITE, "methods": ["ce"], "seeds": [0, 1, 2]})
    specs = expand(suite)
    now = [0.0]
    lines: list[str] = []
    progress = Progress("iso", specs, skipped=1, log=lines.append, clock=lambda: now[0])
    assert progress.line() == "iso: 1/4 done (1 skipped), 0 running, 0 failed, 3 pending, ETA ?"
    progress.start(specs[0].hash)
    progress.start(specs[1].hash)
    now[0] = 10.0
    progress.epoch(specs[0].hash, 1)
    progress.epoch(specs[1].hash, 1)  # 2 epochs in 10 s; 4 epochs left → 20 s
    assert progress.line() == "iso: 1/4 done (1 skipped), 2 running, 0 failed, 1 pending, ETA 20s"
    progress.epoch(specs[0].hash, 2)
    progress.end(Outcome(specs[0].hash, FINISHED, {"top1": 91.5}))
    progress.end(Outcome(specs[1].hash, "FAILED", error="DivergenceError: loss is nan"))
    assert lines[0].startswith(f"[1/3] finished {specs[0].run_name}: top-1 91.50 (10.0 s) | iso: 2/4 done")
    assert "[2/3] failed" in lines[1] and "DivergenceError: loss is nan" in lines[1]
    assert "1 failed, 1 pending" in lines[1]
    resumed = Progress("iso", specs[2:], skipped=0, clock=lambda: now[0])
    resumed.start(specs[2].hash)
    resumed.epoch(specs[2].hash, 2)  # resumed from its epoch-1 checkpoint: only one epoch trained here
    assert resumed.epochs_trained == 1 and resumed.remaining[specs[2].hash] == 0


def test_teachers_first_releases_a_student_only_after_its_teacher():
    from ray.tune.search import Searcher

    from bench.run.ray import JobList, teachers_first

    specs = expand(parse_suite({**SUITE, "methods": ["ce", "kd"], "seeds": [0, 1]}))
    kd = [s for s in specs if s.method == "kd"]
    jobs = JobList([TeacherJob(kd[0]), *specs])
    searcher = teachers_first(Searcher)(jobs)
    order = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [c["job"] for c in order] == [0, 1, 2]  # the teacher, then the two ce runs
    assert searcher.suggest("t3") is None  # the kd runs wait for the teacher
    searcher.on_trial_complete("t0", {"kdb_status": "FAILED", "kdb_error": "teacher wrn_16_1 failed: X"})
    released = [searcher.suggest("t3"), searcher.suggest("t4")]
    assert [jobs(c).method for c in released] == ["kd", "kd"]
    assert released[0]["teacher_error"] == "teacher wrn_16_1 failed: X"
    assert searcher.suggest("t5") == Searcher.FINISHED
