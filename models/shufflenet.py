"""ShuffleNetV2-style network: channel split, depthwise branches, concat, channel shuffle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build, channel_shuffle


def _branch_main(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.Conv2d(
            out_ch, out_ch, 3, stride=stride, padding=1, groups=out_ch, bias=False
        ),
        nn.BatchNorm2d(out_ch),
        nn.Conv2d(out_ch, out_ch, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit.

    stride 1: ``x.chunk(2, dim=1)``, identity left half, right half through the branch,
    ``torch.cat``, channel shuffle. stride 2: both branches process the full input
    (left: depthwise 3x3/2 -> 1x1; right: 1x1 -> depthwise 3x3/2 -> 1x1), cat, shuffle.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch % 2 != 0:
            raise ValueError("out_ch must be even")
        self.stride = stride
        half = out_ch // 2
        self.branch1: nn.Module
        if stride == 1:
            if in_ch != out_ch:
                raise ValueError("stride-1 units need in_ch == out_ch")
            self.branch1 = nn.Identity()
            self.branch2 = _branch_main(half, half, 1)
        else:
            self.branch1 = nn.Sequential(
                nn.Conv2d(
                    in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False
                ),
                nn.BatchNorm2d(in_ch),
                nn.Conv2d(in_ch, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(),
            )
            self.branch2 = _branch_main(in_ch, half, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            parts = x.chunk(2, dim=1)
            out = torch.cat([parts[0], self.branch2(parts[1])], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Stem conv -> stages (one stride-2 unit + stride-1 units) -> 1x1 conv -> GAP -> Linear."""

    def __init__(
        self,
        stage_repeats: Sequence[int] = (2, 2),
        stage_widths: Sequence[int] = (24, 48),
        stem_width: int = 16,
        last_width: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        c = stem_width
        for n, w in zip(stage_repeats, stage_widths, strict=True):
            units: list[nn.Module] = [ShuffleUnit(c, w, 2)]
            units += [ShuffleUnit(w, w, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c = w
        self.stages = nn.Sequential(*stages)
        self.last = nn.Sequential(
            nn.Conv2d(c, last_width, 1, bias=False),
            nn.BatchNorm2d(last_width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        x = self.last(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


def shufflenet(num_classes: int = 10, seed: int | None = 0) -> ShuffleNetV2:
    """Small ShuffleNetV2 for (N, 3, 32, 32) inputs."""
    return build(lambda: ShuffleNetV2(num_classes=num_classes), seed)


def _shuffle2(x: torch.Tensor) -> torch.Tensor:
    """Channel shuffle with 2 groups as libraries write it: view (b, 2, c/2, h, w), transpose,
    contiguous, view back."""
    b, c, h, w = x.size()
    x = x.view(b, 2, c // 2, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnitLib(ShuffleUnit):
    """:class:`ShuffleUnit` with the libraries' shuffle (``view`` / ``transpose`` /
    ``contiguous``) and split (``x.chunk(2, dim=1)`` unpacked)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _shuffle2(out)


class ShuffleNetV2Lib(nn.Module):
    """ShuffleNet V2 as libraries build it: stem 3x3/2 conv-BN-ReLU -> 3x3/2 max-pool -> three
    stages of one downsampling unit (both branches read x) then 3 / 7 / 3 units that split the
    channels in two -> 1x1 conv-BN-ReLU -> mean over H, W -> Linear.  Widths: the x0.5 model's
    (24; 48, 96, 192; 1024) halved, the last conv at a quarter."""

    def __init__(self, stage_repeats: Sequence[int] = (4, 8, 4),
                 stage_widths: Sequence[int] = (24, 48, 96), stem_width: int = 12,
                 last_width: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, stem_width, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        c = stem_width
        stages: list[nn.Module] = []
        for n, w in zip(stage_repeats, stage_widths, strict=True):
            units: list[nn.Module] = [ShuffleUnitLib(c, w, 2)]
            units += [ShuffleUnitLib(w, w, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c = w
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = nn.Sequential(nn.Conv2d(c, last_width, 1, bias=False),
                                   nn.BatchNorm2d(last_width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(last_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


def shufflenetv2_lib(num_classes: int = 10, seed: int | None = 0) -> ShuffleNetV2Lib:
    """ShuffleNet V2's library layout (stages of 4 / 8 / 4 units) at small widths, for
    (N, 3, 32, 32) inputs."""
    return build(lambda: ShuffleNetV2Lib(num_classes=num_classes), seed)
