"""Plain multi-layer perceptron on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import build


class MLP(nn.Module):
    """Flatten -> [Linear -> (BatchNorm1d | LayerNorm)? -> ReLU] * len(hidden) -> Linear.

    ``norm``: None (default), ``"bn"`` or ``"ln"``, between each hidden Linear and its ReLU;
    ``bias=False``: no biases anywhere (OTFusion's MNIST MLPs).
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (64, 64),
        num_classes: int = 10,
        norm: str | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if norm not in (None, "bn", "ln"):
            raise ValueError(f"unknown norm {norm!r}; expected None, 'bn' or 'ln'")
        if not hidden or any(int(w) <= 0 for w in hidden):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {hidden!r}")
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers.append(nn.Linear(prev, h, bias=bias))
            if norm == "bn":
                layers.append(nn.BatchNorm1d(h))
            elif norm == "ln":
                layers.append(nn.LayerNorm(h))
            layers.append(nn.ReLU())
            prev = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes, bias=bias)

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


def mlp_classifier(
    widths: Sequence[int] = (512, 512, 512),
    in_dim: int = 784,
    num_classes: int = 10,
    norm: str | None = None,
    seed: int | None = 0,
) -> MLP:
    """Trainable MLP ``in_dim -> *widths -> num_classes`` (ReLU), optional ``"bn"``/``"ln"`` norm.

    Default 784-512-512-512-10 for (N, 1, 28, 28) MNIST inputs; used by the training
    recipes in :mod:`models.train`. Built like every zoo factory (seeded, eval mode).
    """
    widths = tuple(int(w) for w in widths)
    return build(lambda: MLP(in_dim, widths, num_classes, norm), seed)
