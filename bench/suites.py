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
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bench.config import coerce, from_mapping, to_dict
from bench.data import list_datasets
from bench.engine import Recipe
from bench.errors import BenchError

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


@dataclass
class MethodEntry:
    """One column of the table: a registered method, its label and hyperparameter overrides."""

    name: str
    label: str
    hparams: dict[str, Any] = field(default_factory=dict)
    teacher_mode: str = "offline"  # the method's: "none", "offline" or "online" (the tables need to know)


@dataclass
class Provenance:
    """Where a published number comes from and how it was measured, printed beside it in the tables."""

    source: str  # the paper and table, or the repository file, the number is taken from
    protocol: str = ""  # best or last epoch, runs averaged, and how the recipe differs from the suite's


@dataclass
class Reference:
    """A published top-1 (%) for one cell; ``source``/``protocol`` default to the suite's
    ``reference_sources`` entry of the method label."""

    top1: float
    source: str = ""
    protocol: str = ""


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
    path: Path | None = None

    def online_methods(self) -> set[str]:
        """Names of the suite's methods that train their teacher with the student (their teacher's metrics are
        their own, reported apart)."""
        return {m.name for m in self.methods if m.teacher_mode == "online"}

    def references(self, pair: Pair) -> dict[str, Reference]:
        """The pair's published numbers, each with its provenance (its own, else ``reference_sources``)."""
        out = {}
        for label, ref in pair.reference.items():
            ref = ref if isinstance(ref, Reference) else Reference(float(ref))
            default = self.reference_sources.get(label, Provenance(""))
            out[label] = replace(ref, source=ref.source or default.source, protocol=ref.protocol or default.protocol)
        return out


@dataclass(frozen=True)
class TeacherSpec:
    dataset: str
    model: str
    recipe: Recipe
    seed: int
    fraction: float
    checkpoint: str | None = None

    @property
    def hash(self) -> str:
        return content_hash({**to_dict(self), "recipe": self.recipe.identity()})


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

    @property
    def hash(self) -> str:
        """Stable over everything that changes the result; not the suite name or the column label."""
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
            }
        )

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
        flat.update({f"hp.{k}": v for k, v in self.hparams.items()})
        flat.update({f"recipe.{k}": v for k, v in self.recipe.identity().items()})
        if self.teacher_spec is not None:
            flat["teacher_hash"] = self.teacher_spec.hash
        return flat


def content_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_suite_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise BenchError(f"suite file {path} not found")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists() or candidate.stem in NOT_SUITES:
        known = ", ".join(list_suites())
        raise BenchError(f"unknown suite {str(name_or_path)!r} (known: {known})")
    return candidate


NOT_SUITES = {"teachers"}  # suites/teachers.yaml is the manifest of published teachers, not a suite


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml") if p.stem not in NOT_SUITES)


def _method_entries(raw: Any, where: str) -> list[MethodEntry]:
    from methods import build_hparams, get_method

    if not isinstance(raw, list) or not raw:
        raise BenchError(f"{where}: must be a non-empty list of methods")
    entries = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            name, hparams, label = item, {}, item
        elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
            ((name, hparams),) = item.items()
            label = name
        elif isinstance(item, dict) and "name" in item:
            item = dict(item)
            name = item.pop("name")
            label = item.pop("label", name)
            hparams = item.pop("hparams", {})
            if item:
                raise BenchError(f"{w}: unknown key {sorted(item)[0]!r} (allowed: name, label, hparams)")
        else:
            raise BenchError(f"{w}: expected a method name or a mapping {{name: {{hparam: value}}}}")
        if not isinstance(name, str):
            raise BenchError(f"{w}: method name must be a string, got {name!r}")
        try:
            cls = get_method(name)
        except BenchError as err:
            raise BenchError(f"{w}: {err}") from None
        hparams = hparams or {}
        build_hparams(name, hparams, f"{w}.{name}")  # validate now
        entries.append(MethodEntry(name, str(label), dict(hparams), cls.teacher_mode))
    labels = [e.label for e in entries]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise BenchError(f"{where}: label {dupes[0]!r} used twice; give entries distinct `label`s")
    return entries


