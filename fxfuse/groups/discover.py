"""Discovery driver: walk the traced graph once, apply each node's axis rule to the atom table.

Every tensor axis of every node gets a layout (``node.meta["fxfuse.axes"]``); parameters and
buffers get one layout per axis, shared by every use of the same tensor (weight tying, a block
called ``k`` times, tied embeddings under several ``state_dict`` keys).  Model inputs and outputs
are fixed.  An op without a rule fixes every axis it touches and is recorded as a *cut* (strict
mode raises :class:`~fxfuse.errors.UnsupportedOpError` instead).  Any axis a rule leaves
unmentioned is fixed too.  Only this module mutates the atom table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError, TraceError, UnsupportedOpError
from ..ir.layout import Atom, AtomTable, Layout, Prod, Reason, Sum
from ..rules import (
    AxisRef,
    Cut,
    Free,
    NewAxis,
    OpView,
    Same,
    TensorHandle,
    canonical,
    lookup,
    target_name,
)
from ..trace import (
    VALUE,
    TensorMeta,
    as_input_tuple,
    export_trace,
    record_values,
    source_line,
    symbolic_trace,
)
from .roles import IN, OUT, Origins, related_axes, role_table

AXES = "fxfuse.axes"


@dataclass(frozen=True)
class TensorAxes:
    """The layouts of one tensor's axes (stored in ``node.meta["fxfuse.axes"]``)."""

    layouts: tuple[Layout, ...]


@dataclass
class Discovery:
    """Everything discovery learnt about one model (the spec is derived from it)."""

    gm: fx.GraphModule
    table: AtomTable
    param_axes: dict[str, tuple[Layout, ...]]
    param_shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, list[str]]
    cuts: list[Reason] = field(default_factory=list)
    tracer: str = "torch.fx.symbolic_trace"
    lifted: dict[str, str] = field(default_factory=dict)  # export: placeholder -> param name
    # (state_dict key, axis) -> the roles its uses gave it (fxfuse.groups.roles)
    roles: dict[tuple[str, int], set[str | None]] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()  # state_dict keys that are buffers, not parameters

    def input_nodes(self) -> list[fx.Node]:
        """The placeholders that are model inputs (not lifted parameters/buffers)."""
        return [n for n in self.gm.graph.nodes if n.op == "placeholder" and n.name not in self.lifted]


