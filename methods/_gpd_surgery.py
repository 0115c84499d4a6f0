"""GPD's whole-network operations (``methods/gpd.py``): adding the CBR branches to a model, Inverse
Reparameterization of a student into the dynamic teacher (DT), student mode (hard parameter sharing) and student
extraction. The per-layer rules (channel map, dynamic layers, branches) are in ``methods/_gpd_layers.py``, whose
docstring states them.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from bench.errors import BenchError
from methods._gpd_layers import (
    DynamicBatchNorm2d,
    DynamicBranchConv2d,
    DynamicConv2d,
    DynamicLayer,
    DynamicLinear,
    GPDMode,
    branchable,
    expanded_width,
)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dynamic_layers(model: nn.Module) -> Iterator[tuple[str, DynamicLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, DynamicLayer):
            yield name, module


def add_branches(model: nn.Module, init: Literal["scratch", "single"] = "scratch") -> nn.Module:
    """A copy of ``model`` whose 3×3 stride-1 convs are :class:`DynamicBranchConv2d` (student width).

    ``init="single"`` (a trained student: GPD's fine-tuning path) sets the branch vector to [1, 0, 0, 0, 0, 0], so
    the copy computes exactly what ``model`` computes; ``"scratch"`` uses OREPA's [0.25, 0.25, 0, 0.5, 0.05, 0.5]
    with the original kernel as branch 1 and fresh kaiming-uniform kernels elsewhere (GPD from scratch).
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if branchable(module):
            _replace(model, name, DynamicBranchConv2d(module, init))
    return model


def _input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, 32, 32)
        if isinstance(module, DynamicConv2d):
            return (module.widths["in"][0], 32, 32)
    raise BenchError("GPD: the model has no convolution; pass input_shape")


