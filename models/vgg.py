"""Small VGG-style convnet with and without BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build

# Channel counts; "M" is a 2x2 max-pool. 32x32 input -> 4x4 at the flatten.
VGG_CFG: tuple[int | str, ...] = (16, 16, "M", 32, 32, "M", 64, "M")


class VGG(nn.Module):
    """conv stack + max-pools -> flatten (spatial 4x4) -> Linear -> ReLU -> Linear."""

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG_CFG,
        batchnorm: bool = False,
        in_channels: int = 3,
        input_size: int = 32,
        hidden: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        size = input_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(c, v, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU())
            c = v
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c * size * size, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.flatten(x)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


def vgg(batchnorm: bool = False, num_classes: int = 10, seed: int | None = 0) -> VGG:
    """Small VGG for (N, 3, 32, 32) inputs; flatten sees 64x4x4."""
    return build(lambda: VGG(batchnorm=batchnorm, num_classes=num_classes), seed)


def vgg_bn(num_classes: int = 10, seed: int | None = 0) -> VGG:
    """Small VGG with BatchNorm2d after every conv."""
    return vgg(batchnorm=True, num_classes=num_classes, seed=seed)
