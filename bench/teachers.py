"""Teachers for offline methods: trained once per teacher spec (cached by its content hash) or loaded.

``ensure_teacher`` returns a :class:`TeacherRecord` (weights file + test metrics). Training goes through
the same engine as every student (method ``ce``), checkpointing every epoch, so an interrupted teacher
resumes too. A user checkpoint (``teacher_checkpoint:`` in the suite) is loaded in the common published
layouts (a bare ``state_dict``, ``{"model": ...}`` as in CRD / mdistiller, ``{"state_dict": ...}``,
``module.`` prefixes from DataParallel) and evaluated once on the test split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.config import to_dict
from bench.data import Splits
from bench.engine import atomic_save, build_task, predict, seed_everything
from bench.errors import BenchError
from bench.metrics import classification_metrics
from bench.models import StagedNet, create_model
from bench.suites import TeacherSpec


@dataclass
class TeacherRecord:
    spec: TeacherSpec
    path: Path
    metrics: dict[str, float]

    @property
    def top1(self) -> float:
        return self.metrics["top1"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise BenchError(f"teacher checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
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

    ``teacher_dir``: a folder of published teacher checkpoints (``--teacher-dir``); not used yet."""
    folder = results_dir / "teachers" / f"{spec.model}-{spec.hash}"
    final = folder / "teacher.pt"
    if final.exists():
        saved = torch.load(final, map_location="cpu", weights_only=False)
        return TeacherRecord(spec, final, saved["metrics"])
    if spec.checkpoint is not None:
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
        method = get_method("ce")(model, None, None, MethodContext(splits.info, task.train_loader.num_samples, spec.recipe.epochs))
        history = method.fit(task, spec.recipe)
        metrics = {k.removeprefix("test_"): v for k, v in history.epochs[-1].items() if k.startswith("test_")}
    atomic_save({"state_dict": model.state_dict(), "metrics": metrics, "spec": to_dict(spec)}, final)
    return TeacherRecord(spec, final, metrics)


def load_teacher(record: TeacherRecord, splits: Splits) -> StagedNet:
    saved = torch.load(record.path, map_location="cpu", weights_only=False)
    return build_teacher(record.spec, splits, saved["state_dict"])
