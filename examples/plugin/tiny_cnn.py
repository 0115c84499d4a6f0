"""A tiny CNN written as a plain ``nn.Module`` (no kdbench base class): three conv-BN-ReLU blocks, global average
pooling, a linear classifier. An example plugin.

Two ways to use it as a teacher or student:

- by reference in a suite: ``student: {module: tiny_cnn:TinyCNN, kwargs: {width: 8}, stages: [block1, block2,
  block3]}``; kdbench traces it (``torch.fx``), takes the stage outputs by module name and the pre-logit feature
  at the classifier's input;
- by name: this file registers ``tinycnn`` (``register_model``), wrapped the same way by
  ``bench.models.generic.wrap_module``.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.models import register_model
from bench.models.generic import wrap_module


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """``block1`` keeps the resolution, ``block2`` and ``block3`` halve it; widths w, 2w, 4w."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.block1 = conv_bn_relu(in_channels, width, 1)
        self.block2 = conv_bn_relu(width, 2 * width, 2)
        self.block3 = conv_bn_relu(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def tinycnn(num_classes: int = 10, in_channels: int = 3, width: int = 16):
    """``TinyCNN`` as a named model of the zoo."""
    return wrap_module(TinyCNN(num_classes, in_channels, width), ["block1", "block2", "block3"], label="tinycnn",
                       in_channels=in_channels)  # fmt: skip
