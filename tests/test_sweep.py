"""Sweeps: the `sweep:` schema (one-line errors naming the field), trial specs from Tune configs, selection
on validation only, the sensitivity table, and one tiny sweep end to end through Ray Tune with ASHA."""
import math

import pandas as pd
import pytest
import yaml

from bench.__main__ import main
from bench.errors import BenchError
from bench.run import Outcome
from bench.suites import parse_suite
from bench.report.sweep import SweepReport, markdown, sensitivity, trial_frame
from bench.sweep import SweepResolver, parse_sweep, select_best

BASE = {
    "name": "sw",
    "dataset": "digits",
    "pairs": [{"teacher": "wrn_16_1", "student": "wrn_16_1"}],
    "methods": ["ce", "kd"],
    "fractions": [0.3],
    "seeds": [0],
    "recipe": {"epochs": 2, "milestones": [1], "batch_size": 128},
    "teacher": {"recipe": {"epochs": 1, "milestones": []}},
}


def sweep_of(**section):
    return parse_sweep(parse_suite({**BASE, "sweep": section}))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"space": {"temperature": {"grid": [1, 2]}}, "metric": "test_top1"},
         "sweep.metric: must be a metric of the validation split"),
        ({"space": {"temprature": {"grid": [1, 2]}}},
         "sweep.space.temprature: method 'kd' has no hyperparameter 'temprature' "
         "(known: ce_weight, kd_weight, temperature)"),
        ({"space": {"recipe.epochs": {"grid": [1, 2]}}}, "sweep.space.recipe.epochs: recipe.epochs cannot be swept"),
        ({"space": {"temperature": {"grid": [1, -2]}}}, "sweep.space.temperature.grid[1].temperature: must be > 0"),
        ({"space": {"temperature": {"range": [1, 2]}}}, "sweep.space.temperature: expected one of {grid: [...]}"),
        ({"space": {"temperature": {"loguniform": [0, 2]}}}, "sweep.space.temperature.loguniform: low must be > 0"),
        ({"space": {"recipe.augment": {"uniform": [0, 2]}}},
         "sweep.space.recipe.augment.uniform: recipe.augment is not numeric"),
        ({"space": {"ce_weight,kd_weight": {"grid": [[0.5, 0.5], [1.0]]}}},
         "sweep.space.ce_weight,kd_weight.grid[1]: expected a list of 2 values (ce_weight, kd_weight)"),
        ({"space": {"ce_weight,kd_weight": {"uniform": [0, 1]}}}, "tied hyperparameters take grid or choice values"),
        ({"space": {"temperature": {"grid": [1]}}, "method": "dkd"}, "sweep.method: 'dkd' is not a method label"),
        ({"space": {"temperature": {"grid": [1]}}, "fraction": 0.5}, "sweep.fraction: 0.5 is not one of"),
        ({"space": {"temperature": {"grid": [1]}}, "asha": {"grace_period": 3}}, "sweep.asha.grace_period: must be <="),
        ({"space": {"temperature": {"grid": [1]}}, "mode": "maximum"}, "sweep.mode: must be one of ['max', 'min']"),
        ({"space": {"temperature": {"grid": [1]}}, "spce": 1}, "sweep: unknown key 'spce'"),
        ({"space": {}}, "sweep.space: must be a non-empty mapping"),
    ],
)
def test_sweep_section_errors_name_the_field(section, message):
    with pytest.raises(BenchError) as err:
        sweep_of(**section)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_suite_without_sweep_section_says_so():
    with pytest.raises(BenchError, match="no `sweep:` section"):
        parse_sweep(parse_suite(BASE))


def test_trial_specs_carry_the_sampled_values_and_the_validation_split():
    sweep = sweep_of(
        space={"temperature": {"grid": [1, 8]}, "ce_weight,kd_weight": {"choice": [[0.5, 0.5], [0.0, 1.0]]},
               "recipe.lr": {"loguniform": [0.01, 0.1]}, "recipe.batch_size": {"uniform": [32, 64]}},
        seeds=[3, 4], num_samples=2, val_fraction=0.25,
    )  # fmt: skip
    assert sweep.num_trials == 2 * 2 * 2 and sweep.base.label == "kd"  # grid × seeds × samples
    assert sweep.dims[3].integer and not sweep.dims[2].integer
    spec = SweepResolver(sweep)({"seed": 4, "p0": 8, "p1": [0.0, 1.0], "p2": 0.02, "p3": 40.0})
    assert spec.hparams == {"temperature": 8.0, "ce_weight": 0.0, "kd_weight": 1.0}
    assert (spec.recipe.lr, spec.recipe.batch_size, spec.recipe.val_fraction, spec.seed) == (0.02, 40, 0.25, 4)
    assert spec.label == "kd[temperature=8,ce_weight=0,kd_weight=1,lr=0.02,batch_size=40]"
    assert spec.teacher_spec == sweep.base.teacher_spec  # the suite's teacher, whatever the student's recipe


