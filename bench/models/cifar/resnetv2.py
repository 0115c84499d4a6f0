"""CIFAR ResNet50 of the CRD benchmark (RepDistiller ``models/resnetv2.py``, ``ResNet50``): ``resnet50``
(alias ``ResNet50``).

Layout: 3x3 stride-1 ``conv1`` to 64 (no max-pool), ``bn1``, ``layer1..4`` of Bottlenecks ([3, 4, 6, 3], widths
64/128/256/512 x4, strides 1, 2, 2, 2; blocks have ``conv1..3, bn1..3, shortcut`` where ``shortcut`` is an
empty Sequential or 1x1 conv + BN: keys ``shortcut.0/1``), ``avgpool``, ``linear``.

Stages (CRD's ``f1..f4``): stem = ``relu(bn1(conv1(x)))`` (64 ch); stages = ``layer1..layer4``
(256, 512, 1024, 2048). Head: ``avgpool -> flatten`` (feature, 2048) then ``linear``. Pre-activation of a stage
(CRD's ``preact=True`` list): its last Bottleneck's residual sum before the ReLU.

No deviation: CRD already uses ``AdaptiveAvgPool2d``. Option: ``zero_init_residual`` (CRD default False).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.base import StagedNet
from bench.models.cifar._common import LayerStages, init_kaiming_fan_out, reject_options
from bench.models.registry import register_model


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, pre-activation): the residual sum before and after the final ReLU (CRD's ``is_last``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class ResNetV2(LayerStages, StagedNet):
    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
        num_classes: int = 100,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)

        self.stage_channels = [w * Bottleneck.expansion for w in (64, 128, 256, 512)]
        self.feature_dim = 512 * Bottleneck.expansion
        self.num_classes = num_classes

        init_kaiming_fan_out(self)  # CRD's initialisation
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.avgpool(x).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.linear(feature)


def resnet50(num_classes: int = 100, in_channels: int = 3, zero_init_residual: bool = False, **kwargs) -> ResNetV2:
    """CRD ``ResNet50`` for CIFAR (bottleneck [3, 4, 6, 3], 3x3 stem, no max-pool)."""
    reject_options("resnet50", kwargs)
    return ResNetV2((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels,
                    zero_init_residual=zero_init_residual)


register_model(resnet50, name="resnet50")
register_model(resnet50, name="ResNet50")
