"""What produced a run, recorded on its MLflow run so a number can be traced to its code, software and hardware.

Per run (``run_tags``): ``git_commit``, ``git_dirty``, ``kdbench_version``, ``torch_version``, ``cuda_version``,
``device_name`` (the GPU's name, or the CPU model), ``device_count`` (CUDA devices visible, or the CPU cores this
process may use), ``deterministic`` and ``tf32`` (``world_size``, ``global_batch_size`` and the other
parallelism tags come from ``bench.distributed.run_tags``, set when the run is prepared), plus
MLflow's own system tags (``mlflow.source.git.commit``, ``mlflow.source.name``, ``mlflow.source.type``) so its UI
shows the source, and ``command`` (the whole command line); ``run_note`` writes the spec as one readable paragraph
(``mlflow.note.content``) and ``dataset_inputs`` the training / test data as MLflow dataset inputs (name,
fraction, digest of the chosen indices).

MLflow 3.17's UI opens an experiment on the view its sidebar switch (GenAI / Model training) or the URL's
``?workflowType=machine_learning`` picks, defaulting to GenAI; the experiment's ``mlflow.experimentKind`` tag
(``bench.tracking``) decides where that switch is off (its bundle reads the tag only then).

Per invocation of ``bench run`` / ``bench sweep`` (``start_invocation``): the full environment
(``torch.utils.collect_env`` and every installed distribution) is written once to
``<suite folder>/environment/<key>.txt``, named by a digest of what decides it (Python, platform, host, the
installed distributions), so an unchanged environment is written once ever; each run names that file in its
``environment`` tag. ``collect_env`` calls ``pip`` (seconds), so the file is written by a background thread while
the runs start (``Invocation.wait`` before the invocation returns). When the checkout is dirty, ``git diff HEAD``
(and the untracked files' names) goes to ``environment/git-diff-<digest>.patch``, logged as an artifact of each
run. Not here: opening MLflow runs (``bench.tracking``), the lifecycle that calls these (``bench.run.lifecycle``).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from bench.suites import RunSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS = ("git_commit", "git_dirty", "kdbench_version", "torch_version", "cuda_version", "device_name",
        "device_count", "world_size", "global_batch_size", "deterministic", "tf32")  # fmt: skip


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(short: bool = True) -> str:
    """The checkout's HEAD commit, or "unknown" outside a git checkout."""
    out = _git("rev-parse", *(["--short"] if short else []), "HEAD")
    return out.strip() if out else "unknown"


def git_diff() -> str | None:
    """``git diff HEAD`` plus the names of untracked (not ignored) files; "" when clean, None outside git."""
    diff = _git("diff", "HEAD")
    untracked = _git("ls-files", "--others", "--exclude-standard")
    if diff is None or untracked is None:
        return None
    names = [f"# untracked: {name}" for name in untracked.splitlines()]
    return diff + ("\n".join(names) + "\n" if names else "")


