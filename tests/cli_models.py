"""Factories importable as MODEL strings by the CLI tests (``tests.cli_models:two_inputs``)."""

from __future__ import annotations

import torch
from torch import nn


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(4, 8)
        self.mix = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.proj(feats)
        return self.head(torch.relu(self.mix(h)))


def two_inputs() -> nn.Module:
    torch.manual_seed(0)
    return TwoInputs()


def tiny_mlp(width: int = 8) -> nn.Module:
    """A 4-width-3 MLP: the smallest model the CLI tests fuse."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


class FixedBatch(nn.Module):
    """Code that hard-codes the batch size (2): its ONNX file can only have static shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(x.reshape(2, 8)))


def fixed_batch() -> nn.Module:
    torch.manual_seed(0)
    return FixedBatch()


def not_a_module() -> int:
    return 3


def broken() -> nn.Module:
    raise RuntimeError("this factory is broken on purpose")


NOT_CALLABLE = 3
