"""``gpd`` / ``gpd_scratch``: Gap Preserving Distillation (Guo, Zhang, Pan, Liu, Zhang, Chen, "Gap Preserving
Distillation by Building Bidirectional Mappings with A Dynamic Teacher", ICLR 2025, arXiv 2410.04140).

A dynamic teacher (DT), ``ratio``× wider than the student, is trained together with it. The DT starts as the
Inverse Reparameterization (IR, §3.1) of the student (same function), and the student *is* a slice of the DT
(hard parameter sharing, Channel-Branch Reparameterization CBR §3.2), so one optimiser trains both and the
student can be extracted at any time without post-training. Every 3×3 stride-1 conv is trained as a
multi-branch (OREPA) block and merged into one kernel for deployment (``branches``). The layer machinery is in
``methods/_gpd_layers.py`` (its docstring states the channel rules and how the branches differ from OREPA's) and
``methods/_gpd_surgery.py`` (whole-network operations).

Per iteration (official ``train_dkd.py`` + ``gpd_utils.enhance_with_es``; :func:`gpd_loss`):

- DT:      ``CE(z_DT, y) + DKD(z_DT, z_T)``
- student: ``CE(z_S, y) + DKD(z_S, z_T) + kd_ratio · SCE(z_S, softmax(z_DT.detach()))``, with
  ``SCE(x, p) = (1-ε)·mean_b Σ_c −p_c log softmax(x)_c + ε·mean_b mean_c −log softmax(x)_c`` (ε = 0.1).

The official code calls ``backward`` on each loss in turn before one optimiser step; here both are returned and
the engine back-propagates their sum once, which accumulates the same gradients in the shared weights.
``gpd`` uses a static (offline) teacher; ``gpd_scratch`` has none (the paper's "training from scratch": the
DKD terms vanish) and, with ``init_checkpoint``, is the paper's fine-tuning setting.

Choices where the paper/code is silent or differs from our harness (all hyperparameters):

- ``grad_clip`` (5.0, the official ``clip_grad_norm_`` over all parameters before each step): applied by the
  method itself, so suites shared with other methods keep their recipe and every training driver (``fit``,
  lockstep) clips GPD alike: a post-accumulate-grad hook on every trainable parameter counts the gradients
  of one backward and, once all have arrived, clips their global norm (:class:`_GradClipper`). A recipe
  ``grad_clip`` is applied on top by the engine (``null`` here: only the recipe's). On several data-parallel
  workers the hooks see each worker's own gradients, so the clip waits for DDP's average (``prepare_distributed``:
  the engine's ``after_backward``), and the DT's BatchNorm uses the statistics of the global batch with SyncBN.
- ``ema_decay``: the official ImageNet runs keep an EMA of the DT (timm ``ModelEmaV2``, 0.99996) and pick the
  best of the raw and EMA checkpoints. Default off (``None``): a 0.99996 EMA is meaningless over the few
  thousand steps of CIFAR/digits runs. When set, the EMA student is evaluated as ``ema_*`` next to the raw
  student, whose numbers stay the run's result.
- ``noise`` (0.0): the official IR adds N(0, 1e-6) to every copy; 0 keeps the DT exactly equal to the student.
- DKD ``alpha``, ``beta``, ``temperature``, ``warmup_epochs``: the official ImageNet runs use α=1, β=0.5
  (ResNet18) / 2.0 (MobileNet), T=1 and no warm-up of the DKD terms (``warmup_epochs: 0``, as the ImageNet
  suites set). The paper has no CIFAR setting, so the defaults are DKD's own CIFAR-100 ones (α=1, β=8, T=4, a
  linear warm-up of both DKD terms over 20 epochs, ``methods.dkd.warmup_factor``); β is set per pair in the
  suites as for ``dkd``.
- The branch vector starts at OREPA's from-scratch values, or at [1, 0, …] (``single_init``) when
  ``init_checkpoint`` is given, as the official code does.
- Evaluation: ``""`` is the extracted plain student (re-extracted from the DT whenever the DT changed), ``dt``
  the DT; ``method.student`` is that plain student, so its ``state_dict()`` is the deployable student's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import check_fields
from bench.distributed import sync_batch_norm
from bench.errors import BenchError
from bench.models import StagedNet, count_parameters
from methods._gpd_layers import DynamicBatchNorm2d
from methods._gpd_surgery import (
    add_branches,
    extract_student,
    inverse_reparameterize,
    student_mode,
    student_state_dict,
)
from methods.base import Method, MethodContext, register_method
from methods.dkd import dkd_loss, warmup_factor

__all__ = ["extract_student", "gpd_loss", "inverse_reparameterize", "soft_ce_loss", "student_mode"]


def soft_ce_loss(logits: Tensor, target_probs: Tensor, smoothing: float = 0.1) -> Tensor:
    """Label-smoothed soft-target cross-entropy (official ``LabelSmoothingCrossEntropy``, ``kd_loss_type=sce``):
    ``(1-ε)·mean_b Σ_c −p_c log q_c + ε·mean_b mean_c −log q_c`` with ``q = softmax(logits)``."""
    log_q = F.log_softmax(logits, dim=1)
    return (1 - smoothing) * -(target_probs * log_q).sum(dim=1).mean() + smoothing * -log_q.mean(dim=1).mean()


def gpd_loss(
    dt_logits: Tensor,
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    kd_ratio: float = 3.0,
    smoothing: float = 0.1,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    dkd_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The GPD objective of one iteration as named terms (their sum is DT loss + student loss).

    ``dt_ce``/``dt_dkd``: the DT's CE and DKD to the static teacher; ``ce``/``dkd``: the student's; ``gpd``:
    ``kd_ratio``·SCE from the detached DT to the student. Without ``teacher_logits`` the DKD terms are absent.
    ``dkd_weight`` scales both DKD terms (the warm-up factor)."""
    losses = {"dt_ce": F.cross_entropy(dt_logits, targets), "ce": F.cross_entropy(student_logits, targets)}
    if teacher_logits is not None:
        losses["dt_dkd"] = dkd_weight * dkd_loss(dt_logits, teacher_logits, targets, alpha, beta, temperature)
        losses["dkd"] = dkd_weight * dkd_loss(student_logits, teacher_logits, targets, alpha, beta, temperature)
    losses["gpd"] = kd_ratio * soft_ce_loss(student_logits, F.softmax(dt_logits.detach(), dim=1), smoothing)
    return losses


