"""The verdict tables, summary.csv and the suite summary on a frame of runs whose numbers are set by hand; the
suite keys they read (baseline, tolerance, references with an epoch or a convergence figure)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from bench.errors import BenchError
from bench.report.cells import mean_ci_text
from bench.report.frame import RUN_COLUMNS, produced_by
from bench.report.summary import method_summaries, summary_section
from bench.report.tables import markdown
from bench.report.verdicts import (
    SUMMARY_COLUMNS,
    baseline_table,
    convergence_reference_table,
    reference_table,
    summary_frame,
    verdict,
)
from bench.suites import parse_suite

SUITE = {
    "name": "hand",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet20", "student": "resnet8",
               "reference": {"kd": {"top1": 95.0, "source": "Paper T1", "epoch": "final"}, "student": 90.0,
                             "dkd": {"epochs_to_target": 5, "speedup": 2.0, "source": "Paper F3"}}}],
    "methods": ["ce", "kd", "dkd"],
    "fractions": [0.4, 1.0],
    "seeds": [0, 1, 2],
    "recipe": {"epochs": 10, "milestones": [5]},
    "target_top1": 90,
    "reference_sources": {"student": {"source": "Paper T1", "protocol": "best of 5 runs"}},
}  # fmt: skip
# final top-1 per (label, fraction): one value per seed
TOP1 = {("ce", 1.0): [90.0, 91.0, 92.0], ("kd", 1.0): [93.0, 95.0, 94.0], ("dkd", 1.0): [96.0, 97.0, 98.0],
        ("ce", 0.4): [80.0, 81.0, 82.0], ("kd", 0.4): [85.0, 84.0, 86.0], ("dkd", 0.4): [87.0]}  # fmt: skip
EPOCHS = {"ce": [8.0, 9.0, 10.0], "kd": [8.0, 8.0, 6.0], "dkd": [4.0, 4.0, 3.0]}


def frame_of(top1=TOP1) -> pd.DataFrame:
    rows = []
    for (label, fraction), values in top1.items():
        for seed, value in enumerate(values):
            rows.append({"suite": "hand", "dataset": "digits", "teacher": "resnet20", "student": "resnet8",
                         "method": label, "label": label, "fraction": fraction, "seed": seed, "status": "finished",
                         "top1": value, "best_top1": value + 1.0, "ece": 2.0, "nll": 0.3, "auc_top1": value - 5,
                         "epochs_to_target": EPOCHS[label][seed], "teacher_top1": 97.0 if label != "ce" else None,
                         "git_commit": "abc123def456", "git_dirty": "false", "torch_version": "2.14.1",
                         "device": "cpu", "device_name": "AMD EPYC", "device_count": "2"})  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=RUN_COLUMNS)


@pytest.fixture
def suite():
    return parse_suite(SUITE)


def test_verdict_rules():
    assert verdict(95.2, 94.0, 96.0, 95.0, 0.3) == "reproduced"  # within the tolerance
    assert verdict(94.0, 93.0, 95.5, 95.0, 0.3) == "reproduced"  # outside it, but inside our interval
    assert verdict(94.0, 93.5, 94.5, 95.0, 0.3) == "below"
    assert verdict(96.0, 95.5, 96.5, 95.0, 0.3) == "above"
    assert verdict(95.2, math.nan, math.nan, 95.0, 0.3) == "reproduced"  # one seed: the tolerance alone
    assert verdict(94.0, math.nan, math.nan, 95.0, 0.3) == "below"


def test_the_vs_baseline_table_is_the_paired_difference_by_seed(suite):
    table = baseline_table(frame_of(), suite)
    row = next(line for line in table.splitlines() if "| 1 |" in line)
    # ce − kd = [−3, −4, −2]: mean −3, sd 1 → ±4.30/√3; dkd − kd = [3, 2, 4]: +3
    half = st.t.ppf(0.975, 2) / math.sqrt(3)
    assert f"-3.00 [{-3 - half:+.2f}, {-3 + half:+.2f}] ▼" in row
    assert f"+3.00 [{3 - half:+.2f}, {3 + half:+.2f}] ▲" in row
    short = next(line for line in table.splitlines() if "| 0.4 |" in line)
    assert "+2.00 (n=1, no CI) (1/3 paired)" in short  # dkd ran one seed at 0.4: no interval, not ± 0
    same = {**TOP1, ("ce", 0.4): [84.0, 83.0, 85.0]}  # ce − kd = −1 on every seed: no spread, no mark
    short = next(line for line in baseline_table(frame_of(same), suite).splitlines() if "| 0.4 |" in line)
    assert "| -1.00 (the same on each seed) |" in short


def test_the_reference_table_compares_at_the_references_epoch_and_gives_verdicts(suite):
    table = reference_table(frame_of(), suite)
    kd = next(line for line in table.splitlines() if "| kd |" in line)
    assert "94.00 [" in kd and "(final)" in kd and "| 95.00 | -1.00 | **reproduced** |" in kd  # 95 inside the CI
    student = next(line for line in table.splitlines() if "| student |" in line)
    # ce best epoch = 92 ± 1 → [89.5, 94.5] excludes... no: 90 lies inside, so reproduced
    assert "(best)" in student and "| 90.00 | +2.00 | **reproduced** | Paper T1; best of 5 runs |" in student


def test_a_reference_outside_tolerance_and_interval_is_below(suite):
    tight = {**TOP1, ("kd", 1.0): [93.0, 93.1, 93.2]}
    kd = next(line for line in reference_table(frame_of(tight), suite).splitlines() if "| kd |" in line)
    assert "**below**" in kd


def test_convergence_references(suite):
    table = convergence_reference_table(frame_of(), suite)
    epochs = next(line for line in table.splitlines() if "epochs to 90 %" in line)
    assert "3.7 [" in epochs and "| 5 | **reproduced** |" in epochs  # 11/3 ± → the interval holds 5
    speed = next(line for line in table.splitlines() if "speed-up vs kd" in line)
    # kd / dkd per seed = 2, 2, 2: geometric mean 2 with a zero-width interval; the claim of 2× is reproduced
    assert "×2.00 [2.00, 2.00] (3 seeds reached both) | ×2 | **reproduced** | Paper F3 |" in speed


def test_summary_csv_has_exactly_the_issues_columns_and_the_numbers(suite):
    out = summary_frame(frame_of(), suite)
    assert list(out.columns) == SUMMARY_COLUMNS == [
        "teacher", "student", "method", "fraction", "n_seeds", "top1_mean", "top1_std", "top1_ci_low", "top1_ci_high",
        "baseline", "delta", "delta_ci_low", "delta_ci_high", "reference", "reference_source", "reference_delta",
        "verdict"]  # fmt: skip
    ce = out[(out.method == "ce") & (out.fraction == 1.0)].iloc[0]
    low, high = st.t.interval(0.95, 2, loc=91.0, scale=st.sem([90.0, 91.0, 92.0]))
    assert (ce.n_seeds, ce.top1_mean, ce.top1_std) == (3, 91.0, 1.0)
    assert (ce.top1_ci_low, ce.top1_ci_high) == pytest.approx((low, high))
    assert ce.baseline == "kd" and ce.delta == pytest.approx(-3.0) and ce.delta_ci_high < 0
    assert ce.reference == 90.0 and ce.verdict == "reproduced" and "ours at the best epoch" in ce.reference_source
    kd = out[(out.method == "kd") & (out.fraction == 1.0)].iloc[0]
    assert math.isnan(kd.delta) and kd.reference_delta == pytest.approx(-1.0)
    dkd = out[(out.method == "dkd") & (out.fraction == 0.4)].iloc[0]
    assert dkd.n_seeds == 1 and math.isnan(dkd.top1_ci_low) and math.isnan(dkd.top1_std)
    assert out[out.fraction == 0.4].reference.isna().all()  # references are for the largest fraction


def test_the_suite_summary(suite):
    by = {s.label: s for s in method_summaries(frame_of(), suite)}
    assert by["dkd"].improve[0] == 1.0 and by["dkd"].improve_cells == 2  # every dkd seed beats every kd seed
    assert by["ce"].improve == (0.0, 0.0, 0.0) and math.isnan(by["kd"].improve[0])
    assert by["dkd"].first[0] == 1.0 and by["ce"].first[0] == 0.0  # dkd has the highest mean in both cells
    pooled = np.array(TOP1[("kd", 1.0)] + TOP1[("kd", 0.4)])
    assert by["kd"].iqm[0] == pytest.approx(st.trim_mean(pooled, 0.25)) and by["kd"].cells == 2
    assert by["kd"].iqm[1] <= by["kd"].iqm[0] <= by["kd"].iqm[2]
    assert "| dkd | 1.00 [1.00, 1.00] | 2 |" in summary_section(list(by.values()), suite)


def test_tables_md_embeds_its_pictures_and_ends_with_what_produced_it(suite):
    text = markdown(frame_of(), suite, summary="SUMMARY")
    for picture in ("(convergence.png)", "(reliability-resnet20-resnet8.png)", "(summary.png)"):
        assert f"]{picture}" in text
    assert "## vs baseline" in text and "## Against the published numbers" in text
    last = text.strip().splitlines()[-1]
    assert last == produced_by(frame_of())
    assert "commit abc123def456 (clean)" in last and "AMD EPYC (CPU, 2 cores)" in last and "torch 2.14.1" in last


def test_ci_cells_and_a_single_seed(suite):
    text = markdown(frame_of(), suite, ci=True)
    assert "Cells: mean and 95 % Student-t interval" in text and "87.00 (n=1, no CI) (1/3)" in text
    assert mean_ci_text(pd.Series([1.0, 2.0, 3.0])).startswith("2.00 [")


@pytest.mark.parametrize(
    "change,expected",
    [({}, "kd"), ({"methods": ["ce", "dkd"]}, "ce"), ({"methods": ["dkd"]}, None), ({"baseline": "dkd"}, "dkd")],
)
def test_the_baseline_defaults_to_kd_then_ce(change, expected):
    bare = {**SUITE, "pairs": [{"teacher": "resnet20", "student": "resnet8"}], "reference_sources": {}}
    assert parse_suite({**bare, **change}).baseline == expected


@pytest.mark.parametrize(
    "change,message",
    [
        ({"baseline": "nope"}, "baseline: 'nope' is not a method label"),
        ({"tolerance": -1}, "tolerance: must be >= 0"),
        ({"tolerance": "loose"}, "tolerance"),
        ({"pairs": [{"teacher": "resnet20", "student": "resnet8", "reference": {"kd": {"source": "x"}}}]},
         "give top1, epochs_to_target or speedup"),
        ({"pairs": [{"teacher": "resnet20", "student": "resnet8", "reference": {"kd": {"top1": 1, "epoch": "last"}}}]},
         "epoch: must be one of ['best', 'final']"),
    ],
)  # fmt: skip
def test_bad_verdict_keys_name_the_field(change, message):
    with pytest.raises(BenchError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_suite({**SUITE, **change})
