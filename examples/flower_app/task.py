"""The task of the example: a small MLP on MNIST (or digits), client partitions from a seeded
Dirichlet split of the training set (fxfuse.bench.splits), accuracy on the test set."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from fxfuse.bench import datasets, split


class Net(nn.Module):
    """Flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(10)."""

    def __init__(self, in_features: int, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@lru_cache(maxsize=2)
def load(name: str) -> datasets.Dataset:
    return datasets.load(name)


def make_model(cfg: Any, seed: int = 0) -> Net:
    """A fresh model, initialised from ``seed``."""
    data = load(str(cfg["dataset"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net(data.in_features, int(cfg["hidden"]), data.n_classes)


def partition(cfg: Any, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s training samples under the configured split."""
    data = load(str(cfg["dataset"]))
    s = split(data.train_y, num_partitions, scheme=str(cfg["split"]), alpha=float(cfg["alpha"]),
              seed=int(cfg["seed"]))
    x, y = s.subset(partition_id, data.train_x, data.train_y)
    return x, y


def server_sets(cfg: Any) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The server's calibration batches (the first ``calibration-size`` test samples) and the
    evaluation set (the rest of the test set)."""
    data = load(str(cfg["dataset"]))
    n = int(cfg["calibration-size"])
    calib = list(data.test_x[:n].split(100))
    return calib, (data.test_x[n:], data.test_y[n:])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
