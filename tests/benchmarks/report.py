"""Write ``results/nightly/report.md`` from a benchmark run's JSON, the previous saved run and the
accuracy check: the ratios, every median with its change since the last saved run, the step
throughputs and the accuracy table.

``python -m tests.benchmarks.report --json results/nightly/benchmarks.json --status $?``
"""
from __future__ import annotations

import argparse
import json
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


def render(current: dict, previous: dict | None, accuracy: list[dict] | None, status: int | None) -> str:
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
        f"- pytest exit status: {status if status is not None else '?'} (non-zero: a benchmark, a guard, the "
        f"median comparison or the accuracy check failed; see the log)",
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
    lines += [
        "",
        f"## Medians vs the previous saved run ({previous.get('datetime', '?') if previous else 'none saved'})",
        "",
        "| benchmark | median (s) | previous (s) | change | |",
        "|---|---|---|---|---|",
    ]
    for b in benches:
        median = b["stats"]["median"]
        old = before.get(b["fullname"])
        change = "" if old is None else f"{(median / old - 1) * 100:+.1f} %"
        flag = "" if old is None or median / old - 1 <= SLOWDOWN else "**slower**"
        lines.append(f"| {b['name']} | {median:.4f} | {'' if old is None else f'{old:.4f}'} | {change} | {flag} |")
    throughput = [b for b in benches if "images_per_s" in b.get("extra_info", {})]
    if throughput:
        lines += ["", "## Step throughput (images/s, one training step, synthetic CIFAR batch)", "",
                  "| method | pair | images/s |", "|---|---|---|"]  # fmt: skip
        for b in sorted(throughput, key=lambda b: (b["group"] or "", b["name"])):
            params = b.get("params") or {}
            pair = f"{params.get('teacher', '?')}→{params.get('student', '?')}"
            lines.append(f"| {params.get('method', b['name'])} | {pair} | {b['extra_info']['images_per_s']:.1f} |")
    lines += ["", "## Accuracy regression (mini suite vs tests/benchmarks/baseline/mini.json)", ""]
    if accuracy is None:
        lines.append("not checked (no runs of the mini suite)")
    else:
        lines += ["| cell | mean top-1 | baseline | drop | tolerance | |", "|---|---|---|---|---|---|"]
        for c in accuracy:
            if c["baseline"] is None:
                lines.append(f"| {c['cell']} | {c['mean']:.2f} | — | — | — | no baseline |")
            else:
                drop = c["baseline"] - c["mean"]
                lines.append(f"| {c['cell']} | {c['mean']:.2f} | {c['baseline']:.2f} ± {c['baseline_std']:.2f} "
                             f"| {drop:+.2f} | {c['tolerance']:.2f} | {'ok' if c['ok'] else '**DROP**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=Path("results/nightly/benchmarks.json"))
    parser.add_argument("--storage", type=Path, default=Path(".benchmarks"))
    parser.add_argument("--accuracy", type=Path, default=Path("results/nightly/accuracy.json"))
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(current, previous_run(args.storage, current), accuracy, args.status))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
