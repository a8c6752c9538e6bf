"""fxfuse's tracer takes shortcuts through fx (its own autowrap of ``math``, fast paths in
``create_arg`` / ``getattr``; a plain loop instead of ``fx.Interpreter`` for recording): the graphs
and recorded values must be exactly fx's."""

from __future__ import annotations

import math
from math import floor
from typing import Any, NamedTuple

import pytest
import torch
import torch.fx as fx
from torch import nn

import models
from fxfuse.rules import lookup
from fxfuse.trace import VALUE, _Tracer, record_values, trace_graph

# a module whose forward has its own globals (fx patches those when the module is called)
_NS: dict[str, Any] = {}
exec(  # noqa: S102 - a forward defined in a namespace of its own
    "import torch\nfrom math import ceil\n"
    "class Half(torch.nn.Module):\n"
    "    def forward(self, x):\n"
    "        return x[:, :ceil(x.size(1) / 2)]\n",
    _NS,
)


class _Pair(NamedTuple):
    a: Any
    b: Any


class _FxTracer(fx.Tracer):
    """fx's own tracer (its autowrap of ``math``, its create_arg) with fxfuse's leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return lookup(type(m)) is not None


class MathNet(nn.Module):
    """Calls ``math`` functions on proxies: by attribute, by a name imported into the root's
    globals, and (``Half``) by a name imported into another forward's globals."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.top = _NS["Half"]()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) / math.sqrt(x.size(-1))
        y = y * floor(x.size(0) + 0.5) + math.log(2.0)  # the last on a constant: no node
        return self.top(y * self.scale)


def _signature(graph: fx.Graph) -> list[tuple[Any, ...]]:
    def names(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: n.name)

    return [(n.op, n.name, n.target, names(n.args), names(n.kwargs),
             dict(n.meta.get("nn_module_stack", {})), n.meta.get("is_wrapped"))
            for n in graph.nodes]


def test_math_on_proxies_traces_as_fx_does() -> None:
    model = MathNet()
    ours, theirs = _Tracer(False).trace(model), _FxTracer().trace(model)
    assert _signature(ours) == _signature(theirs)
    targets = [n.target for n in ours.nodes if n.op == "call_function"]
    assert math.sqrt in targets and math.floor in targets and math.ceil in targets
    assert math.log not in targets
    # every patched name is restored
    assert math.sqrt is math.__dict__["sqrt"] and type(math.sqrt).__name__ == (
        "builtin_function_or_method")
    assert floor is math.floor and _NS["ceil"] is math.ceil and globals()["floor"] is math.floor


def test_patches_are_undone_when_the_trace_fails() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * math.sqrt(x.size(1))
            if y.sum() > 0:  # control flow on a proxy: the root's trace fails
                return y
            return -y

    with pytest.raises(fx.proxy.TraceError):
        _Tracer(False).trace(Bad())
    assert type(math.sqrt).__name__ == "builtin_function_or_method"


def test_recorded_math_values_are_the_eager_ones() -> None:
    model, x = MathNet().eval(), torch.randn(3, 8)
    traced = trace_graph(model, stack_traces=False)
    record_values(traced, (x,))
    by_target = {n.target: n.meta[VALUE] for n in traced.graph.nodes if n.op == "call_function"}
    assert by_target[math.sqrt] == math.sqrt(8) and by_target[math.floor] == 3
    assert by_target[math.ceil] == 4


@pytest.mark.parametrize("name", ["mlp", "resnet20", "densenet", "vit_tiny", "shufflenet",
                                  "tied_block_net", "concat_split_net", "se_net"])
def test_zoo_graphs_are_fx_graphs(name: str) -> None:
    model = models.get(name).factory()
    ours, theirs = _Tracer(False).trace(model), _FxTracer().trace(model)
    assert _signature(ours) == _signature(theirs)


def test_create_arg_keeps_structures_and_constants() -> None:
    """Arguments of every kind fx lowers: nested tuples / lists / dicts, slices, dtypes, None,
    a tensor constant (a ``_tensor_constant`` attribute), a named tuple."""
    const = torch.arange(4.0)

    class Args(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            a = torch.cat([x, x * 2], dim=1)
            b = a[:, 1:5:2, ...]
            c = a.to(dtype=torch.float64).float()
            d = torch.stack((b, b), 0).sum(dim=(0,), keepdim=True)
            e = x[:, :4] + const
            return {"a": a, "b": [b, (c, None)], "d": d, "e": e, "p": _Pair(a, 3)}

    model = Args()
    ours, theirs = _Tracer(False).trace(model), _FxTracer().trace(model)
    assert _signature(ours) == _signature(theirs)
