"""CIFAR ResNets of the CRD benchmark (RepDistiller ``models/resnet.py``): resnet8 ... resnet110, resnet8x4, resnet32x4.

Structure: 3x3 conv stem (no max-pool), three layers of ``n = (depth - 2) / 6`` BasicBlocks with widths
``[w0, w1, w2, w3]`` (``[16, 16, 32, 64]``, or ``[32, 64, 128, 256]`` for the x4 models), strides 1, 2, 2,
global average pooling, ``fc``. Module names follow CRD: ``conv1, bn1, relu, layer1..3, fc``; blocks have
``conv1, bn1, relu, conv2, bn2, downsample`` (``downsample`` = 1x1 conv + BN where shape changes).

Stages: stem = ``conv1 -> bn1 -> relu``; stages = ``layer1, layer2, layer3`` (post-ReLU block outputs, the
``f1..f3`` of CRD's ``is_feat`` list); head = ``avgpool -> flatten`` (feature) then ``fc``. Pre-activation of a
stage (CRD's ``preact=True`` ``f1..f3``): its last block's ``bn2(conv2(.)) + shortcut`` before the ReLU.

Deviation: ``avgpool`` is ``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(8)`` (same result on 32x32 inputs,
and 8x8 inputs work). CRD's unused bottleneck option is not reproduced; CRD's ``is_last`` flag (the last block
of a layer returns ``(out, preact)``) is the block's ``forward_preact``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.base import StagedNet
from bench.models.cifar._common import LayerStages, init_kaiming_fan_out, reject_options
from bench.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, pre-activation): the residual sum before and after the final ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact  # never in place: ``x`` may be a stored stage output

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class CifarResNet(LayerStages, StagedNet):
    def __init__(self, depth: int, widths: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], n)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)

        self.stage_channels = [w * BasicBlock.expansion for w in widths[1:]]
        self.feature_dim = widths[3] * BasicBlock.expansion
        self.num_classes = num_classes

        init_kaiming_fan_out(self)  # CRD's initialisation

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.avgpool(x).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.fc(feature)


_NARROW = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def _builder(name: str, depth: int, widths: list[int]):
    def build(num_classes: int = 100, in_channels: int = 3, **kwargs) -> CifarResNet:
        reject_options(name, kwargs)
        return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CRD ``{name}``: CIFAR ResNet-{depth}, widths {widths}."
    return register_model(build, name=name)


resnet8 = _builder("resnet8", 8, _NARROW)
resnet14 = _builder("resnet14", 14, _NARROW)
resnet20 = _builder("resnet20", 20, _NARROW)
resnet32 = _builder("resnet32", 32, _NARROW)
resnet44 = _builder("resnet44", 44, _NARROW)
resnet56 = _builder("resnet56", 56, _NARROW)
resnet110 = _builder("resnet110", 110, _NARROW)
resnet8x4 = _builder("resnet8x4", 8, _WIDE)
resnet32x4 = _builder("resnet32x4", 32, _WIDE)
