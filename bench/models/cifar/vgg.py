"""CIFAR VGGs of the CRD benchmark (RepDistiller ``models/vgg.py``), batch-norm variants: vgg8, vgg11, vgg13,
vgg16, vgg19 (CRD's ``model_dict`` maps these names to ``vgg*_bn``).

Five conv blocks ``block0..block4`` (each ``[Conv2d(3x3, bias) -> BatchNorm2d -> ReLU] * k`` without the final
ReLU, which CRD applies in ``forward``), max-pools ``pool0..pool3``, ``pool4 = AdaptiveAvgPool2d(1)`` and a single
``classifier = Linear(512, num_classes)`` (no FC stack). Keys: ``block0.0.weight`` (conv), ``block0.1.*`` (BN), ...

Stages: stem = ``block0 -> relu`` (64 ch); stages = ``pool0 -> block1 -> relu`` (128), ``pool1 -> block2 -> relu``
(256), ``pool2 -> block3 -> relu`` (512), ``[pool3] -> block4 -> relu`` (512): the post-ReLU ``f1..f4`` of CRD's
``is_feat`` list. Head: ``pool4 -> flatten`` (feature, 512) then ``classifier``. Pre-activation of a stage: the
block's output before that ReLU (CRD's ``f1_pre..f4_pre``).

CRD applies ``pool3`` only when the network input is 64x64 (Tiny-ImageNet); a 32x32 input runs ``block4`` at
4x4. A stage cannot see the network input, so here ``pool3`` runs when the input of stage 3 is 8x8, which is
the same condition for every input size that is a multiple of 8 (64x64 -> 8x8 at stage 3).
"""
from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.base import StagedNet
from bench.models.cifar._common import init_normal_fan_out, reject_options
from bench.models.registry import register_model

CFG = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(widths: list[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied in forward (CRD keeps the pre-activation)


class VGG(StagedNet):
    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.block0 = _make_block(cfg[0], in_channels, batch_norm)
        self.block1 = _make_block(cfg[1], cfg[0][-1], batch_norm)
        self.block2 = _make_block(cfg[2], cfg[1][-1], batch_norm)
        self.block3 = _make_block(cfg[3], cfg[2][-1], batch_norm)
        self.block4 = _make_block(cfg[4], cfg[3][-1], batch_norm)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

        self.stage_channels = [cfg[i][-1] for i in range(1, 5)]
        self.feature_dim = 512
        self.num_classes = num_classes

        init_normal_fan_out(self)  # CRD's initialisation

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.block0(x))

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if index == 0:
            x = self.block1(self.pool0(x))
        elif index == 1:
            x = self.block2(self.pool1(x))
        elif index == 2:
            x = self.block3(self.pool2(x))
        elif index == 3:
            if x.shape[-2] == 8:  # CRD: ``if h == 64: x = self.pool3(x)``
                x = self.pool3(x)
            x = self.block4(x)
        else:
            raise IndexError(f"VGG has 4 stages, got stage {index}")
        return F.relu(x), x

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        return self.forward_stage_preact(index, x)[0]

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.pool4(x).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.classifier(feature)


def _builder(name: str, cfg_key: str):
    def build(num_classes: int = 100, in_channels: int = 3, **kwargs) -> VGG:
        reject_options(name, kwargs)
        return VGG(CFG[cfg_key], batch_norm=True, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CRD ``{name}`` (= ``{name}_bn``, configuration {cfg_key!r})."
    return register_model(build, name=name)


vgg8 = _builder("vgg8", "S")
vgg11 = _builder("vgg11", "A")
vgg13 = _builder("vgg13", "B")
vgg16 = _builder("vgg16", "D")
vgg19 = _builder("vgg19", "E")
