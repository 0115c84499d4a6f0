"""Speed regressions of a nightly benchmark run, each re-measured once before it counts.

A benchmark whose median is more than ``SLOWDOWN`` above its median in the previous saved run
(``.benchmarks/``, pytest-benchmark's autosave) is flagged; the flagged ones run once more (pytest on their
node ids, not autosaved) and a benchmark regressed only when the re-measured median is too slow as well. On a
shared machine single medians wander: two nightly runs here flagged 7 of 181 step-throughput cells, 10–19 %
slower, with no code change between them. Writes the verdicts as JSON for ``tests/benchmarks/report.py``;
exit 1 when something regressed.

``python -m tests.benchmarks.regressions --json results/nightly/benchmarks.json --out results/nightly/speed.json``
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from tests.benchmarks.report import SLOWDOWN, medians, previous_run

Remeasure = Callable[[list[str]], dict[str, float]]


def slower(median: float, before: float) -> bool:
    return median / before - 1 > SLOWDOWN


def remeasure_with_pytest(nodeids: list[str]) -> dict[str, float]:
    """The medians of one more run of ``nodeids`` (same environment, benchmarks on, nothing saved)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "again.json"
        subprocess.run([sys.executable, "-m", "pytest", *nodeids, "--benchmark-enable", f"--benchmark-json={out}",
                        "-p", "no:cacheprovider", "-q"], check=False)  # fmt: skip
        return medians(json.loads(out.read_text())) if out.exists() else {}


def check(current: dict, previous: dict | None, remeasure: Remeasure = remeasure_with_pytest) -> list[dict]:
    """One row per flagged benchmark: its median now, before, re-measured, and whether it regressed (too slow
    both times; a benchmark the re-run could not measure counts as regressed)."""
    if previous is None:
        return []
    before = medians(previous)
    flagged = {name: m for name, m in medians(current).items() if name in before and slower(m, before[name])}
    again = remeasure(sorted(flagged)) if flagged else {}
    rows = []
    for name, median in sorted(flagged.items()):
        second = again.get(name)
        rows.append({"benchmark": name, "median": median, "previous": before[name], "remeasured": second,
                     "regressed": second is None or slower(second, before[name])})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("results/nightly/benchmarks.json"))
    parser.add_argument("--storage", type=Path, default=Path(".benchmarks"))
    parser.add_argument("--out", type=Path, default=Path("results/nightly/speed.json"))
    args = parser.parse_args(argv)
    if not args.json.exists():
        print(f"{args.json} not found: no benchmark run to check")
        return 1
    current = json.loads(args.json.read_text())
    rows = check(current, previous_run(args.storage, current))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    regressed = [r["benchmark"] for r in rows if r["regressed"]]
    print(f"{len(rows)} benchmark(s) more than {SLOWDOWN:.0%} slower than the last saved run, re-measured once; "
          f"{len(regressed)} still slower{': ' + ', '.join(regressed) if regressed else ''}")  # fmt: skip
    return 1 if regressed else 0


if __name__ == "__main__":
    raise SystemExit(main())
