"""Teachers for offline methods: trained once per teacher spec (cached by its content hash) or loaded.

``ensure_teacher`` returns a :class:`TeacherRecord` (weights file + test metrics). Training goes through
the same engine as every student (method ``ce``), checkpointing every epoch, so an interrupted teacher
resumes too. A user checkpoint (``teacher_checkpoint:`` in the suite) is loaded in the common published
layouts (a bare ``state_dict``, ``{"model": ...}`` as in CRD / mdistiller, ``{"state_dict": ...}``,
``module.`` prefixes from DataParallel) and evaluated once on the test split. Every file is read without running
code from it (``bench.checkpoints``): a checkpoint whose pickle asks for more than weights is refused.

Published teachers (``--teacher-dir DIR``): ``suites/teachers.yaml`` (or ``DIR/teachers.yaml`` when present)
lists, per dataset and teacher model, the checkpoint file under DIR (``<arch>_vanilla/ckpt_epoch_240.pth`` for
the CRD CIFAR-100 teachers, as in mdistiller's ``cifar_teachers.tar``), an optional sha256 and the published
test top-1. ``use_published_teachers`` gives every pair without a ``teacher_checkpoint`` the listed file (so
the teacher spec, and the hash of every student run, records which file was used); ``ensure_teacher`` checks
the sha256 when listed (before the file is opened), evaluates the teacher once on the test split and refuses it (``BenchError``) when its
top-1 is more than the tolerance off the published value.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from bench.checkpoints import PUBLISHED_TEACHER_TYPES, load_checkpoint
from bench.config import from_mapping, to_dict
from bench.data import Splits
from bench.engine import atomic_save, build_task, predict, seed_everything
from bench.recipe import apply_numerics
from bench.errors import BenchError
from bench.locks import exclusive_lock
from bench.metrics import classification_metrics
from bench.models import StagedNet, create_model
from bench.suites import SUITES_DIR, Suite, TeacherSpec

MANIFEST_NAME = "teachers.yaml"


@dataclass
class PublishedTeacher:
    """One published checkpoint: its path under ``--teacher-dir``, optional sha256, published test top-1."""

    file: str
    top1: float
    sha256: str | None = None
    tolerance: float | None = None  # overrides the manifest's tolerance for this teacher

    def validate(self, where: str) -> None:
        hex_digits = set("0123456789abcdef")
        if self.sha256 is not None and (len(self.sha256) != 64 or not set(self.sha256) <= hex_digits):
            raise BenchError(f"{where}.sha256: expected 64 lower-case hex digits, got {self.sha256!r}")
        if self.tolerance is not None and self.tolerance < 0:
            raise BenchError(f"{where}.tolerance: must be >= 0, got {self.tolerance}")


@dataclass
class TeacherManifest:
    """``teachers.yaml``: ``tolerance`` (top-1 points) and ``datasets: {dataset: {model: PublishedTeacher}}``."""

    tolerance: float = 1.0
    datasets: dict[str, dict[str, PublishedTeacher]] = field(default_factory=dict)
    path: Path | None = field(default=None, init=False)

    def validate(self, where: str) -> None:
        if self.tolerance < 0:
            raise BenchError(f"{where}.tolerance: must be >= 0, got {self.tolerance}")

    def entry(self, dataset: str, model: str) -> PublishedTeacher:
        teachers = self.datasets.get(dataset)
        if not teachers:
            raise BenchError(f"{self.path}: no published teachers for dataset {dataset!r} "
                             f"(listed: {', '.join(sorted(self.datasets)) or 'none'})")  # fmt: skip
        if model not in teachers:
            raise BenchError(f"{self.path}: no published {dataset} teacher {model!r} (listed: {', '.join(teachers)}); "
                             "give the pair a teacher_checkpoint or add the model to the manifest")  # fmt: skip
        return teachers[model]

    def tolerance_of(self, entry: PublishedTeacher) -> float:
        return self.tolerance if entry.tolerance is None else entry.tolerance


def manifest_path(teacher_dir: Path | None = None) -> Path:
    """``DIR/teachers.yaml`` when the teacher folder has one, else the shipped ``suites/teachers.yaml``."""
    if teacher_dir is not None and (Path(teacher_dir) / MANIFEST_NAME).exists():
        return Path(teacher_dir) / MANIFEST_NAME
    return SUITES_DIR / MANIFEST_NAME


def load_manifest(path: Path) -> TeacherManifest:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BenchError(f"teacher manifest {path} could not be read: {err}") from None
    manifest = from_mapping(TeacherManifest, raw, str(path))
    manifest.path = Path(path)
    return manifest


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def published_checkpoint(teacher_dir: Path, entry: PublishedTeacher) -> Path:
    return (Path(teacher_dir) / entry.file).resolve()


def check_sha256(path: Path, sha256: str, entry: PublishedTeacher, manifest: TeacherManifest, model: str) -> None:
    """A listed sha256 is compared before the file is ever opened by ``torch.load``."""
    if entry.sha256 is not None and sha256 != entry.sha256:
        raise BenchError(f"published teacher {model}: {path} has sha256 {sha256}, {manifest.path} lists "
                         f"{entry.sha256}; refusing to open it")  # fmt: skip


def use_published_teachers(suite: Suite, teacher_dir: Path) -> None:
    """``--teacher-dir``: every pair without a ``teacher_checkpoint`` gets the manifest's file under the folder.

    Only for suites with an offline method (online methods train their teacher). Raises ``BenchError`` for a
    teacher the manifest does not list, a file that is missing or one whose sha256 differs from the listed one."""
    from methods import get_method

    if not any(get_method(m.name).teacher_mode == "offline" for m in suite.methods):
        return
    if not Path(teacher_dir).is_dir():
        raise BenchError(f"--teacher-dir {teacher_dir}: not a folder")
    manifest = load_manifest(manifest_path(teacher_dir))
    for pair in suite.pairs:
        if pair.teacher_checkpoint is None:
            path = published_checkpoint(teacher_dir, manifest.entry(suite.dataset, pair.teacher))
            if not path.exists():
                raise BenchError(f"published teacher {pair.teacher}: {path} not found (listed in {manifest.path})")
            pair.teacher_checkpoint = str(path)
        entry = manifest.datasets.get(suite.dataset, {}).get(pair.teacher)
        path = Path(pair.teacher_checkpoint).resolve()
        if entry is not None and entry.sha256 is not None and path == published_checkpoint(teacher_dir, entry):
            if path.exists():  # (a missing explicit checkpoint is reported by the caller)
                check_sha256(path, file_sha256(path), entry, manifest, pair.teacher)


def published_entry(spec: TeacherSpec, teacher_dir: Path) -> tuple[TeacherManifest, PublishedTeacher] | None:
    """The manifest and its entry when ``spec`` loads the manifest's file under ``teacher_dir``, else None."""
    if spec.checkpoint is None:
        return None
    manifest = load_manifest(manifest_path(teacher_dir))
    entry = manifest.datasets.get(spec.dataset, {}).get(spec.model)
    if entry is None or published_checkpoint(teacher_dir, entry) != Path(spec.checkpoint).resolve():
        return None
    return manifest, entry


