"""Two `bench run` of one suite started together on a fresh results folder share the work: both exit 0, both
print the same table, every spec has exactly one MLflow run and it is FINISHED, the teacher is trained once.

Two real processes; a race needs repetition to show, so each process runs the CLI (``bench.__main__.main``, the
code `python -m bench run` executes) on several fresh folders in a row, the two meeting at a barrier before
each one (so they start within milliseconds, and the imports are paid once per process)."""
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import yaml

from bench.suites import expand, parse_suite
from bench.tracking import FINISHED, Tracker

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3
SUITE = {
    "name": "twice",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet8", "student": "resnet8"}],
    "methods": ["ce", {"kd": {"temperature": 4.0}}],
    "fractions": [0.2],
    "seeds": [0, 1],
    "recipe": {"epochs": 1, "batch_size": 64, "lr": 0.05, "milestones": []},
    "teacher": {"seed": 0, "fraction": 0.2, "recipe": {"epochs": 1, "milestones": []}},
}


def worker(suite: str, root: str, repeats: int, me: str, executor: str) -> None:
    """One of the two processes: for each repetition, meet the other at a barrier, then run the suite on the
    repetition's fresh folder; its exit code and stdout go to ``rep<i>-<me>.json``."""
    from bench.__main__ import main

    base = Path(root)
    for i in range(repeats):
        (base / f"ready-{i}-{me}").touch()
        deadline = time.time() + 300
        while len(list(base.glob(f"ready-{i}-*"))) < 2 and time.time() < deadline:
            time.sleep(0.005)
        out = StringIO()
        with redirect_stdout(out):
            code = main(["run", suite, "--executor", executor, "--results", str(base / f"rep{i}"), "--no-progress",
                         "--cpus-per-run", "1"])  # fmt: skip
        (base / f"rep{i}-{me}.json").write_text(json.dumps({"code": code, "stdout": out.getvalue()}))


def table_of(stdout: str) -> str:
    """The printed tables.md (from its title to the closing ``wrote ...`` line)."""
    start = stdout.index("# Suite `twice`")
    return stdout[start : stdout.index("\nwrote ", start)]


def check_two(tmp_path: Path, suite: Path, procs, repeats: int) -> None:
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    specs = expand(parse_suite(yaml.safe_load(suite.read_text()), suite))
    for i in range(repeats):
        results = [json.loads((tmp_path / f"rep{i}-{me}.json").read_text()) for me in "ab"]
        assert [r["code"] for r in results] == [0, 0], (i, logs, [r["stdout"][-3000:] for r in results])
        assert table_of(results[0]["stdout"]) == table_of(results[1]["stdout"]), i
        folder = tmp_path / f"rep{i}"
        tracker = Tracker("twice", f"sqlite:///{folder / 'mlflow.db'}", folder / "mlartifacts")
        runs = tracker.runs_by_hash()
        assert sorted(runs) == sorted(s.hash for s in specs), i
        for spec in specs:  # exactly one MLflow run per spec, finished
            assert [r.status for r in runs[spec.hash]] == [FINISHED], (i, spec.run_name, runs[spec.hash])
        assert len(list((folder / "teachers").glob("*/teacher.pt"))) == 1


def start_workers(tmp_path: Path, executor: str, repeats: int):
    suite = tmp_path / "twice.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = "import sys; from tests.test_two_at_once import worker; worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(suite), str(tmp_path), str(repeats), me, executor],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for me in "ab"]  # fmt: skip
    return procs, suite


@pytest.mark.slow
def test_two_local_runs_at_once_share_the_work(tmp_path):
    procs, suite = start_workers(tmp_path, "local", REPEATS)
    check_two(tmp_path, suite, procs, REPEATS)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KDBENCH_TEST_RAY_TWICE") != "1",
                    reason="two Ray instances at once take minutes on 2 cores: KDBENCH_TEST_RAY_TWICE=1 runs it")  # fmt: skip
def test_two_ray_runs_at_once_share_the_work(tmp_path):
    """The default executor: each process starts its own local Ray; they share the results folder (specs, teacher,
    MLflow store, Tune state)."""
    procs, suite = start_workers(tmp_path, "ray", 1)
    check_two(tmp_path, suite, procs, 1)
