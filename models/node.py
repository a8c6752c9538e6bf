"""Neural-ODE-style network with one weight-tied ODE function integrated by explicit Euler."""

from __future__ import annotations

import torch
from torch import nn

from ._utils import build, make_norm2d


class ODEFunc(nn.Module):
    """f(x) = conv(relu(conv(norm(x)))), channel count preserved."""

    def __init__(self, channels: int, norm: str = "bn") -> None:
        super().__init__()
        self.norm = make_norm2d(norm, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(self.norm(x))))


class NODENet(nn.Module):
    """Stem conv-BN-ReLU -> ``steps`` Euler steps ``x = x + dt * f(x)`` with one tied f -> GAP -> Linear."""

    def __init__(
        self,
        channels: int = 16,
        steps: int = 3,
        norm: str = "bn",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.steps = steps
        self.dt = 1.0 / steps
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.f = ODEFunc(channels, norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(self.steps):
            x = x + self.dt * self.f(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


def node_net(
    steps: int = 3,
    channels: int = 16,
    norm: str = "bn",
    num_classes: int = 10,
    seed: int | None = 0,
) -> NODENet:
    """Neural-ODE net for (N, 3, 16, 16) inputs; ``steps`` calls of the same ``f`` module."""
    return build(lambda: NODENet(channels, steps, norm, num_classes), seed)
