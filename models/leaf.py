"""A user's own layer kept whole as a leaf module between two covered groups.

:class:`GatedMixer` computes ``y = W_o (tanh(W_a x) * sigmoid(W_b x)) + b`` with its own
parameters and its own forward (no torch layer inside).  Its axis rule states only what the layer
does to its input and output channels (input channels are ``W_a``'s and ``W_b``'s columns, output
channels ``W_o``'s rows and ``b``); its hidden axis is left to the driver, which fixes it: no
weight rule reaches inside.  Discovery keeps the module a leaf (a registered rule), so the groups
on either side are covered and the mixer is one level of its own for neuron interpolation, which
fits it by gradient (it has no linear form).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxfuse.rules import OpView, Relation, Same, axis_rule

from ._utils import build


class GatedMixer(nn.Module):
    """``y = W_o (tanh(W_a x) * sigmoid(W_b x)) + b`` on ``(batch, d_in)`` inputs."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.w_a = nn.Parameter(torch.randn(d_hidden, d_in) / math.sqrt(d_in))
        self.w_b = nn.Parameter(torch.randn(d_hidden, d_in) / math.sqrt(d_in))
        self.w_o = nn.Parameter(torch.randn(d_out, d_hidden) / math.sqrt(d_hidden))
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(x @ self.w_a.T) * torch.sigmoid(x @ self.w_b.T)
        return gate @ self.w_o.T + self.b


@axis_rule(GatedMixer)
def gated_mixer_rule(op: OpView) -> list[Relation]:
    """Input channels = the columns of ``w_a`` and ``w_b``; output channels = the rows of
    ``w_o`` and ``b``; the batch axis passes through; the hidden axis is not stated (fixed)."""
    x, y = op.args[0], op.out
    w_a, w_b = op.required_param("w_a"), op.required_param("w_b")
    w_o, b = op.required_param("w_o"), op.required_param("b")
    return [Same(x[0], y[0]), Same(x[1], w_a[1]), Same(x[1], w_b[1]), Same(y[1], w_o[0]),
            Same(y[1], b[0])]


class LeafMLP(nn.Module):
    """Flatten -> Linear -> ReLU -> GatedMixer (a leaf) -> ReLU -> Linear."""

    def __init__(self, in_features: int = 64, width: int = 32, mixer_hidden: int = 16,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, width)
        self.relu1 = nn.ReLU()
        self.mixer = GatedMixer(width, mixer_hidden, width)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.head(self.relu2(self.mixer(x)))


def leaf_mlp(in_features: int = 64, width: int = 32, mixer_hidden: int = 16,
             num_classes: int = 10, seed: int | None = 0) -> LeafMLP:
    """LeafMLP 64 -> 32 -> GatedMixer(32 -> 16 -> 32) -> 10 for (N, 1, 8, 8) inputs."""
    return build(lambda: LeafMLP(in_features, width, mixer_hidden, num_classes), seed)
