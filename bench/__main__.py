"""kdbench command line: ``python -m bench {run,sweep,validate,tables,list} ...`` (also ``kdbench``).

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
  python -m bench run mini --executor local     # in this process, one run after another (debugging)
  python -m bench run mini --cpus-per-run 2     # Ray Tune trials of 2 CPUs (torch threads) each
  python -m bench run imagenet --workers-per-run 8  # each run on 8 GPUs (Ray Train DDP), global batch kept
  python -m bench sweep ablation-kd-temperature # hyperparameter search (Ray Tune), re-run the best on test
  python -m bench validate                      # check every shipped suite (or name some) without running
  python -m bench tables mini                   # rebuild results/mini/{runs.csv,tables.md,convergence.png}
  python -m bench list methods                  # models | methods | datasets | suites

environment: KDBENCH_DATA (data root), MLFLOW_TRACKING_URI (tracking store; default
sqlite:///results/mlflow.db), RAY_ADDRESS (run on an existing Ray cluster), CUDA_VISIBLE_DEVICES."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"), help="output folder (default: results/)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite under --results)")


def _add_execution(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="dataset folder (default: $KDBENCH_DATA); digits needs none")
    p.add_argument("--download", action="store_true", help="download torchvision datasets into --data-root")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ... "
                   "(Ray trials use the GPU Ray assigns them)")
    p.add_argument("--teacher-dir", type=Path, help="folder of published teacher checkpoints "
                   "(<arch>_vanilla/ckpt_epoch_240.pth, as mdistiller's cifar_teachers.tar)")  # fmt: skip
    p.add_argument("--cpus-per-run", type=float, help="CPUs (= torch threads) per run (default: the suite's "
                   "resources.cpus, 1)")  # fmt: skip
    p.add_argument("--gpus-per-run", type=float, help="GPUs per Ray trial, fractions allowed (default: the "
                   "suite's resources.gpus, else 1 where Ray sees GPUs)")  # fmt: skip
    p.add_argument("--workers-per-run", type=int, metavar="N", help="train each run on N data-parallel workers "
                   "(Ray Train: DDP, NCCL on GPUs, gloo on CPUs; --cpus/--gpus-per-run are then per worker); "
                   "recipe.batch_size stays the global batch, each worker takes batch_size / N (default: the "
                   "suite's resources.workers_per_run, 1)")  # fmt: skip
    p.add_argument("--address", help="Ray cluster to run on, e.g. auto or head:6379, from a node of the cluster "
                   "(default: $RAY_ADDRESS, else a fresh local Ray instance)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (recipe.amp: a different run, never a "
                   "reference run)")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="NHWC models and batches (recipe.channels_last)")
    p.add_argument("--compile", action="store_true", help="torch.compile each method's forward_train (recipe.compile)")
    p.add_argument("--share-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="train offline runs that share teacher, data, fraction, seed and batches in lockstep: one "
                   "teacher pass per batch for the group, results unchanged (default: the suite's share_teacher, "
                   "true)")  # fmt: skip
    p.add_argument("--teacher-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="store a frozen teacher's per-sample outputs in the first epoch and reuse them, where "
                   "training has no random augmentation (digits; augment: none); results unchanged (default: on)")  # fmt: skip
    p.add_argument("--device-data", action=argparse.BooleanOptionalAction, default=True,
                   help="keep tensor datasets (digits, CIFAR) on the training device as uint8 and augment batches "
                   "there; --no-device-data keeps them in host memory and moves a batch per step; same batches "
                   "(default: on)")  # fmt: skip
    _add_common(p)


def with_speed_flags(suite, args):
    """The suite with --amp / --channels-last / --compile set in its recipe (they are part of each run's hash)."""
    from dataclasses import replace

    changes = {k: True for k in ("amp", "channels_last", "compile") if getattr(args, k)}
    return replace(suite, recipe=replace(suite.recipe, **changes)) if changes else suite


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
    run.add_argument("--rerun", action="store_true", help="run specs again even if a finished run exists")
    run.add_argument("--executor", choices=["ray", "local"], default="ray",
                     help="ray: one Ray Tune trial per run, side by side (default); local: one after another "
                     "in this process")  # fmt: skip
    _add_execution(run)

    swp = sub.add_parser("sweep", help="hyperparameter search of a suite's `sweep:` section (Ray Tune)",
                         description="Search the suite's `sweep:` space with Ray Tune, selecting on a validation "
                         "split carved from the training set (never the test set); re-run the best config with "
                         "the suite's seeds and report it on test. Writes results/<suite>/sweep.{csv,md,png}.",
                         )  # fmt: skip
    swp.add_argument("suite", help="suite name under suites/ or path to a YAML file with a `sweep:` section")
    swp.add_argument("--rerun", action="store_true", help="run trials again even if a finished run exists")
    _add_execution(swp)

    val = sub.add_parser("validate", help="check suite files; exit 2 with the first error")
    val.add_argument("suites", nargs="*", help="suite names or YAML paths (default: every suite under suites/)")

    tab = sub.add_parser("tables", help="rebuild runs.csv, tables.md and convergence.png from MLflow")
    tab.add_argument("suite")
    _add_common(tab)

    lst = sub.add_parser("list", help="list models, methods, datasets or suites")
    lst.add_argument("what", choices=["models", "methods", "datasets", "suites"])
    return parser


def run_options(args, executor: str):
    from bench.run import RunOptions

    return RunOptions(
        results_dir=args.results, data_root=args.data_root, download=args.download, device=args.device,
        rerun=args.rerun, tracking_uri=args.tracking_uri, teacher_dir=args.teacher_dir,
        progress=not args.no_progress and sys.stderr.isatty(), executor=executor, cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run, address=args.address, share_teacher=args.share_teacher,
        teacher_cache=args.teacher_cache, device_data=args.device_data, workers_per_run=args.workers_per_run,
    )  # fmt: skip


def cmd_run(args) -> int:
    from bench.report import write_tables
    from bench.run import make_tracker, run_suite, suite_dir
    from bench.suites import load_suite

    suite = with_speed_flags(load_suite(args.suite), args)
    options = run_options(args, executor=args.executor)
    report = run_suite(suite, options)
    out = suite_dir(options, suite)
    frame = write_tables(suite, make_tracker(suite, options), out)
    print((out / "tables.md").read_text())
    print(f"wrote {out}/runs.csv, tables.md, convergence.png ({len(frame)} runs); "
          f"{len(report.finished)} ran, {len(report.skipped)} skipped, {len(report.failed)} failed")  # fmt: skip
    return report.exit_code


def cmd_sweep(args) -> int:
    from bench.run.sweep import run_sweep
    from bench.suites import load_suite

    suite = with_speed_flags(load_suite(args.suite), args)
    report = run_sweep(suite, run_options(args, executor="ray"))
    return report.exit_code


def cmd_validate(args) -> int:
    from bench.suites import expand, list_suites, load_suite

    for name in args.suites or list_suites():
        suite = load_suite(name)
        sweep = ""
        if suite.sweep is not None:
            from bench.sweep import parse_sweep

            sweep = f", sweep of {parse_sweep(suite).num_trials} trials"
        print(f"ok: {suite.path} ({len(expand(suite))} runs{sweep})")
    return 0


def cmd_tables(args) -> int:
    from bench.report import write_tables
    from bench.run import RunOptions, make_tracker, suite_dir
    from bench.suites import load_suite

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


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "validate": cmd_validate, "tables": cmd_tables, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; run the same command again to resume (interrupted runs "
              "continue from their last epoch checkpoint in the same MLflow run)", file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
