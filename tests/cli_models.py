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
