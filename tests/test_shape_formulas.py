"""The shape formulas shape recording uses for heavy ops agree with torch, and invalid calls still
fail with torch's own error (issue 21: no meta-device dispatch on the first discovery)."""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxfuse.errors import InputError
from fxfuse.trace import VALUE, TensorMeta, conv_shape, matmul_shape, record_values, symbolic_trace

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _torch_shape(fn, *args) -> tuple[int, ...] | None:
    try:
        return tuple(fn(*args).shape)
    except RuntimeError:
        return None


def test_matmul_shape_matches_torch_on_every_small_rank_combination() -> None:
    dims = (1, 2, 3)
    for ra, rb in itertools.product(range(1, 4), repeat=2):
        for a in itertools.product(dims, repeat=ra):
            for b in itertools.product(dims, repeat=rb):
                want = _torch_shape(torch.matmul, torch.zeros(a), torch.zeros(b))
                assert matmul_shape(a, b) == want, (a, b)


def test_conv_shape_matches_torch_on_random_configurations() -> None:
    rng = random.Random(0)
    valid = invalid = 0
    for _ in range(600):
        n = rng.randint(1, 3)
        g = rng.choice([1, 2])
        c, co = g * rng.randint(1, 2), g * rng.randint(1, 2)
        x = (rng.randint(1, 2), c + rng.choice([0, 0, 0, 1])) + tuple(
            rng.randint(1, 7) for _ in range(n))
        if rng.random() < 0.2:
            x = x[1:]  # unbatched
        w = (co, c // g) + tuple(rng.randint(1, 4) for _ in range(n))
        stride = rng.choice([1, 2, tuple(rng.randint(1, 3) for _ in range(n))])
        padding = rng.choice([0, 1, 2, "same", "valid", tuple(rng.randint(0, 2) for _ in range(n))])
        if padding == "same":
            stride = 1
        dilation = rng.choice([1, 2])
        with warnings.catch_warnings():  # torch warns about padding="same", even kernels
            warnings.simplefilter("ignore")
            want = _torch_shape(CONVS[n], torch.zeros(x), torch.zeros(w), None, stride, padding,
                                dilation, g)
        assert conv_shape(x, w, n, stride, padding, dilation, g) == want, (x, w, stride, padding)
        valid += want is not None
        invalid += want is None
    assert valid > 100 and invalid > 50  # both kinds of call were exercised


class _Heavy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4, 5)
        self.w = nn.Parameter(torch.randn(6, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reflect(self.conv(x))
        y = F.conv2d(y, self.w, None, 1, "same")
        z = self.fc(y.permute(0, 2, 3, 1)[..., :4])
        return torch.matmul(z, z.transpose(-1, -2)) + torch.bmm(z.flatten(0, 1), z.flatten(0, 1)
                                                                .transpose(1, 2)).view_as(
            torch.matmul(z, z.transpose(-1, -2)))


def test_recorded_shapes_equal_the_real_forward() -> None:
    model = _Heavy().eval()
    x = torch.randn(2, 3, 9, 9)
    gm = symbolic_trace(model, stack_traces=False)
    record_values(gm, (x,))
    real: dict[str, torch.Tensor] = {}

    class _Real(torch.fx.Interpreter):
        def run_node(self, n):  # type: ignore[no-untyped-def]
            out = super().run_node(n)
            real[n.name] = out
            return out

    with torch.no_grad():
        _Real(symbolic_trace(model, stack_traces=False)).run(x)
    for node in gm.graph.nodes:
        got = node.meta[VALUE]
        if isinstance(got, TensorMeta):
            assert got == TensorMeta(tuple(real[node.name].shape), real[node.name].dtype), node


def test_invalid_heavy_call_still_raises_torchs_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(7, 2)).eval()
    gm = symbolic_trace(model, stack_traces=False)
    with pytest.raises(InputError, match="mat1 and mat2 shapes cannot be multiplied"):
        record_values(gm, (torch.randn(1, 3, 5, 5),))
    with pytest.raises(InputError, match="expected input"):
        record_values(gm, (torch.randn(1, 2, 5, 5),))
