"""One activation capture for both tracers: the values of named graph nodes on a batch.

Discovery records, per traced node a group acts on, where the group's units sit
(``spec.activations``); activation-based methods read those nodes' values by name.  The graph is
the one discovery traced: a ``torch.fx.symbolic_trace`` of the model (the same node names for
every model of the architecture), or a ``torch.export`` graph, whose parameters, buffers and
constants are lifted to inputs and fed from the exported program.  An exported graph is specialised
to its input shapes, so it is exported once per batch shape (cached); Hugging Face causal LMs are
exported as their :func:`~fxfuse.trace.without_kv_cache` copies, as discovery does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..trace import eval_mode, export_program, symbolic_trace

SYMBOLIC = "torch.fx.symbolic_trace"


class _Record(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.seen[n.name] = out
        return out


class ActivationCapture:
    """``capture(*xs) -> {node name: value}`` for the ``wanted`` nodes of ``model``'s graph, traced
    the way its spec was (``tracer``: the spec's ``tracer``)."""

    def __init__(self, model: nn.Module, tracer: str, wanted: Iterable[str]) -> None:
        self.model = model
        self.tracer = tracer
        self.wanted = set(wanted)
        self._symbolic = symbolic_trace(model, stack_traces=False) if tracer == SYMBOLIC else None
        self._exported: dict[tuple[Any, ...], tuple[fx.GraphModule, list[Any]]] = {}

    def __call__(self, *xs: Any) -> dict[str, torch.Tensor]:
        if self._symbolic is not None:
            gm, args = self._symbolic, list(xs)
        else:
            gm, lifted = self._export(xs)
            user = iter(xs)
            args = [next(user) if v is None else v for v in lifted]
        rec = _Record(gm, self.wanted)
        with eval_mode(gm, self.model), torch.no_grad():
            rec.run(*args)
        return rec.seen

    def _export(self, xs: tuple[Any, ...]) -> tuple[fx.GraphModule, list[Any]]:
        key = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                    for x in xs)
        if key not in self._exported:
            ep = export_program(self.model, xs, "on a data batch")
            values = {**ep.state_dict, **ep.constants}
            lifted = [None if s.kind.name == "USER_INPUT" else values[s.target]
                      for s in ep.graph_signature.input_specs]
            self._exported[key] = (ep.graph_module, lifted)
        return self._exported[key]