@dataclass
class GPDScratchHparams:
    """``ratio``: DT width / student width (official ``--gpd_ratio 2``; non-integer ratios allowed);
    ``kd_ratio``: weight of the DT→student SCE (official 3); ``smoothing``: its label smoothing (0.1);
    ``branches``: OREPA multi-branch 3×3 convs (official: always on); ``noise``: std of the IR noise (official
    1e-6; 0 = exact IR); ``grad_clip``: global grad-norm clip (official 5; null = none); ``ema_decay``: EMA of the
    DT (official 0.99996 on ImageNet; null = off); ``init_checkpoint``: student weights to start from
    (fine-tuning; the branches then start as the plain conv)."""

    ratio: float = 2.0
    kd_ratio: float = 3.0
    smoothing: float = 0.1
    branches: bool = True
    noise: float = 0.0
    grad_clip: float | None = 5.0
    ema_decay: float | None = None
    init_checkpoint: str | None = None

    def validate(self, where: str) -> None:
        checks = [
            (self.ratio >= 1, "ratio", "must be >= 1"),
            (self.kd_ratio >= 0, "kd_ratio", "must be >= 0"),
            (0 <= self.smoothing < 1, "smoothing", "must be in [0, 1)"),
            (self.noise >= 0, "noise", "must be >= 0"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1) or null"),
        ]
        check_fields(self, where, checks)


@dataclass
class GPDHparams(GPDScratchHparams):
    """Adds the DKD terms to the static teacher: ``alpha``, ``beta``, ``temperature`` and a linear warm-up of
    both DKD terms over ``warmup_epochs`` (see the module docstring for the defaults)."""

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.temperature <= 0:
            raise BenchError(f"{where}.temperature: must be > 0, got {self.temperature}")
        if self.warmup_epochs < 0:
            raise BenchError(f"{where}.warmup_epochs: must be >= 0, got {self.warmup_epochs}")


class _GradClipper:
    """Clips the global gradient norm of ``params`` to ``max_norm`` as soon as one backward pass has accumulated
    the gradient of every one of them (each DT parameter takes part in every forward, so each receives exactly
    one accumulation per backward)."""

    def __init__(self, params: list[nn.Parameter], max_norm: float) -> None:
        self.params, self.max_norm, self.arrived = params, max_norm, 0
        self.deferred = False  # a data-parallel run clips after DDP's average instead (``clip``)
        for p in params:
            p.register_post_accumulate_grad_hook(self._arrive)

    def reset(self) -> None:
        self.arrived = 0

    def clip(self) -> None:
        nn.utils.clip_grad_norm_(self.params, self.max_norm)

    def _arrive(self, _: Tensor) -> None:
        self.arrived += 1
        if self.arrived == len(self.params):
            if not self.deferred:
                self.clip()
            self.arrived = 0


def _load_student_checkpoint(student: nn.Module, path: str) -> None:
    from bench.teachers import read_state_dict

    if not Path(path).exists():
        raise BenchError(f"gpd.init_checkpoint: {path} not found")
    try:
        student.load_state_dict(read_state_dict(path))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise BenchError(f"gpd.init_checkpoint: {path} does not fit the student: {first}") from None