class _Handles:
    """The tensors one op application relates, numbered as the rule sees them: each handle's
    axis layouts, shape, and (for parameters and views of them) the parameter axes per axis."""

    def __init__(self, lineage: dict[str, Any]) -> None:
        self.lineage = lineage
        self.handles: list[tuple[Layout, ...]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.sources: list[Origins | None] = []

    def handle(self, lays: tuple[Layout, ...], meta: TensorMeta, src: Origins | None = None
               ) -> TensorHandle:
        self.handles.append(lays)
        self.shapes.append(meta.shape)
        self.sources.append(src)
        return TensorHandle(len(self.handles) - 1, meta.shape, meta.dtype)

    def wrap(self, axes: Any, val: Any, src: Any = None) -> Any:
        if isinstance(axes, TensorAxes):
            return self.handle(axes.layouts, val, src)
        if isinstance(axes, tuple) and isinstance(val, (list, tuple)):
            subs = src if isinstance(src, tuple) and len(src) == len(axes) else (None,) * len(axes)
            return type(val)(self.wrap(a, v, u) for a, v, u in zip(axes, val, subs))
        return val

    def arg(self, v: Any) -> Any:
        if isinstance(v, fx.Node):
            return self.wrap(v.meta.get(AXES), v.meta.get(VALUE), self.lineage.get(v.name))
        if isinstance(v, (list, tuple)):
            return type(v)(self.arg(u) for u in v)
        if isinstance(v, dict):
            return {k: self.arg(u) for k, u in v.items()}
        if isinstance(v, slice):
            return slice(self.arg(v.start), self.arg(v.stop), self.arg(v.step))
        return v


class _Driver:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, strict: bool, fix_io: bool,
                 lifted: dict[str, str] | None = None) -> None:
        self.gm = gm
        self.lifted = lifted or {}  # export graphs: placeholder name -> parameter/buffer name
        self.strict = strict
        self.fix_io = fix_io
        self.table = AtomTable()
        self.cuts: list[Reason] = []
        # state_dict keys by tensor identity (several keys for tied tensors)
        self.key_of: dict[int, str] = {}
        self.aliases: dict[str, list[str]] = {}
        self.param_axes: dict[str, tuple[Layout, ...]] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.state = model.state_dict(keep_vars=True)
        self.buffers = frozenset(k for k, t in self.state.items() if not isinstance(t, nn.Parameter))
        for key, t in self.state.items():
            first = self.key_of.setdefault(id(t), key)
            self.aliases.setdefault(first, []).append(key)
            self.param_shapes[key] = tuple(t.shape)
            if first == key:
                self.param_axes[key] = tuple(self.table.new(s) for s in t.shape)
        self.used: set[str] = set()
        # for member roles (fxfuse.groups.roles): the parameters each node's value is made of only
        # (a parameter, or a view of parameters), and every op application that reads them
        self.lineage: dict[str, Any] = {}
        self.roles: dict[tuple[str, int], set[str | None]] = {}

    # -- helpers ------------------------------------------------------------------------------
    def _fresh(self, value: Any) -> Any:
        if isinstance(value, TensorMeta):
            return TensorAxes(tuple(self.table.new(s) for s in value.shape))
        if isinstance(value, (list, tuple)):
            return tuple(self._fresh(v) for v in value)
        return None

    def _tensor_axes(self, axes: Any) -> Iterable[TensorAxes]:
        if isinstance(axes, TensorAxes):
            yield axes
        elif isinstance(axes, tuple):
            for a in axes:
                yield from self._tensor_axes(a)

    def _param_layouts(self, t: torch.Tensor) -> tuple[Layout, ...] | None:
        key = self.key_of.get(id(t))
        if key is None:
            return None
        self.used.add(key)
        return self.param_axes[key]

    def _fix_all(self, axes: Iterable[TensorAxes], why: Reason) -> None:
        for ta in axes:
            for lay in ta.layouts:
                self.table.fix(lay, why)

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.table.at(node.name, node.op)
            if node.op == "placeholder" and node.name in self.lifted:
                self._lifted(node)
            elif node.op == "placeholder":
                node.meta[AXES] = self._fresh(node.meta.get(VALUE))
                if self.fix_io:
                    why = Reason("input", node.name, "placeholder", "model inputs are never permuted")
                    self._fix_all(self._tensor_axes(node.meta[AXES]), why)
            elif node.op == "get_attr":
                self._get_attr(node)
            elif node.op == "output":
                if self.fix_io:
                    why = Reason("output", node.name, "output", "model outputs are never permuted")
                    outs = [a.meta.get(AXES) for a in _nodes_in(node.args)]
                    self._fix_all((t for o in outs for t in self._tensor_axes(o)), why)
            else:
                self._call(node)
        for key, lays in self.param_axes.items():
            if key not in self.used:
                why = Reason("unused", key, "state_dict", "not used by the traced forward")
                for lay in lays:
                    self.table.fix(lay, why)

    def _lifted(self, node: fx.Node) -> None:
        """A parameter/buffer that torch.export lifted to a graph input."""
        name = self.lifted[node.name]
        t = self.state.get(name)
        lays = self._param_layouts(t) if t is not None else None
        if lays is not None and t is not None:
            node.meta[AXES] = TensorAxes(lays)
            self.lineage[node.name] = _param_origins(self.key_of[id(t)], t.ndim)
            return
        node.meta[AXES] = self._fresh(node.meta.get(VALUE))
        why = Reason("constant", node.name, "placeholder", f"tensor {name!r} is not in the "
                     "state_dict, so it can not be permuted")
        self._fix_all(self._tensor_axes(node.meta[AXES]), why)

    def _get_attr(self, node: fx.Node) -> None:
        value = node.meta.get(VALUE)
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        lays = self._param_layouts(obj) if isinstance(obj, torch.Tensor) else None
        if lays is not None:
            node.meta[AXES] = TensorAxes(lays)
            self.lineage[node.name] = _param_origins(self.key_of[id(obj)], obj.ndim)
            return
        node.meta[AXES] = self._fresh(value)
        why = Reason("constant", node.name, "get_attr", f"tensor attribute {node.target!r} is not "
                     "in the state_dict, so it can not be permuted")
        self._fix_all(self._tensor_axes(node.meta[AXES]), why)

    def _call(self, node: fx.Node) -> None:
        module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        opname = type(module).__name__ if module is not None else target_name(node.target)
        self.table.at(node.name, opname)
        value = node.meta.get(VALUE)
        node.meta[AXES] = self._fresh(value)
        hs = _Handles(self.lineage)
        args, kwargs = hs.arg(node.args), hs.arg(node.kwargs)
        out_value = hs.wrap(node.meta[AXES], value)
        outs = _handles_in(out_value)
        params = self._module_params(node, module, opname, hs) if module is not None else {}
        if not hs.handles:
            return  # no tensor in or out: shape arithmetic, nothing to relate
        src = source_line(node)
        target = canonical(node.target)
        rule = lookup(type(module) if module is not None else target)
        if rule is None:
            msg = (f"no axis rule for {opname}{_module_path(node)}; the groups through it stay "
                   f"fixed. Register one "
                   f"with @fxfuse.axis_rule({_recipe(node, self.gm)}) (see fxfuse.rules)")
            if self.strict:
                where = f" at {src}" if src else ""
                raise UnsupportedOpError(f"node {node.name!r}: {msg}{where}")
            self._cut(hs, Reason("no-rule", node.name, opname, msg, src))
            return
        op = OpView(target, args, kwargs, outs, out_value, module, params)
        base = Reason("rule", node.name, opname, "", src)
        try:
            relations = rule(op)
            self._apply(relations, hs.handles, hs.shapes, base)
            self._record_use(node, relations, hs.sources, out_value, module, params)
        except Exception as exc:  # a rule that can not handle this call: never guess
            if self.strict:
                raise UnsupportedOpError(
                    f"node {node.name!r}: the axis rule for {opname} failed: {exc}") from exc
            self._cut(hs, Reason("no-rule", node.name, opname, f"axis rule failed ({exc}); fixed",
                                 src))

    def _cut(self, hs: _Handles, why: Reason) -> None:
        self.cuts.append(why)
        self._fix_handles(hs.handles, why)

    def _module_params(self, node: fx.Node, module: nn.Module, opname: str, hs: _Handles
                       ) -> dict[str, TensorHandle]:
        """Handles of a called module's parameters and buffers (a buffer outside the state_dict
        is a constant: fixed)."""
        params: dict[str, TensorHandle] = {}
        for name, t in [*module.named_parameters(remove_duplicate=False),
                        *module.named_buffers(remove_duplicate=False)]:
            if t is None:
                continue
            lays = self._param_layouts(t)
            if lays is None:
                lays = tuple(self.table.new(s) for s in t.shape)
                why = Reason("constant", node.name, opname,
                             f"buffer {name!r} is not in the state_dict")
                for lay in lays:
                    self.table.fix(lay, why)
            key = self.key_of.get(id(t))
            params[name] = hs.handle(lays, TensorMeta(tuple(t.shape), t.dtype),
                                     _param_origins(key, t.ndim) if key is not None else None)
        return params

    def _record_use(self, node: fx.Node, relations: list[Any], sources: list[Origins | None],
                    out_value: Any, module: nn.Module | None,
                    params: dict[str, TensorHandle]) -> None:
        """Member roles (:mod:`fxfuse.groups.roles`) from one applied rule.  An op all of whose inputs
        are parameters is a view of them: its output axes inherit the parameter axes they are
        related to.  Otherwise a parameter axis related to an output axis is output-side, one
        related only to an activation input is input-side."""
        outs = {h.index for h in _handles_in(out_value)}
        inputs = [i for i in range(len(sources)) if i not in outs]
        near = related_axes(relations)
        if inputs and all(sources[i] is not None for i in inputs):
            def origins(v: Any) -> Any:
                if isinstance(v, TensorHandle):
                    return tuple(frozenset().union(*[
                        sources[t][a] for t, a in near.get((v.index, d), ())  # type: ignore[index]
                        if t in inputs and a < len(sources[t] or ())]) for d in range(len(v.shape)))
                if isinstance(v, (list, tuple)):
                    return tuple(origins(u) for u in v)
                return None
            self.lineage[node.name] = origins(out_value)
            return
        table = role_table(module)
        names = {h.index: name for name, h in params.items()}
        for t in inputs:
            src = sources[t]
            if src is None:
                continue
            for a, keys in enumerate(src):
                role = None
                others = near.get((t, a), ())
                if any(u in outs for u, _ in others):
                    role = OUT
                elif any(u in inputs and sources[u] is None for u, _ in others):
                    role = IN
                role = table.get((names.get(t, ""), a), role)
                for key, axis in keys:
                    self.roles.setdefault((key, axis), set()).add(role)

    def _fix_handles(self, handles: list[tuple[Layout, ...]], why: Reason) -> None:
        for lays in handles:
            for lay in lays:
                self.table.fix(lay, why)

    def _apply(self, relations: list[Any], handles: list[tuple[Layout, ...]],
               shapes: list[tuple[int, ...]], base: Reason) -> None:
        mentioned: set[tuple[int, int]] = set()
        local: dict[str, Atom] = {}

        def lay(e: Any) -> Layout:
            if isinstance(e, AxisRef):
                mentioned.add((e.tensor, e.axis))
                return handles[e.tensor][e.axis]
            if isinstance(e, NewAxis):
                if e.key not in local:
                    local[e.key] = self.table.new(e.size, e.key)
                return local[e.key]
            if isinstance(e, Prod):
                return Prod(tuple(lay(p) for p in e.parts))
            if isinstance(e, Sum):
                return Sum(tuple(lay(p) for p in e.parts))
            raise TypeError(f"not an axis expression: {e!r}")

        for r in relations:
            if isinstance(r, Same):
                self.table.unify(lay(r.a), lay(r.b), base)
            elif isinstance(r, Cut):
                self.table.fix(lay(r.a), Reason("rule", base.node, base.op, r.why, base.source))
            elif isinstance(r, Free):
                lay(r.a)
            else:
                raise TypeError(f"not a relation: {r!r}")
        for i, lays in enumerate(handles):
            for d, lo in enumerate(lays):
                if shapes[i][d] > 1 and (i, d) not in mentioned:
                    why = Reason("rule", base.node, base.op,
                                 f"the rule does not relate axis {d} of tensor #{i}", base.source)
                    self.table.fix(lo, why)


