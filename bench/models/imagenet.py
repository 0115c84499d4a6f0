"""ImageNet models: torchvision ResNets behind the ``tv:`` prefix, and the MobileNet-V1 student of ReviewKD/DKD/GPD.

``tv:<name>`` (``tv:resnet18``, ``tv:resnet34``, ``tv:resnet50``, and the other torchvision ResNet-family builders
listed in ``TV_RESNETS``) builds the torchvision model and adopts its modules under their own names, so
``state_dict()`` keys are exactly torchvision's (``conv1, bn1, relu, maxpool, layer1..4, avgpool, fc``) and
torchvision / torch-hub checkpoints load unchanged. Stages: stem = ``conv1 -> bn1 -> relu -> maxpool``, stages =
``layer1..layer4``, head = ``avgpool -> flatten`` (feature) then ``fc``. Pre-activation of a stage: its last
block's residual sum before the final ReLU (what the official ReviewKD ImageNet code and mdistiller's
``preact_feats`` take).

Options: ``pretrained=True`` loads torchvision's ``IMAGENET1K_V1`` weights through the torch hub cache
(``$TORCH_HOME/hub/checkpoints``); when ``num_classes != 1000`` the ``fc`` is replaced by a freshly initialised
one, and when ``in_channels != 3`` the pretrained ``conv1`` kernels are summed (1 channel) or tiled and rescaled
(other counts), as timm does. A failed download is a ``BenchError`` saying where to put the file.

``mobilenetv1`` is mdistiller's ``models/imagenet/mobilenetv1.py`` (``model`` = Sequential of a stride-2 conv-bn
and 13 depthwise-separable blocks, then pooling; ``fc``). Stages follow mdistiller's ``feats``: stem =
``model[0]`` (32 ch, stride 2); stages = ``model[1:4]`` (128, stride 4), ``model[4:6]`` (256, stride 8),
``model[6:12]`` (512, stride 16), ``model[12:14]`` (1024, stride 32) (post-ReLU outputs; the pre-activation
output is the last block's BatchNorm output before its ReLU, mdistiller's ``preact_feats``); head =
``model[14] -> flatten`` (feature, 1024) then ``fc``. Deviations from mdistiller: ``model[14]`` is
``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(7)`` (same on 224x224, no parameters, keys unchanged), and
``fc`` has ``num_classes`` outputs instead of a hard-coded 1000.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError
from bench.models.base import StagedNet
from bench.models.registry import register_model, register_prefix

TV_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def adapt_first_conv(conv: nn.Conv2d, in_channels: int, keep_weights: bool) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs; with ``keep_weights`` the RGB kernels are reused."""
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    if keep_weights:
        weight = conv.weight.detach()
        if in_channels == 1:
            weight = weight.sum(dim=1, keepdim=True)
        else:
            repeats = -(-in_channels // weight.shape[1])
            weight = weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)
        new.weight.data.copy_(weight)
        if conv.bias is not None:
            new.bias.data.copy_(conv.bias.detach())
    return new


class TorchvisionResNet(StagedNet):
    """A torchvision ``ResNet`` whose modules are adopted as they are (same names, same parameters)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        self.stage_channels = [self._out_channels(getattr(self, f"layer{i}")) for i in range(1, 5)]
        self.feature_dim = self.fc.in_features
        self.num_classes = self.fc.out_features

    @staticmethod
    def _out_channels(layer: nn.Sequential) -> int:
        block = layer[-1]
        return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        return (self.layer1, self.layer2, self.layer3, self.layer4)[index](x)

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        layer = (self.layer1, self.layer2, self.layer3, self.layer4)[index]
        for block in layer[:-1]:
            x = block(x)
        preact = _tv_block_preact(layer[-1], x)
        return F.relu(preact), preact

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.avgpool(x).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.fc(feature)


def _tv_block_preact(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision ``BasicBlock`` / ``Bottleneck`` up to its final ReLU: ``bn_last(conv_last(.)) + identity``."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "bn3"):  # Bottleneck
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out)) + identity
    return block.bn2(block.conv2(out)) + identity


def _load_tv_weights(name: str, weights) -> dict:
    import torch.hub

    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, corrupt cache file: all end the same way for the user
        filename = weights.url.rsplit("/", 1)[-1]
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BenchError(
            f"could not download torchvision weights {weights} for 'tv:{name}' ({type(exc).__name__}: {reason}); "
            f"download {weights.url} elsewhere and place it as {torch.hub.get_dir()}/checkpoints/{filename} "
            f"(the torch hub cache; set TORCH_HOME to move it)"
        ) from exc


def create_tv_model(name: str, num_classes: int, in_channels: int = 3, pretrained: bool = False, **kwargs):
    """Factory of the ``tv:`` prefix."""
    if kwargs:
        raise BenchError(f"model 'tv:{name}' does not take option(s) {sorted(kwargs)}")
    if name not in TV_RESNETS:
        raise BenchError(f"unknown torchvision model 'tv:{name}' (supported: {', '.join(TV_RESNETS)})")
    from torchvision import models

    net = models.get_model(name, weights=None, num_classes=1000 if pretrained else num_classes)
    if pretrained:
        weights = models.get_model_weights(name)["IMAGENET1K_V1"]
        net.load_state_dict(_load_tv_weights(name, weights))
        if num_classes != net.fc.out_features:
            net.fc = nn.Linear(net.fc.in_features, num_classes)
    if in_channels != 3:
        net.conv1 = adapt_first_conv(net.conv1, in_channels, keep_weights=pretrained)
    return TorchvisionResNet(net)


register_prefix("tv", create_tv_model)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(StagedNet):
    _STAGES = ((1, 4), (4, 6), (6, 12), (12, 14))  # stage i = model[start:end]

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.model = nn.Sequential(
            _conv_bn(in_channels, 32, 2),
            _conv_dw(32, 64, 1),
            _conv_dw(64, 128, 2),
            _conv_dw(128, 128, 1),
            _conv_dw(128, 256, 2),
            _conv_dw(256, 256, 1),
            _conv_dw(256, 512, 2),
            _conv_dw(512, 512, 1),
            _conv_dw(512, 512, 1),
            _conv_dw(512, 512, 1),
            _conv_dw(512, 512, 1),
            _conv_dw(512, 512, 1),
            _conv_dw(512, 1024, 2),
            _conv_dw(1024, 1024, 1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(1024, num_classes)
        self.stage_channels = [128, 256, 512, 1024]
        self.feature_dim = 1024
        self.num_classes = num_classes

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.model[0](x)

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        start, end = self._STAGES[index]
        for block in self.model[start:end]:
            x = block(x)
        return x

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        start, end = self._STAGES[index]
        for block in self.model[start : end - 1]:
            x = block(x)
        preact = self.model[end - 1][:-1](x)  # the last block without its final ReLU
        return F.relu(preact), preact

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.model[14](x).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.fc(feature)


@register_model
def mobilenetv1(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MobileNetV1:
    """ImageNet MobileNet-V1 (mdistiller ``models/imagenet/mobilenetv1.py``), the ResNet50 -> MobileNet student."""
    if kwargs:
        raise BenchError(f"model 'mobilenetv1' does not take option(s) {sorted(kwargs)}")
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels)
