"""Suite files: YAML → validated dataclasses → expanded ``RunSpec``s with stable content hashes.

A suite enumerates a dataset, teacher→student pairs, methods (with hyperparameters), data fractions,
seeds and a training recipe. ``load_suite`` rejects any mistake with a ``BenchError`` naming the file
and the field; ``expand`` turns a suite into one ``RunSpec`` per (pair, method, fraction, seed).

Example (``suites/mini.yaml``)::

    name: mini
    dataset: digits
    pairs:
      - {teacher: resnet20, student: resnet8}
    methods: [ce, {kd: {temperature: 4}}]
    fractions: [0.4, 1.0]
    seeds: [0, 1, 2]
    recipe: {epochs: 20, lr: 0.05, milestones: [12, 16]}
    target_top1: 90

A run's recipe is the suite's ``recipe``, updated by its pair's ``recipe`` (e.g. lr 0.01 for the MobileNetV2 /
ShuffleNet students of the CRD protocol), then by its method entry's ``recipe`` (``{name, label, hparams,
recipe}``: the protocol a method's reference numbers were measured with, e.g. mdistiller's batch 512 / lr 0.2
for DKD on ImageNet). The result is part of the run's hash.

A method entry may compose logit modifiers and a trainer onto a method (:mod:`methods.modifiers`), each by
name or as ``{name: {hyperparameter: value}}``; the label defaults to the composed name (``kd+ls``,
``dkd+ls+ctkd``, ``kd+dot``)::

    methods:
      - kd: {temperature: 2, kd_weight: 9, modifiers: [ls]}
      - dkd: {modifiers: [ls, {ctkd: {curriculum_epochs: 5}}]}
      - {name: kd, label: kd-dot, hparams: {temperature: 4}, trainer: {dot: {delta: 0.09}}}
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bench.config import coerce, from_mapping, to_dict
from bench.data import list_datasets
from bench.recipe import Recipe
from bench.errors import BenchError
from bench.method_entries import MethodEntry, merge_hparams, method_entries
from bench.references import Provenance, Reference, resolve_references



def shipped_suites_dir() -> Path:
    """The shipped suite files: ``suites/`` of a source checkout, else the installed package data
    (``kdbench_suites``, the same folder shipped in the wheel), found with ``importlib.resources``."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "suites").is_dir():
        return checkout / "suites"
    try:
        return Path(str(importlib.resources.files("kdbench_suites")))
    except ModuleNotFoundError:
        return checkout / "suites"


SUITES_DIR = shipped_suites_dir()


@dataclass
class Pair:
    teacher: str
    student: str
    teacher_checkpoint: str | None = None
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    # method label (or "teacher" / "student") → a number, or {top1, source, protocol}; a number is parsed
    # into a Reference whose provenance comes from the suite's ``reference_sources``
    reference: dict[str, float | Reference] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # student-recipe overrides (e.g. lr 0.01 for MobileNetV2)
    exclude: list[str] = field(default_factory=list)  # method labels not run for this pair (shown as "—")

    @property
    def label(self) -> str:
        return f"{self.teacher}→{self.student}"


@dataclass
class TeacherSettings:
    """How the teachers of offline methods are trained (when no checkpoint is given)."""

    seed: int = 0
    fraction: float = 1.0
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides of the suite recipe

    def validate(self, where: str) -> None:
        if not 0 < self.fraction <= 1:
            raise BenchError(f"{where}.fraction: must be in (0, 1], got {self.fraction}")


@dataclass
class Resources:
    """What one run takes: ``workers_per_run`` data-parallel workers (Ray Train; ``recipe.batch_size`` is the global
    batch, each worker takes ``batch_size / workers_per_run``), each with ``cpus`` CPUs and ``gpus`` GPUs."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers_per_run: int = 1

    def validate(self, where: str) -> None:
        if self.workers_per_run < 1:
            raise BenchError(f"{where}.workers_per_run: must be >= 1, got {self.workers_per_run}")


@dataclass
class Suite:
    name: str
    dataset: str
    pairs: list[Pair]
    methods: list[MethodEntry]
    fractions: list[float]
    seeds: list[int]
    recipe: Recipe
    teacher: TeacherSettings
    description: str = ""
    target_top1: float | None = None
    resources: Resources = field(default_factory=Resources)
    reference_note: str = ""
    reference_sources: dict[str, Provenance] = field(default_factory=dict)  # per method label (or teacher/student)
    sweep: dict[str, Any] | None = None
    share_teacher: bool = True  # offline runs sharing teacher and batches train in lockstep (bench.lockstep)
    plugins: list[str] = field(default_factory=list)  # loaded when the suite is parsed (bench.plugins)
    baseline: str | None = None  # the method label others are compared with (default kd, else ce, else none)
    tolerance: float = 0.3  # points of top-1 within which a published number counts as reproduced
    path: Path | None = None

    def online_methods(self) -> set[str]:
        """Names of the suite's methods that train their teacher with the student (their teacher's metrics are
        their own, reported apart)."""
        return {m.name for m in self.methods if m.teacher_mode == "online"}

    def references(self, pair: Pair) -> dict[str, Reference]:
        """The pair's published numbers, each with its provenance (its own, else ``reference_sources``)."""
        return resolve_references(pair.reference, self.reference_sources)


