"""Calibration: ECE and reliability bins vs brute force, temperature scaling, calibration tables and diagrams."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.calibration import final_calibration, fit_temperature
from bench.report.calibration import bins_ece, calibration_sections, plot_reliability, pool_bins, reliability_path
from bench.engine import Task
from bench.metrics import expected_calibration_error, reliability_bins
from bench.suites import parse_suite
from bench.report.frame import RUN_COLUMNS


def test_ece_is_zero_for_a_calibrated_model_over_several_bins():
    # 100 samples at confidence 0.8 (80 correct) and 100 at 0.6 (60 correct): two bins, both exact
    logits = torch.tensor([[math.log(4.0), 0.0]] * 100 + [[math.log(1.5), 0.0]] * 100)
    targets = torch.tensor([0] * 80 + [1] * 20 + [0] * 60 + [1] * 40)
    assert expected_calibration_error(logits, targets) == pytest.approx(0.0, abs=1e-4)
    bins = reliability_bins(logits, targets)
    assert sorted(n for n in bins["count"] if n) == [100, 100]
    # and a miscalibrated one: every prediction at 0.8 while only half are right -> ECE = 30 %
    assert expected_calibration_error(logits[:100], torch.tensor([0, 1] * 50)) == pytest.approx(30.0, abs=1e-3)


def brute_force_bins(logits, targets, n_bins):
    """Loop over samples: bin b holds confidences in (b/n, (b+1)/n] (bin 0 also takes 0)."""
    probs = logits.softmax(1)
    members = [[] for _ in range(n_bins)]
    for i in range(len(targets)):
        conf = float(probs[i].max())
        correct = float(int(probs[i].argmax()) == int(targets[i]))
        b = next(b for b in range(n_bins) if conf <= (b + 1) / n_bins)
        members[b].append((conf, correct))
    return members


@pytest.mark.parametrize("n_bins", [15, 10])
def test_reliability_bins_and_ece_match_a_brute_force_loop(n_bins):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 6, generator=g) * 2.5
    targets = torch.randint(0, 6, (400,), generator=g)
    members = brute_force_bins(logits, targets, n_bins)
    bins = reliability_bins(logits, targets, n_bins)
    ece = 0.0
    for b, m in enumerate(members):
        assert bins["count"][b] == len(m)
        if m:
            conf = sum(c for c, _ in m) / len(m)
            acc = sum(a for _, a in m) / len(m)
            assert bins["confidence"][b] == pytest.approx(conf, abs=1e-5)
            assert bins["accuracy"][b] == pytest.approx(acc, abs=1e-6)
            ece += len(m) / len(targets) * abs(acc - conf)
    assert expected_calibration_error(logits, targets, n_bins) == pytest.approx(100 * ece, abs=1e-4)
    assert bins_ece(bins) == pytest.approx(100 * ece, abs=1e-4)


def test_pooled_bins_equal_the_bins_of_the_pooled_predictions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 4, generator=g) * 3
    targets = torch.randint(0, 4, (300,), generator=g)
    parts = [reliability_bins(logits[a:b], targets[a:b]) for a, b in [(0, 50), (50, 220), (220, 300)]]
    pooled, whole = pool_bins(parts), reliability_bins(logits, targets)
    for key in ("count", "confidence", "accuracy"):
        assert pooled[key] == pytest.approx(whole[key], abs=1e-6)


def overconfident(n: int, scale: float, seed: int):
    """Labels drawn from softmax(z) (a calibrated model) and the model's logits scale·z (over-confident)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g) * 1.5
    targets = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * scale, targets


def test_temperature_scaling_recovers_the_scale_and_lowers_nll_and_ece():
    logits, targets = overconfident(4000, 3.0, seed=2)
    temperature = fit_temperature(logits, targets)
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert F.cross_entropy(logits / temperature, targets) < F.cross_entropy(logits, targets) - 0.1
    assert expected_calibration_error(logits / temperature, targets) < expected_calibration_error(logits, targets) / 2


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _task(with_val: bool) -> Task:
    test = [overconfident(500, 1.0, seed=3)]  # predict() only iterates (x, y) batches
    loaders = {"test": test, **({"val": [overconfident(2000, 1.0, seed=4)]} if with_val else {})}
    return Task(train_loader=None, eval_loaders=loaders, device=torch.device("cpu"), seed=0)


def test_final_calibration_fits_on_val_and_reports_test_ece(tmp_path):
    method = SimpleNamespace(student=Scale(3.0))  # a calibrated model made 3x over-confident
    metrics, files = final_calibration(method, _task(with_val=True), tmp_path / "run")
    assert metrics["temperature_ts"] == pytest.approx(3.0, rel=0.2)
    logits, targets = _task(False).eval_loaders["test"][0]
    assert metrics["ece_ts"] < expected_calibration_error(logits * 3.0, targets)
    assert metrics["nll_ts"] < F.cross_entropy(logits * 3.0, targets).item()
    assert files == [tmp_path / "run" / "reliability.json"]
    assert json.loads(files[0].read_text()) == reliability_bins(logits * 3.0, targets)