def _nonempty_list(raw: dict, key: str, where: str) -> list:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        raise BenchError(f"{where}.{key}: must be a non-empty list")
    return value


def parse_suite(raw: Any, path: Path | None = None) -> Suite:
    from bench.models import is_known_model

    where = str(path) if path else "suite"
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: a suite file must be a YAML mapping")
    allowed = {
        "name", "description", "dataset", "pairs", "methods", "fractions", "seeds", "recipe", "teacher",
        "target_top1", "resources", "reference_note", "reference_sources", "sweep", "share_teacher",
    }  # fmt: skip
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    for key in ("name", "dataset"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise BenchError(f"{where}.{key}: required, a non-empty string")
    if raw["dataset"] not in list_datasets():
        raise BenchError(f"{where}.dataset: unknown dataset {raw['dataset']!r} (known: {', '.join(list_datasets())})")
    pairs = []
    for i, p in enumerate(_nonempty_list(raw, "pairs", where)):
        pair = from_mapping(Pair, p, f"{where}.pairs[{i}]")
        for role in ("teacher", "student"):
            if not is_known_model(getattr(pair, role)):
                raise BenchError(
                    f"{where}.pairs[{i}].{role}: unknown model {getattr(pair, role)!r} (`python -m bench list models`)"
                )
        pairs.append(pair)
    methods = _method_entries(raw.get("methods"), f"{where}.methods")
    labels = {m.label for m in methods}
    for i, pair in enumerate(pairs):
        for label, values in pair.hparams.items():
            if label not in labels:
                raise BenchError(f"{where}.pairs[{i}].hparams: {label!r} is not a method label of this suite")
            entry = next(m for m in methods if m.label == label)
            from methods import build_hparams

            build_hparams(entry.name, {**entry.hparams, **values}, f"{where}.pairs[{i}].hparams.{label}")
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
        path=path,
    )


def _is_number(value: Any, where: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BenchError(f"{where}: {value!r} is not a number")
    return True


def load_suite(name_or_path: str | Path) -> Suite:
    path = resolve_suite_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise BenchError(f"{path}:{at} YAML syntax error: {getattr(err, 'problem', err)}") from None
    return parse_suite(raw, path)


def teacher_spec(suite: Suite, pair: Pair) -> TeacherSpec:
    recipe = from_mapping(Recipe, suite.teacher.recipe, "teacher.recipe", base=suite.recipe)
    recipe = replace(recipe, sync_bn=None)  # a teacher trains in one process (its own job)
    return TeacherSpec(
        dataset=suite.dataset,
        model=pair.teacher,
        recipe=recipe,
        seed=suite.teacher.seed,
        fraction=suite.teacher.fraction,
        checkpoint=pair.teacher_checkpoint,
    )


def expand(suite: Suite) -> list[RunSpec]:
    """One RunSpec per (pair, method, fraction, seed), in that nesting order."""
    from methods import build_hparams, get_method

    specs = []
    for pair in suite.pairs:
        recipe = from_mapping(Recipe, pair.recipe, "recipe", base=suite.recipe)
        for entry in suite.methods:
            if entry.label in pair.exclude:
                continue
            cls = get_method(entry.name)
            values = {**entry.hparams, **pair.hparams.get(entry.label, {})}
            hparams = to_dict(build_hparams(entry.name, values, entry.label))
            tspec = teacher_spec(suite, pair) if cls.teacher_mode == "offline" else None
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
                        )
                    )
    return specs


def with_recipe(spec: RunSpec, **changes: Any) -> RunSpec:
    return replace(spec, recipe=replace(spec.recipe, **changes))
