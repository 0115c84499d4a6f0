"""ShuffleNetV2 of the CRD benchmark (RepDistiller ``models/ShuffleNetv2.py``): ``shufflev2`` (alias ``ShuffleV2``)
= ``ShuffleNetV2(net_size=1)``: widths 116/232/464, blocks 3/7/3, final 1x1 conv to 1024.

Layout: ``conv1`` (1x1 conv to 24, no stride), ``bn1``, ``layer1..3`` (each a stride-2 ``DownBlock`` with
``conv1..5, bn1..5`` followed by ``BasicBlock``s with ``conv1..3, bn1..3``), ``conv2`` (1x1 to 1024), ``bn2``,
``linear``.

Stages (CRD's ``f1..f3``): stem = ``relu(bn1(conv1(x)))`` (24 ch); stages = ``layer1, layer2, layer3``
(116, 232, 464; strides 2, 2, 2). Head: ``relu(bn2(conv2(x))) -> avgpool -> flatten`` (feature, 1024) then
``linear`` -- the final 1x1 conv belongs to the head, as the last stage output is CRD's ``f3`` (464 ch).
Pre-activation of a stage (CRD's ``preact=True`` list): its last block's ``cat([x1, bn3(conv3(.))])`` before
the ReLU **and before the channel shuffle**, exactly as CRD / mdistiller return it; so the stage output is
``shuffle(relu(preact))``, a channel permutation of ``relu(preact)``.

Deviation: ``F.avg_pool2d(out, 4)`` becomes a parameter-free ``avgpool = AdaptiveAvgPool2d(1)`` module (same on
32x32 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.base import StagedNet
from bench.models.cifar._common import LayerStages, ShuffleBlock, reject_options
from bench.models.registry import register_model

CONFIGS = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class SplitBlock(nn.Module):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        ch = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(ch, ch, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1, groups=ch, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)
        self.shuffle = ShuffleBlock()

    def _branch(self, x2: Tensor) -> Tensor:
        """The convolutional branch up to its last BatchNorm (before its ReLU)."""
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, pre-activation) as CRD's ``is_last`` block: the pre-activation is ``cat([x1, branch])``
        *before* the channel shuffle, so the output is ``shuffle(relu(preact))`` (``x1`` is non-negative)."""
        x1, x2 = self.split(x)
        branch = self._branch(x2)
        return self.shuffle(torch.cat([x1, F.relu(branch)], 1)), torch.cat([x1, branch], 1)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        return self.shuffle(torch.cat([x1, F.relu(self._branch(x2))], 1))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(LayerStages, StagedNet):
    def __init__(self, net_size: float = 1, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)

        self.stage_channels = list(out_channels[:3])
        self.feature_dim = out_channels[3]
        self.num_classes = num_classes

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def activate(self, index: int, preact: Tensor) -> Tensor:
        return self.layer1[-1].shuffle(F.relu(preact))  # every block shuffles with 2 groups

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.avgpool(F.relu(self.bn2(self.conv2(x)))).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.linear(feature)


def shufflev2(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ShuffleNetV2:
    """CRD ``ShuffleV2``: ``ShuffleNetV2(net_size=1)``."""
    reject_options("shufflev2", kwargs)
    return ShuffleNetV2(net_size=1, num_classes=num_classes, in_channels=in_channels)


register_model(shufflev2, name="shufflev2")
register_model(shufflev2, name="ShuffleV2")
