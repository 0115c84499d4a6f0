"""The Python API: what the command line does, as functions for notebooks and scripts. The CLI
(``bench.__main__``) is a thin layer over it.

    from bench import api
    runs = api.run_suite("mini")                                        # a shipped suite, by name
    runs = api.run_suite("my-suite.yaml", executor="ray", cpus_per_run=2)
    runs = api.run_suite({"name": "quick", "dataset": "digits", "pairs": [...], "methods": ["kd", "my_kd"],
                          "fractions": [1.0], "seeds": [0]}, plugins=["./my_kd.py"])
    runs = api.load_results("mini")                                     # one row per run, from MLflow

A suite is a shipped name, a YAML path, a mapping with the YAML schema (validated the same way; its
``plugins:`` paths are relative to the current folder) or a parsed ``Suite``. ``plugins`` (module names or
``.py`` files) are loaded before the suite is read, as ``--plugin``; installed ``kdbench.plugins`` entry points
are loaded at the first call. Run options are the fields of ``bench.run.RunOptions`` (``results_dir``,
``data_root``, ``device``, ``rerun``, ``executor``, ``cpus_per_run``, ...; the API's executor defaults to
``local``, the CLI's to ``ray``) plus ``amp``, ``channels_last`` and ``compile`` (recipe switches, part of each
run's hash; ``deterministic`` too). Bad input raises ``bench.errors.BenchError`` before anything is written.

``compare(a, b)`` compares two result sets of one suite cell by cell (``python -m bench compare``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from bench import plugins as plugin_loader
from bench.errors import BenchError
from bench.locks import exclusive_lock
from bench.run import RunOptions, SuiteReport, make_tracker, suite_dir
from bench.suites import Suite, expand, list_suites, load_suite as load_suite_file, parse_suite

SuiteLike = str | Path | Mapping[str, Any] | Suite
SPEED_FLAGS = ("amp", "channels_last", "compile", "deterministic")  # recipe switches set from the command line


def load_plugins(plugins: Iterable[str] = (), base: Path | None = None, where: str = "plugins") -> None:
    """The installed entry-point plugins (once), then ``plugins`` (relative to ``base``, default the current
    folder)."""
    plugin_loader.load_entry_points()
    plugin_loader.load(list(plugins), base, where)


def load_suite(suite: SuiteLike, plugins: Iterable[str] = ()) -> Suite:
    """A validated suite from a name, a path, a mapping or a ``Suite`` (see module docstring)."""
    load_plugins(plugins)
    if isinstance(suite, Suite):
        return suite
    if isinstance(suite, Mapping):
        return parse_suite(dict(suite))
    if isinstance(suite, (str, Path)):
        return load_suite_file(suite)
    raise BenchError(f"a suite is a name, a path, a mapping or a Suite, not {type(suite).__name__}")


def run_options(**options: Any) -> RunOptions:
    """``RunOptions`` from keyword arguments (paths may be strings); an unknown option is a ``BenchError``."""
    known = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BenchError(f"unknown run option {unknown[0]!r} (known: {', '.join(sorted(known | set(SPEED_FLAGS)))})")
    for key in ("results_dir", "teacher_dir"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    return RunOptions(**options)


def with_speed_flags(suite: Suite, flags: dict[str, bool]) -> Suite:
    """The suite with amp / channels_last / compile / deterministic set in its recipe (part of each run's hash)."""
    changes = {k: True for k, v in flags.items() if v}
    if changes.get("deterministic"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA work (bench.engine)
    return replace(suite, recipe=replace(suite.recipe, **changes)) if changes else suite


def _split(options: dict[str, Any]) -> tuple[dict[str, bool], dict[str, Any]]:
    return {k: bool(options.pop(k)) for k in SPEED_FLAGS if k in options}, options


@dataclass
class SuiteRun:
    """What running a suite gave: its report (finished / failed / skipped runs), the runs frame, its folder."""

    suite: Suite
    report: SuiteReport
    frame: pd.DataFrame
    out: Path
    markdown: str = ""  # tables.md as written (read under the tables lock)

    @property
    def exit_code(self) -> int:
        return self.report.exit_code


def run(suite: SuiteLike, plugins: Iterable[str] = (), log: Callable[[str], None] = print, ci: bool = False,
        **options: Any) -> SuiteRun:  # fmt: skip
    """Run every pending spec of ``suite``, then write ``results/<suite>/{runs.csv,tables.md,summary.csv,*.png}``
    (``ci``: accuracy cells as mean and 95 % interval instead of mean ± std)."""
    from bench.run import run_suite as execute

    flags, options = _split(dict(options))
    suite = with_speed_flags(load_suite(suite, plugins), flags)
    opts = run_options(**options)
    if opts.executor == "ray":
        plugin_loader.check_shippable(spec.parts for spec in expand(suite))
    report = execute(suite, opts, log)
    out = suite_dir(opts, suite)
    frame, markdown = _write_tables(suite, make_tracker(suite, opts), out, ci)
    return SuiteRun(suite, report, frame, out, markdown)


def run_suite(suite: SuiteLike, plugins: Iterable[str] = (), **options: Any) -> pd.DataFrame:
    """Run ``suite`` (skipping finished runs, resuming interrupted ones) and return its runs, one row each
    (``runs.csv``'s columns: dataset, teacher, student, method, label, fraction, seed, status, top1, ...)."""
    return run(suite, plugins, **options).frame


def sweep(suite: SuiteLike, plugins: Iterable[str] = (), log: Callable[[str], None] = print, **options: Any):
    """The suite's ``sweep:`` search with Ray Tune (``python -m bench sweep``); returns its ``SweepReport``."""
    from bench.run.sweep import run_sweep

    flags, options = _split(dict(options))
    suite = with_speed_flags(load_suite(suite, plugins), flags)
    return run_sweep(suite, run_options(**{**options, "executor": "ray"}), log)


def _write_tables(suite: Suite, tracker, out: Path, ci: bool) -> tuple[pd.DataFrame, str]:
    """Write the suite's tables and read ``tables.md`` back, under a lock: another ``bench run`` of the suite may
    write them at the same time."""
    from bench.report import write_tables

    with exclusive_lock(out / ".tables.lock"):
        frame = write_tables(suite, tracker, out, ci=ci)
        return frame, (out / "tables.md").read_text()


def _existing_tracker(suite: Suite, options: RunOptions):
    db = options.results_dir / "mlflow.db"
    if not (options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) and not db.exists():
        raise BenchError(f"no runs yet: {db} does not exist (run `python -m bench run {suite.name}` first)")
    return make_tracker(suite, options)


def load_results(suite: SuiteLike, plugins: Iterable[str] = (), results_dir: str | Path = "results",
                 tracking_uri: str | None = None) -> pd.DataFrame:  # fmt: skip
    """The runs of ``suite`` recorded in MLflow, one row per spec (the latest finished run, else the latest
    attempt), as ``runs.csv``; writes nothing."""
    from bench.report import runs_frame

    suite = load_suite(suite, plugins)
    options = run_options(results_dir=results_dir, tracking_uri=tracking_uri)
    return runs_frame(_existing_tracker(suite, options), expand(suite))


def tables(suite: SuiteLike, plugins: Iterable[str] = (), results_dir: str | Path = "results",
           tracking_uri: str | None = None, ci: bool = False) -> SuiteRun:  # fmt: skip
    """Rebuild ``results/<suite>/{runs.csv,tables.md,summary.csv,*.png}`` from MLflow."""
    suite = load_suite(suite, plugins)
    options = run_options(results_dir=results_dir, tracking_uri=tracking_uri)
    out = suite_dir(options, suite)
    frame, markdown = _write_tables(suite, _existing_tracker(suite, options), out, ci)
    return SuiteRun(suite, SuiteReport(), frame, out, markdown)


def compare(a: str | Path, b: str | Path, metric: str = "top1", tolerance: float = 0.5,
            json_path: str | Path | None = None) -> tuple[str, int]:  # fmt: skip
    """Two result sets of one suite (results folders or ``runs.csv`` files), cell by cell: the report's text and
    the exit code (0 nothing regressed, 1 B regressed beyond ``tolerance`` points and significantly)."""
    from bench.report.compare import compare as compare_results

    return compare_results(Path(a), Path(b), metric, tolerance, Path(json_path) if json_path else None)


def validate(suites: Iterable[SuiteLike] = (), plugins: Iterable[str] = ()) -> list[str]:
    """Check suites (default: every shipped one) without running anything; one line per suite."""
    lines = []
    for item in list(suites) or list_suites():
        suite = load_suite(item, plugins)
        detail = f"{len(expand(suite))} runs"
        if suite.sweep is not None:
            from bench.sweep import parse_sweep

            detail += f", sweep of {parse_sweep(suite).num_trials} trials"
        lines.append(f"ok: {suite.path or suite.name} ({detail})")
    return lines


def available(what: str, plugins: Iterable[str] = ()) -> list[str]:
    """Names of the registered ``models``, ``methods``, ``datasets`` (plugins' included) or shipped ``suites``."""
    load_plugins(plugins)
    if what == "models":
        from bench.models import list_models as names
    elif what == "methods":
        from methods import list_methods as names
    elif what == "datasets":
        from bench.data import list_datasets as names
    elif what == "suites":
        names = list_suites
    else:
        raise BenchError(f"nothing to list called {what!r} (models, methods, datasets, suites)")
    return names()
