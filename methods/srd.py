"""``srd``: the projector / normalisation / soft-maximum recipe of Miles & Mikolajczyk, "A closer look at the
training dynamics of knowledge distillation" (arXiv 2303.11098 v1, 2023; published as "Understanding the Role of
the Projector in Knowledge Distillation", AAAI 2024). torchdistill calls it SRD ("Simple Recipe Distillation").

The recipe has three ingredients (abstract): a trainable **projection layer** on the student feature, a
**normalisation** of both representations, and a **soft maximum function** as the distance. The exact loss is
that of the official ImageNet code (``roymiles/Simple-Recipe-Distillation`` ``imagenet/torchdistill/losses/
single.py``, config ``res3418.yaml``) and of torchdistill's ``SRDLoss``:

    f̂_s = BN(W z_s + b),  f̂_t = BN(z_t)                 z = pooled pre-logit feature, BN = BatchNorm1d(affine=False,
                                                       eps=1e-4), one per side, train-mode batch statistics
    L   = CE(y_s, y) + 2·log Σ_{b,d} |f̂_s − f̂_t|^α + KL(p_t ‖ p_s)     α = 4, KL at T = 1, batch mean, no T² factor

The "soft maximum" is ``log Σ|Δ|^α`` over the whole batch × feature matrix (not a LogSumExp): as α grows it
approaches α·log max|Δ|. The projector is trained with the student: the first public release of the official
code left it out of the optimizer (a fixed random projection, issue #1 there, fixed in ``dc7667f``). Here it is
a module of the method, so ``Method.trainable_parameters`` hands it to the engine's optimizer.

Switches (the paper's three design decisions, so its ablations can be re-run):

- ``projector``: ``linear`` (paper: ``Linear(s_dim, t_dim)`` with bias), ``mlp`` (our construction; the official
  code has only the linear projector: ``Linear(s_dim, h) → BatchNorm1d(h) → ReLU → Linear(h, t_dim)``,
  ``h = mlp_hidden``, default ``t_dim``), ``none`` (identity; only where ``s_dim == t_dim``, else a ``BenchError`` at construction).
- ``normalisation``: ``batchnorm`` (paper), ``l2`` (each feature vector scaled to unit Euclidean norm), ``none``.
- ``distance``: ``softmax_logsum`` (paper, ``2·log Σ|Δ|^α``, α = ``exponent``), ``l2`` (mean squared difference over
  batch and dimensions, ``F.mse_loss``), ``l1`` (mean absolute difference). The element mean keeps the l2/l1 terms
  on the scale of the CE term; ``exponent`` only affects ``softmax_logsum``.

Choices where paper and code are silent, each documented where it is implemented:

- A batch of one (e.g. the last, short batch of an epoch): ``BatchNorm1d`` cannot use batch statistics of one
  sample (PyTorch raises). For such a batch every BatchNorm layer of the method's own modules (the normalisation
  and the ``mlp`` projector) uses its running statistics, which that batch does not update.
- ``log Σ|Δ|^α`` is computed as ``α·log m + log Σ(|Δ|/m)^α`` with ``m = max|Δ|`` (an exact identity), so tiny
  differences (1e-8 and below in float32) neither underflow nor give ``-inf``. The value is floored at
  ``α·log(tiny)`` (``tiny`` = smallest normal number of the dtype; the value of a single difference equal to
  ``tiny``): this is reached only when every |Δ| is below ``tiny``, in particular when all differences are exactly
  0 (where the formula is ``log 0 = -inf``); there the loss is this finite constant with zero gradient.
- ``exponent`` must be >= 1: below 1 the gradient of ``|Δ|^α`` is infinite at a zero difference.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import check_fields
from bench.errors import BenchError
from methods.base import Method, MethodContext, register_method
from methods.kd import kd_loss


# --------------------------------------------------------------------------------------------------
# The loss: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def log_sum_power(delta: Tensor, exponent: float) -> Tensor:
    """``log Σ|δ|^α`` over every element of ``delta``, stable for tiny and large differences.

    Computed as ``α·log m + log Σ(|δ|/m)^α`` with ``m = max|δ|`` (detached: the identity holds for any positive
    ``m``, so the gradient is that of the plain formula). Floored at ``α·log(tiny)``; see the module docstring.
    """
    magnitude = delta.abs()
    tiny = torch.finfo(magnitude.dtype).tiny
    scale = magnitude.detach().max().clamp_min(tiny)
    total = (magnitude / scale).pow(exponent).sum()
    # total >= 1 whenever max|δ| >= tiny (the largest element contributes exactly 1); below, the floor.
    total = torch.where(total >= 1, total, torch.ones_like(total))
    return exponent * scale.log() + total.log()


def soft_maximum_distance(student_features: Tensor, teacher_features: Tensor, exponent: float = 4.0) -> Tensor:
    """``2·log Σ_{b,d} |f̂_s − f̂_t|^α``: the official code's ``log_bn_corr_4`` difference form (α = 4 there)."""
    return 2.0 * log_sum_power(student_features - teacher_features, exponent)


