"""Wide ResNets of the CRD benchmark (RepDistiller ``models/wrn.py``): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation WRN-d-k: 3x3 conv to 16 channels, three ``NetworkBlock``s of ``n = (d - 4) / 6`` BasicBlocks with
``16k, 32k, 64k`` channels (strides 1, 2, 2), final ``bn1 -> relu``, global average pooling, ``fc``. Module
names follow CRD: ``conv1, block1..3, bn1, relu, fc``; each block is ``blockN.layer.<i>`` with
``bn1, relu1, conv1, bn2, relu2, conv2, convShortcut`` (``convShortcut`` only where in != out channels).

Stages: stem = ``conv1``; stages = ``block1, block2, block3`` (their raw, pre-activation outputs: the
``f1..f3`` of CRD's ``is_feat`` list). The final ``bn1 -> relu`` belongs to the head: ``forward_pool`` =
``bn1 -> relu -> avgpool -> flatten``, so ``stage_channels = [16k, 32k, 64k]`` and ``feature_dim = 64k``.

Pre-activation stage outputs (CRD's ``preact=True`` list): ``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)``
and ``bn1(f3)``, i.e. the BatchNorm that next normalises each raw stage output. ``forward_features(x,
preact=True)`` takes them from the pass itself (the next block is handed its first BatchNorm's output instead of
recomputing it), so each BatchNorm still runs once per pass, and in training mode updates its running statistics
once, where CRD's ``forward`` applies them a second time.

Deviation: ``F.avg_pool2d(out, 8)`` becomes a parameter-free ``avgpool = AdaptiveAvgPool2d(1)`` module (same
result on 32x32 inputs; 8x8 inputs work). ``drop_rate`` (CRD ``dropRate``, default 0) is the only option.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.base import Features, StagedNet
from bench.models.cifar._common import reject_options
from bench.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor, normed: Tensor | None = None) -> Tensor:
        """``normed``: ``bn1(x)`` when the caller has computed it already (kept: its ReLU is not in place)."""
        act = self.relu1(self.bn1(x)) if normed is None else F.relu(normed)
        # CRD: identity shortcut takes the raw input, the projection shortcut the pre-activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor, normed: Tensor | None = None) -> Tensor:
        """``normed``: the first block's ``bn1(x)``, if already computed."""
        x = self.layer[0](x, normed)
        for block in self.layer[1:]:
            x = block(x)
        return x


class WideResNet(StagedNet):
    local_preact = False  # a stage's pre-activation is the next block's BatchNorm (module docstring)

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)

        self.stage_channels = ch[1:]
        self.feature_dim = ch[3]
        self.num_classes = num_classes

        # CRD's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        return (self.block1, self.block2, self.block3)[index](x)

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.avgpool(self.relu(self.bn1(x))).flatten(1)

    def forward_features(self, x: Tensor, preact: bool = False) -> Features:
        if not preact:
            return super().forward_features(x)
        blocks = (self.block1, self.block2, self.block3)
        norms = (self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1)  # what normalises each output
        x, normed = self.forward_stem(x), None
        stages, preacts = [], []
        for block, norm in zip(blocks, norms):
            x = block(x, normed)
            normed = norm(x)
            stages.append(x)
            preacts.append(normed)
        feature = self.avgpool(F.relu(normed)).flatten(1)  # = forward_pool(x), sharing bn1(x)
        return Features(stages=stages, feature=feature, logits=self.fc(feature), preact_stages=preacts)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.fc(feature)


def _builder(name: str, depth: int, widen_factor: int):
    def build(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0, **kwargs) -> WideResNet:
        reject_options(name, kwargs)
        return WideResNet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CRD ``{name}``: WRN-{depth}-{widen_factor}."
    return register_model(build, name=name)


wrn_16_1 = _builder("wrn_16_1", 16, 1)
wrn_16_2 = _builder("wrn_16_2", 16, 2)
wrn_40_1 = _builder("wrn_40_1", 40, 1)
wrn_40_2 = _builder("wrn_40_2", 40, 2)
