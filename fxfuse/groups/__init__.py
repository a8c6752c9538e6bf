"""``find_groups``: the public entry point of discovery."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..errors import InputError, TraceError
from ..trace import GraphTrace, as_input_tuple, record_values, release_graph, trace_graph
from . import memo
from .discover import (
    STATE_TENSORS,
    SYMBOLIC,
    TRACERS,
    _state_tensors,
    discover,
    export_after,
)
from .spec import PermutationSpec, build_spec


def find_groups(
    model: nn.Module, example_inputs: Any, *, strict: bool = False, tracer: str = "auto"
) -> PermutationSpec:
    """Discover the permutation groups of ``model`` from its torch.fx graph.

    ``example_inputs`` is a tensor or a tuple of tensors the model's ``forward`` accepts.  The model
    is run at most once (eval mode, no grad; its modes are restored) and never modified.  With
    ``strict=True`` an op without an axis rule raises :class:`~fxfuse.errors.UnsupportedOpError`
    instead of cutting the groups through it.  ``tracer``: ``"auto"`` (``torch.fx.symbolic_trace``,
    falling back to ``torch.export`` for models it can not trace), ``"symbolic"`` or ``"export"``.

    The model is traced on every call; where its trace, recorded values, rules, called modules
    and state_dict are those of a model discovered before (:mod:`fxfuse.groups.memo`: the same
    architecture again, e.g. in every federated round), the spec found then is returned (a copy)
    instead of relating every axis again.  Where every op of the trace has an output shape that
    follows from its inputs' shapes (convolutions, linear layers, norms, activations, reshapes,
    concatenation, attention, ...), the inputs' shapes and dtypes stand in for the recorded
    values and such a repeat is found without running the model (so an input that has the
    shapes and dtypes of one seen before but that the model can not run on, an out-of-range
    embedding index, raises nothing then); otherwise the model is run on every call.
    :func:`clear_spec_cache` forgets those specs.
    """
    if tracer not in TRACERS:
        raise InputError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    with _collector_paused():
        inputs = as_input_tuple(example_inputs)
        graph: GraphTrace | None = None
        key = None
        if tracer != "export" and not strict:
            try:
                graph = trace_graph(model, stack_traces=False)
            except TraceError as exc:
                if tracer == "symbolic":
                    raise
                disc = export_after(model, inputs, exc)
            else:
                tensors = graph.meta[STATE_TENSORS] = _state_tensors(model)
                options = (tracer,)
                known = memo.seen(model, graph, tensors)  # a first discovery is not keyed
                # a trace whose recorded values follow from the shapes is keyed before the
                # recording (a hit does not run the model), any other after it
                key = memo.shape_key(model, graph, tensors, inputs, options) if known else None
                spec = memo.cached(key)
                if spec is None:
                    record_values(graph, inputs)
                    if known and (key is None or not memo.shapes_suffice(graph)):
                        key = memo.value_key(model, graph, tensors, options)
                        spec = memo.cached(key)
                if spec is not None:
                    release_graph(graph.graph)
                    return spec
                disc = discover(model, inputs, tracer=tracer, graph=graph)
        else:
            disc = discover(model, inputs, strict=strict, tracer=tracer)
        spec = build_spec(disc, type(model).__name__)
        spec.lint(disc.param_shapes)
        if disc.tracer == SYMBOLIC:  # the graph is discovery's own: nothing else holds it
            release_graph(disc.gm.graph)
            memo.keep(key, spec)
        elif graph is not None:
            release_graph(graph.graph)
        del disc  # freed (by reference counting) while the collector is still paused
    return spec


def clear_spec_cache() -> None:
    """Forget the specs :func:`find_groups` kept (each model's next discovery relates its axes
    again)."""
    memo.clear()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (as it was after).

    Discovery builds tens of thousands of long-lived objects (graph nodes, layouts, atoms, the
    spec), almost none of them garbage until it returns; each time that many survive, the
    collector makes a full pass over the whole heap (torch's objects included), about a third
    of the time of a large model's discovery.  Paused, the garbage of one call is collected
    once, by the next collection after it, in one pass over what the call allocated
    (Mercurial's ``util.nogc`` does the same around its big builds)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
