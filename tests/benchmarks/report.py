"""Write ``results/nightly/report.md`` from a benchmark run's JSON, the previous saved run, the re-measured
slowdowns (``tests/benchmarks/regressions.py``) and the accuracy check (``python -m bench compare --json``
of the mini suite against ``tests/benchmarks/baseline/mini-runs.csv``): the ratios, every median with its
change since the last saved run, the step throughputs and the accuracy table.

``python -m tests.benchmarks.report --json results/nightly/benchmarks.json --status $?``
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

SLOWDOWN = 0.10  # a median slower than the previous run's by more than this is flagged (and fails nightly)


def medians(run: dict) -> dict[str, float]:
    return {b["fullname"]: b["stats"]["median"] for b in run.get("benchmarks", [])}


def previous_run(storage: Path, current: dict) -> dict | None:
    """The latest run saved in ``storage`` other than ``current`` (pytest-benchmark's autosave layout). The
    autosaved copy of ``current`` carries a slightly different ``datetime`` than ``--benchmark-json``'s, so
    a saved run is recognised as ``current`` by its measurements."""
    runs = sorted(storage.glob("*/*.json"), key=lambda p: p.name)
    for path in reversed(runs):
        data = json.loads(path.read_text())
        if medians(data) != medians(current):
            return data
    return None


def fmt_ratio(target: str, ratio: float) -> str:
    op, value = target.split()
    met = ratio <= float(value) if op == "<=" else ratio >= float(value)
    return "met" if met else "**not met**"


def _interval(diff: list) -> str:
    est, low, high = (math.nan if v is None else v for v in diff)
    if math.isnan(est):
        return "—"
    return f"{est:+.2f}" + (" (n=1, no CI)" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")


def accuracy_lines(accuracy: dict | None) -> list[str]:
    """The accuracy section from ``bench compare --json`` (A: the stored baseline, B: tonight's runs)."""
    if accuracy is None:
        return ["not checked (no comparison of the mini suite: see results/nightly/accuracy.md)"]
    lines = [f"`python -m bench compare {accuracy['a']} {accuracy['b']}`: {accuracy['metric']}, tolerance "
             f"{accuracy['tolerance']:g} points; a cell regressed when tonight is worse by more than that **and** the "
             "95 % interval lies below 0 (paired by seed where the seeds match, else Welch).", "",
             "| cell | baseline mean (n) | tonight mean (n) | tonight − baseline [95 % CI] | test | |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in accuracy["cells"]:
        base = "—" if not c["n_a"] else f"{c['mean_a']:.2f} ({c['n_a']})"
        now = "—" if not c["n_b"] else f"{c['mean_b']:.2f} ({c['n_b']})"
        flag = "**REGRESSED**" if c["regressed"] else ("" if c["test"] else "only one side")
        lines.append(f"| {c['cell']} | {base} | {now} | {_interval(c['diff'])} | {c['test'] or '—'} | {flag} |")
    return lines


def render(current: dict, previous: dict | None, accuracy: dict | None, status: int | None,
           speed: list[dict] | None = None) -> str:  # fmt: skip
    info = current.get("machine_info", {})
    commit = current.get("commit_info", {})
    lines = [
        "# Nightly benchmark report",
        "",
        f"- date: {current.get('datetime', '?')}; commit {commit.get('id', '?')[:10]}"
        f"{' (uncommitted changes)' if commit.get('dirty') else ''}",
        f"- machine: {info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}, "
        f"{info.get('cpu', {}).get('count', '?')} cores; torch threads {os.environ.get('KDBENCH_BENCH_THREADS', 1)}; "
        f"load average at report time {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- pytest exit status: {status if status is not None else '?'} (non-zero: a benchmark or a guard failed; "
        f"see the log)",
        "",
        "## Ratios (measured within this run, interleaved rounds)",
        "",
        "| comparison | ratio (median of rounds) | per-round range | ratio of medians | rounds | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    benches = current.get("benchmarks", [])
    for b in benches:
        extra = b.get("extra_info", {})
        if "ratio" in extra:
            lines.append(
                f"| {extra['ratio_name']} | {extra['ratio']:.3f} | {extra['ratio_min']:.3f}–{extra['ratio_max']:.3f} "
                f"| {extra['ratio_of_medians']:.3f} | {extra['rounds']} | {extra['ratio_target']} "
                f"| {fmt_ratio(extra['ratio_target'], extra['ratio'])} |"
            )
    before = {b["fullname"]: b["stats"]["median"] for b in (previous or {}).get("benchmarks", [])}
    again = {r["benchmark"]: r for r in speed or []}
    lines += [
        "",
        f"## Medians vs the previous saved run ({previous.get('datetime', '?') if previous else 'none saved'})",
        "",
        f"A median more than {SLOWDOWN:.0%} slower is measured once more; it regressed only when slower again.",
        "",
        "| benchmark | median (s) | previous (s) | change | |",
        "|---|---|---|---|---|",
    ]
    for b in benches:
        median = b["stats"]["median"]
        old = before.get(b["fullname"])
        change = "" if old is None else f"{(median / old - 1) * 100:+.1f} %"
        flag = "" if old is None or median / old - 1 <= SLOWDOWN else "slower, not re-measured"
        row = again.get(b["fullname"])
        if row is not None:
            second = "failed" if row["remeasured"] is None else f"{(row['remeasured'] / old - 1) * 100:+.1f} %"
            flag = f"{'**regressed**' if row['regressed'] else 'noise'} (re-measured: {second})"
        lines.append(f"| {b['name']} | {median:.4f} | {'' if old is None else f'{old:.4f}'} | {change} | {flag} |")
    throughput = [b for b in benches if "images_per_s" in b.get("extra_info", {})]
    if throughput:
        lines += ["", "## Step throughput (images/s, one training step, synthetic CIFAR batch)", "",
                  "| method | pair | images/s |", "|---|---|---|"]  # fmt: skip
        for b in sorted(throughput, key=lambda b: (b["group"] or "", b["name"])):
            params = b.get("params") or {}
            pair = f"{params.get('teacher', '?')}→{params.get('student', '?')}"
            lines.append(f"| {params.get('method', b['name'])} | {pair} | {b['extra_info']['images_per_s']:.1f} |")
    lines += ["", "## Accuracy regression (mini suite vs tests/benchmarks/baseline/mini-runs.csv)", ""]
    lines += accuracy_lines(accuracy)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=Path("results/nightly/benchmarks.json"))
    parser.add_argument("--storage", type=Path, default=Path(".benchmarks"))
    parser.add_argument("--accuracy", type=Path, default=Path("results/nightly/accuracy.json"))
    parser.add_argument("--speed", type=Path, default=Path("results/nightly/speed.json"))
    parser.add_argument("--out", type=Path, default=Path("results/nightly/report.md"))
    parser.add_argument("--status", type=int, default=None, help="the benchmark run's exit status")
    args = parser.parse_args(argv)
    if not args.json.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Nightly benchmark report\n\nno benchmark results ({args.json} missing); "
                            f"pytest exit status {args.status}\n")  # fmt: skip
        print(f"wrote {args.out} (no results)")
        return 1
    current = json.loads(args.json.read_text())
    accuracy = json.loads(args.accuracy.read_text()) if args.accuracy.exists() else None
    speed = json.loads(args.speed.read_text()) if args.speed.exists() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(current, previous_run(args.storage, current), accuracy, args.status, speed))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
