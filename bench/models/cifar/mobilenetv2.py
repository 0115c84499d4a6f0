"""MobileNetV2 of the CRD benchmark (RepDistiller ``models/mobilenetv2.py``, from RCO): ``mobilenetv2`` =
CRD ``mobile_half`` = ``mobilenetv2_T_w(T=6, W=0.5)``. Also registered as ``MobileNetV2`` (mdistiller) and
``mobile_half`` (CRD).

Layout: ``conv1`` (3x3 stride-2 conv, BN, ReLU: keys ``conv1.0/1``), ``blocks`` = ModuleList of 7 Sequentials of
InvertedResidual (``blocks.<i>.<j>.conv.0..7``; settings t,c,n,s = [1,16,1,1], [6,24,2,1], [6,32,3,2],
[6,64,4,2], [6,96,3,1], [6,160,3,2], [6,320,1,1], channels scaled by 0.5), ``conv2`` (1x1 conv to 1280, BN, ReLU:
``conv2.0/1``), average pooling, ``classifier`` = ``Sequential(Linear(1280, num_classes))`` (``classifier.0``).

Stages (CRD's ``f1..f4``): stem = ``conv1`` (16 ch, stride 2); stages = ``blocks[0:2]`` (12 ch),
``blocks[2]`` (16), ``blocks[3:5]`` (48), ``blocks[5:7]`` (160). Head: ``conv2 -> avgpool -> flatten`` (feature,
1280) then ``classifier``. A stage ends with a linear bottleneck (no ReLU), so its pre-activation output is the
stage output itself: CRD's ``forward`` returns the same list with ``preact=True`` (mdistiller has no
``preact_feats`` for it).

Deviation: ``avgpool`` is ``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(2, ceil_mode=True)`` (same on 32x32
inputs, where the last map is 2x2); CRD's constructor ``print`` is dropped.
"""
from __future__ import annotations


from torch import Tensor, nn

from bench.models.base import StagedNet
from bench.models.cifar._common import init_normal_fan_out, reject_options
from bench.models.registry import register_model


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pointwise expand
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(StagedNet):
    # stage i = blocks[_STAGES[i][0] : _STAGES[i][1]]
    _STAGES = ((0, 2), (2, 3), (3, 5), (5, 7))

    def __init__(self, expand: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [expand, 24, 2, 1],
            [expand, 32, 3, 2],
            [expand, 64, 4, 2],
            [expand, 96, 3, 1],
            [expand, 160, 3, 2],
            [expand, 320, 1, 1],
        ]
        channel = int(32 * width_mult)
        self.conv1 = conv_bn(in_channels, channel, 2)
        self.blocks = nn.ModuleList()
        block_channels = []
        for t, c, n, s in setting:
            out = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(channel, out, stride, t))
                channel = out
            self.blocks.append(nn.Sequential(*layers))
            block_channels.append(out)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        self.stage_channels = [block_channels[end - 1] for _, end in self._STAGES]
        self.feature_dim = self.last_channel
        self.num_classes = num_classes

        init_normal_fan_out(self)  # CRD's initialisation

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        start, end = self._STAGES[index]
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.forward_stage(index, x)
        return out, out

    def activate(self, index: int, preact: Tensor) -> Tensor:
        return preact

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.avgpool(self.conv2(x)).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.classifier(feature)


def mobilenetv2(num_classes: int = 100, in_channels: int = 3, **kwargs) -> MobileNetV2:
    """CRD ``mobile_half``: MobileNetV2 with expansion 6 and width 0.5 (the CRD-benchmark student)."""
    reject_options("mobilenetv2", kwargs)
    return MobileNetV2(expand=6, width_mult=0.5, num_classes=num_classes, in_channels=in_channels)


register_model(mobilenetv2, name="mobilenetv2")
register_model(mobilenetv2, name="MobileNetV2")
register_model(mobilenetv2, name="mobile_half")
