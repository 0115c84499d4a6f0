"""kdbench command line: ``python -m bench {run,validate,tables,list} ...`` (also ``kdbench``).

Exit codes: 0 every run finished, 1 some run failed (the others still finished and were recorded),
2 bad input (one line on stderr, nothing started or written), 130 interrupted (re-run to resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.errors import BenchError

EPILOG = """examples:
  python -m bench run mini                      # the default suite on the embedded digits data
  python -m bench run cifar100-crd --data-root ~/data --download --device cuda
  python -m bench validate suites/*.yaml        # check suite files without running anything
  python -m bench tables mini                   # rebuild results/mini/{runs.csv,tables.md,convergence.png}
  python -m bench list methods                  # models | methods | datasets | suites

environment: KDBENCH_DATA (data root), MLFLOW_TRACKING_URI (tracking store; default
sqlite:///results/mlflow.db), CUDA_VISIBLE_DEVICES."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"), help="output folder (default: results/)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite under --results)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="kdbench: run knowledge-distillation suites, track them in MLflow, write paper-style tables.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run every spec of a suite (skips finished ones), then write its tables",
                         description="Run a suite: train the teachers it needs once, run every (pair, method, "
                         "fraction, seed), resume interrupted runs, skip finished ones, write the tables.")  # fmt: skip
    run.add_argument("suite", help="suite name under suites/ (e.g. mini) or path to a YAML file")
    run.add_argument("--data-root", help="dataset folder (default: $KDBENCH_DATA); digits needs none")
    run.add_argument("--download", action="store_true", help="download torchvision datasets into --data-root")
    run.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    run.add_argument("--rerun", action="store_true", help="run specs again even if a finished run exists")
    run.add_argument("--teacher-dir", type=Path, help="folder of published teacher checkpoints "
                     "(<arch>_vanilla/ckpt_epoch_240.pth, as mdistiller's cifar_teachers.tar)")
    run.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    _add_common(run)

    val = sub.add_parser("validate", help="check suite files; exit 2 with the first error")
    val.add_argument("suites", nargs="+", help="suite names or YAML paths")

    tab = sub.add_parser("tables", help="rebuild runs.csv, tables.md and convergence.png from MLflow")
    tab.add_argument("suite")
    _add_common(tab)

    lst = sub.add_parser("list", help="list models, methods, datasets or suites")
    lst.add_argument("what", choices=["models", "methods", "datasets", "suites"])
    return parser


def cmd_run(args) -> int:
    from bench.runner import RunOptions, make_tracker, run_suite, suite_dir
    from bench.suites import load_suite
    from bench.tables import write_tables

    suite = load_suite(args.suite)
    options = RunOptions(
        results_dir=args.results, data_root=args.data_root, download=args.download, device=args.device,
        rerun=args.rerun, tracking_uri=args.tracking_uri, teacher_dir=args.teacher_dir, progress=not args.no_progress and sys.stderr.isatty(),
    )  # fmt: skip
    report = run_suite(suite, options)
    out = suite_dir(options, suite)
    frame = write_tables(suite, make_tracker(suite, options), out)
    print((out / "tables.md").read_text())
    print(f"wrote {out}/runs.csv, tables.md, convergence.png ({len(frame)} runs); "
          f"{len(report.finished)} ran, {len(report.skipped)} skipped, {len(report.failed)} failed")  # fmt: skip
    return report.exit_code


def cmd_validate(args) -> int:
    from bench.suites import expand, load_suite

    for name in args.suites:
        suite = load_suite(name)
        print(f"ok: {suite.path} ({len(expand(suite))} runs)")
    return 0


def cmd_tables(args) -> int:
    from bench.runner import RunOptions, make_tracker, suite_dir
    from bench.suites import load_suite
    from bench.tables import write_tables

    suite = load_suite(args.suite)
    options = RunOptions(results_dir=args.results, tracking_uri=args.tracking_uri)
    db = options.results_dir / "mlflow.db"
    if not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) and not db.exists():
        raise BenchError(f"no runs yet: {db} does not exist (run `python -m bench run {args.suite}` first)")
    out = suite_dir(options, suite)
    write_tables(suite, make_tracker(suite, options), out)
    print((out / "tables.md").read_text())
    return 0


def cmd_list(args) -> int:
    if args.what == "models":
        from bench.models import list_models as items
    elif args.what == "methods":
        from methods import list_methods as items
    elif args.what == "datasets":
        from bench.data import list_datasets as items
    else:
        from bench.suites import list_suites as items
    print("\n".join(items()))
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "tables": cmd_tables, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