def _param_origins(key: str, ndim: int) -> Origins:
    return tuple(frozenset({(key, d)}) for d in range(ndim))


def _module_path(node: fx.Node) -> str:
    return f" (module {node.target})" if node.op == "call_module" else ""


def _nodes_in(v: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(v, out.append)
    return out


def _handles_in(v: Any) -> list[TensorHandle]:
    if isinstance(v, TensorHandle):
        return [v]
    if isinstance(v, (list, tuple)):
        return [h for u in v for h in _handles_in(u)]
    return []


def _recipe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return repr(node.target)
    return target_name(node.target)


TRACERS = ("auto", "symbolic", "export")


def discover(
    model: nn.Module, example_inputs: Any, *, strict: bool = False, fix_io: bool = True,
    tracer: str = "auto",
) -> Discovery:
    """Trace ``model``, record its values on ``example_inputs`` and relate every axis.

    ``tracer``: ``"symbolic"`` (``torch.fx.symbolic_trace``, Python-level ops), ``"export"``
    (``torch.export``, ATen-level ops, for models symbolic tracing can not handle: most Hugging
    Face models) or ``"auto"`` (symbolic, then export if that fails).  One rule table serves
    both levels (:mod:`fxfuse.rules.aten`).
    """
    if tracer not in TRACERS:
        raise InputError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    inputs = as_input_tuple(example_inputs)
    if tracer != "export":
        try:
            gm = symbolic_trace(model, stack_traces=strict)
        except TraceError as exc:
            if tracer == "symbolic":
                raise
            symbolic_error = exc
        else:
            record_values(gm, inputs)
            driver = _Driver(model, gm, strict, fix_io)
            driver.run()
            cuts = driver.cuts
            if cuts:  # name the user's source lines: trace again, recording stack traces
                sources = {n.name: source_line(n) for n in symbolic_trace(model).graph.nodes}
                cuts = [replace(c, source=sources.get(c.node)) for c in cuts]
            return Discovery(gm, driver.table, driver.param_axes, driver.param_shapes,
                             driver.aliases, cuts, roles=driver.roles,
                             buffers=driver.buffers)
    try:
        gm, lifted = export_trace(model, inputs)
    except TraceError as exc:
        if tracer == "auto":
            raise TraceError(f"{symbolic_error} Then: {exc}") from exc
        raise
    driver = _Driver(model, gm, strict, fix_io, lifted)
    driver.run()
    return Discovery(gm, driver.table, driver.param_axes, driver.param_shapes, driver.aliases,
                     driver.cuts, tracer="torch.export", lifted=lifted, roles=driver.roles,
                     buffers=driver.buffers)