def check_published_top1(record: "TeacherRecord", manifest: TeacherManifest, entry: PublishedTeacher) -> None:
    """The teacher's test top-1 within the manifest's tolerance of the published value, else ``BenchError``."""
    spec = record.spec
    tolerance = manifest.tolerance_of(entry)
    if abs(record.top1 - entry.top1) > tolerance:
        raise BenchError(
            f"published teacher {spec.model} ({spec.checkpoint}): test top-1 {record.top1:.2f} is "
            f"{record.top1 - entry.top1:+.2f} points off the published {entry.top1:.2f} (tolerance {tolerance:g}, "
            f"{manifest.path}); refusing to distil from it"
        )


@dataclass
class TeacherRecord:
    spec: TeacherSpec
    path: Path
    metrics: dict[str, float]
    sha256: str | None = None  # of the checkpoint file the weights were loaded from (None: trained here)

    @property
    def top1(self) -> float:
        return self.metrics["top1"]

    def tags(self) -> dict[str, str]:
        """MLflow tags for every student run distilled from this teacher."""
        tags = {"teacher_hash": self.spec.hash}
        if self.spec.checkpoint is not None:
            tags["teacher_checkpoint"] = str(self.spec.checkpoint)
        if self.sha256 is not None:
            tags["teacher_sha256"] = self.sha256
        return tags


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a user or published checkpoint, loaded without running code from it
    (``bench.checkpoints``; the extra types of the published teachers' files allowed)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"teacher checkpoint {path} not found")
    try:
        obj = load_checkpoint(path, allow=PUBLISHED_TEACHER_TYPES)
    except BenchError:
        raise
    except Exception as err:  # torn file, wrong format
        raise BenchError(f"teacher checkpoint {path} could not be read: {err}") from None
    for key in ("model", "state_dict", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise BenchError(f"teacher checkpoint {path}: no state_dict inside")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_teacher(spec: TeacherSpec, splits: Splits, state: dict[str, torch.Tensor]) -> StagedNet:
    info = splits.info
    model = create_model(spec.model, info.num_classes, info.in_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise BenchError(f"teacher weights do not fit model {spec.model!r}: {first}") from None
    return model


def ensure_teacher(
    spec: TeacherSpec,
    splits: Splits,
    results_dir: Path,
    device: torch.device,
    progress: bool = True,
    teacher_dir: Path | None = None,
) -> TeacherRecord:
    """Train (or load) the teacher of ``spec`` once; later calls return the cached record.

    A loaded checkpoint is hashed (sha256) and re-evaluated when the file changed since it was cached.
    ``teacher_dir`` (``--teacher-dir``): a teacher loaded from the manifest's file under it is verified: its sha256
    (when listed) before the file is opened, its top-1 (:func:`check_published_top1`, also when cached). One
    process at a time trains or evaluates a teacher (a lock in its folder): another ``bench run`` needing the same
    teacher waits and reuses it."""
    folder = results_dir / "teachers" / f"{spec.model}-{spec.hash}"
    final = folder / "teacher.pt"
    if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
        raise BenchError(f"teacher checkpoint {spec.checkpoint} not found")
    sha256 = file_sha256(spec.checkpoint) if spec.checkpoint is not None else None
    published = published_entry(spec, teacher_dir) if teacher_dir is not None else None
    if published is not None:
        check_sha256(Path(spec.checkpoint), sha256, published[1], published[0], spec.model)
    with exclusive_lock(folder / "lock"):
        record = _cached_teacher(spec, final, sha256) or _make_teacher(spec, splits, folder, device, progress, sha256)
    if published is not None:
        check_published_top1(record, *published)
    return record


def _cached_teacher(spec: TeacherSpec, final: Path, sha256: str | None) -> TeacherRecord | None:
    if not final.exists():
        return None
    saved = load_checkpoint(final)
    return TeacherRecord(spec, final, saved["metrics"], sha256) if saved.get("sha256") == sha256 else None


def _make_teacher(spec: TeacherSpec, splits: Splits, folder: Path, device: torch.device, progress: bool,
                  sha256: str | None) -> TeacherRecord:  # fmt: skip
    """Evaluate the checkpoint, or train the teacher (resuming its checkpoint), and save its record."""
    if spec.checkpoint is not None:
        apply_numerics(spec.recipe, device)  # evaluated with the numerics its students train with
        model = build_teacher(spec, splits, read_state_dict(spec.checkpoint)).to(device)
        task = build_task(splits, 1.0, spec.seed, spec.recipe, device, progress=False)
        metrics = classification_metrics(*predict(model, task.eval_loaders["test"]))
    else:
        from methods import MethodContext, get_method

        seed_everything(spec.seed)
        model = create_model(spec.model, splits.info.num_classes, splits.info.in_channels)
        task = build_task(
            splits, spec.fraction, spec.seed, spec.recipe, device,
            checkpoint_path=folder / "checkpoint.pt", progress=progress, description=f"teacher {spec.model}",
        )  # fmt: skip
        context = MethodContext(splits.info, task.train_loader.num_samples, spec.recipe.epochs)
        method = get_method("ce")(model, None, None, context)
        history = method.fit(task, spec.recipe)
        metrics = {k.removeprefix("test_"): v for k, v in history.epochs[-1].items() if k.startswith("test_")}
    final = folder / "teacher.pt"
    atomic_save({"state_dict": model.state_dict(), "metrics": metrics, "spec": to_dict(spec), "sha256": sha256}, final)
    return TeacherRecord(spec, final, metrics, sha256)


def load_teacher(record: TeacherRecord, splits: Splits) -> StagedNet:
    saved = load_checkpoint(record.path)
    return build_teacher(record.spec, splits, saved["state_dict"])
