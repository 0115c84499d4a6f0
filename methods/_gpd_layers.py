"""The network surgery of GPD (``methods/gpd.py``): Inverse Reparameterization (IR), hard parameter sharing
(the student is a slice of the dynamic teacher, DT), the multi-branch convolution of the CBR "branch" part, and
student extraction. Reference: Guo et al., "Gap Preserving Distillation by Building Bidirectional Mappings with
A Dynamic Teacher", ICLR 2025 (arXiv 2410.04140), §3 (IR, CBR); the official code ``guoyongcs/GPD``
(``CNN/gpd_utils.py``, ``gpd_layers.py``, ``orepa_ft.py``) was read for the exact rules; this is our own code.

**Channel map.** Every channel dimension of width ``C`` becomes ``C' = round(C·ratio)`` in the DT, and DT channel
``j`` is a copy of student channel ``j mod C`` (for an integer ratio ``r`` these are the ``r`` concatenated copies
of the official ``torch.cat([W] * r)``; for a non-integer ratio the first ``C' - C`` channels get a second copy,
the official "partial duplication" ``[W[:d], W[d:], W[:d]]`` layout, whose first ``C`` channels are the student
channels in order). ``count[c]`` is the number of DT copies of student channel ``c`` (``r`` for an integer ratio,
1 or 2 for ratios in (1, 2)). Each DT copy carries ``1/count`` of the student activation, so:

- a conv / linear weight ``W (O, I, ...)`` becomes ``W'[o', i'] = W[o' mod O, i' mod I] / count_out[o' mod O]``:
  outputs are split (``/count``), inputs are replicated without division (the copies of an input channel sum
  back to the student activation); a bias is split like the outputs;
- a depthwise conv (``groups = in = out``) is replicated without division (the scale rides on its input), its
  bias is split, and its group count becomes ``C'``;
- a BatchNorm keeps replicated ``γ, β, running mean/var``; the DT's BN multiplies its input by ``count`` and
  divides its output by ``count`` (the official ``DynamicBatchNorm2d`` does ``x·r`` / ``y/r``; with a per-channel
  ``count`` this is exact for non-integer ratios too, train and eval mode — the official any-size path instead
  halves mean / quarters var and sets ``eps/4`` for the whole layer, which is not exact for the channels that
  are not duplicated);
- the first layer (the one that reads the network input) keeps its input width, the classifier (the layer whose
  output is the network output) keeps its output width. Both are found by tracing one forward pass, not by name.

Residual additions are consistent because the map depends only on the width. Channel concatenation, split or
shuffle (ShuffleNet) break the map: ``inverse_reparameterize`` checks the DT against the student on a random
input and raises ``BenchError`` for such architectures. The official code adds ``N(0, 1e-6)`` noise to every
copy; here ``noise`` defaults to 0 so the DT equals the student exactly.

**Hard sharing.** In student mode every layer uses the first ``C`` channels of each DT tensor multiplied by
``count`` along the split dimensions (the official ``active_ratio`` slicing ×r), which is exactly the student's
tensor after IR. BatchNorm keeps separate student running statistics (``student_running_mean/var``,
initialised from the student's). Gradients of the DT loss and of the student loss therefore accumulate in the
same parameters.

**Branches (CBR).** ``add_branches`` turns every 3×3 stride-1 conv with ``groups`` 1 or depthwise into a
:class:`DynamicBranchConv2d` with the six branches of GPD's ``orepa_ft.OREPA`` (merged linearly with a learnable
per-output-channel ``vector``; one 3×3 kernel is generated every forward, as OREPA does): (1) the k×k conv,
(2) 1×1 conv ⊗ average kernel, (3) 1×1 conv ⊗ fixed DCT-like prior, (4) 1×1 conv (zero-initialised plus a fixed
identity) → k×k conv, (5) GPD's ``weight_orepa_1x1`` — allocated **k×k** in GPD's ``orepa_ft.py`` (the OREPA paper
has a 1×1 kernel here); we follow GPD's code, (6) depthwise (×8) → pointwise. Differences from GPD's OREPA: no
bias is added to convs that had none (GPD adds a zero-initialised ``bias_orepa_origin``; every such conv in the
zoo is followed by BatchNorm, which cancels a per-channel bias in training, so the deployed student keeps its
architecture and state-dict keys); grouped convs other than depthwise are left single-branch (GPD converts every
3×3 stride-1 conv); in the DT, the fixed tensors (identity of branch 4, prior of branch 3) are reparameterised
with the same rule as the weights, so that IR stays exact (GPD rebuilds them at the wide size).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError

Role = tuple[str, bool] | None  # per tensor dimension: (channel space, split-and-rescale?) or None (not a channel dim)

SCRATCH_VECTOR = (0.25, 0.25, 0.0, 0.5, 0.05, 0.5)  # GPD/OREPA init when training from scratch
SINGLE_VECTOR = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # ``single_init`` when starting from a trained student
DWS_EXPANSION = 8  # OREPA's depthwise-separable branch: 8 depthwise filters per input channel


class GPDMode:
    """Shared by every dynamic layer of one network: ``student=True`` runs the student slice."""

    __slots__ = ("student",)

    def __init__(self) -> None:
        self.student = False


def expanded_width(channels: int, ratio: float) -> int:
    """``C' = round(C·ratio)`` (never below ``C``)."""
    return max(channels, int(round(channels * ratio)))


