"""ShuffleNetV1 of the CRD benchmark (RepDistiller ``models/ShuffleNetv1.py``): ``shufflev1`` (alias ``ShuffleV1``),
groups 3, widths 240/480/960, blocks 4/8/4.

Layout: ``conv1`` (1x1 conv to 24, no stride), ``bn1``, ``layer1..3`` of Bottlenecks (``conv1`` grouped 1x1,
``bn1``, ``shuffle1``, ``conv2`` depthwise 3x3, ``bn2``, ``conv3`` grouped 1x1, ``bn3``, ``shortcut``; the first
block of each layer has stride 2 and concatenates an avg-pooled shortcut), ``linear``.

Stages (CRD's ``f1..f3``): stem = ``relu(bn1(conv1(x)))`` (24 ch); stages = ``layer1, layer2, layer3``
(240, 480, 960; strides 2, 2, 2). Head: ``avgpool -> flatten`` (feature, 960) then ``linear``. Pre-activation of
a stage (CRD's ``preact=True`` list): its last block's residual sum before the ReLU.

Deviation: ``F.avg_pool2d(out, 4)`` becomes a parameter-free ``avgpool = AdaptiveAvgPool2d(1)`` module (same on
32x32 inputs, where the last map is 4x4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.base import StagedNet
from bench.models.cifar._common import LayerStages, ShuffleBlock, reject_options
from bench.models.registry import register_model


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups  # the first block sees the 24-channel stem: no grouping
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, pre-activation): the concatenation / residual sum before the final ReLU (CRD's ``is_last``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class ShuffleNetV1(LayerStages, StagedNet):
    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

        self.stage_channels = list(out_planes)
        self.feature_dim = out_planes[2]
        self.num_classes = num_classes

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 block concatenates its input
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=stride, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.avgpool(x).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.linear(feature)


def shufflev1(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ShuffleNetV1:
    """CRD ``ShuffleV1``: out_planes (240, 480, 960), blocks (4, 8, 4), groups 3."""
    reject_options("shufflev1", kwargs)
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels)


register_model(shufflev1, name="shufflev1")
register_model(shufflev1, name="ShuffleV1")