@dataclass(frozen=True)
class TeacherSpec:
    dataset: str
    model: str
    recipe: Recipe
    seed: int
    fraction: float
    checkpoint: str | None = None
    code: dict[str, str] = field(default_factory=dict)  # source digests of parts not built in (bench.plugins)

    @property
    def hash(self) -> str:
        data = {**to_dict(self), "recipe": self.recipe.identity()}
        if not self.code:  # built-in teachers keep the hashes they always had
            del data["code"]
        return content_hash(data)

    @property
    def parts(self) -> dict[str, tuple[str, str]]:
        return {"model": ("model", self.model), "dataset": ("dataset", self.dataset)}


@dataclass(frozen=True)
class RunSpec:
    suite: str
    dataset: str
    teacher: str
    student: str
    method: str
    label: str
    hparams: dict[str, Any]
    fraction: float
    seed: int
    recipe: Recipe
    teacher_spec: TeacherSpec | None
    target_top1: float | None = None
    code: dict[str, str] = field(default_factory=dict)  # source digests of parts not built in (bench.plugins)

    @property
    def hash(self) -> str:
        """Stable over everything that changes the result; not the suite name or the column label. A part that
        is not built in (a plugin's method, model or dataset) adds the digest of its source."""
        return content_hash(
            {
                "dataset": self.dataset,
                "teacher": self.teacher_spec.hash if self.teacher_spec else self.teacher,
                "student": self.student,
                "method": self.method,
                "hparams": self.hparams,
                "fraction": self.fraction,
                "seed": self.seed,
                "recipe": self.recipe.identity(),
                **({"code": self.code} if self.code else {}),
            }
        )

    @property
    def parts(self) -> dict[str, tuple[str, str]]:
        """Role → (registry kind, name) of what this run is made of."""
        return run_parts(self.method, self.student, self.teacher, self.dataset)

    @property
    def run_name(self) -> str:
        return f"{self.label}:{self.teacher}->{self.student}:f{self.fraction:g}:s{self.seed}"

    def params(self) -> dict[str, Any]:
        """Flat parameters for MLflow."""
        flat = {
            "suite": self.suite,
            "dataset": self.dataset,
            "teacher": self.teacher,
            "student": self.student,
            "method": self.method,
            "label": self.label,
            "fraction": self.fraction,
            "seed": self.seed,
            "target_top1": self.target_top1,
        }
        flat.update(_flatten("hp", self.hparams))
        flat.update({f"recipe.{k}": v for k, v in self.recipe.identity().items()})
        from methods import split_name

        _, modifiers, trainer = split_name(self.method)
        if modifiers:
            flat["modifiers"] = ",".join(modifiers)
        if trainer:
            flat["trainer"] = trainer
        if self.teacher_spec is not None:
            flat["teacher_hash"] = self.teacher_spec.hash
        return flat


