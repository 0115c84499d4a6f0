"""``stablekd``: StableKD (Kao, Chen & Chan, "StableKD: Breaking Inter-block Optimization Entanglement for
Stable Knowledge Distillation", arXiv 2312.13223 v2, 2024): blockwise **Decomposition** of teacher and student,
then progressive **Recomposition** towards end-to-end distillation.

Only the paper's abstract could be read (no official code is public; ``shared/research/methods.md`` §1). The
abstract fixes the two operations: Decomposition "divides a pair of teacher and student networks into several
blocks for separate distillation" and Recomposition "progressively merges them back, evolving towards end-to-end
distillation". Everything below that goes further is our reading, made a hyperparameter of
:class:`StableKDHparams`.

Blocks. Teacher and student are cut at the stage boundaries of the :class:`~bench.models.StagedNet` contract
into K = ``num_stages + 1`` blocks: block 0 = stem + stage 0, block k = stage k (1 <= k < S), block S = the
head (pooling + classifier). A *partition* groups the K blocks into contiguous groups; one training step
trains every group on its own:

* a group starting at block 0 reads the image; a group starting at block a > 0 reads the **teacher's** output
  of block a-1 (``no_grad``), through an input adapter when the teacher's and student's shapes there differ;
  so no gradient crosses a group boundary inside the student;
* a group ending at block b < S is trained to match the teacher's stage-b output (by default: as fed to block
  b+1, i.e. bridged to the student's shape, compared with the student's pre-activation output where the
  bridged target can be negative; :func:`block_feature_loss`, loss name ``feat_b<b>``); the group
  ending with the head is trained with CE + KD on logits (:func:`head_block_loss`, loss names ``ce`` and
  ``kd``, as :mod:`methods.kd`).

With one group (the last phase of the default schedule) this is exactly vanilla KD. Evaluation is always
the student alone, end to end (the inherited ``eval_models``), so accuracy curves compare with any method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import check_fields
from bench.errors import BenchError
from bench.models import StagedNet
from methods.base import Method, MethodContext, register_method
from methods.kd import kd_objective as head_block_loss  # the head group is trained with the KD objective

Partition = list[range]


# --------------------------------------------------------------------------------------------------
# Pure functions: losses and the block schedule
# --------------------------------------------------------------------------------------------------
def block_feature_loss(student: Tensor, teacher: Tensor, kind: str = "mse") -> Tensor:
    """Distance between a student block's (adapted) output and the teacher's block output, averaged over every
    element: ``mse`` = mean (s - t)², ``l1`` = mean |s - t|. The teacher side carries no gradient."""
    if student.shape != teacher.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    teacher = teacher.detach()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "l1":
        return F.l1_loss(student, teacher)
    raise ValueError(f"unknown feature loss {kind!r} (mse, l1)")


def partition(num_blocks: int, num_groups: int) -> Partition:
    """``num_blocks`` blocks in ``num_groups`` contiguous groups of sizes as equal as possible; when
    ``num_groups`` does not divide ``num_blocks`` the larger groups are the **last** ones (next to the head,
    which alone is only pooling + a linear layer): 5 blocks in 3 groups = [0] [1 2] [3 4]."""
    if not 1 <= num_groups <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {num_groups} groups")
    small, extra = divmod(num_blocks, num_groups)
    sizes = [small] * (num_groups - extra) + [small + 1] * extra
    starts = [sum(sizes[:i]) for i in range(num_groups)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def default_schedule(num_blocks: int) -> list[list[float]]:
    """K → ⌈K/2⌉ → 1 blocks, the phases spread evenly over the budget (start fractions 0, 1/3, 2/3); phases
    that would repeat a count are dropped (K = 2: 2 → 1 at 0, 1/2)."""
    counts: list[int] = []
    for n in (num_blocks, math.ceil(num_blocks / 2), 1):
        if not counts or counts[-1] != n:
            counts.append(n)
    return [[i / len(counts), float(n)] for i, n in enumerate(counts)]


def schedule_phases(
    schedule: list[list[float]] | None, num_blocks: int, epochs: int, unit: str = "fraction"
) -> list[tuple[int, Partition]]:
    """``(start_epoch, partition)`` of every phase (0-based epochs). ``schedule`` is a list of
    ``[start, number_of_blocks]`` (None = :func:`default_schedule`); ``start`` is a fraction of ``epochs``
    for ``unit="fraction"`` (rounded half up to an epoch, at most the last epoch, so short budgets still end
    with the last phase; of phases that land on the same epoch the later one wins), an epoch index for
    ``unit="epoch"`` (BenchError if not below ``epochs``). Phases must only merge: every group of a phase is a
    union of groups of the phase before (BenchError otherwise)."""
    if schedule is None:
        schedule, unit = default_schedule(num_blocks), "fraction"
    phases: list[tuple[int, Partition]] = []
    for start, count in schedule:
        n = int(count)
        if n > num_blocks:
            raise BenchError(f"stablekd.schedule: {n} blocks asked, but this teacher/student pair has {num_blocks}")
        epoch = min(math.floor(start * epochs + 0.5), epochs - 1) if unit == "fraction" else int(start)
        if epoch >= epochs:
            raise BenchError(f"stablekd.schedule: a phase starts at epoch {epoch + 1} of a {epochs}-epoch budget")
        groups = partition(num_blocks, n)
        if phases:
            previous = {g.start for g in phases[-1][1]}
            if not {g.start for g in groups} <= previous:
                raise BenchError(
                    f"stablekd.schedule: {len(phases[-1][1])} → {n} blocks is not a merge of adjacent blocks "
                    f"({_show(phases[-1][1])} → {_show(groups)}); pick counts whose groups nest"
                )
        phases.append((epoch, groups))
    return phases


def partition_at(epoch: int, phases: list[tuple[int, Partition]]) -> Partition:
    """The partition in force at (0-based) ``epoch``: that of the last phase starting at or before it."""
    current = phases[0][1]
    for start, groups in phases:
        if start <= epoch:
            current = groups
    return current


def _show(groups: Partition) -> str:
    return " ".join(f"[{' '.join(map(str, g))}]" for g in groups)


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------
class Bridge(nn.Module):
    """Feature map of shape (C_in, H_in, W_in) → (C_out, H_out, W_out): 1×1 conv (no bias) + BatchNorm, with the
    resolution changed by average pooling (downsampling, before the conv) or bilinear interpolation
    (upsampling, after the conv). Both resizes are linear and commute with a 1×1 conv, so this equals
    resize → conv → BN, computed at the lower resolution."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.conv = nn.Conv2d(in_shape[0], out_shape[0], kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_shape[0])

    def forward(self, x: Tensor) -> Tensor:
        size = self.out_shape[1:]
        if tuple(x.shape[2:]) == size:
            return self.bn(self.conv(x))
        if all(o <= i for o, i in zip(size, x.shape[2:])):
            return self.bn(self.conv(F.adaptive_avg_pool2d(x, size)))
        return self.bn(F.interpolate(self.conv(x), size=size, mode="bilinear", align_corners=False))


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
@dataclass
class StableKDHparams:
    """Defaults: ours (the paper body was not available), except T/CE/KD = the CRD protocol's KD setting."""

    schedule: list[list[float]] | None = None  # [[start, blocks], ...]; None = K → ⌈K/2⌉ → 1 at 0, 1/3, 2/3
    schedule_unit: Literal["fraction", "epoch"] = "fraction"
    feature_loss: Literal["mse", "l1"] = "mse"
    feature_weight: float = 1.0
    always_adapt: bool = False
    bridge: Literal["shared", "separate"] = "shared"
    student_feature: Literal["preact", "output"] = "preact"  # shared bridge: student tensor at a signed target
    teacher_feature: Literal["output", "preact"] = "output"  # the teacher tensor bridged / compared
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def validate(self, where: str) -> None:
        checks = [
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.feature_weight >= 0, "feature_weight", "must be >= 0"),
            (self.ce_weight >= 0 and self.kd_weight >= 0, "ce_weight", "ce_weight and kd_weight must be >= 0"),
        ]
        check_fields(self, where, checks)
        if self.schedule is None:
            return
        w = f"{where}.schedule"
        if not self.schedule:
            raise BenchError(f"{w}: must list at least one [start, blocks] phase (or be null for the default)")
        for i, entry in enumerate(self.schedule):
            if len(entry) != 2:
                raise BenchError(f"{w}[{i}]: expected [start, number_of_blocks], got {entry!r}")
            start, count = entry
            if count < 1 or count != int(count):
                raise BenchError(f"{w}[{i}]: number of blocks must be an integer >= 1, got {count!r}")
            if self.schedule_unit == "fraction" and not 0 <= start < 1:
                raise BenchError(f"{w}[{i}]: a start fraction must be in [0, 1), got {start!r}")
            if self.schedule_unit == "epoch" and (start < 0 or start != int(start)):
                raise BenchError(f"{w}[{i}]: a start epoch must be an integer >= 0, got {start!r}")
        starts = [e[0] for e in self.schedule]
        counts = [e[1] for e in self.schedule]
        if starts[0] != 0:
            raise BenchError(f"{w}: the first phase must start at 0, got {starts[0]!r}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise BenchError(f"{w}: phase starts must increase, got {starts}")
        if any(b > a for a, b in zip(counts, counts[1:])):
            raise BenchError(f"{w}: recomposition only merges blocks; counts must not increase, got {counts}")


@register_method
class StableKD(Method):
    """StableKD: blockwise distillation whose blocks are progressively merged back into end-to-end KD.

    Our reading of the paper (each a hyperparameter of :class:`StableKDHparams`, or a fixed structural choice
    stated here; the abstract is all that could be read):

    * **Blocks** = the zoo's stage boundaries: K = ``num_stages + 1`` (CIFAR ResNet/WRN/ShuffleNet 4, VGG,
      MobileNet, CIFAR ResNet50 and torchvision ResNets 5). Block 0 includes the student's own stem and reads
      the image (no teacher activation exists before the first stage, and the stems do not correspond).
      Teacher and student must have the same number of stages (true for all 13 CRD pairs); otherwise a
      BenchError.
    * **Decomposed input**: a group starting at block a > 0 reads the frozen teacher's stage a-1 output. When
      that shape differs from the student's stage a-1 output shape it passes through a :class:`Bridge`
      (1×1 conv + BN; average pooling / bilinear upsampling for resolution) into the student's shape. Equal
      shapes pass unchanged (``always_adapt=False``); ``always_adapt=True`` puts a bridge at every cut.
    * **Decomposed target**: a group ending at block b < S is trained with ``feature_loss`` (``mse``, mean over
      elements; or ``l1``) × ``feature_weight`` (1.0) towards the teacher's stage-b output, in one of two ways
      (``bridge``):

      - ``"shared"`` (default): the target is **what block b+1 is fed**, the bridged teacher output (no
        gradient through the target; the bridge learns only from the blocks it feeds). Block b then learns
        to produce exactly the input block b+1 is trained on, so the decomposed blocks compose into a working
        student. Where shapes are equal this is the teacher's output itself.

        *Reachable targets* (``student_feature``). A bridge ends with a BatchNorm, so its output is about half
        negative, while a stage that ends with a ReLU (vgg8, ShuffleNets, the ResNets, MobileNet-V1) outputs no
        negative value: compared with that output the loss cannot fall below roughly the energy of the
        target's negative part (measured on resnet50 → vgg8: it stalls at ~0.45 of its initial value).
        ``"preact"`` (default) therefore reads the bridge as mapping the teacher into the student's
        **pre-activation** space wherever the target is signed (a bridged cut, or ``teacher_feature:
        preact``): block b's pre-activation output (:meth:`~bench.models.StagedNet.forward_stage_preact`)
        is compared with the bridged tensor, and block b+1 is fed the student's own activation of it
        (:meth:`~bench.models.StagedNet.activate`, e.g. its ReLU), i.e. what block b outputs once its
        pre-activation matches. So every target is reachable and block b+1 trains on inputs of the kind the
        student's block b produces. Where the student's stage has no final activation (MobileNetV2: the
        pre-activation is the output) or its pre-activation is not a stage's own tensor (WRN, whose raw stage
        output is signed already), the output is compared, as it is where the target is the teacher's own
        post-activation output (an identity bridge between equal shapes). ``"output"`` compares the stage
        output everywhere and feeds block b+1 the bridged tensor itself (the earlier reading, unreachable
        where a bridge meets a ReLU stage).
      - ``"separate"``: FitNet-style: the student's output goes through a second bridge (student → teacher
        shape) and is compared with the teacher's raw output. Where shapes differ, block b+1's training input
        and block b's output then live in unrelated spaces, and the end-to-end student stays at chance until
        the cut is merged (on digits, wrn_16_2 → wrn_16_1: ~10 % test top-1 for the first two thirds of the
        budget with ``separate``, 30-85 % with ``shared``, both ~94 % at the end). With ``teacher_feature:
        preact`` this is the other reachable reading: the student's output mapped into the teacher's space
        and compared with the teacher's pre-activation tensor.

      ``teacher_feature``: the teacher tensor that is bridged (``shared``) or compared (``separate``): its
      stage output (``"output"``, default) or its pre-activation output (``"preact"``, as
      :mod:`bench.models.base` defines it; such a teacher pass is not served by the teacher cache).

      ``feature_weight`` 1.0: on digits (15 epochs, 2 seeds) 10 made the decomposed phases converge faster,
      but 20-30 degraded or diverged (NaN) with the shared bridge on wrn_16_2 → wrn_16_1; 1.0 was stable in
      every case tried, and the CRD budget gives each phase 80 epochs.

      The group holding the head gets ``ce_weight``·CE + ``kd_weight``·KD at ``temperature`` (0.1 / 0.9 / 4,
      the CRD protocol's KD), the same loss as the final end-to-end phase, which is therefore plain KD.
    * **Recomposition schedule** = ``schedule``, a list of ``[start, number_of_blocks]``; ``start`` is a
      fraction of the epoch budget (``schedule_unit="fraction"``, rounded half up to an epoch) or an epoch
      (``"epoch"``). Default (null): K → ⌈K/2⌉ → 1 at 0, 1/3, 2/3 of the budget (CRD's 240 epochs: epochs
      0-79 / 80-159 / 160-239; the LR milestones 150/180/210 are untouched). n groups of K blocks are contiguous
      and as equal as possible, the larger ones next to the head (:func:`partition`); consecutive phases must
      nest (only merges), else a BenchError when the method is built.
    * One optimizer over student + bridges for the whole run (the engine's); bridges unused in a phase get
      no gradient and are not updated. Bridges are built only where some phase of the schedule needs them
      and are reported as ``extra_params``.
    * BatchNorm statistics of a student block are those of the (bridged) teacher inputs it is fed while it is
      decomposed; they move to the student's own activations once its cut is merged.
    * ``forward_train`` returns the logits of the group holding the head (in decomposed phases: the student
      head applied to teacher features); they are not used for the reported metrics.
    """

    name = "stablekd"
    Hparams = StableKDHparams
    unused_parameters = True  # a phase trains some blocks and bridges, not the others

    def __init__(self, student: StagedNet, teacher: StagedNet | None, hparams: StableKDHparams, context: MethodContext):
        super().__init__(student, teacher, hparams, context)
        self.require_equal_stages("blocks are cut at stage boundaries")
        self.num_stages = student.num_stages
        self.num_blocks = self.num_stages + 1
        self.phases = schedule_phases(hparams.schedule, self.num_blocks, context.epochs, hparams.schedule_unit)
        t_shapes = teacher.stage_shapes(context.input_shape)
        s_shapes = student.stage_shapes(context.input_shape)
        # cut b = the boundary between block b and block b+1; a phase with a cut at b feeds block b+1 from the
        # teacher's stage b and supervises block b against it
        cuts = sorted({g.stop - 1 for _, groups in self.phases for g in groups if g.stop - 1 < self.num_stages})
        self.input_adapters = nn.ModuleDict({str(b): self._bridge(t_shapes[b], s_shapes[b]) for b in cuts})
        self.output_adapters = nn.ModuleDict(
            {} if hparams.bridge == "shared" else {str(b): self._bridge(s_shapes[b], t_shapes[b]) for b in cuts}
        )
        # cuts where block b's pre-activation is compared and block b+1 is fed the activated bridged tensor
        signed = {b for b in cuts if isinstance(self.input_adapters[str(b)], Bridge)}
        if hparams.teacher_feature == "preact":
            signed = set(cuts)
        uses_preact = hparams.bridge == "shared" and hparams.student_feature == "preact" and student.local_preact
        self.preact_cuts = signed if uses_preact else set()
        self.groups = partition_at(0, self.phases)

    def _bridge(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> nn.Module:
        if in_shape == out_shape and not self.hp.always_adapt:
            return nn.Identity()
        if len(in_shape) != 3 or len(out_shape) != 3:
            raise BenchError(f"stablekd: cannot bridge stage outputs {in_shape} and {out_shape} (need (C, H, W) maps)")
        return Bridge(in_shape, out_shape)

    def partition_at(self, epoch: int) -> Partition:
        """Groups of block indices trained together at (0-based) ``epoch``; block ``num_stages`` is the head."""
        return partition_at(epoch, self.phases)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.groups = self.partition_at(epoch)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hp
        t = self.teacher_features(x, preact=hp.teacher_feature == "preact")
        teacher_at = t.preact_stages if hp.teacher_feature == "preact" else t.stages
        cuts = [g.stop - 1 for g in self.groups[:-1]]
        bridged = {b: self.input_adapters[str(b)](teacher_at[b]) for b in cuts}  # teacher stage b, student's shape
        fed = {b: self.student.activate(b, v) if b in self.preact_cuts else v for b, v in bridged.items()}
        losses: dict[str, Tensor] = {}
        logits = None
        for group in self.groups:
            first, last = group.start, group.stop - 1
            h = self.student.forward_stem(x) if first == 0 else fed[first - 1]
            if last in self.preact_cuts:
                h, preact = self.student.forward_stage_preact(last, self.student.forward_stages(h, first, last))
            else:
                h = self.student.forward_stages(h, first, min(last + 1, self.num_stages))
            if last == self.num_stages:
                _, logits = self.student.forward_head(h)
                losses.update(head_block_loss(logits, t.logits, y, hp.temperature, hp.ce_weight, hp.kd_weight))
                continue
            if hp.bridge == "shared":  # in the student's space: what the next block is fed (before activation)
                student_feat = preact if last in self.preact_cuts else h
                target = bridged[last].detach()
            else:  # in the teacher's space
                student_feat, target = self.output_adapters[str(last)](h), teacher_at[last]
            losses[f"feat_b{last}"] = hp.feature_weight * block_feature_loss(student_feat, target, hp.feature_loss)
        return logits, losses
