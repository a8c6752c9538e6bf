"""Plain multi-layer perceptron on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (64, 64),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = self.features(x)
        return self.head(x)


def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (64, 64),
    num_classes: int = 10,
    seed: int | None = 0,
) -> MLP:
    """MLP 784 -> 64 -> 64 -> 10 for (N, 1, 28, 28) inputs."""
    return build(lambda: MLP(in_features, tuple(hidden), num_classes), seed)
