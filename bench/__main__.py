"""kdbench command line: ``python -m bench {run,sweep,validate,tables,compare,list,new} ...`` (also ``kdbench``),
a thin layer over the Python API (``bench.api``).

Exit codes: 0 every run finished, 1 some run failed (the others still finished and were recorded),
2 bad input (one line on stderr, nothing started or written), 130 interrupted (re-run to resume).
``compare``: 0 nothing regressed, 1 a cell regressed, 2 bad input.
"""
from __future__ import annotations

import argparse
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
  python -m bench tables mini                   # rebuild results/mini/{runs.csv,tables.md,summary.csv,*.png}
  python -m bench compare results/mini /mnt/other/results/mini   # per cell B - A; exit 1 if B regressed
  python -m bench list methods                  # models | methods | datasets | suites
  python -m bench run my-suite.yaml --plugin ./my_kd.py   # a plugin's methods, models and datasets
  python -m bench new method my_kd --plugin ~/my_kd      # a method file + its tests, outside the repository

plugins: a suite's `plugins:` list, --plugin (repeatable), and the `kdbench.plugins` entry points of installed
packages (always loaded).

environment: KDBENCH_DATA (data root), MLFLOW_TRACKING_URI (tracking store; default
sqlite:///results/mlflow.db), RAY_ADDRESS (run on an existing Ray cluster), CUDA_VISIBLE_DEVICES."""


def _add_plugin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a plugin first: a module name or a .py file registering methods, models or "
                   "datasets (repeatable)")  # fmt: skip


CI_HELP = "accuracy cells as mean and 95 %% interval over seeds instead of mean ± std"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"), help="output folder (default: results/)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite under --results)")
    _add_plugin(p)


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
    p.add_argument("--deterministic", action="store_true", help="deterministic cuDNN, no cuDNN benchmark, "
                   "torch.use_deterministic_algorithms (warn only) (recipe.deterministic; TF32 is off unless "
                   "recipe.tf32)")  # fmt: skip
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
    """The suite with --amp / --channels-last / --compile / --deterministic set in its recipe (they are part of
    each run's hash)."""
    from bench.api import SPEED_FLAGS, with_speed_flags as apply

    return apply(suite, {k: getattr(args, k) for k in SPEED_FLAGS})


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
    run.add_argument("--ci", action="store_true", help=CI_HELP)
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
    _add_plugin(val)

    tab = sub.add_parser("tables", help="rebuild runs.csv, tables.md, summary.csv and the plots from MLflow")
    tab.add_argument("suite")
    tab.add_argument("--ci", action="store_true", help=CI_HELP)
    _add_common(tab)

    cmp = sub.add_parser("compare", help="compare two result sets of one suite cell by cell; exit 1 on a regression",
                         description="Per cell (pair × fraction × method): both means, B − A with its 95 % "
                         "interval (paired by seed where both have the same seeds, else Welch), and REGRESSED where B "
                         "is worse by more than --tolerance points and the interval lies below 0. Exit 0: nothing "
                         "regressed; 1: something did; 2: bad input.")  # fmt: skip
    cmp.add_argument("a", type=Path, help="the reference: a results folder of one suite, a suite's folder, or runs.csv")
    cmp.add_argument("b", type=Path, help="the result set checked against A (same forms)")
    cmp.add_argument("--tolerance", type=float, default=0.5,
                     help="points B may be worse before it counts (default 0.5)")
    cmp.add_argument("--metric", default="top1", help="runs.csv column to compare (default top1: final epoch)")
    cmp.add_argument("--json", type=Path, help="also write the per-cell comparison as JSON")

    lst = sub.add_parser("list", help="list models, methods, datasets or suites")
    lst.add_argument("what", choices=["models", "methods", "datasets", "suites"])
    _add_plugin(lst)

    new = sub.add_parser("new", help="write a new method: its file and its tests, in the repository or as a plugin",
                         description="Write a method file (a pure loss function + a thin adapter) and a test file "
                         "(a hand-computed loss check and a one-epoch digits run): methods/NAME.py and "
                         "tests/test_NAME.py of this checkout, or with --plugin DIR, DIR/NAME.py (a plugin) and "
                         "DIR/test_NAME.py. Existing files are never overwritten.")  # fmt: skip
    new.add_argument("what", choices=["method"])
    new.add_argument("name", help="the method's name: lower case, a Python identifier (e.g. my_kd)")
    new.add_argument("--plugin", type=Path, metavar="DIR", help="write a plugin into DIR instead of the repository")
    return parser


def run_options(args, executor: str) -> dict:
    return dict(
        results_dir=args.results, data_root=args.data_root, download=args.download, device=args.device,
        rerun=args.rerun, tracking_uri=args.tracking_uri, teacher_dir=args.teacher_dir,
        progress=not args.no_progress and sys.stderr.isatty(), executor=executor, cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run, address=args.address, share_teacher=args.share_teacher,
        teacher_cache=args.teacher_cache, device_data=args.device_data, workers_per_run=args.workers_per_run,
        amp=args.amp, channels_last=args.channels_last, compile=args.compile,
    )  # fmt: skip


def cmd_run(args) -> int:
    from bench import api

    result = api.run(args.suite, ci=args.ci, **run_options(args, executor=args.executor))
    report = result.report
    print(result.markdown)
    print(f"wrote {result.out}/runs.csv, tables.md, summary.csv, summary.png, convergence.png ({len(result.frame)} runs); "
          f"{len(report.finished)} ran, {len(report.skipped)} skipped, {len(report.failed)} failed")  # fmt: skip
    return report.exit_code


def cmd_sweep(args) -> int:
    from bench import api

    return api.sweep(args.suite, **run_options(args, executor="ray")).exit_code


def cmd_validate(args) -> int:
    from bench import api

    for line in api.validate(args.suites):
        print(line)
    return 0


def cmd_tables(args) -> int:
    from bench import api

    result = api.tables(args.suite, results_dir=args.results, tracking_uri=args.tracking_uri, ci=args.ci)
    print(result.markdown)
    return 0


def cmd_compare(args) -> int:
    from bench import api

    text, code = api.compare(args.a, args.b, args.metric, args.tolerance, args.json)
    print(text)
    return code


def cmd_list(args) -> int:
    from bench import api

    print("\n".join(api.available(args.what)))
    return 0


def cmd_new(args) -> int:
    from bench.scaffold import new_method

    for path in new_method(args.name, args.plugin):
        print(f"wrote {path}")
    return 0


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "validate": cmd_validate, "tables": cmd_tables,
            "compare": cmd_compare, "list": cmd_list, "new": cmd_new}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from bench.api import load_plugins  # the installed entry points, then --plugin (relative to this folder)

        load_plugins([] if args.command == "new" else getattr(args, "plugin", []), where="--plugin")
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