def mse_distance(student_features: Tensor, teacher_features: Tensor, exponent: float = 4.0) -> Tensor:
    """Ablation ``distance: l2``: mean squared difference over batch and dimensions (``exponent`` unused)."""
    return F.mse_loss(student_features, teacher_features)


def l1_distance(student_features: Tensor, teacher_features: Tensor, exponent: float = 4.0) -> Tensor:
    """Ablation ``distance: l1``: mean absolute difference over batch and dimensions (``exponent`` unused)."""
    return F.l1_loss(student_features, teacher_features)


def logit_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(p_t ‖ p_s)`` at ``temperature``, summed over classes, mean over the batch, *without* the T² factor of
    :func:`methods.kd.kd_loss` (the official code and torchdistill use ``KLDivLoss(reduction='batchmean')``)."""
    return kd_loss(student_logits, teacher_logits, temperature) / temperature**2


def srd_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    exponent: float = 4.0,
    temperature: float = 1.0,
) -> Tensor:
    """The distillation terms of the recipe on already-normalised features (B, D):
    ``2·log Σ_{b,d}|f̂_s − f̂_t|^α + KL(p_t ‖ p_s)`` at ``temperature`` (batch mean, no T²). The total training
    loss adds the student's cross-entropy."""
    return soft_maximum_distance(student_features, teacher_features, exponent) + logit_kl(
        student_logits, teacher_logits, temperature
    )


Distance = Callable[[Tensor, Tensor, float], Tensor]
DISTANCES: dict[str, Distance] = {"softmax_logsum": soft_maximum_distance, "l2": mse_distance, "l1": l1_distance}