def copy_counts(channels: int, wide: int) -> Tensor:
    """``count[c]`` = number of DT channels ``j < wide`` with ``j mod channels == c`` (float64)."""
    c = torch.arange(channels)
    return (wide // channels + (c < wide % channels).long()).double()


def _along(vector: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vector.view(shape)


def expand_tensor(tensor: Tensor, roles: tuple[Role, ...], widths: dict[str, tuple[int, int]]) -> Tensor:
    """IR of one tensor: replicate every channel dimension to its wide width, split (``/count``) where marked."""
    for dim, role in enumerate(roles):
        if role is None:
            continue
        space, split = role
        channels, wide = widths[space]
        if wide == channels:
            continue
        index = torch.arange(wide, device=tensor.device) % channels
        tensor = tensor.index_select(dim, index)
        if split:
            counts = copy_counts(channels, wide).to(tensor)[index]
            tensor = tensor / _along(counts, dim, tensor.dim())
    return tensor


# --------------------------------------------------------------------------------------------------
# Dynamic layers
# --------------------------------------------------------------------------------------------------
class DynamicLayer(nn.Module):
    """A layer holding DT-width tensors; in student mode it uses their ``count``-rescaled first-channel slice.

    ``widths[space] = (C, C')`` for each channel space (``in``/``out`` or ``c``); ``roles[name]`` says, per
    dimension of tensor ``name``, which space it indexes and whether IR splits it.
    """

    def __init__(self, widths: dict[str, int], mode: GPDMode | None = None) -> None:
        super().__init__()
        self.widths = {space: (c, c) for space, c in widths.items()}
        self.roles: dict[str, tuple[Role, ...]] = {}
        self.mode = mode if mode is not None else GPDMode()
        self._register_counts()

    def _register_counts(self) -> None:
        like = next((p for p in self.parameters(recurse=False) if p.is_floating_point()), torch.empty(0))
        for space, (c, wide) in self.widths.items():
            counts = copy_counts(c, wide).to(like)
            self.register_buffer(f"count_{space}", counts, persistent=False)
            self.register_buffer(f"count_{space}_wide", counts[torch.arange(wide) % c], persistent=False)

    def width(self, space: str) -> int:
        """Current width of ``space`` (student or DT, following the mode)."""
        c, wide = self.widths[space]
        return c if self.mode.student else wide

    def student_tensor(self, name: str) -> Tensor | None:
        """The student's view of tensor ``name``: the first ``C`` channels of every expanded dimension, times
        ``count`` along the split ones (differentiable: gradients flow into the shared DT tensor)."""
        tensor = getattr(self, name)
        if tensor is None:
            return None
        for dim, role in enumerate(self.roles[name]):
            if role is None:
                continue
            space, split = role
            c, wide = self.widths[space]
            if c == wide:
                continue
            tensor = tensor.narrow(dim, 0, c)
            if split:
                tensor = tensor * _along(getattr(self, f"count_{space}"), dim, tensor.dim())
        return tensor

    def active(self, name: str) -> Tensor | None:
        return self.student_tensor(name) if self.mode.student else getattr(self, name)

    @torch.no_grad()
    def widen(self, wide: dict[str, int], noise: float = 0.0) -> None:
        """Inverse reparameterisation in place: every tensor with roles goes to the widths ``wide``."""
        widths = {space: (self.widths[space][0], wide.get(space, self.widths[space][0])) for space in self.widths}
        for name, roles in self.roles.items():
            tensor = getattr(self, name)
            if tensor is None:
                continue
            new = expand_tensor(tensor.detach(), roles, widths)
            if isinstance(tensor, nn.Parameter):
                if noise > 0:
                    new = new + noise * torch.randn_like(new)
                setattr(self, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                setattr(self, name, new)
        self.widths = widths
        self._register_counts()

    def student_state(self) -> dict[str, Tensor]:
        """State dict of the plain student layer (``export()``'s keys)."""
        raise NotImplementedError

    def export(self) -> nn.Module:
        """The plain student layer (``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d``)."""
        raise NotImplementedError


def _conv_roles(depthwise: bool) -> tuple[Role, ...]:
    """Roles of an (O, I/g, k, k) conv weight: outputs split, inputs replicated; a depthwise kernel is only
    replicated (the split rides on its input)."""
    if depthwise:
        return (("out", False), None, None, None)
    return (("out", True), ("in", False), None, None)


class DynamicConv2d(DynamicLayer):
    """``nn.Conv2d`` with ``groups`` 1 or depthwise, DT-wide and sliceable."""

    def __init__(self, conv: nn.Conv2d, mode: GPDMode | None = None) -> None:
        depthwise = _check_conv(conv)
        super().__init__({"in": conv.in_channels, "out": conv.out_channels}, mode)
        self.depthwise = depthwise
        self.kernel_size, self.stride, self.padding, self.dilation = (
            conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        )  # fmt: skip
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.roles = {"weight": _conv_roles(self.depthwise), "bias": (("out", True),)}

    @property
    def groups(self) -> int:
        return self.width("out") if self.depthwise else 1

    def conv_weight(self, student: bool) -> Tensor:
        return self.student_tensor("weight") if student else self.weight

    def forward(self, x: Tensor) -> Tensor:
        student = self.mode.student
        bias = self.student_tensor("bias") if student else self.bias
        return F.conv2d(x, self.conv_weight(student), bias, self.stride, self.padding, self.dilation, self.groups)

    def student_state(self) -> dict[str, Tensor]:
        state = {"weight": self.conv_weight(True).detach()}
        if self.bias is not None:
            state["bias"] = self.student_tensor("bias").detach()
        return state

    def export(self) -> nn.Conv2d:
        c_in, c_out = self.widths["in"][0], self.widths["out"][0]
        conv = nn.Conv2d(
            c_in, c_out, self.kernel_size, self.stride, self.padding, self.dilation,
            groups=c_out if self.depthwise else 1, bias=self.bias is not None,
        )  # fmt: skip
        conv.to(self.weight).load_state_dict(self.student_state())
        return conv


def _check_conv(conv: nn.Conv2d) -> bool:
    """True for a depthwise conv, False for groups=1; anything else is unsupported."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise BenchError(f"GPD: conv {conv} uses padding {conv.padding!r}/{conv.padding_mode!r}; only zero padding")
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups != 1 and not depthwise:
        raise BenchError(f"GPD: grouped conv {conv} is not supported (only groups=1 and depthwise)")
    return depthwise


def branchable(conv: nn.Module) -> bool:
    """The convs GPD/OREPA re-parameterise: 3×3, stride 1, padding 1 (groups 1 or depthwise here)."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and (conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels)
    )


def _kaiming_uniform_(tensor: Tensor, fan_in: int) -> Tensor:
    """``init.kaiming_uniform_(a=0)`` with an explicit fan-in (OREPA's init of every branch weight)."""
    bound = math.sqrt(6.0 / fan_in)
    return tensor.uniform_(-bound, bound)


def orepa_prior(channels: int, k: int = 3) -> Tensor:
    """OREPA's fixed frequency prior (``fre_init``): cosines along h for the first half of the channels, along w
    for the second half."""
    prior = torch.empty(channels, k, k)
    half = channels / 2
    for i in range(channels):
        for h in range(k):
            for w in range(k):
                if i < half:
                    prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                else:
                    prior[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3)
    return prior


def merge_branches(t: dict[str, Tensor | None], depthwise: bool) -> Tensor:
    """One k×k kernel from the six branch tensors (OREPA's ``weight_gen``; every branch is linear in its kernel)."""
    v = t["vector"]
    k = t["weight"].shape[-1]
    avg = t["weight"].new_full((k, k), 1.0 / (k * k))
    if depthwise:  # every tensor is per channel c
        w = (
            v[0, :, None, None] * t["weight"][:, 0]
            + v[1, :, None, None] * t["w_avg"][:, None, None] * avg
            + v[2, :, None, None] * t["w_prior"][:, None, None] * t["prior"]
            + v[3, :, None, None] * (t["w_id"] + t["id"])[:, None, None] * t["w_id_kxk"]
            + v[4, :, None, None] * t["w_1x1"]
            + v[5, :, None, None] * torch.einsum("cj,cjhw->chw", t["w_pw"], t["w_dw"])
        )
        return w.unsqueeze(1)
    return (
        v[0, :, None, None, None] * t["weight"]
        + v[1, :, None, None, None] * t["w_avg"][:, :, None, None] * avg
        + v[2, :, None, None, None] * t["w_prior"][:, :, None, None] * t["prior"][:, None]
        + v[3, :, None, None, None] * torch.einsum("othw,ti->oihw", t["w_id_kxk"], t["w_id"] + t["id"])
        + v[4, :, None, None, None] * t["w_1x1"]
        + v[5, :, None, None, None] * torch.einsum("oij,ijhw->oihw", t["w_pw"], t["w_dw"])
    )


class DynamicBranchConv2d(DynamicConv2d):
    """A 3×3 stride-1 conv trained as GPD's six-branch OREPA block (see the module docstring), merged into one
    kernel every forward; ``export()`` gives the deployed single ``nn.Conv2d``."""

    def __init__(self, conv: nn.Conv2d, init: Literal["scratch", "single"], mode: GPDMode | None = None) -> None:
        if not branchable(conv):
            raise BenchError(f"GPD: conv {conv} is not a 3x3 stride-1 conv; it cannot take branches")
        super().__init__(conv, mode)
        o, i, k = conv.out_channels, conv.in_channels, conv.kernel_size[0]
        new = conv.weight.new_empty
        dw = self.depthwise
        per_in = 1 if dw else i  # input channels per group
        self.w_avg = nn.Parameter(_kaiming_uniform_(new((o,) if dw else (o, i)), per_in))
        self.w_prior = nn.Parameter(_kaiming_uniform_(new((o,) if dw else (o, i)), per_in))
        # GPD's "1x1" branch is allocated k×k in its orepa_ft.py (see the module docstring)
        self.w_1x1 = nn.Parameter(_kaiming_uniform_(new((o, k, k) if dw else (o, i, k, k)), per_in * k * k))
        self.w_id = nn.Parameter(torch.zeros_like(new((o,) if dw else (i, i))))
        self.w_id_kxk = nn.Parameter(_kaiming_uniform_(new((o, k, k) if dw else (o, i, k, k)), per_in * k * k))
        self.w_dw = nn.Parameter(_kaiming_uniform_(new((i, DWS_EXPANSION, k, k)), k * k))
        self.w_pw = nn.Parameter(
            _kaiming_uniform_(new((o, DWS_EXPANSION) if dw else (o, i, DWS_EXPANSION)), per_in * DWS_EXPANSION)
        )
        self.register_buffer("prior", orepa_prior(o, k).to(conv.weight))
        self.register_buffer("id", torch.ones_like(self.w_id) if dw else torch.eye(i).to(conv.weight))
        vector = SCRATCH_VECTOR if init == "scratch" else SINGLE_VECTOR
        self.vector = nn.Parameter(torch.tensor(vector).to(conv.weight)[:, None].repeat(1, o))
        out_s, out_r, in_r = ("out", True), ("out", False), ("in", False)
        if dw:  # every tensor is indexed by the channel; the scale rides on the input, so nothing is split
            self.roles.update(
                w_avg=(out_r,), w_prior=(out_r,), prior=(out_r, None, None), w_1x1=(out_r, None, None),
                w_id=(out_r,), id=(out_r,), w_id_kxk=(out_r, None, None), w_dw=(out_r, None, None, None),
                w_pw=(out_r, None), vector=(None, out_r),
            )  # fmt: skip
        else:
            self.roles.update(
                w_avg=(out_s, in_r), w_prior=(out_s, in_r), prior=(out_r, None, None),
                w_1x1=(out_s, in_r, None, None), w_id=(("in", True), in_r), id=(("in", True), in_r),
                w_id_kxk=(out_s, in_r, None, None), w_dw=(in_r, None, None, None), w_pw=(out_s, in_r, None),
                vector=(None, out_r),
            )  # fmt: skip

    def conv_weight(self, student: bool) -> Tensor:
        get = self.student_tensor if student else (lambda name: getattr(self, name))
        return merge_branches({name: get(name) for name in self.roles if name != "bias"}, self.depthwise)


class DynamicLinear(DynamicLayer):
    def __init__(self, linear: nn.Linear, mode: GPDMode | None = None) -> None:
        super().__init__({"in": linear.in_features, "out": linear.out_features}, mode)
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.roles = {"weight": (("out", True), ("in", False)), "bias": (("out", True),)}

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.active("weight"), self.active("bias"))

    def student_state(self) -> dict[str, Tensor]:
        state = {"weight": self.student_tensor("weight").detach()}
        if self.bias is not None:
            state["bias"] = self.student_tensor("bias").detach()
        return state

    def export(self) -> nn.Linear:
        linear = nn.Linear(self.widths["in"][0], self.widths["out"][0], bias=self.bias is not None)
        linear.to(self.weight).load_state_dict(self.student_state())
        return linear


class DynamicBatchNorm2d(DynamicLayer):
    """BatchNorm with replicated DT statistics/affine, the ``count`` input/output rescale in DT mode, and separate
    student running statistics. ``batch_norm``: ``F.batch_norm``, or ``bench.distributed.sync_batch_norm`` (same
    arguments) on several data-parallel workers with SyncBN."""

    batch_norm = staticmethod(F.batch_norm)

    def __init__(self, bn: nn.BatchNorm2d, mode: GPDMode | None = None) -> None:
        if not (bn.affine and bn.track_running_stats):
            raise BenchError(f"GPD: BatchNorm {bn} needs affine=True and track_running_stats=True")
        super().__init__({"c": bn.num_features}, mode)
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        for prefix in ("", "student_"):
            self.register_buffer(f"{prefix}running_mean", bn.running_mean.detach().clone())
            self.register_buffer(f"{prefix}running_var", bn.running_var.detach().clone())
            self.register_buffer(f"{prefix}num_batches_tracked", bn.num_batches_tracked.detach().clone())
        self.roles = {name: (("c", False),) for name in ("weight", "bias", "running_mean", "running_var")}

    def forward(self, x: Tensor) -> Tensor:
        student = self.mode.student
        prefix = "student_" if student else ""
        mean, var = getattr(self, f"{prefix}running_mean"), getattr(self, f"{prefix}running_var")
        factor = self.momentum or 0.0
        if self.training:
            tracked = getattr(self, f"{prefix}num_batches_tracked")
            tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(tracked)
        c, wide = self.widths["c"]
        scale = None if student or c == wide else self.count_c_wide.view(1, -1, 1, 1)
        if scale is not None:
            x = x * scale
        out = self.batch_norm(x, mean, var, self.active("weight"), self.active("bias"), self.training, factor, self.eps)
        return out if scale is None else out / scale

    def student_state(self) -> dict[str, Tensor]:
        return {
            "weight": self.student_tensor("weight").detach(),
            "bias": self.student_tensor("bias").detach(),
            "running_mean": self.student_running_mean.detach(),
            "running_var": self.student_running_var.detach(),
            "num_batches_tracked": self.student_num_batches_tracked.detach(),
        }

    def export(self) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(self.widths["c"][0], eps=self.eps, momentum=self.momentum)
        bn.to(self.weight).load_state_dict(self.student_state())
        return bn
