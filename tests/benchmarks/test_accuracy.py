"""Accuracy regression of the ``mini`` suite against ``tests/benchmarks/baseline/mini.json``.

Needs the suite's runs: ``make nightly`` runs ``python -m bench run mini --results results/nightly/mini``
first; ``KDBENCH_NIGHTLY_RUNS`` points at another ``runs.csv``. Without it the test is skipped.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.benchmarks.accuracy import compare, load_baseline, markdown, summarize

RUNS = Path(os.environ.get("KDBENCH_NIGHTLY_RUNS", "results/nightly/mini/mini/runs.csv"))
OUT = Path(os.environ.get("KDBENCH_NIGHTLY_DIR", "results/nightly"))


def test_mini_accuracy_against_baseline():
    if not RUNS.exists():
        pytest.skip(f"{RUNS} not found: run `python -m bench run mini --results {RUNS.parent.parent}` first")
    checks = compare(summarize(RUNS), load_baseline())
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "accuracy.json").write_text(json.dumps([{**asdict(c), "ok": c.ok} for c in checks], indent=1))
    failed = [c for c in checks if not c.ok]
    assert checks, f"{RUNS}: no finished runs"
    assert not failed, "accuracy dropped past the tolerance:\n" + markdown(failed)
