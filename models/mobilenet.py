"""MobileNetV2-style network with inverted residuals and squeeze-and-excitation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build

# (expand_ratio, out_channels, num_blocks, first_stride, use_se)
MBV2_CFG: tuple[tuple[int, int, int, int, bool], ...] = (
    (1, 8, 1, 1, False),
    (4, 16, 2, 2, True),
    (4, 24, 2, 2, True),
)


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv reduce -> ReLU -> 1x1 conv expand -> hardsigmoid -> x * gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool(x)
        s = self.relu(self.fc1(s))
        s = self.gate(self.fc2(s))
        return x * s


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> [SE] -> 1x1 project-BN (+ x if shapes match)."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, use_se: bool
    ) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_ch, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
            ]
        layers += [
            nn.Conv2d(
                hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False
            ),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        ]
        if use_se:
            layers.append(SqueezeExcite(hidden, max(hidden // 4, 4)))
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem 3x3 conv -> inverted residual stages -> 1x1 conv -> GAP -> Linear."""

    def __init__(
        self,
        cfg: Sequence[tuple[int, int, int, int, bool]] = MBV2_CFG,
        stem_width: int = 16,
        last_width: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU6(),
        )
        blocks: list[nn.Module] = []
        in_ch = stem_width
        for t, c, n, s, se in cfg:
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t, se))
                in_ch = c
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(
            nn.Conv2d(in_ch, last_width, 1, bias=False),
            nn.BatchNorm2d(last_width),
            nn.ReLU6(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        x = self.last(x)
        x = self.flatten(self.pool(x))
        return self.classifier(x)


def mobilenetv2(num_classes: int = 10, seed: int | None = 0) -> MobileNetV2:
    """Small MobileNetV2 (+SE in later stages) for (N, 3, 32, 32) inputs."""
    return build(lambda: MobileNetV2(num_classes=num_classes), seed)
