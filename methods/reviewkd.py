"""``reviewkd``: knowledge review (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021).

The student's features of *all* levels are fused top-down by attention-based fusion (ABF): level
``i``'s student feature is projected to a common width, fused with the fused result of the deeper level through
two sigmoid attention maps, and mapped to the teacher's width at level ``i``. Each output is compared with the
teacher's level-``i`` feature by the hierarchical context loss (HCL): the MSE of the full maps
plus the MSEs of average-pooled 4×4, 2×2 and 1×1 versions with weights 1/2, 1/4, 1/8, normalised by their sum.

Levels (official CIFAR/ImageNet code, ``model/reviewkd.py``, and mdistiller ``ReviewKD``): every stage output
plus the pooled pre-logit feature as a 1×1 map; student level ``i`` pairs with teacher level ``i``. The ABF of
the deepest level (the pooled feature) has no fusion. Its middle width is ``min(max_mid_channels, student
feature_dim)`` (512 by default, as mdistiller; the official ImageNet MobileNet student uses 256).

Loss: ``CE + w·min((epoch + 1)/warmup_epochs, 1)·HCL``, with our 0-based epoch, i.e. mdistiller's 1-based
``min(epoch/warmup, 1)``: the first epoch already has weight 1/warmup (the official script's 0-based
``epoch/warmup`` gives the first epoch weight 0). Defaults: ``w = 1`` (official and mdistiller default), warm-up
20 epochs (CIFAR; 1 on ImageNet). The official CIFAR script sets ``w`` per pair (5 for the WRN, resnet32x4 and
ShuffleNetV1 pairs, 8 for ShuffleNetV2, 0.6 for resnet56→resnet20, 1 for resnet110→resnet32); the suites set
those.

Choice: a batch of one sample (the last, short batch of an epoch) cannot be batch-normalised at the 1×1 pooled
level; for such a batch the ABFs' BatchNorm layers use their running statistics (and do not update them).

Feature taps (``teacher_preact``, ``student_preact``): the official code and mdistiller compare with the
teacher's *pre-activation* stage outputs (``teacher(x, preact=True)``; mdistiller ``preact_feats``), i.e. before the
final ReLU of each stage, and for WRN teachers the next block's BatchNorm applied to the raw stage output
(:mod:`bench.models.base`); the student's stage outputs are taken after their activation on CIFAR
(``student_preact=False``, the default, as the official CIFAR code and mdistiller's ``STU_PREACT: False``) and
before it on ImageNet (the official ImageNet code and mdistiller's ImageNet configs, ``STU_PREACT: True``; the
``imagenet`` suite sets ``student_preact: true``). The pooled pre-logit level is the same either way. The
teacher's pre-activation pass is not a plain ``forward_features(x)``, so the teacher cache and a lockstep group's
shared teacher pass do not serve it (``Method.teacher_features``): a ``reviewkd`` run computes its own teacher
pass each step (same result, more time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError
from methods.base import Method, MethodContext, register_method
from methods.dkd import warmup_factor  # the same linear warm-up as DKD (mdistiller)
from methods.srd import running_stats_batchnorm

HCL_LEVELS = (4, 2, 1)


def reviewkd_loss(student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
    """HCL summed over levels: per level ``(mse + Σ_l w_l·mse(pool_l)) / (1 + Σ_l w_l)``, ``w = 1/2, 1/4, 1/8``
    for the pooled sizes 4, 2, 1 that are smaller than the map (a 1×1 map has the full-size term only)."""
    total = student_features[0].new_zeros(())
    for f_s, f_t in zip(student_features, teacher_features, strict=True):
        loss = F.mse_loss(f_s, f_t)
        weight, norm = 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= f_s.shape[-2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
            norm += weight
        total = total + loss / norm
    return total


class ABF(nn.Module):
    """Attention-based fusion (ReviewKD's ABF): 1×1 conv-BN to ``mid`` channels, fusion with the deeper level's
    result through two sigmoid attention maps (when ``fuse``), nearest resize to the teacher's size, 3×3 conv-BN
    to the teacher's width. Returns (output for the loss, fused map passed to the next shallower level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            assert deeper is not None, "a fusing ABF needs the deeper level's result"
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * att[:, :1] + deeper * att[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


@dataclass
class ReviewKDHparams:
    ce_weight: float = 1.0
    reviewkd_weight: float = 1.0
    warmup_epochs: int = 20
    max_mid_channels: int = 512
    teacher_preact: bool = True  # official code / mdistiller: the teacher's pre-activation stage outputs
    student_preact: bool = False  # True on ImageNet (official ImageNet code, mdistiller STU_PREACT)

    def validate(self, where: str) -> None:
        if self.warmup_epochs < 0:
            raise BenchError(f"{where}.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.max_mid_channels < 1:
            raise BenchError(f"{where}.max_mid_channels: must be >= 1, got {self.max_mid_channels}")
        if self.reviewkd_weight < 0 or self.ce_weight < 0:
            raise BenchError(f"{where}: loss weights must be >= 0")


def _levels(stages: list[Tensor], feature: Tensor) -> list[Tensor]:
    """Shallow → deep: every stage output, then the pooled feature as a (B, C, 1, 1) map."""
    return [*stages, feature[:, :, None, None]]


@register_method
class ReviewKD(Method):
    name = "reviewkd"
    Hparams = ReviewKDHparams

    def __init__(self, student, teacher, hparams: ReviewKDHparams, context: MethodContext) -> None:
        super().__init__(student, teacher, hparams, context)
        self.require_equal_stages("knowledge review pairs level i with level i")
        s_channels = [*student.stage_channels, student.feature_dim]
        t_channels = [*teacher.stage_channels, teacher.feature_dim]
        mid = min(hparams.max_mid_channels, student.feature_dim)
        deepest = len(s_channels) - 1
        # abfs[i] serves level i (shallow → deep); the deepest level does not fuse.
        self.abfs = nn.ModuleList(
            ABF(s, mid, t, fuse=i < deepest) for i, (s, t) in enumerate(zip(s_channels, t_channels))
        )

    def review(self, student_levels: list[Tensor], teacher_levels: list[Tensor]) -> list[Tensor]:
        """The ABF outputs, shallow → deep, each at its teacher level's spatial size."""
        outputs: list[Tensor] = []
        deeper = None
        for i in reversed(range(len(student_levels))):
            out, deeper = self.abfs[i](student_levels[i], deeper, tuple(teacher_levels[i].shape[-2:]))
            outputs.insert(0, out)
        return outputs

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hp
        feats = self.student.forward_features(x, preact=hp.student_preact)
        t_feats = self.teacher_features(x, preact=hp.teacher_preact)
        teacher_levels = _levels(t_feats.preact_stages if hp.teacher_preact else t_feats.stages, t_feats.feature)
        student_levels = _levels(feats.preact_stages if hp.student_preact else feats.stages, feats.feature)
        with running_stats_batchnorm([self.abfs], enabled=x.shape[0] == 1):
            outputs = self.review(student_levels, teacher_levels)
        weight = hp.reviewkd_weight * warmup_factor(self.epoch, hp.warmup_epochs)
        return feats.logits, {
            "ce": hp.ce_weight * F.cross_entropy(feats.logits, y),
            "reviewkd": weight * reviewkd_loss(outputs, teacher_levels),
        }
