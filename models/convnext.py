"""ConvNeXt-style network: depthwise 7x7, channels-last LayerNorm + MLP, layer scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import ChannelLayerNorm, build


class ConvNeXtBlock(nn.Module):
    """dwconv7x7 -> permute(0,2,3,1) -> LN(C) -> Linear(C,4C) -> GELU -> Linear(4C,C) -> gamma* -> permute back -> +x."""

    def __init__(self, dim: int, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Non-constant layer scale so that a wrong permutation is observable.
        self.gamma = nn.Parameter(layer_scale * (0.5 + torch.rand(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    """Stem (2x2/2 conv + channel LN) -> stage -> [channel LN + 2x2/2 conv -> stage]* -> GAP -> LN -> Linear."""

    def __init__(
        self,
        depths: Sequence[int] = (2, 2),
        dims: Sequence[int] = (16, 32),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], 2, stride=2), ChannelLayerNorm(dims[0])
        )
        stages: list[nn.Module] = []
        for i, (d, c) in enumerate(zip(depths, dims, strict=True)):
            mods: list[nn.Module] = []
            if i > 0:
                mods.append(
                    nn.Sequential(
                        ChannelLayerNorm(dims[i - 1]),
                        nn.Conv2d(dims[i - 1], c, 2, stride=2),
                    )
                )
            mods += [ConvNeXtBlock(c) for _ in range(d)]
            stages.append(nn.Sequential(*mods))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        x = x.mean(dim=(-2, -1))
        x = self.norm(x)
        return self.head(x)


def convnext(num_classes: int = 10, seed: int | None = 0) -> ConvNeXt:
    """Small ConvNeXt for (N, 3, 32, 32) inputs (16x16 @ 16 ch -> 8x8 @ 32 ch)."""
    return build(lambda: ConvNeXt(num_classes=num_classes), seed)
