"""End to end through the CLI: a tiny digits suite runs, is tracked in MLflow, and yields the tables."""
import pandas as pd
import pytest

from tests.conftest import bench_cli as bench

REQUIRED = "dataset,teacher,student,method,fraction,seed,status,top1,top5,nll,ece,best_top1,epochs_to_target,wall_s"


@pytest.fixture(scope="module")
def finished_suite(tiny_suite_run):
    return tiny_suite_run


def test_run_writes_runs_csv_tables_and_plot(finished_suite):
    _, results, proc = finished_suite
    runs = pd.read_csv(results / "tiny" / "runs.csv")
    assert set(REQUIRED.split(",")) <= set(runs.columns)
    assert len(runs) == 6 and (runs.status == "finished").all()
    assert runs.top1.between(0, 100).all() and (runs.best_top1 >= runs.top1).all()
    kd = runs[runs.method == "kd"]
    assert kd.teacher_top1.notna().all() and runs[runs.method == "ce"].teacher_top1.isna().all()
    table = (results / "tiny" / "tables.md").read_text()
    assert "| resnet8→resnet8 | 0.5 |" in table and "best epoch" in table and "Against the published numbers" in table
    assert (results / "tiny" / "convergence.png").stat().st_size > 1000
    assert "Test top-1" in proc.stdout  # the table is printed at the end


def test_every_run_is_in_mlflow_with_params_tags_and_curves(finished_suite, monkeypatch):
    import mlflow

    _, results, _ = finished_suite
    # not mlflow.set_tracking_uri: it would leak into every later test of this process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{results / 'mlflow.db'}")
    frame = mlflow.search_runs(experiment_names=["tiny"])
    assert len(frame) == 6 and set(frame.status) == {"FINISHED"}
    assert frame["tags.spec_hash"].nunique() == 6 and frame["tags.git_commit"].notna().all()
    assert set(frame["params.method"]) == {"ce", "kd"}
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(frame.run_id.iloc[0], "test_top1")
    assert sorted(m.step for m in history) == [1, 2]


def test_second_run_skips_finished_work_and_keeps_the_table(finished_suite):
    suite, results, _ = finished_suite
    before = pd.read_csv(results / "tiny" / "runs.csv")
    proc = bench("run", str(suite), "--results", str(results), "--executor", "local")
    assert proc.returncode == 0 and "6 already finished, 0 to run" in proc.stdout
    after = pd.read_csv(results / "tiny" / "runs.csv")
    pd.testing.assert_frame_equal(before, after)


def test_tables_command_rebuilds_from_mlflow(finished_suite):
    suite, results, _ = finished_suite
    (results / "tiny" / "tables.md").unlink()
    proc = bench("tables", str(suite), "--results", str(results))
    assert proc.returncode == 0 and (results / "tiny" / "tables.md").exists()