@register_method
class GPDScratch(Method):
    """GPD without a static teacher (from scratch, or fine-tuning with ``init_checkpoint``)."""

    name = "gpd_scratch"
    Hparams = GPDScratchHparams
    teacher_mode = "none"

    def __init__(self, student: StagedNet, teacher: StagedNet | None, hparams, context: MethodContext) -> None:
        super().__init__(student, teacher, hparams, context)
        hp = self.hp
        if hp.init_checkpoint:
            _load_student_checkpoint(student, hp.init_checkpoint)
        source = add_branches(student, "single" if hp.init_checkpoint else "scratch") if hp.branches else student
        self.dt = inverse_reparameterize(source, hp.ratio, hp.noise, context.input_shape)
        # ``student`` becomes the plain deployable student, refreshed from the DT (not trained itself).
        self.student.requires_grad_(False)
        self.ema_dt = self.ema_student = None
        if hp.ema_decay is not None:
            self.ema_dt = copy.deepcopy(self.dt).requires_grad_(False)
            self.ema_student = copy.deepcopy(self.student)
        self._clipper = None if hp.grad_clip is None else _GradClipper(list(self.dt.parameters()), hp.grad_clip)
        self._stale = True  # the DT may have changed since the plain students were refreshed
        self._ema_pending = False  # an optimiser step followed the last forward_train
        for plain in (self.student, self.ema_student):
            if plain is not None:
                plain.register_forward_pre_hook(lambda *_: self._refresh())
                plain.register_state_dict_pre_hook(lambda *_: self._refresh(force=True))
        self._refresh()

    # ---- the shared-weight bookkeeping ---------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.hp.ema_decay
        for ema, value in zip(self.ema_dt.state_dict().values(), self.dt.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.lerp_(value, 1 - decay)
            else:
                ema.copy_(value)

    def _apply_pending_ema(self) -> None:
        """The EMA step that belongs to the optimiser step taken after the last ``forward_train``."""
        if self._ema_pending:
            self._update_ema()
            self._ema_pending = False
            self._stale = True

    @torch.no_grad()
    def _refresh(self, force: bool = False) -> None:
        """Apply a pending EMA step and copy the student slice(s) into the plain student model(s)."""
        self._apply_pending_ema()
        if self._stale or force:
            self.student.load_state_dict(student_state_dict(self.dt))
            if self.ema_student is not None:
                self.ema_student.load_state_dict(student_state_dict(self.ema_dt))
            self._stale = False

    # ---- the method interface ------------------------------------------------------------------
    def teacher_logits(self, x: Tensor) -> Tensor | None:
        return None

    def loss_options(self) -> dict[str, float]:
        return {}

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._apply_pending_ema()
        if self._clipper is not None:
            self._clipper.reset()
        teacher_logits = self.teacher_logits(x)
        dt_logits = self.dt(x)
        with student_mode(self.dt):
            student_logits = self.dt(x)
        losses = gpd_loss(
            dt_logits, student_logits, y, teacher_logits, self.hp.kd_ratio, self.hp.smoothing, **self.loss_options()
        )
        self._stale = True
        self._ema_pending = self.ema_dt is not None
        return student_logits, losses

    def prepare_distributed(self, distributed, sync_bn: bool) -> None:
        """Clip the averaged gradients (not each worker's); the DT's BatchNorm on the global batch with SyncBN."""
        if self._clipper is not None:
            self._clipper.deferred = True
            distributed.register_after_backward(self._clipper.clip)
        if sync_bn:
            for module in self.modules():
                if isinstance(module, DynamicBatchNorm2d):
                    module.batch_norm = sync_batch_norm

    def eval_models(self) -> dict[str, nn.Module]:
        self._refresh()
        models: dict[str, nn.Module] = {"": self.student, "dt": self.dt}
        if self.ema_student is not None:
            models["ema"] = self.ema_student
        return models

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        super().load_checkpoint_state(state)
        self._ema_pending = False
        self._stale = True

    def extra_parameters(self) -> int:
        """The dynamic teacher (the EMA copies are not counted: they are not trained)."""
        return count_parameters(self.dt)


@register_method
class GPD(GPDScratch):
    """GPD with a static teacher: DKD from the teacher to both the DT and the student."""

    name = "gpd"
    Hparams = GPDHparams
    teacher_mode = "offline"

    def teacher_logits(self, x: Tensor) -> Tensor | None:
        return self.teacher_features(x).logits

    def loss_options(self) -> dict[str, float]:
        hp = self.hp
        return {
            "alpha": hp.alpha,
            "beta": hp.beta,
            "temperature": hp.temperature,
            "dkd_weight": warmup_factor(self.epoch, hp.warmup_epochs),
        }