def test_final_calibration_without_val_fits_nothing(tmp_path):
    metrics, files = final_calibration(SimpleNamespace(student=Scale(3.0)), _task(with_val=False), tmp_path)
    assert metrics == {} and files[0].exists()


SUITE = {
    "name": "cal", "dataset": "digits", "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
    "methods": ["ce", "kd", "dml"], "fractions": [1.0], "seeds": [0, 1],
}  # fmt: skip


def _frame(tmp_path: Path) -> pd.DataFrame:
    rows = []
    g = torch.Generator().manual_seed(5)
    for method, top1, ece, teacher in [("dml", 74, 2, 78.0), ("kd", 72, 3, 80.0), ("ce", 70, 5, None)]:
        for seed in (0, 1):
            spec_hash = f"{method}{seed}"
            folder = tmp_path / "runs" / spec_hash
            folder.mkdir(parents=True)
            logits = torch.randn(200, 10, generator=g) * (3 if method == "ce" else 1)
            (folder / "reliability.json").write_text(json.dumps(reliability_bins(logits, torch.zeros(200).long())))
            rows.append({
                "teacher": "resnet14", "student": "resnet8", "method": method, "label": method, "fraction": 1.0,
                "seed": seed, "status": "finished", "top1": top1 + seed, "ece": ece, "teacher_top1": teacher,
                "teacher_ece": 1.5 if method == "dml" else None, "spec_hash": spec_hash, "run_id": "none",
            })  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=[*RUN_COLUMNS, "teacher_ece"])  # as bench.report.runs_frame


def test_calibration_sections_put_accuracy_and_ece_side_by_side(tmp_path):
    from bench.report.tables import markdown

    suite = parse_suite(SUITE)
    text = "\n".join(calibration_sections(_frame(tmp_path), suite))
    assert "| resnet14→resnet8 | 1 | 70.50 ± 0.71 / 5.00 ± 0.00 | 72.50 ± 0.71 / 3.00 ± 0.00 |" in text
    assert "## Online teachers" in text and "| resnet14→resnet8 | 1 | 78.00 ± 0.00 / 1.50 ± 0.00 |" in text
    assert "temperature scaling: not run" in text
    # the main tables' teacher column shows the offline teacher (kd's), not dml's co-trained one
    assert "| resnet14→resnet8 | 1 | 80.00 |" in markdown(_frame(tmp_path / "again"), suite)


def test_reliability_diagram_from_run_folders_when_mlflow_has_no_artifact(tmp_path):
    class NoArtifacts:
        def download_artifacts(self, run_id, path, dst):
            raise OSError("no artifact store")

    suite = parse_suite(SUITE)
    written = plot_reliability(SimpleNamespace(client=NoArtifacts()), _frame(tmp_path), suite, tmp_path)
    assert written == [reliability_path(tmp_path, "resnet14", "resnet8")]
    assert written[0] == tmp_path / "reliability-resnet14-resnet8.png"
    assert written[0].stat().st_size > 5000


@pytest.mark.slow
def test_suite_run_logs_calibration_and_tables_rebuild_from_mlflow(tmp_path):
    """A tiny online suite through the runner: ece_ts and the online teacher are recorded, and the
    reliability diagram is rebuilt from the MLflow artifacts alone (run folders' copies removed)."""
    from bench.run import RunOptions, make_tracker, run_suite, suite_dir
    from bench.report.tables import write_tables

    raw = {**SUITE, "methods": ["ce", "bdkd"], "fractions": [0.1], "seeds": [0],
           "pairs": [{"teacher": "resnet8", "student": "resnet8"}],
           "recipe": {"epochs": 1, "milestones": [], "batch_size": 64, "val_fraction": 0.2}}  # fmt: skip
    suite = parse_suite(raw)
    options = RunOptions(results_dir=tmp_path, progress=False)
    report = run_suite(suite, options, log=lambda *_: None)
    assert report.exit_code == 0 and len(report.finished) == 2
    out = suite_dir(options, suite)
    for path in out.glob("runs/*/reliability.json"):
        path.unlink()
    frame = write_tables(suite, make_tracker(suite, options), out)
    assert frame.ece_ts.notna().all() and frame.temperature_ts.gt(0).all()
    bdkd = frame[frame.method == "bdkd"].iloc[0]
    assert 0 <= bdkd.teacher_top1 <= 100 and 0 <= bdkd.teacher_ece <= 100
    assert frame[frame.method == "ce"].teacher_top1.isna().all()
    assert (out / "reliability-resnet8-resnet8.png").stat().st_size > 5000
    table = (out / "tables.md").read_text()
    assert "## Online teachers" in table and "Post-hoc temperature scaling (T fitted" in table
