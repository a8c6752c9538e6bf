"""ResNets: CIFAR-style ResNet-20 (BN / LayerNorm) and bottleneck ResNets (incl. ResNet-50)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build, make_norm2d


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm + shortcut, relu.

    The shortcut is the identity when shapes match, otherwise a 1x1 conv + norm
    ("option B"), so the residual stream changes width at stage boundaries.
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, norm: str = "bn"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm2d(norm, out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = make_norm2d(norm, out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                make_norm2d(norm, out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2): stem conv, 3 stages of n BasicBlocks, GAP, Linear."""

    def __init__(
        self,
        depth: int = 20,
        width: int = 1,
        base_width: int = 8,
        norm: str = "bn",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError("depth must be 6n + 2")
        n = (depth - 2) // 6
        widths = [base_width * width * m for m in (1, 2, 4)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.norm1 = make_norm2d(norm, widths[0])
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        in_ch = widths[0]
        for i, w in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, w, stride, norm))
                in_ch = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, torchvision style) -> 1x1 expand (x4), BN, projection shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu3 = nn.ReLU()
        self.downsample: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


class BottleneckResNet(nn.Module):
    """Bottleneck ResNet. ``imagenet_stem`` selects 7x7/2 conv + 3x3/2 max-pool (else a 3x3/1 conv)."""

    def __init__(
        self,
        layers: Sequence[int] = (1, 1, 1),
        widths: Sequence[int] = (8, 16, 32),
        stem_width: int = 16,
        imagenet_stem: bool = False,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        self.stem: nn.Sequential
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(),
            )
        stages: list[nn.Module] = []
        in_ch = stem_width
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(in_ch, w, stride))
                in_ch = w * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


def resnet20(
    width: int = 1,
    norm: str = "bn",
    base_width: int = 8,
    num_classes: int = 10,
    seed: int | None = 0,
) -> ResNetCifar:
    """CIFAR ResNet-20; stage widths ``base_width * width * (1, 2, 4)``; norm "bn" | "ln" | "gn"."""
    return build(
        lambda: ResNetCifar(
            20, width=width, base_width=base_width, norm=norm, num_classes=num_classes
        ),
        seed,
    )


def resnet20_ln(
    width: int = 1, base_width: int = 8, num_classes: int = 10, seed: int | None = 0
) -> ResNetCifar:
    """ResNet-20 with channel LayerNorm (permute -> nn.LayerNorm(C) -> permute) instead of BN."""
    return resnet20(
        width=width,
        norm="ln",
        base_width=base_width,
        num_classes=num_classes,
        seed=seed,
    )


def bottleneck_resnet(
    layers: Sequence[int] = (1, 2, 1),
    widths: Sequence[int] = (8, 16, 32),
    stem_width: int = 16,
    num_classes: int = 10,
    seed: int | None = 0,
) -> BottleneckResNet:
    """Small bottleneck ResNet for (N, 3, 32, 32) inputs (outputs 32 -> 64 -> 128 channels)."""
    return build(
        lambda: BottleneckResNet(
            tuple(layers), tuple(widths), stem_width, False, num_classes
        ),
        seed,
    )


def resnet50(num_classes: int = 1000, seed: int | None = 0) -> BottleneckResNet:
    """Real ResNet-50 layout (3, 4, 6, 3 bottlenecks; 256..2048 channels) for (N, 3, 224, 224)."""
    return build(
        lambda: BottleneckResNet(
            (3, 4, 6, 3), (64, 128, 256, 512), 64, True, num_classes
        ),
        seed,
    )
