"""DenseNet-style network: concatenating dense blocks and transition layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck) -> BN-ReLU-conv3x3; output concatenated to the input."""

    def __init__(self, in_ch: int, growth: int, bn_size: int = 2) -> None:
        super().__init__()
        inter = bn_size * growth
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 -> 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """Stem conv -> (dense block -> transition)* -> dense block -> BN-ReLU -> GAP -> Linear."""

    def __init__(
        self,
        block_layers: Sequence[int] = (3, 3, 3),
        growth: int = 8,
        stem_width: int = 16,
        compression: float = 0.5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem_width, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        c = stem_width
        for i, n in enumerate(block_layers):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i != len(block_layers) - 1:
                out = int(c * compression)
                layers.append(Transition(c, out))
                c = out
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.features(x)
        x = self.relu(self.bn(x))
        x = self.flatten(self.pool(x))
        return self.fc(x)


def densenet(
    block_layers: Sequence[int] = (3, 3, 3),
    growth: int = 8,
    num_classes: int = 10,
    seed: int | None = 0,
) -> DenseNet:
    """Small DenseNet-BC for (N, 3, 32, 32) inputs."""
    return build(
        lambda: DenseNet(tuple(block_layers), growth, num_classes=num_classes), seed
    )
