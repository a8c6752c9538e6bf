"""Numerical check of axis rules: permute what a rule claims, run the op, compare.

For a small module or function ``f`` and sample inputs, discovery runs with the inputs and outputs
*free* (not fixed), so the groups found are exactly what the rules claim about ``f``.  Every free
atom gets a random non-identity permutation; inputs and parameters are permuted along their axes;
the claim holds iff ``f(permuted inputs; permuted params) == permuted f(inputs; params)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from ..groups.discover import AXES, TensorAxes, discover
from ..groups.spec import axis_index, to_tree
from ..permute import rel_diff
from ..trace import as_input_tuple


class _Fn1(nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, a: Any) -> Any:
        return self.fn(a)


class _Fn2(_Fn1):
    def forward(self, a: Any, b: Any) -> Any:  # type: ignore[override]
        return self.fn(a, b)


class _Fn3(_Fn1):
    def forward(self, a: Any, b: Any, c: Any) -> Any:  # type: ignore[override]
        return self.fn(a, b, c)


class _Fn4(_Fn1):
    def forward(self, a: Any, b: Any, c: Any, d: Any) -> Any:  # type: ignore[override]
        return self.fn(a, b, c, d)


class _Fn5(_Fn1):
    def forward(self, a: Any, b: Any, c: Any, d: Any, e: Any) -> Any:  # type: ignore[override]
        return self.fn(a, b, c, d, e)


_WRAPPERS: dict[int, type[_Fn1]] = {1: _Fn1, 2: _Fn2, 3: _Fn3, 4: _Fn4, 5: _Fn5}


def _tensor_axes_in(v: Any) -> list[TensorAxes]:
    """The tensor layouts in an output structure, in the order tree_flatten visits tensors."""
    if isinstance(v, TensorAxes):
        return [v]
    if isinstance(v, (tuple, list)):
        return [a for u in v for a in _tensor_axes_in(u)]
    if isinstance(v, dict):
        return [a for u in v.values() for a in _tensor_axes_in(u)]
    return []


@dataclass(frozen=True)
class RuleCheck:
    """``n_free``: permutable atoms the rules claim; ``rel_diff``: output mismatch (0 if exact)."""

    n_free: int
    rel_diff: float
    ok: bool


def check_equivariance(
    fn: nn.Module | Callable[..., Any], inputs: Any, *, seed: int = 0, tolerance: float = 1e-5,
    tracer: str = "symbolic", probe: bool = False,
) -> RuleCheck:
    """Check what discovery claims about ``fn`` on ``inputs``: the rules' relations, and with
    ``probe=True`` also the relations probed on ops without a rule (:mod:`fxfuse.rules.probe`;
    off by default, so a rule that declines is not hidden by the probe)."""
    xs = as_input_tuple(inputs)
    model = _WRAPPERS[len(xs)](fn)  # a root module is traced through, so wrap it as a leaf
    disc = discover(model, xs, fix_io=False, tracer=tracer, probe=probe)
    table = disc.table
    gen = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}

    def index(lay: Any) -> torch.Tensor:
        tree = to_tree(table.resolve(lay), str)
        for a in table.atoms_in(lay):
            if str(a) not in perms:
                n = table.atom_size(a)
                p = torch.randperm(n, generator=gen)
                perms[str(a)] = p if not torch.equal(p, torch.arange(n)) else torch.roll(p, 1)
                sizes[str(a)] = n
        return axis_index(tree, perms, sizes)

    def apply(t: torch.Tensor, layouts: tuple[Any, ...]) -> torch.Tensor:
        for d, lay in enumerate(layouts):
            t = t.index_select(d, index(lay))
        return t

    placeholders = disc.input_nodes()
    new_xs = tuple(apply(x, n.meta[AXES].layouts) if isinstance(n.meta.get(AXES), TensorAxes)
                   else x for x, n in zip(xs, placeholders))
    permuted = copy.deepcopy(model)
    state = model.state_dict()
    new_state = {k: apply(v, disc.param_axes[k]) if k in disc.param_axes else v
                 for k, v in state.items()}
    for key, aliases in disc.aliases.items():
        for alias in aliases:
            new_state[alias] = new_state[key]
    permuted.load_state_dict(new_state)
    out_node = next(n for n in disc.gm.graph.nodes if n.op == "output")
    out_axes = _tensor_axes_in(fx.node.map_arg(out_node.args[0], lambda n: n.meta[AXES]))
    with torch.no_grad():
        model.eval()
        permuted.eval()
        ref = model(*xs)
        got = permuted(*new_xs)
    refs = [r for r in tree_flatten(ref)[0] if isinstance(r, torch.Tensor)]
    gots = [g for g in tree_flatten(got)[0] if isinstance(g, torch.Tensor)]
    if len(refs) != len(out_axes):
        raise AssertionError(f"{len(refs)} output tensors but {len(out_axes)} output layouts")
    expected = [apply(r, ax.layouts) for r, ax in zip(refs, out_axes)]
    diff = rel_diff(expected, gots)
    return RuleCheck(len(perms), diff, diff <= tolerance)
