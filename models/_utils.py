"""Shared helpers for the reference model zoo (seeding, norm init, small layers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


@torch.no_grad()
def randomize_norms(model: nn.Module) -> None:
    """Give every normalisation layer non-trivial (but well-conditioned) parameters.

    Default-initialised norms have weight=1, bias=0, running_mean=0, running_var=1,
    which hides bugs (e.g. a wrongly permuted BN is still the identity). We draw
    weight ~ U(0.5, 1.5), bias ~ N(0, 0.1^2), running_mean ~ N(0, 0.1^2),
    running_var ~ U(0.5, 1.5) from the global RNG (seeded by :func:`build`).
    """
    for m in model.modules():
        if not isinstance(m, _NORM_TYPES):
            continue
        weight = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        if isinstance(weight, torch.Tensor):
            weight.uniform_(0.5, 1.5)
        if isinstance(bias, torch.Tensor):
            bias.normal_(0.0, 0.1)
        running_mean = getattr(m, "running_mean", None)
        running_var = getattr(m, "running_var", None)
        if isinstance(running_mean, torch.Tensor):
            running_mean.normal_(0.0, 0.1)
        if isinstance(running_var, torch.Tensor):
            running_var.uniform_(0.5, 1.5)


def build(ctor: Callable[[], M], seed: int | None = 0) -> M:
    """Construct ``ctor()`` deterministically and return it in eval mode.

    With an integer ``seed`` the construction runs inside a forked CPU RNG seeded
    with ``seed`` so the caller's global RNG state is left untouched. With
    ``seed=None`` the current global RNG is used (non-deterministic across calls).
    """
    if seed is None:
        model = ctor()
        randomize_norms(model)
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
        randomize_norms(model)
    return model.eval()


def randn_inputs(*shapes: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic standard-normal example inputs (uses a private generator)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen) for shape in shapes)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: (n, g, c/g, h, w) -> transpose(1, 2) -> (n, c, h, w)."""
    n = x.size(0)
    c = x.size(1)
    h = x.size(2)
    w = x.size(3)
    x = x.reshape(n, groups, c // groups, h, w)
    x = x.transpose(1, 2)
    return x.reshape(n, c, h, w)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of an NC... feature map.

    Implemented as permute to channels-last -> ``nn.LayerNorm(C)`` -> permute back.
    Supports 4-D (NCHW) inputs.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = self.ln(x)
        return x.permute(0, 3, 1, 2)


def make_norm2d(norm: str, channels: int) -> nn.Module:
    """2-D feature-map normalisation: ``"bn"`` (BatchNorm2d) or ``"ln"`` (channel LayerNorm)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "ln":
        return ChannelLayerNorm(channels)
    if norm == "gn":
        return nn.GroupNorm(4, channels)
    raise ValueError(f"unknown norm {norm!r}; expected 'bn', 'ln' or 'gn'")