# --------------------------------------------------------------------------------------------------
# The modules: projectors and normalisations
# --------------------------------------------------------------------------------------------------
class L2Normalise(nn.Module):
    """Each row scaled to unit Euclidean norm (ablation ``normalisation: l2``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1)


def _linear_projector(s_dim: int, t_dim: int, hidden: int | None) -> nn.Module:
    return nn.Linear(s_dim, t_dim)


def _mlp_projector(s_dim: int, t_dim: int, hidden: int | None) -> nn.Module:
    hidden = hidden or t_dim
    return nn.Sequential(
        nn.Linear(s_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, t_dim)
    )


def _no_projector(s_dim: int, t_dim: int, hidden: int | None) -> nn.Module:
    if s_dim != t_dim:
        raise BenchError(
            f"srd: projector 'none' needs equal feature widths, but the student has {s_dim} and the teacher {t_dim}"
        )
    return nn.Identity()


PROJECTORS: dict[str, Callable[[int, int, int | None], nn.Module]] = {
    "linear": _linear_projector,
    "mlp": _mlp_projector,
    "none": _no_projector,
}
NORMALISATIONS: dict[str, Callable[[int, float], nn.Module]] = {
    "batchnorm": lambda dim, eps: nn.BatchNorm1d(dim, eps=eps, affine=False),
    "l2": lambda dim, eps: L2Normalise(),
    "none": lambda dim, eps: nn.Identity(),
}


@contextmanager
def running_stats_batchnorm(modules: list[nn.Module], enabled: bool) -> Iterator[None]:
    """While active (and ``enabled``), every training-mode BatchNorm inside ``modules`` uses (and does not update)
    its running statistics: how a batch of one sample is normalised."""
    batchnorms = (m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    norms = [m for m in batchnorms if m.training] if enabled else []
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
@dataclass
class SRDHparams:
    """Defaults: the official ImageNet ResNet34→ResNet18 configuration (``res3418.yaml``).

    ``bn_eps`` (1e-4) is the official BatchNorm epsilon. ``mlp_hidden``: width of the ``mlp`` projector's hidden
    layer, ``None`` = the teacher's feature width (our choice)."""

    exponent: float = 4.0
    temperature: float = 1.0
    ce_weight: float = 1.0
    feature_weight: float = 1.0
    kd_weight: float = 1.0
    normalisation: str = "batchnorm"
    distance: str = "softmax_logsum"
    projector: str = "linear"
    bn_eps: float = 1e-4
    mlp_hidden: int | None = None

    def validate(self, where: str) -> None:
        choices = {"normalisation": NORMALISATIONS, "distance": DISTANCES, "projector": PROJECTORS}
        for key, table in choices.items():
            if getattr(self, key) not in table:
                raise BenchError(f"{where}.{key}: must be one of {', '.join(table)}, got {getattr(self, key)!r}")
        checks = [
            (self.exponent >= 1, "exponent", "must be >= 1 (below 1 the gradient at a zero difference is infinite)"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.bn_eps > 0, "bn_eps", "must be > 0"),
            (self.mlp_hidden is None or self.mlp_hidden >= 1, "mlp_hidden", "must be >= 1 or null"),
        ] + [(getattr(self, w) >= 0 and math.isfinite(getattr(self, w)), w, "must be a finite number >= 0")
             for w in ("ce_weight", "feature_weight", "kd_weight")]  # fmt: skip
        check_fields(self, where, checks)


@register_method
class SRD(Method):
    """Student pre-logit feature → projector → normalisation; teacher pre-logit feature → its own normalisation;
    loss = ``ce_weight``·CE + ``feature_weight``·distance + ``kd_weight``·KL (module docstring)."""

    name = "srd"
    Hparams = SRDHparams
    ddp_note = ("the soft maximum log Σ|Δ|^α sums over each worker's share of the batch: the loss reads 2·log(workers) "
                "lower, its gradient is that of the whole batch to first order")  # fmt: skip

    def __init__(self, student, teacher, hparams: SRDHparams, context: MethodContext) -> None:
        super().__init__(student, teacher, hparams, context)
        t_dim = teacher.feature_dim
        self.projector = PROJECTORS[hparams.projector](student.feature_dim, t_dim, hparams.mlp_hidden)
        self.student_norm = NORMALISATIONS[hparams.normalisation](t_dim, hparams.bn_eps)
        self.teacher_norm = NORMALISATIONS[hparams.normalisation](t_dim, hparams.bn_eps)
        self.distance = DISTANCES[hparams.distance]

    def normalised_features(self, student_feature: Tensor, teacher_feature: Tensor) -> tuple[Tensor, Tensor]:
        """(f̂_s, f̂_t); a batch of one is normalised with running statistics (module docstring)."""
        with running_stats_batchnorm(
            [self.projector, self.student_norm, self.teacher_norm], enabled=student_feature.shape[0] == 1
        ):
            return self.student_norm(self.projector(student_feature)), self.teacher_norm(teacher_feature)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hp
        student = self.student.forward_features(x)
        teacher = self.teacher_features(x)
        f_s, f_t = self.normalised_features(student.feature, teacher.feature)
        return student.logits, {
            "ce": hp.ce_weight * F.cross_entropy(student.logits, y),
            "feature": hp.feature_weight * self.distance(f_s, f_t, hp.exponent),
            "kd": hp.kd_weight * logit_kl(student.logits, teacher.logits, hp.temperature),
        }
