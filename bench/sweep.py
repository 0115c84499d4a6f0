"""Hyperparameter sweeps: ``python -m bench sweep SUITE`` searches the suite's ``sweep:`` space with Ray
Tune, selects on a validation split carved from the training set (never the test set), re-runs the chosen
config (and the suite's own config of that method, for comparison) with the suite's seeds on the full
training set, and reports both on test.

The ``sweep:`` section of a suite (``suites/ablation-kd-temperature.yaml``)::

    sweep:
      method: kd                 # label of the suite method searched (default: the only method that is not ce)
      space:                     # method hyperparameters by name; recipe fields as recipe.<field>
        temperature: {grid: [1, 2, 4, 8]}
        ce_weight,kd_weight: {grid: [[0.5, 0.5], [0.1, 0.9], [0.0, 1.0]]}   # tied: values move together
        recipe.lr: {loguniform: [0.01, 0.2]}                                  # also: uniform, choice
      num_samples: 1             # draws of the random dimensions; the grid is crossed with them
      seeds: [0]                 # seeds of the search trials (default: the suite's first seed)
      metric: val_top1           # a metric of the validation split: val_top1, val_nll, val_ece, ...
      mode: max
      val_fraction: 0.2          # held out of the training set, stratified, seeded by the trial's seed
      pair: 0                    # index into the suite's pairs
      fraction: 1.0              # data fraction (default: the suite's largest)
      asha: {grace_period: 2, reduction_factor: 2}   # optional: ASHA early stopping on `metric` per epoch
      max_concurrent: null       # cap on trials at once (default: as many as the resources allow)

Here: the ``sweep:`` schema (``parse_sweep``), a trial's spec (``SweepResolver``) and the selection
(``select_best``, ``final_runs``). Running it: ``bench.run.sweep``; its files: ``bench.report.sweep``.

Outputs ``results/<suite>/sweep.csv`` (every trial: its config, status, epochs, validation metrics, MLflow
run), ``sweep.md`` (space, best config, a sensitivity table per hyperparameter, the test results) and
``sweep.png`` (the metric against each swept value). Search trials are MLflow runs of the experiment
``<suite>-sweep``; the final runs go to the suite's own experiment, so a final run of the suite's default
config is the very run ``python -m bench run SUITE`` makes (skipped when finished). A trial's teacher is
the suite's teacher of that pair (trained on the whole training set; the student never sees the
validation images, so the selection stays clean).
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, replace
from typing import Any, Literal

import pandas as pd

from bench.config import from_mapping, to_dict
from bench.recipe import Recipe
from bench.errors import BenchError
from bench.suites import RunSpec, Suite, expand

KINDS = ("grid", "choice", "uniform", "loguniform")
FIXED_RECIPE = ("epochs", "val_fraction")  # the scheduler's time axis and the selection split


@dataclass
class AshaSettings:
    """ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning"): trials are
    compared at epochs grace_period·reduction_factor^k; all but the top 1/reduction_factor stop."""

    grace_period: int = 1
    reduction_factor: float = 2.0

    def validate(self, where: str) -> None:
        if self.grace_period < 1:
            raise BenchError(f"{where}.grace_period: must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise BenchError(f"{where}.reduction_factor: must be > 1, got {self.reduction_factor}")


@dataclass
class SweepSettings:
    """The ``sweep:`` section as written (see the module docstring)."""

    space: dict[str, Any]
    method: str | None = None
    num_samples: int = 1
    seeds: list[int] | None = None
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    val_fraction: float = 0.2
    pair: int = 0
    fraction: float | None = None
    asha: AshaSettings | None = None
    max_concurrent: int | None = None
    search_seed: int = 0  # seeds Tune's sampling of the random dimensions


@dataclass
class Dimension:
    """One axis of the search space: one hyperparameter, or several tied ones moving together."""

    names: tuple[str, ...]
    kind: str
    values: list[Any]  # grid / choice: the options (tuples when tied); uniform / loguniform: [low, high]
    integer: bool = False

    @property
    def label(self) -> str:
        return ",".join(self.names)

    @property
    def continuous(self) -> bool:
        return self.kind in ("uniform", "loguniform")

    def assign(self, value: Any) -> dict[str, Any]:
        """Tune's value for this axis → {name: value}."""
        values = list(value) if len(self.names) > 1 else [value]
        return {n: int(v) if self.integer else v for n, v in zip(self.names, values)}


@dataclass
class Sweep:
    settings: SweepSettings
    dims: list[Dimension]
    base: RunSpec  # the suite's spec of the swept method on the chosen pair / fraction (first sweep seed)
    seeds: list[int]
    where: str

    @property
    def num_trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.dims if d.kind == "grid")
        return grid * len(self.seeds) * self.settings.num_samples


def fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def apply(base: RunSpec, values: dict[str, Any], where: str, seed: int | None = None,
          val_fraction: float | None = None, label: str | None = None) -> RunSpec:  # fmt: skip
    """``base`` with hyperparameters ``values`` (method ones by name, ``recipe.<field>``), validated."""
    from methods import build_hparams

    hparams = {k: v for k, v in values.items() if not k.startswith("recipe.")}
    recipe = {k.removeprefix("recipe."): v for k, v in values.items() if k.startswith("recipe.")}
    if val_fraction is not None:
        recipe["val_fraction"] = val_fraction
    built = to_dict(build_hparams(base.method, {**base.hparams, **hparams}, where))
    return replace(
        base,
        hparams=built,
        recipe=from_mapping(Recipe, recipe, where, base=base.recipe),
        seed=base.seed if seed is None else seed,
        label=label or base.label,
    )


def trial_label(base_label: str, values: dict[str, Any]) -> str:
    return f"{base_label}[" + ",".join(f"{k.removeprefix('recipe.')}={fmt(v)}" for k, v in values.items()) + "]"


@dataclass
class SweepResolver:
    """Tune config ``{"seed": s, "p0": ..., ...}`` → the trial's RunSpec."""

    sweep: Sweep

    def values(self, config: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, dim in enumerate(self.sweep.dims):
            out.update(dim.assign(config[f"p{i}"]))
        return out

    def __call__(self, config: dict[str, Any]) -> RunSpec:
        values = self.values(config)
        sw = self.sweep
        return apply(sw.base, values, f"{sw.where}.sweep", seed=config["seed"], val_fraction=sw.settings.val_fraction,
                     label=trial_label(sw.base.label, values))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def _target_type(name: str, method: str, where: str) -> Any:
    """The annotated type of a method hyperparameter or ``recipe.<field>`` (BenchError if unknown)."""
    from methods import get_method

    if name.startswith("recipe."):
        field_name, owner, hints = name.removeprefix("recipe."), "recipe", typing.get_type_hints(Recipe)
        if field_name in FIXED_RECIPE:
            raise BenchError(f"{where}: recipe.{field_name} cannot be swept (it is fixed by the sweep)")
    else:
        field_name, owner, hints = name, f"method {method!r}", typing.get_type_hints(get_method(method).Hparams)
    if field_name not in hints:
        known = ", ".join(sorted(hints)) or "none"
        raise BenchError(f"{where}: {owner} has no hyperparameter {field_name!r} (known: {known})")
    return hints[field_name]


def _dimension(key: str, raw: Any, base: RunSpec, where: str) -> Dimension:
    names = tuple(n.strip() for n in str(key).split(","))
    if len(set(names)) != len(names) or not all(names):
        raise BenchError(f"{where}: a tied key lists distinct, non-empty names separated by commas")
    types = [_target_type(n, base.method, where) for n in names]
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in KINDS:
        raise BenchError(f"{where}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, "
                         f"{{loguniform: [low, high]}}, got {raw!r}")  # fmt: skip
    ((kind, values),) = raw.items()
    where = f"{where}.{kind}"
    if not isinstance(values, list) or not values:
        raise BenchError(f"{where}: expected a non-empty list")
    if kind in ("grid", "choice"):
        options = []
        for i, value in enumerate(values):
            if len(names) > 1:
                if not isinstance(value, list) or len(value) != len(names):
                    raise BenchError(f"{where}[{i}]: expected a list of {len(names)} values ({', '.join(names)})")
                value = tuple(value)
            options.append(value)
            apply(base, dict(zip(names, value if len(names) > 1 else [value])), f"{where}[{i}]")
        if len(set(map(repr, options))) != len(options):
            raise BenchError(f"{where}: values repeat")
        return Dimension(names, kind, options)
    if len(names) > 1:
        raise BenchError(f"{where}: tied hyperparameters take grid or choice values")
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise BenchError(f"{where}: expected [low, high], got {values!r}")
    low, high = values
    if not low < high:
        raise BenchError(f"{where}: low must be < high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise BenchError(f"{where}: low must be > 0 on a log scale, got {low}")
    integer = types[0] is int
    if not integer and types[0] not in (float, float | None):
        raise BenchError(f"{where}: {names[0]} is not numeric; use grid or choice")
    for bound in values:
        apply(base, {names[0]: int(bound) if integer else float(bound)}, where)
    return Dimension(names, kind, [low, high], integer)


def parse_sweep(suite: Suite) -> Sweep:
    """Validate the suite's ``sweep:`` section; every mistake is a one-line BenchError naming the field."""
    where = f"{suite.path or suite.name}: sweep"
    if suite.sweep is None:
        raise BenchError(f"{suite.path or suite.name}: no `sweep:` section (see suites/ablation-kd-temperature.yaml)")
    settings = from_mapping(SweepSettings, suite.sweep, where)
    labels = [m.label for m in suite.methods]
    if settings.method is None:
        candidates = [m.label for m in suite.methods if m.name != "ce"]
        if len(candidates) != 1:
            raise BenchError(f"{where}.method: required, one of {', '.join(labels)}")
        settings.method = candidates[0]
    if settings.method not in labels:
        raise BenchError(
            f"{where}.method: {settings.method!r} is not a method label of this suite ({', '.join(labels)})"
        )
    if not 0 <= settings.pair < len(suite.pairs):
        raise BenchError(f"{where}.pair: must index the suite's {len(suite.pairs)} pair(s), got {settings.pair}")
    fraction = max(suite.fractions) if settings.fraction is None else settings.fraction
    if fraction not in suite.fractions:
        raise BenchError(f"{where}.fraction: {fraction} is not one of the suite's fractions {suite.fractions}")
    seeds = settings.seeds or [suite.seeds[0]]
    if len(set(seeds)) != len(seeds):
        raise BenchError(f"{where}.seeds: seeds repeat")
    if settings.num_samples < 1:
        raise BenchError(f"{where}.num_samples: must be >= 1, got {settings.num_samples}")
    if not settings.metric.startswith("val_"):
        raise BenchError(f"{where}.metric: must be a metric of the validation split (val_top1, val_nll, val_ece, ...),"
                         f" got {settings.metric!r}: the test split is never used for selection")  # fmt: skip
    if not 0 < settings.val_fraction < 1:
        raise BenchError(f"{where}.val_fraction: must be in (0, 1), got {settings.val_fraction}")
    if settings.max_concurrent is not None and settings.max_concurrent < 1:
        raise BenchError(f"{where}.max_concurrent: must be >= 1, got {settings.max_concurrent}")
    pair = suite.pairs[settings.pair]
    base = next(
        s for s in expand(suite)
        if (s.teacher, s.student, s.label, s.fraction, s.seed) == (pair.teacher, pair.student, settings.method,
                                                                   fraction, suite.seeds[0])
    )  # fmt: skip
    if settings.asha is not None and settings.asha.grace_period > base.recipe.epochs:
        raise BenchError(f"{where}.asha.grace_period: must be <= the recipe's {base.recipe.epochs} epochs")
    if not isinstance(settings.space, dict) or not settings.space:
        raise BenchError(f"{where}.space: must be a non-empty mapping of hyperparameter → values")
    dims = [_dimension(key, raw, base, f"{where}.space.{key}") for key, raw in settings.space.items()]
    names = [n for d in dims for n in d.names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BenchError(f"{where}.space: {dupes[0]!r} appears in two entries")
    return Sweep(settings, dims, base, list(seeds), str(suite.path or suite.name))


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------
def final_runs(suite: Suite, sweep: Sweep, values: dict[str, Any]) -> list[RunSpec]:
    """The chosen config and the suite's own config of the method, each with every suite seed, on the
    full training set (the suite's recipe: no validation split unless the suite has one)."""
    own = [s for s in expand(suite) if (s.teacher, s.student, s.label, s.fraction)
           == (sweep.base.teacher, sweep.base.student, sweep.base.label, sweep.base.fraction)]  # fmt: skip
    tuned = [apply(s, values, f"{sweep.where}.sweep", label=f"{sweep.base.label} (tuned)") for s in own]
    if [s.hash for s in tuned] == [s.hash for s in own]:  # the search picked the suite's own config
        return [replace(s, label=f"{sweep.base.label} (tuned = the suite's)") for s in own]
    seen: dict[str, RunSpec] = {}
    for spec in [*tuned, *own]:
        seen.setdefault(spec.hash, spec)  # the tuned config may be the suite's own
    return list(seen.values())


def select_best(sweep: Sweep, trials: pd.DataFrame) -> dict[str, Any] | None:
    """The config with the best mean ``metric`` over its finished trials (seeds); None if none finished."""
    metric, labels = sweep.settings.metric, [d.label for d in sweep.dims]
    done = trials[(trials.status == "finished")]
    if done.empty or metric not in done or done[metric].isna().all():
        return None
    grouped = done.groupby(labels, dropna=False, sort=False)[metric].agg(["mean", "count"]).reset_index()
    row = grouped.loc[grouped["mean"].idxmax() if sweep.settings.mode == "max" else grouped["mean"].idxmin()]
    values: dict[str, Any] = {}
    for dim in sweep.dims:
        value = row[dim.label]
        if len(dim.names) > 1:
            value = next(v for v in dim.values if fmt(list(v)) == value)
        values.update(dim.assign(value.item() if hasattr(value, "item") else value))
    return {"values": values, "mean": float(row["mean"]), "n": int(row["count"])}
