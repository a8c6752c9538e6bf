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


# MobileNetV2 as libraries build it: (expand_ratio, out_channels, num_blocks, first_stride), 17
# blocks from width 32 to 320, then a 1x1 conv to 1280 (here every width divided by 4)
MBV2_LIB_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class MobileNetV2Lib(nn.Module):
    """MobileNetV2 as libraries build it: stem 3x3/2 conv-BN-ReLU6 -> 17 inverted residuals
    (1x1 expand-BN-ReLU6 -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN, + x when stride is 1 and
    widths agree) -> 1x1 conv-BN-ReLU6 -> GAP -> dropout -> Linear; ``width``: the library's
    channel counts divided by this."""

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        stem = 32 // width
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU6())
        blocks: list[nn.Module] = []
        c = stem
        for t, out, n, s in MBV2_LIB_CFG:
            for i in range(n):
                blocks.append(InvertedResidual(c, out // width, s if i == 0 else 1, t, False))
                c = out // width
        self.blocks = nn.Sequential(*blocks)
        last = 1280 // width
        self.last = nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last),
                                  nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():  # the library's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenetv2_lib(num_classes: int = 10, seed: int | None = 0) -> MobileNetV2Lib:
    """MobileNetV2's library layout (17 inverted residuals) at a quarter of its widths, for
    (N, 3, 32, 32) inputs."""
    return build(lambda: MobileNetV2Lib(num_classes=num_classes), seed)