@torch.no_grad()
def _boundary_layers(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[set[str], set[str]]:
    """Names of the layers reading the network input (no input expansion) and producing its output (no output
    expansion), found by one traced forward pass in eval mode."""
    kinds = (nn.Conv2d, nn.Linear, DynamicConv2d, DynamicLinear)
    param = next(model.parameters())
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(param)
    seen: list[tuple[str, bool, Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, inp, out, name=name: seen.append((name, inp[0] is x, out)))
        for name, module in model.named_modules()
        if isinstance(module, kinds)
    ]
    was_training = model.training
    model.eval()
    try:
        y = model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    first = {name for name, reads_input, _ in seen if reads_input}
    last = {name for name, _, out in seen if out is y}
    if not first or not last:
        raise BenchError("GPD: could not find the input layer and the classifier of the model by tracing")
    return first, last


def _to_dynamic(model: nn.Module) -> None:
    """Replace every Conv2d / Linear / BatchNorm2d by its dynamic twin (student width); reject other layers
    that hold parameters (their channel rule is not implemented)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DynamicLayer):
            continue
        if type(module) is nn.Conv2d:
            _replace(model, name, DynamicConv2d(module))
        elif type(module) is nn.Linear:
            _replace(model, name, DynamicLinear(module))
        elif type(module) is nn.BatchNorm2d:
            _replace(model, name, DynamicBatchNorm2d(module))
        elif any(True for _ in module.parameters(recurse=False)):
            kind = type(module).__name__
            raise BenchError(f"GPD: layer {name!r} ({kind}) is not supported by the reparameterisation")


def inverse_reparameterize(
    student: nn.Module, ratio: float, noise: float = 0.0, input_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """The dynamic teacher: a ``ratio``× wider copy of ``student`` computing the same function (paper §3.1, IR).

    ``student`` may already contain :class:`DynamicBranchConv2d` layers (``add_branches``). The result is a model
    of the student's class whose conv / linear / BN layers are dynamic: by default it runs as the DT; inside
    ``student_mode(dt)`` it runs as the student (the shared slice). It carries ``gpd_mode`` and the plain
    student architecture (``gpd_template``, for :func:`extract_student`). ``noise`` > 0 adds N(0, noise²) to
    every learnable DT tensor (the official code uses 1e-6; 0 keeps IR exact). ``input_shape`` (C, H, W) is
    used to trace the network (default: the first conv's channels at 32×32). Raises ``BenchError`` when the
    architecture holds channel operations the rule cannot follow (the DT output differs from the student's).
    """
    if ratio < 1:
        raise BenchError(f"GPD: expansion ratio must be >= 1, got {ratio}")
    input_shape = tuple(input_shape) if input_shape else _input_shape_of(student)
    template = plain_copy(student)
    dt = copy.deepcopy(student)
    first, last = _boundary_layers(dt, input_shape)
    _to_dynamic(dt)
    mode = GPDMode()
    for name, layer in dynamic_layers(dt):
        layer.mode = mode
        wide = {space: expanded_width(c, ratio) for space, (c, _) in layer.widths.items()}
        if name in first:
            wide["in"] = layer.widths["in"][0]
        if name in last:
            wide["out"] = layer.widths["out"][0]
        if getattr(layer, "depthwise", False) and wide["in"] != wide["out"]:
            raise BenchError(f"GPD: depthwise conv {name!r} reads the network input; not supported")
        layer.widen(wide, noise)
    if hasattr(dt, "stage_channels"):
        dt.stage_channels = [expanded_width(c, ratio) for c in student.stage_channels]
        dt.feature_dim = expanded_width(student.feature_dim, ratio)
    dt.gpd_mode = mode
    object.__setattr__(dt, "gpd_template", template)  # not a submodule: no parameters, not moved by .to()
    if noise == 0:
        _check_equal(student, dt, input_shape)
    return dt


@torch.no_grad()
def _check_equal(student: nn.Module, dt: nn.Module, input_shape: tuple[int, ...]) -> None:
    """The DT must reproduce the student, with running statistics (eval) and with batch statistics (train; the
    buffers are restored afterwards): a freshly initialised BN is the identity in eval mode, which can hide a
    channel mismatch."""
    param = next(student.parameters())
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(1)).to(param)
    models = (student, dt)
    was = [m.training for m in models]
    buffers = [{k: b.clone() for k, b in m.named_buffers()} for m in models]
    worst, scale = 0.0, 0.0
    try:
        for train in (False, True):
            for m in models:
                m.train(train)
            ref, out = student(x), dt(x)
            worst = max(worst, (ref - out).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    finally:
        for m, training, saved in zip(models, was, buffers):
            m.train(training)
            for k, b in m.named_buffers():
                b.copy_(saved[k])
    if worst > (1e-9 if param.dtype == torch.float64 else 1e-4) * (1.0 + scale):
        raise BenchError(
            f"GPD: the reparameterised teacher does not reproduce {type(student).__name__} (max |Δ| = "
            f"{worst:.3g}); the architecture has channel operations (concat, split, shuffle) that the "
            f"channel-replication rule does not follow"
        )


@contextmanager
def student_mode(dt: nn.Module) -> Iterator[nn.Module]:
    """Run ``dt`` as the student (the shared, rescaled slice) inside the block."""
    mode: GPDMode = dt.gpd_mode
    previous, mode.student = mode.student, True
    try:
        yield dt
    finally:
        mode.student = previous


def student_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain student's state dict (keys of the original architecture) from a DT or branched student."""
    state: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, DynamicLayer):
            state.update({prefix + k: v for k, v in module.student_state().items()})
            continue
        state.update({prefix + k: p.detach() for k, p in module.named_parameters(recurse=False)})
        skip = module._non_persistent_buffers_set
        state.update({prefix + k: b.detach() for k, b in module.named_buffers(recurse=False) if k not in skip})
    return state


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every dynamic layer replaced by its plain student layer (branches merged)."""
    template = getattr(model, "gpd_template", None)
    if template is not None:  # a DT: fill the stored plain architecture
        param = next(model.parameters())
        plain = copy.deepcopy(template).to(device=param.device, dtype=param.dtype)
        plain.load_state_dict(student_state_dict(model))
        return plain.train(model.training)
    plain = copy.deepcopy(model)
    for name, layer in list(dynamic_layers(plain)):
        _replace(plain, name, layer.export())
    return plain


def extract_student(dt: nn.Module) -> nn.Module:
    """The deployable student (paper §3.2, CBR: no post-training): a plain model of the student's architecture
    whose ``state_dict`` loads into ``create_model(<student>)``; branch convs are merged into single kernels."""
    if getattr(dt, "gpd_template", None) is None:
        raise BenchError("extract_student: not a dynamic teacher built by inverse_reparameterize")
    return plain_copy(dt)