def kdbench_version() -> str:
    try:
        return importlib.metadata.version("kdbench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_tags(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name, count = torch.cuda.get_device_name(device), torch.cuda.device_count()
    else:
        name, count = cpu_model(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device_name": name, "device_count": str(count), "cuda_version": torch.version.cuda or "none"}


def numeric_tags() -> dict[str, str]:
    """Settings that change the float results: deterministic algorithms and TensorFloat-32 (CUDA matmul /
    cuDNN convolutions)."""
    tf32 = f"matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, cudnn " \
           f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}"  # fmt: skip
    return {"deterministic": str(torch.are_deterministic_algorithms_enabled()).lower(), "tf32": tf32}


def _distributions() -> list[str]:
    found = {(d.metadata["Name"] or "?").lower(): d.version for d in importlib.metadata.distributions()}
    return [f"{name}=={version}" for name, version in sorted(found.items())]


@lru_cache(maxsize=1)  # one process, one environment: later invocations in it (tests, notebooks) reuse it
def _environment_text(packages: tuple[str, ...]) -> str:
    from torch.utils import collect_env

    return (collect_env.get_pretty_env_info() + f"\n\nPython executable: {sys.executable}\n\n"
            f"Installed distributions ({len(packages)}):\n" + "\n".join(packages) + "\n")  # fmt: skip


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Invocation:
    """What one ``bench run`` / ``bench sweep`` records once for all its runs (module docstring)."""

    source_name: str  # "python -m bench run <suite>" (MLflow's UI shows a source name's last path component)
    command: str  # the whole command line
    git_commit: str  # full hash
    git_dirty: bool
    environment: Path  # the environment file (written by a background thread until ``wait``)
    diff: Path | None = None  # the git diff when dirty
    _writer: threading.Thread | None = field(default=None, repr=False, compare=False)

    def wait(self) -> None:
        """Block until the environment file is written."""
        if self._writer is not None:
            self._writer.join()

    def __getstate__(self) -> dict:  # travels to Ray workers without its thread
        return {**self.__dict__, "_writer": None}


@lru_cache(maxsize=1)
def _environment_key() -> tuple[str, tuple[str, ...]]:
    packages = tuple(_distributions())
    key = json.dumps([sys.version, platform.platform(), socket.gethostname(), sys.executable, cpu_model(), packages])
    return hashlib.sha256(key.encode()).hexdigest()[:16], packages


def start_invocation(folder: Path, argv: list[str] | None = None) -> Invocation:
    """Record this invocation's environment (in the background, unless already on disk) and git diff under
    ``folder/environment/``."""
    key, packages = _environment_key()
    environment = (folder / "environment" / f"{key}.txt").resolve()
    writer = None
    if not environment.exists():
        writer = threading.Thread(target=lambda: _write_atomically(environment, _environment_text(packages)),
                                  name="kdbench-environment", daemon=True)  # fmt: skip
        writer.start()
    diff_text = git_diff()
    diff = None
    if diff_text:
        digest = hashlib.sha256(diff_text.encode()).hexdigest()[:12]
        diff = (folder / "environment" / f"git-diff-{digest}.patch").resolve()
        if not diff.exists():
            _write_atomically(diff, diff_text)
    argv = sys.argv[1:] if argv is None else argv
    source = f"python -m bench {argv[0] if argv else 'run'} {folder.name}"
    return Invocation(source, " ".join(["python -m bench", *argv]), git_commit(short=False), bool(diff_text),
                      environment, diff, writer)  # fmt: skip


def run_tags(invocation: Invocation | None, device: torch.device) -> dict[str, str]:
    """The provenance tags of a run (module docstring) but the parallelism ones. Without an
    invocation (a run started outside ``bench run`` / ``bench sweep``) git is asked now and no environment
    file is named."""
    if invocation is None:
        commit, dirty, source = git_commit(short=False), bool(git_diff()), "python -m bench"
    else:
        commit, dirty, source = invocation.git_commit, invocation.git_dirty, invocation.source_name
    tags = {"git_commit": commit[:12], "git_dirty": str(dirty).lower(), "kdbench_version": kdbench_version(),
            "torch_version": torch.__version__, **device_tags(device), **numeric_tags(),
            "mlflow.source.git.commit": commit, "mlflow.source.name": source[:500],
            "mlflow.source.type": "LOCAL"}  # fmt: skip
    if invocation is not None:
        tags.update(environment=str(invocation.environment), command=invocation.command[:5000])
    return tags


def indices_digest(indices: np.ndarray, targets: np.ndarray) -> str:
    """A digest of the chosen samples (their positions in the split and their labels)."""
    h = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes())
    h.update(np.asarray(targets, dtype=np.int64)[indices].tobytes())
    return h.hexdigest()[:16]


def dataset_inputs(dataset: str, fraction: float, seed: int, splits: dict[str, tuple[np.ndarray, np.ndarray]]):
    """MLflow dataset inputs of a run: one per split (``"train"`` / ``"test"`` / ``"val"`` → (indices into the
    split, the split's labels)), each named after the dataset and split, its digest from its indices."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for context, (indices, targets) in splits.items():
        share = f" {fraction:g}" if context == "train" else ""
        profile = {"num_samples": int(len(indices)), "of": int(len(targets))}
        if context != "test":
            profile.update(seed=seed, **({"fraction": fraction} if context == "train" else {}))
        dataset_entity = Dataset(name=f"{dataset} {context}{share}", digest=indices_digest(indices, targets),
                                 source_type="code", source=json.dumps({"tags": {"kdbench.dataset": dataset}}),
                                 profile=json.dumps(profile))  # fmt: skip
        inputs.append(DatasetInput(dataset_entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def run_note(spec: "RunSpec", teacher_mode: str, num_train: int) -> str:
    """The spec as one readable paragraph (``mlflow.note.content``); ``teacher_mode``: the method's."""
    r = spec.recipe
    target = f"; epochs-to-target counts from {spec.target_top1:g} % test top-1" if spec.target_top1 is not None else ""
    hp = ", ".join(f"{k}={v}" for k, v in spec.hparams.items()) or "defaults"
    teacher = {"offline": f"distilled from the frozen teacher {spec.teacher}",
               "online": f"together with the teacher {spec.teacher}, trained from scratch beside it"}.get(
        teacher_mode, "without a teacher")  # fmt: skip
    return (f"Method `{spec.label}` ({spec.method}; hyperparameters: {hp}) trains the student {spec.student} "
            f"{teacher} on {spec.dataset}: {spec.fraction:g} of the training set ({num_train} images, stratified), "
            f"seed {spec.seed}. Recipe: {r.epochs} epochs, batch {r.batch_size}, SGD lr {r.lr} momentum "
            f"{r.momentum} (×{r.gamma} at epochs {list(r.milestones)}), weight decay {r.weight_decay}, augmentation "
            f"{r.augment}{f', validation split {r.val_fraction:g}' if r.val_fraction else ''}"
            f"{', bf16 autocast' if r.amp else ''}{', channels-last' if r.channels_last else ''}"
            f"{', torch.compile' if r.compile else ''}. Suite `{spec.suite}`, spec hash {spec.hash}"
            f"{target}.")
