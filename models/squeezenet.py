"""SqueezeNet-style network of fire modules (as libraries build SqueezeNet 1.1, small widths)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build


class Fire(nn.Module):
    """1x1 squeeze conv + ReLU feeding a 1x1 and a 3x3 expand conv (+ ReLU), concatenated."""

    def __init__(self, in_ch: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_ch, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


# SqueezeNet 1.1's (squeeze, expand) per fire module; "M" is a 3x3/2 max-pool (ceil mode)
FIRE_CFG: tuple[tuple[int, int] | str, ...] = (
    (16, 64), (16, 64), "M", (32, 128), (32, 128), "M",
    (48, 192), (48, 192), (64, 256), (64, 256),
)


class SqueezeNet(nn.Module):
    """Stem 3x3/2 conv + ReLU -> max-pool -> 8 fire modules with max-pools -> classifier
    (dropout -> 1x1 conv -> ReLU -> global average pool) -> flatten.  ``width``: the library's
    channel counts divided by this."""

    def __init__(self, cfg: Sequence[tuple[int, int] | str] = FIRE_CFG, width: int = 4,
                 num_classes: int = 10) -> None:
        super().__init__()
        stem = 64 // width
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, stride=2), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(3, 2, ceil_mode=True)]
        c = stem
        for item in cfg:
            if isinstance(item, str):
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            s, e = item[0] // width, item[1] // width
            layers.append(Fire(c, s, e, e))
            c = 2 * e
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(c, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        for m in self.modules():  # the library's initialisation
            if isinstance(m, nn.Conv2d):
                if m is self.classifier[1]:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet(num_classes: int = 10, seed: int | None = 0) -> SqueezeNet:
    """SqueezeNet 1.1 layout at a quarter of its widths, for (N, 3, 32, 32) inputs."""
    return build(lambda: SqueezeNet(num_classes=num_classes), seed)
