"""Neural-ODE-style network with one weight-tied ODE function integrated by explicit Euler.

``x(T) = x(0) + int_0^T f(x(t)) dt`` is approximated by ``k = steps`` Euler steps of size
``dt = T / k`` with one tied ``f``.  The iteration count is an attribute read at forward time
(``model.steps = 6`` then ``model(x)``, or ``model.at_steps(6)`` for a copy), and ``dt``
follows it, so clients that trained the same weights at different counts share one state dict
(``steps`` is not in it) and one set of permutation groups.
"""

from __future__ import annotations

import copy

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


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (the Euler iteration count) must be an int >= 1, got {steps!r}")
    return steps


class NODENet(nn.Module):
    """Stem conv-BN-ReLU -> ``steps`` Euler steps ``x = x + dt * f(x)`` with one tied f
    (``dt = horizon / steps``, computed at forward time) -> GAP -> Linear.

    Shapes: ``x: (N, in_channels, H, W)`` -> logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        channels: int = 16,
        steps: int = 3,
        norm: str = "bn",
        num_classes: int = 10,
        in_channels: int = 3,
        horizon: float = 1.0,
    ) -> None:
        super().__init__()
        self._steps = _check_steps(steps)
        if not horizon > 0:
            raise ValueError(f"horizon (the integration time T) must be > 0, got {horizon!r}")
        self.horizon = float(horizon)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.f = ODEFunc(channels, norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    @property
    def steps(self) -> int:
        """The Euler iteration count k used by the next forward call."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = _check_steps(value)

    @property
    def dt(self) -> float:
        """The step size ``horizon / steps`` (follows ``steps``)."""
        return self.horizon / self._steps

    def at_steps(self, steps: int) -> NODENet:
        """A copy of this model (same weights, its own buffers) run for ``steps`` iterations."""
        other = copy.deepcopy(self)
        other.steps = steps
        return other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        dt = self.dt
        for _ in range(self._steps):
            x = x + dt * self.f(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


def node_net(
    steps: int = 3,
    channels: int = 16,
    norm: str = "bn",
    num_classes: int = 10,
    in_channels: int = 3,
    seed: int | None = 0,
) -> NODENet:
    """Neural-ODE net for (N, in_channels, 16, 16) inputs; ``steps`` calls of the same ``f``
    module (settable later: ``model.steps = k``)."""
    return build(lambda: NODENet(channels, steps, norm, num_classes, in_channels), seed)
