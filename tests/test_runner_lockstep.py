"""The fast paths through the runner change no result, bit for bit: offline runs of a suite that share
teacher, data, fraction, seed and batches train in lockstep (``share_teacher``) with the teacher-output cache,
each in its own MLflow run, and end exactly where separate runs with every fast path off end (local and Ray
executors), also after an interruption and with a diverging member."""
from dataclasses import dataclass

import pytest
import torch
import yaml

from bench.__main__ import main
from bench.data import load_dataset
from bench.run import RunOptions, make_tracker, run_suite, suite_dir
from bench.run.jobs import LockstepJob, plan_jobs
from bench.run.lifecycle import Workspace, execute, prepare_teachers
from bench.suites import expand, parse_suite
from bench.tracking import FAILED, FINISHED, KILLED, Tracker

SUITE = {
    "name": "share",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet8", "student": "resnet8"}],
    "methods": ["ce", {"kd": {"temperature": 4.0}}, {"srd": {"exponent": 4.0, "temperature": 1.0}}, "dkd"],
    "fractions": [0.3],
    "seeds": [0],
    "recipe": {"epochs": 3, "milestones": [2], "batch_size": 128},
    "teacher": {"recipe": {"epochs": 1, "milestones": []}},
}
COMPARED = ("top1", "best_top1", "nll", "ece", "train_loss")  # final metrics that must agree, bit for bit


def suite(**changes):
    return parse_suite({**SUITE, **changes})


@dataclass
class Run:
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]


def runs_of(tracker: Tracker) -> list[Run]:
    return [Run(r.info.status, r.data.tags, r.data.metrics) for r in tracker.all_runs()]


def finished_runs(results, name="share"):
    tracker = Tracker(name, f"sqlite:///{results / 'mlflow.db'}", results / "mlartifacts")
    return {r.tags["spec_hash"]: r for r in runs_of(tracker) if r.status == FINISHED}


def student_weights(results, spec_hash, name="share"):
    return torch.load(results / name / "runs" / spec_hash / "student.pt", weights_only=True)


def assert_same_results(a, b, name="share"):
    runs_a, runs_b = finished_runs(a, name), finished_runs(b, name)
    assert set(runs_a) == set(runs_b) and len(runs_a) == 4
    for spec_hash, run in runs_a.items():
        for key in COMPARED:
            if key in run.metrics:
                assert run.metrics[key] == runs_b[spec_hash].metrics[key], key
        torch.testing.assert_close(student_weights(a, spec_hash, name), student_weights(b, spec_hash, name),
                                   rtol=0, atol=0)  # fmt: skip


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    """The reference: every fast path that changes no result switched off on the command line."""
    results = tmp_path_factory.mktemp("separate")
    path = results / "share.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    code = main(["run", str(path), "--executor", "local", "--results", str(results), "--no-progress",
                 "--no-share-teacher", "--no-teacher-cache", "--no-device-data"])  # fmt: skip
    assert code == 0
    runs = finished_runs(results).values()
    assert not any("share_teacher" in r.tags for r in runs)
    assert {r.tags["data"] for r in runs} == {"uint8 tensors in host memory, one batch moved per step (cpu), "
                                              "batched augmentation"}  # fmt: skip
    return results


def test_plan_groups_the_offline_runs_of_one_teacher_and_batch_order():
    specs = expand(suite(seeds=[0, 1]))
    jobs = plan_jobs(specs, share=True)
    groups = [j for j in jobs if isinstance(j, LockstepJob)]
    assert [sorted(s.method for s in g.specs) for g in groups] == [["dkd", "kd", "srd"]] * 2
    assert {s.seed for s in groups[0].specs} == {0} and {s.seed for s in groups[1].specs} == {1}
    assert sorted(j.method for j in jobs if not isinstance(j, LockstepJob)) == ["ce", "ce"]  # no teacher
    assert plan_jobs(specs, share=False) == specs
    assert len(plan_jobs(specs, True, slots=4)) == 4  # two ce runs and two groups fill four workers
    # six parallel workers: the groups shrink until there are six jobs
    six = plan_jobs(specs, True, slots=6)
    assert len(six) == 6 and max(len(j.specs) for j in six if isinstance(j, LockstepJob)) == 2


def test_share_teacher_must_be_a_boolean():
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="share_teacher: expected true or false"):
        suite(share_teacher="yes")