def run_parts(method: str, student: str, teacher: str, dataset: str) -> dict[str, tuple[str, str]]:
    return {"method": ("method", method), "student": ("model", student), "teacher": ("model", teacher),
            "dataset": ("dataset", dataset)}  # fmt: skip


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{"a": 1, "ctkd": {"b": 2}}`` → ``{"<prefix>.a": 1, "<prefix>.ctkd.b": 2}`` (a modifier's hyperparameters)."""
    out = {}
    for k, v in values.items():
        out.update(_flatten(f"{prefix}.{k}", v) if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


def content_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_suite_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    is_file = path.suffix in (".yaml", ".yml")
    candidate = path if is_file else SUITES_DIR / f"{name_or_path}.yaml"
    if candidate.stem in NOT_SUITES and candidate.resolve().parent == SUITES_DIR.resolve():
        raise BenchError(f"{name_or_path} is the manifest of published teachers (read by --teacher-dir), not a suite")
    if not candidate.exists():
        if is_file:
            raise BenchError(f"suite file {path} not found")
        raise BenchError(f"unknown suite {str(name_or_path)!r} (known: {', '.join(list_suites())})")
    return candidate


NOT_SUITES = {"teachers"}  # suites/teachers.yaml is the manifest of published teachers, not a suite


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml") if p.stem not in NOT_SUITES)


def _nonempty_list(raw: dict, key: str, where: str) -> list:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        raise BenchError(f"{where}.{key}: must be a non-empty list")
    return value


def parse_suite(raw: Any, path: Path | None = None) -> Suite:
    """A suite from a mapping (a YAML file's content, or a Python dict: the same schema and checks). Its
    ``plugins`` (paths relative to the suite file, else the current folder) are loaded first."""
    from bench.models import is_known_model
    from bench.models.generic import declare_pair_models
    from bench.plugins import load as load_plugins

    where = str(path) if path else "suite"
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: a suite file must be a YAML mapping")
    allowed = {
        "name", "description", "dataset", "pairs", "methods", "fractions", "seeds", "recipe", "teacher",
        "target_top1", "resources", "reference_note", "reference_sources", "sweep", "share_teacher", "plugins",
        "baseline", "tolerance",
    }  # fmt: skip
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    base = path.resolve().parent if path else None
    plugins = raw.get("plugins") or []
    load_plugins(plugins, base, f"{where}.plugins")
    for key in ("name", "dataset"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise BenchError(f"{where}.{key}: required, a non-empty string")
    if raw["dataset"] not in list_datasets():
        raise BenchError(f"{where}.dataset: unknown dataset {raw['dataset']!r} (known: {', '.join(list_datasets())})")
    pairs = []
    for i, p in enumerate(_nonempty_list(raw, "pairs", where)):
        pair = from_mapping(Pair, declare_pair_models(p, base, f"{where}.pairs[{i}]"), f"{where}.pairs[{i}]")
        for role in ("teacher", "student"):
            if not is_known_model(getattr(pair, role)):
                raise BenchError(
                    f"{where}.pairs[{i}].{role}: unknown model {getattr(pair, role)!r} (`python -m bench list models`)"
                )
        pairs.append(pair)
    methods = method_entries(raw.get("methods"), f"{where}.methods")
    labels = {m.label for m in methods}
    for i, pair in enumerate(pairs):
        for label, values in pair.hparams.items():
            if label not in labels:
                raise BenchError(f"{where}.pairs[{i}].hparams: {label!r} is not a method label of this suite")
            entry = next(m for m in methods if m.label == label)
            from methods import build_hparams

            build_hparams(entry.name, merge_hparams(entry.hparams, values), f"{where}.pairs[{i}].hparams.{label}")
        for label in pair.exclude:
            if label not in labels:
                raise BenchError(f"{where}.pairs[{i}].exclude: {label!r} is not a method label of this suite")
        for label in pair.reference:
            if label not in labels | {"teacher", "student"}:
                raise BenchError(f"{where}.pairs[{i}].reference: {label!r} is not a method label of this suite "
                                 "(nor teacher / student)")  # fmt: skip
    sources = coerce(raw.get("reference_sources") or {}, dict[str, Provenance], f"{where}.reference_sources")
    for label in sources:
        if label not in labels | {"teacher", "student"}:
            raise BenchError(f"{where}.reference_sources: {label!r} is not a method label of this suite "
                             "(nor teacher / student)")  # fmt: skip
    fractions = [float(f) for f in _nonempty_list(raw, "fractions", where) if _is_number(f, f"{where}.fractions")]
    for f in fractions:
        if not 0 < f <= 1:
            raise BenchError(f"{where}.fractions: {f} is outside (0, 1]")
    seeds = _nonempty_list(raw, "seeds", where)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise BenchError(f"{where}.seeds: {s!r} is not an integer")
    recipe = from_mapping(Recipe, raw.get("recipe"), f"{where}.recipe")
    for i, pair in enumerate(pairs):
        from_mapping(Recipe, pair.recipe, f"{where}.pairs[{i}].recipe", base=recipe)
    for i, entry in enumerate(methods):
        for pair in pairs:  # the method's recipe on top of every pair's (the combination is what runs)
            run_recipe(recipe, pair, entry, f"{where}.methods[{i}].recipe")
    teacher = from_mapping(TeacherSettings, raw.get("teacher"), f"{where}.teacher")
    from_mapping(Recipe, teacher.recipe, f"{where}.teacher.recipe", base=recipe)
    target = raw.get("target_top1")
    if target is not None:
        _is_number(target, f"{where}.target_top1")
    sweep = raw.get("sweep")
    if sweep is not None and not isinstance(sweep, dict):
        raise BenchError(f"{where}.sweep: expected a mapping")
    share = raw.get("share_teacher", True)
    if not isinstance(share, bool):
        raise BenchError(f"{where}.share_teacher: expected true or false, got {share!r}")
    baseline = raw.get("baseline", next((d for d in ("kd", "ce") if d in labels), None))
    if "baseline" in raw and baseline not in labels:
        raise BenchError(f"{where}.baseline: {baseline!r} is not a method label of this suite")
    tolerance = raw.get("tolerance", 0.3)
    if _is_number(tolerance, f"{where}.tolerance") and tolerance < 0:
        raise BenchError(f"{where}.tolerance: must be >= 0 (points of top-1), got {tolerance}")
    return Suite(
        name=raw["name"],
        dataset=raw["dataset"],
        pairs=pairs,
        methods=methods,
        fractions=fractions,
        seeds=list(seeds),
        recipe=recipe,
        teacher=teacher,
        description=str(raw.get("description", "")),
        target_top1=float(target) if target is not None else None,
        resources=from_mapping(Resources, raw.get("resources"), f"{where}.resources"),
        reference_note=str(raw.get("reference_note", "")),
        reference_sources=sources,
        sweep=sweep,
        share_teacher=share,
        plugins=list(plugins),
        baseline=baseline,
        tolerance=float(tolerance),
        path=path,
    )


def _is_number(value: Any, where: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BenchError(f"{where}: {value!r} is not a number")
    return True


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_suite(name_or_path: str | Path) -> Suite:
    path = resolve_suite_path(name_or_path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise BenchError(f"{path}:{at} YAML syntax error: {getattr(err, 'problem', err)}") from None
    return parse_suite(raw, path)


def run_recipe(base: Recipe, pair: Pair, entry: MethodEntry, where: str = "recipe") -> Recipe:
    """The recipe a (pair, method) runs with: ``base`` updated by the pair's, then the method entry's overrides."""
    return from_mapping(Recipe, {**pair.recipe, **entry.recipe}, where, base=base)


def teacher_spec(suite: Suite, pair: Pair) -> TeacherSpec:
    from bench.plugins import code_digests

    recipe = from_mapping(Recipe, suite.teacher.recipe, "teacher.recipe", base=suite.recipe)
    recipe = replace(recipe, sync_bn=None)  # a teacher trains in one process (its own job)
    spec = TeacherSpec(
        dataset=suite.dataset,
        model=pair.teacher,
        recipe=recipe,
        seed=suite.teacher.seed,
        fraction=suite.teacher.fraction,
        checkpoint=pair.teacher_checkpoint,
    )
    return replace(spec, code=code_digests(spec.parts))


def expand(suite: Suite) -> list[RunSpec]:
    """One RunSpec per (pair, method, fraction, seed), in that nesting order."""
    from bench.plugins import code_digests
    from methods import build_hparams, get_method

    specs = []
    for pair in suite.pairs:
        for entry in suite.methods:
            if entry.label in pair.exclude:
                continue
            recipe = run_recipe(suite.recipe, pair, entry)
            cls = get_method(entry.name)
            cls.check_recipe(recipe, f"{suite.path or suite.name}: {entry.label} on {pair.label}")
            values = merge_hparams(entry.hparams, pair.hparams.get(entry.label, {}))
            hparams = to_dict(build_hparams(entry.name, values, entry.label))
            tspec = teacher_spec(suite, pair) if cls.teacher_mode == "offline" else None
            code = code_digests(run_parts(entry.name, pair.student, pair.teacher, suite.dataset))
            for fraction in suite.fractions:
                for seed in suite.seeds:
                    specs.append(
                        RunSpec(
                            suite=suite.name,
                            dataset=suite.dataset,
                            teacher=pair.teacher,
                            student=pair.student,
                            method=entry.name,
                            label=entry.label,
                            hparams=hparams,
                            fraction=fraction,
                            seed=seed,
                            recipe=recipe,
                            teacher_spec=tspec,
                            target_top1=suite.target_top1,
                            code=code,
                        )
                    )
    return specs


def with_recipe(spec: RunSpec, **changes: Any) -> RunSpec:
    return replace(spec, recipe=replace(spec.recipe, **changes))
