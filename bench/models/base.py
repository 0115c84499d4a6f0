"""The staged-model contract every network in the zoo follows.

A classifier is ``stem -> stages[0..K-1] -> head`` where the head is global pooling (giving the
pre-logit *feature*) followed by the classifier. Feature-based methods pick stages by index, StableKD
runs student stage k on the teacher's stage k-1 output, GPD widens every layer. Module names inside a
model stay those of the published definitions (CRD / mdistiller / torchvision), so published
checkpoints load with ``load_state_dict`` as they are; the staging is expressed by methods, not by
re-nesting modules.

Pre-activation stage outputs (``forward_features(x, preact=True)``) are those of RepDistiller's and mdistiller's
``preact=True`` feature lists: for a stage that ends with a ReLU (CIFAR ResNets, ResNet50, VGG, ShuffleNets,
torchvision ResNets, MobileNet-V1) the tensor whose ReLU is the stage output (ShuffleNetV2: before the block's
channel shuffle, as CRD returns it, so the output is the shuffled ReLU); for MobileNetV2 (whose stages end
with a linear bottleneck) the stage output itself; for WRN the next block's first BatchNorm applied to the raw
stage output (the final ``bn1`` for the last stage), as RepDistiller's ``wrn.py`` does. They are computed only
when asked for, as by-products of the same forward pass (no extra layer runs, no extra cost otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Features:
    """Everything one forward pass yields: each stage's output, the pooled pre-logit feature, logits, and
    (only from ``forward_features(x, preact=True)``, else empty) each stage's pre-activation output."""

    stages: list[Tensor]
    feature: Tensor
    logits: Tensor
    preact_stages: list[Tensor] = field(default_factory=list)


class StagedNet(nn.Module):
    """Base class of every zoo model.

    Subclasses implement :meth:`forward_stem`, :meth:`forward_stage`, :meth:`forward_pool` and
    :meth:`forward_classifier`, and set ``stage_channels`` (output channels of each stage) and
    ``feature_dim`` (width of the pre-logit feature). ``num_stages`` is ``len(stage_channels)``.

    Pre-activations: a subclass whose stage's pre-activation is computed inside the stage
    (``local_preact = True``) implements :meth:`forward_stage_preact` and, where the stage output is not the
    ReLU of it, :meth:`activate`; one where it is not (WRN: the next block's BatchNorm) sets
    ``local_preact = False`` and overrides :meth:`forward_features` for ``preact=True``.
    """

    stage_channels: list[int]
    feature_dim: int
    num_classes: int
    local_preact: ClassVar[bool] = True

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)

    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Stage ``index`` on ``x``: (its output, its pre-activation output), from one pass."""
        raise NotImplementedError(f"{type(self).__name__} does not expose a stage's pre-activation on its own")

    def activate(self, index: int, preact: Tensor) -> Tensor:
        """The output of stage ``index`` whose pre-activation output is ``preact`` (default: its ReLU)."""
        return F.relu(preact)

    def forward_pool(self, x: Tensor) -> Tensor:
        """Last stage output -> pre-logit feature (B, feature_dim)."""
        raise NotImplementedError

    def forward_classifier(self, feature: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_stages(self, x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Run stages ``start..end-1`` on ``x`` (the input of stage ``start``)."""
        end = self.num_stages if end is None else end
        for index in range(start, end):
            x = self.forward_stage(index, x)
        return x

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Last stage output -> (feature, logits)."""
        feature = self.forward_pool(x)
        return feature, self.forward_classifier(feature)

    def forward_features(self, x: Tensor, preact: bool = False) -> Features:
        """One pass: every stage output, the feature and the logits; with ``preact`` also every stage's
        pre-activation output (``Features.preact_stages``)."""
        x = self.forward_stem(x)
        stages, preacts = [], []
        for index in range(self.num_stages):
            if preact:
                x, pre = self.forward_stage_preact(index, x)
                preacts.append(pre)
            else:
                x = self.forward_stage(index, x)
            stages.append(x)
        feature, logits = self.forward_head(x)
        return Features(stages=stages, feature=feature, logits=logits, preact_stages=preacts)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_stages(self.forward_stem(x)))[1]

    @torch.no_grad()
    def stage_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes (C, H, W) of every stage output for one input of ``input_shape`` (C, H, W)."""
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        feats = self.forward_features(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
        self.train(was_training)
        return [tuple(s.shape[1:]) for s in feats.stages]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