@pytest.mark.parametrize("cache", [True, False])
def test_lockstep_runs_equal_separate_runs_and_are_tagged(separate, tmp_path, cache):
    report = run_suite(suite(), RunOptions(results_dir=tmp_path, progress=False, teacher_cache=cache), log=print)
    assert report.exit_code == 0 and len(report.finished) == 4
    assert_same_results(separate, tmp_path)
    runs = finished_runs(tmp_path)
    shared = [r for r in runs.values() if "share_teacher" in r.tags]
    assert sorted(r.tags["mlflow.runName"].split(":")[0] for r in shared) == ["dkd", "kd", "srd"]
    assert {r.tags["share_teacher"] for r in shared} == {"lockstep group of 3"}
    # one teacher pass per batch for the group: 430 samples = 3 batches of 128 and one of 46 an epoch, for 3
    # epochs; with the teacher cache (digits has no augmentation) the first epoch's, the 46 padded to 128 once
    # to store them at the size they are served at, and the small batch of each later epoch
    assert {r.tags["teacher_passes"] for r in shared} == {"7" if cache else "12"}
    assert {r.tags["teacher_cache"] for r in shared} == {"on" if cache else "off: disabled (--no-teacher-cache)"}
    ce = next(r for r in runs.values() if r.tags["mlflow.runName"].startswith("ce"))
    assert "share_teacher" not in ce.tags
    assert ce.tags["teacher_cache"].startswith("off: teacher mode is 'none'" if cache else "off: disabled")
    assert {r.tags["data"] for r in runs.values()} == {"uint8 tensors on the device (cpu), batched augmentation"}
    assert {r.tags["malloc_tuning"] for r in runs.values()} == {"on"}  # Linux/glibc, as this machine and CI


def test_lockstep_through_ray_equals_separate_runs(separate, tmp_path):
    options = RunOptions(results_dir=tmp_path, progress=False, executor="ray", cpus_per_run=1, live=False)
    lines = []
    report = run_suite(suite(), options, log=lines.append)
    assert report.exit_code == 0 and len(report.finished) == 4, lines
    assert any("3 runs in 1 lockstep group" in line for line in lines), lines
    assert sum(line.startswith("[") and " finished " in line for line in lines) == 4, lines
    assert_same_results(separate, tmp_path)


def test_interrupted_group_resumes_each_run_from_its_own_checkpoint(separate, tmp_path):
    """Ctrl-C during the second epoch's bookkeeping of the second run: the first run has checkpointed two
    epochs, the others one; all are KILLED, and the next `run` resumes them to the separate runs' results."""
    the_suite = suite()
    options = RunOptions(results_dir=tmp_path, progress=False)
    specs = [s for s in expand(the_suite) if s.method != "ce"]
    splits = load_dataset("digits")
    tracker = make_tracker(the_suite, options)
    teachers, _ = prepare_teachers(specs, splits, options, torch.device("cpu"), log=lambda _: None)
    teacher = teachers[specs[0].teacher_spec.hash]

    def interrupt(spec, epoch, _metrics):
        if spec is specs[1] and epoch == 1:
            raise KeyboardInterrupt

    ws = Workspace(options, splits, tracker, torch.device("cpu"), suite_dir(options, the_suite) / "runs",
                   log=lambda _: None)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        execute(specs, ws, teacher, None, on_epoch=interrupt)
    assert {r.status for s in specs for r in tracker.runs_for(s.hash)} == {KILLED}
    epochs = [torch.load(suite_dir(options, the_suite) / "runs" / s.hash / "checkpoint.pt", weights_only=True)["epoch"]
              for s in specs]  # fmt: skip
    assert epochs == [2, 1, 1]
    report = run_suite(the_suite, options, log=lambda _: None)
    assert report.exit_code == 0
    assert_same_results(separate, tmp_path)
    assert all(r.tags.get("resumed") == "true" for s in specs for r in tracker.runs_for(s.hash))


def test_a_diverging_member_fails_alone(tmp_path):
    diverging = {"name": "kd", "label": "kd-diverge", "hparams": {"kd_weight": 1.0e30}}
    the_suite = suite(methods=[{"kd": {"temperature": 4.0}}, diverging])
    report = run_suite(the_suite, RunOptions(results_dir=tmp_path, progress=False), log=lambda _: None)
    assert len(report.finished) == 1 and len(report.failed) == 1
    tracker = make_tracker(the_suite, RunOptions(results_dir=tmp_path))
    by_label = {r.tags["mlflow.runName"].split(":")[0]: r for r in runs_of(tracker)}
    assert by_label["kd"].status == FINISHED and by_label["kd"].tags["share_teacher"] == "lockstep group of 2"
    assert by_label["kd-diverge"].status == FAILED and "DivergenceError" in by_label["kd-diverge"].tags["error"]
    spec = next(s for s in expand(the_suite) if s.label == "kd-diverge")
    assert "DivergenceError" in (tmp_path / "share" / "runs" / spec.hash / "error.log").read_text()
