"""Client models the adaptive-selection benchmark adds to the MLPs of the scoreboard: a small
MNIST CNN, so routers over models of different classes (MLP + CNN) can be measured."""

from __future__ import annotations

import torch
from torch import nn


class MnistCNN(nn.Module):
    """conv 5x5 (1 -> 8) -> ReLU -> max-pool 2 -> conv 5x5 (8 -> 16) -> ReLU -> max-pool 2 ->
    Linear(256 -> 10), for (N, 1, 28, 28); about 323k multiply-accumulates per image (the MLP
    784-256-10: 203k)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.flatten(x, 1))


def mnist_cnn(num_classes: int = 10, seed: int = 0) -> MnistCNN:
    """A seeded :class:`MnistCNN` (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MnistCNN(num_classes).eval()