def synthetic(sweep, rows):
    outcomes = [
        Outcome(f"h{i}", status, {"val_top1": v, "epoch": 2.0, "top1": 99.0} if v is not None else {}, config=c)
        for i, (c, status, v) in enumerate(rows)
    ]

    class NoRuns:
        def finished_run(self, key):
            return None

        def runs_for(self, key):
            return []

    return trial_frame(sweep, outcomes, NoRuns())


def test_selection_uses_validation_means_over_seeds_and_the_sensitivity_table():
    sweep = sweep_of(space={"temperature": {"grid": [1, 4]}}, seeds=[0, 1])
    rows = [({"seed": 0, "p0": 1}, "FINISHED", 90.0), ({"seed": 1, "p0": 1}, "FINISHED", 80.0),
            ({"seed": 0, "p0": 4}, "FINISHED", 88.0), ({"seed": 1, "p0": 4}, "FINISHED", 86.0),
            ({"seed": 2, "p0": 4}, "FAILED", None)]  # fmt: skip
    trials = synthetic(sweep, rows)
    assert "top1" not in trials and not [c for c in trials if c.startswith("test")]  # no test metric at all
    best = select_best(sweep, trials)
    assert best["values"] == {"temperature": 4} and best["mean"] == 87.0 and best["n"] == 2  # not the single 90
    table = sensitivity(sweep, trials, sweep.dims[0])
    assert "| 1 | 2 | 85.00 ± 7.07 | 90.00 | 0 / 0 |" in table and "| 4 | 2 | 87.00 ± 1.41 | 88.00 | 0 / 1 |" in table
    text = markdown(parse_suite({**BASE, "sweep": {"space": {"temperature": {"grid": [1, 4]}}}}), sweep,
                    SweepReport(trials, best, pd.DataFrame(columns=["config"])))  # fmt: skip
    assert "`kd[temperature=4]`: val_top1 87.00 (mean of 2 trial(s))" in text and "## Failed trials" in text
    minimise = sweep_of(space={"temperature": {"grid": [1, 4]}}, seeds=[0, 1], metric="val_nll", mode="min")
    nll = synthetic(minimise, [({"seed": 0, "p0": 1}, "FINISHED", None), ({"seed": 0, "p0": 4}, "STOPPED", 1.0)])
    assert select_best(minimise, nll) is None  # nothing finished with a value: nothing to select


@pytest.mark.slow
def test_tiny_sweep_end_to_end_with_asha(tmp_path):
    suite = {**BASE, "sweep": {"space": {"temperature": {"grid": [1, 4]}, "recipe.lr": {"loguniform": [0.02, 0.1]}},
                               "asha": {"grace_period": 1, "reduction_factor": 2}, "val_fraction": 0.3}}  # fmt: skip
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    results = tmp_path / "results"
    code = main(["sweep", str(path), "--results", str(results), "--cpus-per-run", "1", "--no-progress"])
    assert code == 0
    trials = pd.read_csv(results / "sw" / "sweep.csv")
    assert len(trials) == 2 and set(trials.status) <= {"finished", "stopped"} and (trials.status == "finished").any()
    assert not [c for c in trials if c.startswith("test") or c == "top1"] and trials.run_id.notna().all()
    assert trials["recipe.lr"].between(0.02, 0.1).all() and set(trials.temperature) == {1, 4}
    done = trials[trials.status == "finished"]
    best = done.loc[done.val_top1.idxmax()]
    text = (results / "sw" / "sweep.md").read_text()
    assert f"`kd[temperature={best.temperature:g},lr={best['recipe.lr']:.4g}]`" in text
    assert "## Sensitivity: val_top1 by temperature" in text and "## On test" in text
    assert (results / "sw" / "sweep.png").stat().st_size > 5000

    from bench.tracking import Tracker

    uri = f"sqlite:///{results / 'mlflow.db'}"
    search = Tracker("sw-sweep", uri, results / "mlartifacts").search()
    assert set(search["params.recipe.val_fraction"]) == {"0.3"} and len(search) == 2
    final = Tracker("sw", uri, results / "mlartifacts").search()
    tuned = final[final["params.label"] == "kd (tuned)"]
    assert len(tuned) == 1 and tuned.status.iloc[0] == "FINISHED"
    assert tuned["params.recipe.val_fraction"].iloc[0] == "0.0"  # re-run on the whole training set
    assert math.isclose(float(tuned["params.recipe.lr"].iloc[0]), best["recipe.lr"], rel_tol=1e-9)
    assert float(tuned["params.hp.temperature"].iloc[0]) == best.temperature
    assert (final["params.label"] == "kd").sum() == 1  # the suite's own config on the same seeds
