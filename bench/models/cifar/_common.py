"""Small helpers shared by the CIFAR families."""
from __future__ import annotations

import math

from torch import Tensor, nn

from bench.errors import BenchError


def reject_options(model: str, options: dict) -> None:
    """Constructors take ``**kwargs`` for a uniform signature; anything they do not use is a user error."""
    if options:
        raise BenchError(f"model {model!r} does not take option(s) {sorted(options)}")


def init_normal_fan_out(model: nn.Module) -> None:
    """CRD's initialisation of its VGG and MobileNetV2: conv N(0, sqrt(2 / (k*k*C_out))), BN 1/0, linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


def init_kaiming_fan_out(model: nn.Module) -> None:
    """CRD's initialisation of its ResNets: Kaiming-normal (fan_out, ReLU) convs, norm layers 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def run_blocks_preact(blocks: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a stage's blocks; the last one through its ``forward_preact``: (stage output, its pre-activation)."""
    for block in blocks[:-1]:
        x = block(x)
    return blocks[-1].forward_preact(x)


class LayerStages:
    """Stages for a :class:`~bench.models.base.StagedNet` whose stage ``i`` is the ``nn.Sequential`` of blocks
    ``layer{i + 1}`` (RepDistiller's names, kept so its checkpoints load) and whose blocks' last one has
    ``forward_preact``. Put it before ``StagedNet`` among the bases."""

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        return getattr(self, f"layer{index + 1}")(x)

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        return run_blocks_preact(getattr(self, f"layer{index + 1}"), x)


class ShuffleBlock(nn.Module):
    """ShuffleNet's channel shuffle: ``groups`` groups of channels interleaved (no parameters)."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
