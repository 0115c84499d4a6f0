"""Reading checkpoint files without running code from them: every ``torch.load`` of the harness goes through
:func:`load_checkpoint`, which loads with ``weights_only=True`` (PyTorch's restricted unpickler: tensors,
containers and plain Python values; a pickle that asks for any other callable or class is refused before
anything of it runs). Our own files (run checkpoints, teacher records, student weights) hold nothing else. A
caller may allow exactly the extra types a known kind of file holds, never more: :data:`PUBLISHED_TEACHER_TYPES`
(the published CIFAR teachers) and :data:`LEGACY_RUN_CHECKPOINT_TYPES` (NumPy's RNG state in run checkpoints
written before it was stored as a tensor). A file that needs anything else is refused with a ``BenchError``
naming the file and the type it asked for. There is no switch that turns the check off.

Not here: writing checkpoints (``bench.engine.atomic_save``), what a teacher file must contain
(``bench.teachers.read_state_dict``), the sha256 check of a published teacher (``bench.teachers``).
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.serialization import safe_globals

from bench.errors import BenchError

_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy._core.multiarray.scalar (numpy.core.* before NumPy 2)

# RepDistiller's ``train_teacher.py`` / mdistiller's ``cifar_teachers.tar`` (``<arch>_vanilla/ckpt_epoch_240.pth``):
# ``{"model": state_dict, "epoch": int, "accuracy": ..., "optimizer": state_dict}``, the accuracy a NumPy scalar
# (float64 or float32, with its dtype) in some copies, and the training options (``argparse.Namespace``) in others.
PUBLISHED_TEACHER_TYPES: tuple = (
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Float32DType,
    argparse.Namespace,
)

# Run checkpoints written before the NumPy RNG state was stored as a tensor hold it as a uint32 array.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy._core.multiarray._reconstruct
LEGACY_RUN_CHECKPOINT_TYPES: tuple = (
    _RECONSTRUCT,
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
)

_WANTED = (re.compile(r"GLOBAL ([\w.]+)"), re.compile(r"got <class '([\w.]+)'>"))


def wanted_type(err: Exception) -> str:
    """The global (function or class) a refused pickle asked for, from PyTorch's error message."""
    text = str(err)
    for pattern in _WANTED:
        match = pattern.search(text)
        if match:
            return match.group(1)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__


def load_checkpoint(path: str | Path, map_location: Any = "cpu", allow: Sequence = ()) -> Any:
    """``torch.load(path, weights_only=True)``, also allowing the types in ``allow``. A file that needs another
    type is refused (``BenchError``: the file and the type); other read errors (a torn file) propagate."""
    try:
        with safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():  # not a refusal: a torn or foreign file
            raise
        raise BenchError(
            f"{path}: refused to load: its pickle asks for {wanted_type(err)}, which a weights-only load does not "
            "allow (unpickling it could run code); if you made this file yourself, save the bare state_dict"
        ) from None
