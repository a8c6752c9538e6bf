"""Every registered axis rule is checked numerically (see fxfuse.rules.validate)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.rules import Same, rule_table, target_name
from fxfuse.rules.validate import check_equivariance
from fxfuse.testing import randomize_constants

from .conftest import NEEDS_GPU
from .rule_cases import CASES, EXPORT_CASES

TABLE = rule_table()
PARAMS = [pytest.param(t, i, id=f"{target_name(t)}-{i}")
          for t in TABLE for i in range(len(CASES.get(t, [])))]


def test_every_rule_has_a_case() -> None:
    missing = [target_name(t) for t in TABLE
               if t not in CASES and t not in EXPORT_CASES and t != "cuda"]
    assert not missing, f"rules without a numerical check in tests/rule_cases.py: {missing}"


def _constant_tensors(module: nn.Module) -> list[str]:
    """Floating parameters/buffers (2+ entries) whose entries are all equal."""
    return [k for k, t in module.state_dict().items()
            if t.is_floating_point() and t.numel() > 1 and bool(torch.all(t == t.reshape(-1)[0]))]


def _randomized(fn: Any, seed: int) -> Any:
    """Module cases get channel-distinct constants (norm affines, running statistics, PReLU
    slopes, attention biases): at their defaults a wrong permutation of them changes nothing."""
    if isinstance(fn, nn.Module):
        randomize_constants(fn, seed=seed)
        constant = _constant_tensors(fn)
        assert not constant, f"case still has constant tensors, a wrong rule would pass: {constant}"
        fn.eval()
    return fn


@pytest.mark.parametrize("target,i", PARAMS)
def test_rule_is_equivariant(target: Any, i: int) -> None:
    fn, inputs = CASES[target][i]
    if isinstance(fn, nn.Module):
        _randomized(fn, seed=i)
        if isinstance(target, type):
            assert any(isinstance(m, target) for m in fn.modules()), "case lacks the module"
    check = check_equivariance(fn, inputs)
    assert check.n_free > 0, "the case claims no permutable axis: it could not fail"
    assert check.ok, f"{target_name(target)}: output differs by {check.rel_diff:.3g}"


EXPORT_PARAMS = [pytest.param(t, i, id=f"{target_name(t)}-{i}")
                 for t in EXPORT_CASES for i in range(len(EXPORT_CASES[t]))]


@pytest.mark.parametrize("target,i", EXPORT_PARAMS)
def test_aten_rule_is_equivariant(target: Any, i: int) -> None:
    """ATen-level rules, on graphs from torch.export; the case must really produce the op."""
    from fxfuse.groups.discover import discover

    fn, inputs = EXPORT_CASES[target][i]
    _randomized(fn, seed=i)
    check = check_equivariance(fn, inputs, tracer="export")
    from fxfuse.rules.validate import _WRAPPERS

    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    gm = discover(_WRAPPERS[len(xs)](fn), xs, fix_io=False, tracer="export").gm
    assert target in {n.target for n in gm.graph.nodes}, "the case does not exercise the op"
    assert check.n_free > 0 and check.ok, f"{target_name(target)}: {check.rel_diff:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_GPU)
def test_cuda_method_rule() -> None:
    assert check_equivariance(lambda x: x.cuda().cpu(), torch.randn(2, 3)).ok


class Shift(nn.Module):
    """Rolls the channels by one: NOT equivariant to channel permutations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=1)


def test_validator_catches_a_wrong_rule() -> None:
    @fxfuse.axis_rule(Shift)
    def wrong_rule(op: Any) -> list[Any]:
        x, y = op.args[0], op.out
        return [Same(x[d], y[d]) for d in range(x.ndim)]  # claims full equivariance: false

    try:
        check = check_equivariance(Shift(), torch.randn(2, 6, 3))
        assert check.n_free > 0 and not check.ok
    finally:
        from fxfuse.rules import registry

        registry._RULES.pop(Shift)
