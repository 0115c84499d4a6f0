"""``make nightly``'s checks: a benchmark flagged slower is re-measured once and regresses only when slower
again; the accuracy section of the report is ``bench compare``'s JSON."""
import json

import pandas as pd

from bench.report.compare import compare
from tests.benchmarks.regressions import check
from tests.benchmarks.report import render


def bench_run(medians: dict[str, float]) -> dict:
    rows = [{"fullname": f"tests/benchmarks/t.py::{n}", "name": n, "group": None, "stats": {"median": m},
             "extra_info": {}} for n, m in medians.items()]  # fmt: skip
    return {"datetime": "now", "benchmarks": rows}


def test_a_slower_median_is_remeasured_once_and_counts_only_if_slower_again():
    previous = bench_run({"a": 1.0, "b": 1.0, "c": 1.0})
    current = bench_run({"a": 1.05, "b": 1.3, "c": 1.2})  # b and c flagged (>10 %), a within
    asked = []

    def remeasure(nodeids):
        asked.append(nodeids)
        return {"tests/benchmarks/t.py::b": 1.02, "tests/benchmarks/t.py::c": 1.25}  # b was noise, c is not

    rows = check(current, previous, remeasure)
    assert asked == [["tests/benchmarks/t.py::b", "tests/benchmarks/t.py::c"]]  # one re-run, flagged ones only
    assert {r["benchmark"].split("::")[1]: r["regressed"] for r in rows} == {"b": False, "c": True}
    assert check(current, None, remeasure) == [] and len(asked) == 1  # nothing saved before: nothing to compare
    report = render(current, previous, None, 0, rows)
    assert "| b | 1.3000 | 1.0000 | +30.0 % | noise (re-measured: +2.0 %) |" in report
    assert "| c | 1.2000 | 1.0000 | +20.0 % | **regressed** (re-measured: +25.0 %) |" in report


def test_the_accuracy_section_is_bench_compares_json(tmp_path):
    rows = [{"suite": "mini", "teacher": "t", "student": "s", "fraction": 1.0, "label": "kd", "seed": seed,
             "status": "finished", "top1": 90.0 + seed} for seed in range(3)]  # fmt: skip
    base = tmp_path / "base" / "runs.csv"
    base.parent.mkdir()
    pd.DataFrame(rows).to_csv(base, index=False)
    tonight = tmp_path / "mini" / "runs.csv"
    tonight.parent.mkdir()
    pd.DataFrame([{**r, "top1": r["top1"] - 2.0 - 0.1 * r["seed"]} for r in rows]).to_csv(tonight, index=False)
    _, code = compare(base, tonight, json_out=tmp_path / "accuracy.json")
    assert code == 1
    report = render(bench_run({}), None, json.loads((tmp_path / "accuracy.json").read_text()), 0)
    line = next(line for line in report.splitlines() if line.startswith("| t→s f1 kd"))
    assert "| 91.00 (3) | 88.90 (3) | -2.10 [" in line and "| paired | **REGRESSED** |" in line
