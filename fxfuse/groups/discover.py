"""Discovery driver: walk the traced graph once, apply each node's axis rule to the atom table.

Every tensor axis of every node gets a layout (``node.meta["fxfuse.axes"]``); parameters and
buffers get one layout per axis, shared by every use of the same tensor (weight tying, a block
called ``k`` times, tied embeddings under several ``state_dict`` keys).  Model inputs and outputs
are fixed.  An op without a rule fixes every axis it touches and is recorded as a *cut* (strict
mode raises :class:`~fxfuse.errors.UnsupportedOpError` instead).  Any axis a rule leaves
unmentioned is fixed too.  Only this module mutates the atom table.

A rule marked as a function of the op's form (:func:`fxfuse.rules.registry.form_rule`: fxfuse's
conv, linear, norm (batch, layer, group), pooling and elementwise rules) is called once per form;
its relations, compiled for the table, are kept across calls (:data:`_RELATIONS`), as are the
role plans (:data:`_PLANS`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import FxFuseError, InputError, TraceError, UnsupportedOpError, quote_error
from ..ir.layout import Atom, AtomTable, Interleave, Layout, Prod, Reason, Sum
from ..rules import (
    AxisRef,
    Cut,
    Free,
    NewAxis,
    OpView,
    RuleDoesNotApply,
    RuleError,
    Same,
    TensorHandle,
    canonical,
    lookup,
    target_name,
)
from ..rules.probe import ProbeResult, probe
from ..rules.registry import form_attrs
from ..rules.shape import channel_shuffle, channel_shuffle_rule
from ..trace import (
    OPAQUE,
    VALUE,
    GraphTrace,
    TensorMeta,
    as_input_tuple,
    attribute,
    export_trace,
    member,
    record_values,
    source_line,
    trace_graph,
)
from .roles import IN, OUT, Origins, axis_classes, related_axes, role_table
from .shuffle import Shuffle, find_shuffles, prefer_interleave

AXES = "fxfuse.axes"
# GraphTrace.meta key: the model's state tensors (_state_tensors), where the caller found them
# already for this trace
STATE_TENSORS = "fxfuse.state_tensors"


@dataclass(frozen=True)
class TensorAxes:
    """The layouts of one tensor's axes (stored in ``node.meta["fxfuse.axes"]``)."""

    layouts: tuple[Layout, ...]

    def __init__(self, layouts: tuple[Layout, ...]) -> None:
        self.__dict__["layouts"] = layouts  # as Same's (fxfuse.rules.registry): one per node


SYMBOLIC = "torch.fx.symbolic_trace"  # Discovery.tracer of a symbolic trace (fxfuse.trace)


@dataclass
class Discovery:
    """Everything discovery learnt about one model (the spec is derived from it)."""

    gm: GraphTrace  # the traced graph (and the module its targets name)
    table: AtomTable
    param_axes: dict[str, tuple[Layout, ...]]
    param_shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, list[str]]
    cuts: list[Reason] = field(default_factory=list)
    tracer: str = SYMBOLIC
    lifted: dict[str, str] = field(default_factory=dict)  # export: placeholder -> param name
    # (state_dict key, axis) -> the roles its uses gave it (fxfuse.groups.roles)
    roles: dict[tuple[str, int], set[str | None]] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()  # state_dict keys that are buffers, not parameters
    # calls without a rule whose relations were measured (fxfuse.rules.probe), kind "probed"
    probed: list[Reason] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what discovery chose, and why

    def input_nodes(self) -> list[fx.Node]:
        """The placeholders that are model inputs (not lifted parameters/buffers)."""
        return [n for n in self.gm.graph.nodes if n.op == "placeholder" and n.name not in self.lifted]


class _Handles:
    """The tensors one op application relates, numbered as the rule sees them: each handle's
    axis layouts, shape, and (for parameters and views of them) the parameter axes per axis.
    ``viewed``: whether some handle has parameter axes (else no member role comes of the op)."""

    __slots__ = ("lineage", "handles", "shapes", "sources", "viewed")

    def __init__(self, lineage: dict[str, Any]) -> None:
        self.lineage = lineage
        self.handles: list[tuple[Layout, ...]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.sources: list[Origins | None] = []
        self.viewed = False

    def handle(self, lays: tuple[Layout, ...], shape: tuple[int, ...], dtype: torch.dtype,
               src: Origins | None = None) -> TensorHandle:
        handles = self.handles
        i = len(handles)
        handles.append(lays)
        self.shapes.append(shape)
        self.sources.append(src)
        if src is not None:
            self.viewed = True
        return TensorHandle(i, shape, dtype)

    def big(self) -> list[tuple[int, int]]:
        """Every (handle, axis) of size > 1, in order: the axes a rule must mention."""
        out: list[tuple[int, int]] = []
        for key in enumerate(self.shapes):
            big = _BIG.get(key)
            if big is None:
                if len(_BIG) >= _BIG_KEPT:
                    _BIG.clear()
                i, shape = key
                big = _BIG[key] = tuple([(i, d) for d, n in enumerate(shape) if n > 1])
            out += big
        return out

    def wrap(self, axes: Any, val: Any, src: Any = None) -> Any:
        if type(axes) is TensorAxes:
            return self.handle(axes.layouts, val.shape, val.dtype, src)
        if isinstance(axes, tuple) and isinstance(val, (list, tuple)):
            subs = src if isinstance(src, tuple) and len(src) == len(axes) else (None,) * len(axes)
            return type(val)(self.wrap(a, v, u) for a, v, u in zip(axes, val, subs))
        return val

    def arg(self, v: Any) -> Any:
        if isinstance(v, fx.Node):
            meta = v.meta
            return self.wrap(meta.get(AXES), meta.get(VALUE), self.lineage.get(v.name))
        if type(v) in _SCALARS:
            return v
        if isinstance(v, (list, tuple)):
            return type(v)([self.arg(u) for u in v])
        if isinstance(v, dict):
            return {k: self.arg(u) for k, u in v.items()} if v else {}
        if isinstance(v, slice):
            return slice(self.arg(v.start), self.arg(v.stop), self.arg(v.step))
        return v


# role plans (_role_plan) by (Same relations, outputs, parameter ranks): a function of the op's
# form only (tensor numbers, no names, shapes or model), so kept across calls, like a compiled
# pattern; every conv (norm, linear) of one form shares one
_PLANS: dict[Any, tuple[tuple[int, int, str | None], ...]] = {}
_PLANS_KEPT = 4096

_SCALARS = frozenset({int, float, bool, str, type(None)})  # arguments passed through as they are


class _Pair(tuple):  # type: ignore[type-arg]
    """``Same(AxisRef, AxisRef)`` compiled: its two (tensor, axis) pairs (no rule returns one)."""

    __slots__ = ()


class _Applied:
    """A form rule's application, kept per form (:data:`_RELATIONS`) after its first: the rule's
    ``relations``; the axes of size > 1 they leave ``unmentioned`` (a function of the relations
    and the shapes, both in the form); :meth:`steps`, the relations with each ``Same`` of two
    single axes as a :class:`_Pair` (made at the second application: most forms of a model have
    one); its role ``plans`` (:func:`_role_plan`) by (outputs, parameter ranks), as first
    needed."""

    __slots__ = ("relations", "unmentioned", "plans", "_steps")

    def __init__(self, relations: list[Any], unmentioned: tuple[tuple[int, int], ...]) -> None:
        self.relations = relations
        self.unmentioned = unmentioned
        self.plans: dict[Any, tuple[tuple[int, int, str | None], ...]] = {}
        self._steps: tuple[Any, ...] | None = None

    def steps(self) -> tuple[Any, ...]:
        if self._steps is None:
            self._steps = tuple(
                _Pair(((r.a.tensor, r.a.axis), (r.b.tensor, r.b.axis)))
                if type(r) is Same and type(r.a) is AxisRef and type(r.b) is AxisRef else r
                for r in self.relations)
        return self._steps


# a form rule's application (fxfuse.rules.registry.form_rule) by the op's form (_form_key): one
# rule call per form, every conv (norm, activation) of one form shares one; a function of its
# key, kept across calls like _PLANS, cleared when full.  Entries are only read once made.
_RELATIONS: dict[tuple[Any, ...], _Applied] = {}
_RELATIONS_KEPT = 4096
_FORM_LEAVES = frozenset({torch.dtype, torch.device, torch.memory_format, torch.layout,
                          type(Ellipsis)})  # immutable argument values a form holds as they are

# (handle number, shape) -> the handle's (number, axis) pairs of size > 1 (_Handles.big); a
# function of its key, kept across calls, cleared when full
_BIG: dict[tuple[int, tuple[int, ...]], tuple[tuple[int, int], ...]] = {}
_BIG_KEPT = 4096


class _Driver:
    def __init__(self, model: nn.Module, gm: GraphTrace, strict: bool, fix_io: bool,
                 lifted: dict[str, str] | None = None, probe: bool = True) -> None:
        self.gm = gm
        self.probe = probe
        self.probed: list[Reason] = []  # calls whose relations were measured, not from a rule
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
        self.state = gm.meta.get(STATE_TENSORS) or _state_tensors(model)
        param = nn.Parameter
        self.buffers = frozenset(k for k, t in self.state.items()
                                 if type(t) is not param and not isinstance(t, param))
        key_of, aliases, shapes, axes = self.key_of, self.aliases, self.param_shapes, self.param_axes
        new_axes = self.table.new_axes
        for key, t in self.state.items():
            first = key_of.setdefault(id(t), key)
            shape = shapes[key] = tuple(t.shape)
            if first == key:
                aliases[key] = [key]
                axes[key] = new_axes(shape)
            else:
                aliases[first].append(key)
        self.used: set[str] = set()
        # for member roles (fxfuse.groups.roles): the parameters each node's value is made of only
        # (a parameter, or a view of parameters), and every op application that reads them
        self.lineage: dict[str, Any] = {}
        self.roles: dict[tuple[str, int], set[str | None]] = {}
        self.shuffles = find_shuffles(gm.graph)  # node name -> its channel shuffle chain
        self._shuffle_on: dict[str, bool] = {}  # chain's first node -> read as one op
        # per call, looked up once: submodules by qualified name (each prefix walked once)
        self._submodules: dict[str, nn.Module] = {"": gm.root}
        self._near: dict[Any, dict[tuple[Any, Any], set[tuple[Any, Any]]]] = {}
        self._opnames: dict[Any, str] = {}

    # -- helpers ------------------------------------------------------------------------------
    def _fresh(self, value: Any) -> Any:
        if isinstance(value, TensorMeta):
            return TensorAxes(self.table.new_axes(value.shape))
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
            kind = node.op
            if kind != "placeholder" and kind != "get_attr" and kind != "output":
                self._call(node)  # names its node and op itself
                continue
            self.table.at(node.name, kind)
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
        obj = attribute(self.gm.root, str(node.target))
        lays = self._param_layouts(obj) if isinstance(obj, torch.Tensor) else None
        if lays is not None:
            node.meta[AXES] = TensorAxes(lays)
            self.lineage[node.name] = _param_origins(self.key_of[id(obj)], obj.ndim)
            return
        node.meta[AXES] = self._fresh(value)
        why = Reason("constant", node.name, "get_attr", f"tensor attribute {node.target!r} is not "
                     "in the state_dict, so it can not be permuted")
        self._fix_all(self._tensor_axes(node.meta[AXES]), why)

    def _submodule(self, target: str) -> nn.Module:
        """``root.get_submodule(target)``, each prefix of a dotted name walked once per call."""
        hit = self._submodules.get(target)
        if hit is not None:
            return hit
        parent, _, name = target.rpartition(".")
        sub = _child(self._submodule(parent), name)
        if not isinstance(sub, nn.Module):
            return self.gm.root.get_submodule(target)  # raises get_submodule's own error
        self._submodules[target] = sub
        return sub

    def _opname(self, target: Any) -> str:
        """``target_name(target)``, once per distinct target in a call."""
        try:
            hit = self._opnames.get(target)
        except TypeError:  # an unhashable target
            return target_name(target)
        if hit is None:
            hit = self._opnames[target] = target_name(target)
        return hit

    def _call(self, node: fx.Node) -> None:
        module = self._submodule(str(node.target)) if node.op == "call_module" else None
        opname = type(module).__name__ if module is not None else self._opname(node.target)
        self.table.at(node.name, opname)
        chain = self.shuffles.get(node.name)
        if chain is not None and self._shuffle(node, chain, opname):
            return
        meta = node.meta
        value = meta.get(VALUE)
        hs = _Handles(self.lineage)
        args, kwargs = hs.arg(node.args), hs.arg(node.kwargs) if node.kwargs else {}
        if type(value) is TensorMeta:  # _fresh and wrap of one tensor, the common case
            lays = self.table.new_axes(value.shape)
            meta[AXES] = TensorAxes(lays)
            out_value = hs.handle(lays, value.shape, value.dtype)
            outs = [out_value]
        else:
            axes = meta[AXES] = self._fresh(value)
            out_value = hs.wrap(axes, value)
            outs = _handles_in(out_value)
        params = self._module_params(node, module, opname, hs) if module is not None else {}
        if not hs.handles:
            return  # no tensor in or out: shape arithmetic, nothing to relate
        target = canonical(node.target)
        rule = lookup(type(module) if module is not None else target)
        declined = ""
        if rule is not None:
            key = _form_key(rule, target, module, args, kwargs, out_value, params)
            try:
                applied = _RELATIONS.get(key) if key is not None else None
            except TypeError:  # a module attribute in the key that does not hash
                key = applied = None
            try:
                relations = applied.relations if applied is not None else rule(
                    OpView(target, args, kwargs, outs, out_value, module, params))
            except RuleDoesNotApply as exc:
                declined = str(exc) or "the rule does not describe this call"
            except FxFuseError:
                raise
            except Exception as exc:
                raise self._rule_error(node, opname, rule, source_line(node),
                                       quote_error(exc)) from exc
            else:
                try:
                    if applied is not None:
                        self._apply(applied.steps(), hs, node, opname,
                                    unmentioned=applied.unmentioned)
                    else:
                        unmentioned = self._apply(relations, hs, node, opname)
                        if key is not None and type(relations) is list:  # kept once it applied
                            if len(_RELATIONS) >= _RELATIONS_KEPT:
                                _RELATIONS.clear()
                            applied = _RELATIONS[key] = _Applied(relations, unmentioned)
                except (TypeError, AttributeError, IndexError) as exc:
                    raise self._rule_error(node, opname, rule, source_line(node),
                                           quote_error(exc)) from exc
                if hs.viewed:
                    self._record_use(node, relations, hs.sources, out_value, module, params,
                                     applied)
                return
        src = source_line(node)
        what = (f"the axis rule for {opname}{_module_path(node)} does not apply ({declined})"
                if declined else f"no axis rule for {opname}{_module_path(node)}")
        msg = (f"{what}; the groups through it stay fixed. Register one with "
               f"@fxfuse.axis_rule({_recipe(node, self.gm.root)}) (see fxfuse.rules)")
        if self.strict:
            where = f" at {src}" if src else ""
            raise UnsupportedOpError(f"node {node.name!r}: {msg}{where} (strict mode does not "
                                     f"probe ops without a rule)")
        if self._from_constants(hs, outs):  # a function of constants is a constant: no cut
            why = Reason("constant", node.name, opname, "computed from constants only")
            self._fix_handles([hs.handles[h.index] for h in outs], why)
            return
        if self.probe:
            op = OpView(target, args, kwargs, outs, out_value, module, params)
            result = self._probe(node, module, op)
            if result.found:
                self.table.at(node.name, f"probed {opname}")
                self.probed.append(Reason("probed", node.name, opname,
                                          "measured: " + "; ".join(result.holds), src))
                failed = "; ".join(result.fails) or "some axes relate as no rule says"
                cut = Reason("no-rule", node.name, opname, f"{what}; probed: {failed}", src)
                self._apply(result.relations, hs, node, opname, cut, cut_kind="no-rule")
                if hs.viewed:
                    self._record_use(node, result.relations, hs.sources, out_value, module,
                                     params)
                if any(isinstance(r, Cut) for r in result.relations):
                    self.cuts.append(cut)
                return
            msg = f"{what} ({result.reason}); the groups through it stay fixed. " + msg.split(
                "stay fixed. ", 1)[1]
        self._cut(hs, Reason("no-rule", node.name, opname, msg, src))

    def _shuffle(self, node: fx.Node, chain: Shuffle, opname: str) -> bool:
        """A node of a channel shuffle chain (:mod:`fxfuse.groups.shuffle`): read as one op
        where the shuffled axis is a sum or an interleave that keeps more that way (decided at
        the chain's first node); False: the node keeps its own rule."""
        if node is chain.nodes[0]:
            src = chain.source.meta.get(AXES)
            self._shuffle_on[node.name] = isinstance(src, TensorAxes) and prefer_interleave(
                self.table, self.table.resolve(src.layouts[chain.dim]), chain.groups)
        if not self._shuffle_on.get(chain.nodes[0].name):
            return False
        node.meta[AXES] = self._fresh(node.meta.get(VALUE))
        if node is not chain.last:  # its result is read by the chain's next op only
            why = Reason("rule", node.name, opname, f"inside the channel shuffle ending at "
                         f"{chain.last.name!r}, read as one op")
            self._fix_all(self._tensor_axes(node.meta[AXES]), why)
            return True
        self.table.at(node.name, "channel_shuffle")
        hs = _Handles(self.lineage)
        x = hs.arg(chain.source)
        out_value = hs.wrap(node.meta[AXES], node.meta.get(VALUE))
        op = OpView(channel_shuffle, (x, chain.dim, chain.groups), {}, [out_value], out_value)
        src_line = source_line(node)
        try:
            relations = channel_shuffle_rule(op)
            self._apply(relations, hs, node, "channel_shuffle")
        except Exception as exc:  # the chain was checked: a failure is a bug
            raise self._rule_error(node, "channel_shuffle", channel_shuffle_rule, src_line,
                                   quote_error(exc)) from exc
        self._record_use(node, relations, hs.sources, out_value, None, {})
        return True

    def _from_constants(self, hs: _Handles, outs: list[TensorHandle]) -> bool:
        """Whether every input tensor of the call is a constant (all its axes fixed)."""
        out_ids = {h.index for h in outs}
        inputs = [lays for i, lays in enumerate(hs.handles) if i not in out_ids]
        return bool(inputs) and all(not self.table.atoms_in(self.table.resolve(lay))
                                    for lays in inputs for lay in lays)

    def _probe(self, node: fx.Node, module: nn.Module | None, op: OpView) -> ProbeResult:
        """Measure the relations of a call without a rule (:mod:`fxfuse.rules.probe`)."""
        params = {name: h for name, h in op.params.items()
                  if module is not None and self._in_state(module, name)}
        inputs = [*op.tensors(), *params.values()]
        copy_ = copy.deepcopy(module).eval() if module is not None else None

        def call(values: dict[int, torch.Tensor]) -> Any:
            a, kw = _fill(op.args, values), _fill(op.kwargs, values)
            if copy_ is not None:
                state = {name: values[h.index] for name, h in params.items()}
                return torch.func.functional_call(copy_, state, tuple(a), kw)
            if node.op == "call_method":
                return getattr(a[0], str(node.target))(*a[1:], **kw)
            return node.target(*a, **kw)  # type: ignore[operator]

        labels = {h.index: f"arg{i}" for i, h in enumerate(op.tensors())}
        labels.update({h.index: name for name, h in params.items()})
        labels.update({h.index: "out" if len(op.outs) == 1 else f"out{i}"
                       for i, h in enumerate(op.outs)})
        return probe(call, inputs, op.outs, labels=labels)

    def _in_state(self, module: nn.Module, name: str) -> bool:
        t = module.get_parameter(name) if name in dict(module.named_parameters(
            remove_duplicate=False)) else module.get_buffer(name)
        return id(t) in self.key_of

    @staticmethod
    def _rule_error(node: fx.Node, opname: str, rule: Any, src: str | None, what: str
                    ) -> RuleError:
        name = getattr(rule, "__qualname__", repr(rule))
        where = f" at {src}" if src else ""
        return RuleError(
            f"the axis rule {getattr(rule, '__module__', '')}.{name} failed on node "
            f"{node.name!r} ({opname}){where}: {what}. This is a bug in the rule: a rule that "
            f"does not describe a call must raise fxfuse.rules.RuleDoesNotApply (see "
            f"fxfuse.rules.registry)")

    def _cut(self, hs: _Handles, why: Reason) -> None:
        self.cuts.append(why)
        self._fix_handles(hs.handles, why)

    def _module_params(self, node: fx.Node, module: nn.Module, opname: str, hs: _Handles
                       ) -> dict[str, TensorHandle]:
        """Handles of a called module's parameters and buffers (a buffer outside the state_dict
        is a constant: fixed)."""
        params: dict[str, TensorHandle] = {}
        key_of, used, shapes, axes = self.key_of, self.used, self.param_shapes, self.param_axes
        for name, t in _named_tensors(module):
            key = key_of.get(id(t))
            if key is not None:
                used.add(key)
                shape = shapes[key]
                params[name] = hs.handle(axes[key], shape, t.dtype, _param_origins(key, len(shape)))
                continue
            lays = self.table.new_axes(tuple(t.shape))
            why = Reason("constant", node.name, opname, f"buffer {name!r} is not in the state_dict")
            for lay in lays:
                self.table.fix(lay, why)
            params[name] = hs.handle(lays, tuple(t.shape), t.dtype)
        return params

    def _record_use(self, node: fx.Node, relations: list[Any], sources: list[Origins | None],
                    out_value: Any, module: nn.Module | None,
                    params: dict[str, TensorHandle], applied: _Applied | None = None) -> None:
        """Member roles (:mod:`fxfuse.groups.roles`) from one applied rule.  An op all of whose inputs
        are parameters is a view of them: its output axes inherit the parameter axes they are
        related to.  Otherwise a parameter axis related to an output axis is output-side, one
        related only to an activation input is input-side."""
        if all(src is None for src in sources):  # outputs have none (only inputs can)
            return  # only activations in: no parameter axis gets a role here
        outs = ([out_value.index] if type(out_value) is TensorHandle
                else sorted({h.index for h in _handles_in(out_value)}))
        inputs = [i for i in range(len(sources)) if i not in outs]
        if all(sources[i] is not None for i in inputs):  # a view: its outputs' origins
            wanted = [(h.index, d) for h in _handles_in(out_value) for d in range(len(h.shape))]
            near = self._related(relations, wanted)
            self.lineage[node.name] = _view_origins(out_value, near, sources, inputs)
            return
        # roles of the parameter axes among the inputs
        ndims = tuple([-1 if src is None else len(src) for src in sources])  # -1: an activation
        form = (tuple(outs), ndims)
        plan = applied.plans.get(form) if applied is not None else None
        if plan is None:
            try:
                key = (_same_key(relations), *form)
                plan = _PLANS.get(key)
            except TypeError:  # a rule's expression that does not hash (a list inside a Prod)
                key, plan = None, None
            if plan is None:
                plan = _role_plan(relations, outs, inputs, ndims)
                if key is not None:
                    if len(_PLANS) >= _PLANS_KEPT:
                        _PLANS.clear()
                    _PLANS[key] = plan
            if applied is not None:
                applied.plans[form] = plan
        table = role_table(module)
        names = {h.index: name for name, h in params.items()} if table else {}
        roles = self.roles
        for t, a, role in plan:
            if table:
                role = table.get((names.get(t, ""), a), role)
            keys = sources[t][a]  # type: ignore[index]
            # a frozenset: sorted where it has several, so the spec's role order does not
            # depend on string hashing (PYTHONHASHSEED)
            for key_axis in keys if len(keys) < 2 else sorted(keys):
                seen = roles.get(key_axis)
                if seen is None:
                    roles[key_axis] = {role}
                else:
                    seen.add(role)

    def _related(self, relations: list[Any], wanted: list[tuple[int, int]]
                 ) -> dict[tuple[Any, Any], set[tuple[Any, Any]]]:
        """:func:`~fxfuse.groups.roles.related_axes`, once per distinct (relations, wanted) in
        a call: relations name tensors by their number in the op, so every conv (or norm, or
        linear) of one form has the same ones.  The result is only read."""
        try:
            key = (tuple(relations), tuple(wanted))
            hit = self._near.get(key)
        except TypeError:  # a rule's expression that does not hash (a list inside a Prod)
            return related_axes(relations, wanted)
        if hit is None:
            hit = self._near[key] = related_axes(relations, wanted)
        return hit

    def _fix_handles(self, handles: list[tuple[Layout, ...]], why: Reason) -> None:
        for lays in handles:
            for lay in lays:
                self.table.fix(lay, why)

    def _apply(self, relations: Iterable[Any], hs: _Handles, node: fx.Node, opname: str,
               base: Reason | None = None, cut_kind: str = "rule",
               unmentioned: tuple[tuple[int, int], ...] | None = None
               ) -> tuple[tuple[int, int], ...]:
        """Apply a rule's ``relations`` (or an :class:`_Applied`'s steps) to the tensors ``hs``:
        unify each ``Same``, fix each ``Cut`` (kind ``cut_kind``), then fix every axis of size > 1
        that no relation mentions (``unmentioned``, where the caller knows them; returned).
        ``base`` is the reason of the unions and fixes (a rule's own by default,
        ``Reason("rule", node, opname, "", source line)``, built where one is first needed: the
        common atom-atom union records none)."""
        handles, table = hs.handles, self.table
        unify_atoms = table.unify_atoms
        mentioned: set[tuple[int, int]] = set()
        add = mentioned.add
        track = unmentioned is None
        local: dict[str, Atom] = {}
        cut_why: dict[str, Reason] = {}
        layout = self._layout
        for r in relations:
            if type(r) is _Pair:  # Same(AxisRef, AxisRef), compiled
                p, q = r
            elif isinstance(r, Same):
                a, b = r.a, r.b
                if type(a) is not AxisRef or type(b) is not AxisRef:
                    if base is None:
                        base = Reason("rule", node.name, opname, "", source_line(node))
                    table.unify(layout(a, handles, mentioned, local),
                                layout(b, handles, mentioned, local), base)
                    continue
                p, q = (a.tensor, a.axis), (b.tensor, b.axis)  # most relations: axis = axis
            elif isinstance(r, Cut):
                why = cut_why.get(r.why)  # one Reason per distinct text (a conv's spatial axes)
                if why is None:
                    why = cut_why[r.why] = Reason(cut_kind, node.name, opname, r.why,
                                                  base.source if base else source_line(node))
                table.fix(layout(r.a, handles, mentioned, local), why)
                continue
            elif isinstance(r, Free):
                layout(r.a, handles, mentioned, local)
                continue
            else:
                raise TypeError(f"not a relation: {r!r}")
            # an axis = axis relation: the atom-atom union where it applies, else unify
            if track:
                add(p)
                add(q)
            x, y = handles[p[0]][p[1]], handles[q[0]][q[1]]
            if type(x) is Atom and type(y) is Atom and unify_atoms(x.id, y.id):
                continue
            if base is None:
                base = Reason("rule", node.name, opname, "", source_line(node))
            table.unify_layouts(x, y, base)
        if unmentioned is None:
            big = hs.big()
            unmentioned = () if mentioned.issuperset(big) else tuple(
                [(i, d) for i, d in big if (i, d) not in mentioned])
        for i, d in unmentioned:
            why = Reason(cut_kind, node.name, opname,
                         f"the rule does not relate axis {d} of tensor #{i}",
                         base.source if base else source_line(node))
            table.fix(handles[i][d], why)
        return unmentioned

    def _layout(self, e: Any, handles: list[tuple[Layout, ...]], mentioned: set[tuple[int, int]],
                local: dict[str, Atom]) -> Layout:
        """The layout a rule's axis expression ``e`` stands for (axis references are looked up in
        ``handles`` and noted in ``mentioned``; a rule's new axes are atoms, one per key).  A
        node of one part is read as the part: :meth:`AtomTable.resolve` gives both the same
        normal form (a reshape's unchanged axes are ``Prod((x[d],)) = Prod((y[d],))``), and the
        atom-atom unify then takes its short path."""
        if isinstance(e, AxisRef):
            mentioned.add((e.tensor, e.axis))
            return handles[e.tensor][e.axis]
        if isinstance(e, NewAxis):
            if e.key not in local:
                local[e.key] = self.table.new(e.size, e.key if e.named else None)
            return local[e.key]
        if isinstance(e, (Prod, Sum, Interleave)):
            if len(e.parts) == 1:  # a product (sum, interleave) of one part is that part
                return self._layout(e.parts[0], handles, mentioned, local)
            return type(e)(tuple([self._layout(p, handles, mentioned, local) for p in e.parts]))
        raise TypeError(f"not an axis expression: {e!r}")


def _form_key(rule: Any, target: Any, module: nn.Module | None, args: tuple[Any, ...],
              kwargs: dict[str, Any], out: Any, params: dict[str, TensorHandle]
              ) -> tuple[Any, ...] | None:
    """The key in :data:`_RELATIONS` of ``rule`` applied to the op these make up (the fields of
    its :class:`OpView`), None if the rule is not a function of the op's form or the op holds
    a value a form does not: everything the rule can read of the op (its target, or the
    module's class and the rule's attributes of it; each tensor's number, shape and dtype; the
    other values, with their types; the structure)."""
    attrs = form_attrs(rule)
    if attrs is None:
        return None
    # _form of (args, kwargs, out, params), its first level here: most items are handles
    form: list[Any] = [(type(args), len(args))]
    append = form.append
    for v in args:
        if type(v) is TensorHandle:
            append((v.index, v.shape, v.dtype))
        elif not _form(v, form):
            return None
    if kwargs and not _form(kwargs, form):
        return None
    append(len(kwargs))  # ends the keyword arguments (one 0 where there are none)
    if type(out) is TensorHandle:
        append((out.index, out.shape, out.dtype))
    elif not _form(out, form):
        return None
    for name, h in params.items():
        append((name, h.index, h.shape, h.dtype))
    key: tuple[Any, ...]
    if module is None:
        key = (rule, target, tuple(form))
    else:  # the module's attributes in the same typed form (a numpy integer has none: the
        # rule, which may refuse what is not an int, runs every time)
        mod_form: list[Any] = []
        for a in attrs:
            if not _form(getattr(module, a, None), mod_form):
                return None
        key = (rule, type(module), tuple(mod_form), tuple(form))
    return key  # unhashable where a module attribute is (the caller then calls the rule)


def _form(v: Any, out: list[Any]) -> bool:
    """Append ``v``'s form to ``out`` (a tensor handle as its number, shape and dtype; a
    container as its type and length, then its items; a number or flag with its type): equal
    forms are equal values to a rule.  False where ``v`` holds something else."""
    t = type(v)
    if t is TensorHandle:
        out.append((v.index, v.shape, v.dtype))
    elif t is int or t is str or v is None:
        out.append(v)
    elif t is float or t is bool:
        out.append((t, v))
    elif t is dict:
        out.append((dict, tuple(v)))
        for u in v.values():
            if not _form(u, out):
                return False
    elif isinstance(v, (tuple, list)):
        out.append((t, len(v)))
        for u in v:
            if not _form(u, out):
                return False
    elif t is slice:
        out.append(slice)
        return _form(v.start, out) and _form(v.stop, out) and _form(v.step, out)
    elif t in _FORM_LEAVES:
        out.append(v)
    else:
        return False
    return True


def _same_key(relations: list[Any]) -> tuple[Any, ...]:
    """The Same relations of a rule application (related_axes reads nothing else), each
    ``Same(AxisRef, AxisRef)`` as its four numbers (a tuple of ints hashes without a Python
    call per relation and axis), any other as itself."""
    key: list[Any] = []
    for r in relations:
        if isinstance(r, Same):
            a, b = r.a, r.b
            if type(a) is AxisRef and type(b) is AxisRef:
                key.append((a.tensor, a.axis, b.tensor, b.axis))
            else:
                key.append(r)
    return tuple(key)


def _role_plan(relations: list[Any], outs: list[int], inputs: list[int], ndims: tuple[int, ...]
               ) -> tuple[tuple[int, int, str | None], ...]:
    """``(tensor, axis, role)`` for each parameter axis among an op's inputs: output-side
    (:data:`OUT`) if the rule relates it to an output axis, else input-side (:data:`IN`) if to an
    activation input's, else none.  ``ndims[t]``: tensor ``t``'s rank if it is a parameter (or a
    view of parameters), -1 for an activation.  A function of its arguments only, so one is
    kept per distinct (Same relations, outs, ndims) (:data:`_PLANS`)."""
    wanted = [(t, a) for t in inputs for a in range(max(ndims[t], 0))]
    classes = axis_classes(relations)  # single axes only: each is related to its class
    near = related_axes(relations, wanted) if classes is None else {}
    plan: list[tuple[int, int, str | None]] = []
    for t, a in wanted:
        role = None
        if classes is None:
            others: Any = near.get((t, a), ())
        else:
            others = [u for u in classes.get((t, a), ()) if u != (t, a) and u[0] != "new"]
        if any(u in outs for u, _ in others):
            role = OUT
        elif any(u in inputs and ndims[u] < 0 for u, _ in others):
            role = IN
        plan.append((t, a, role))
    return tuple(plan)


def _view_origins(v: Any, near: dict[tuple[Any, Any], set[tuple[Any, Any]]],
                  sources: list[Origins | None], inputs: list[int]) -> Any:
    """The parameter axes each axis of the output ``v`` of a view of parameters is made of."""
    if isinstance(v, TensorHandle):
        return tuple(frozenset().union(*[
            sources[t][a] for t, a in near.get((v.index, d), ())  # type: ignore[index]
            if t in inputs and a < len(sources[t] or ())]) for d in range(len(v.shape)))
    if isinstance(v, (list, tuple)):
        return tuple(_view_origins(u, near, sources, inputs) for u in v)
    return None


def _fill(v: Any, values: dict[int, torch.Tensor]) -> Any:
    """``v`` (a rule's view of the arguments) with every tensor handle replaced by its value."""
    if isinstance(v, TensorHandle):
        return values[v.index]
    if isinstance(v, list):
        return [_fill(u, values) for u in v]
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(_fill(u, values) for u in v)
    if isinstance(v, dict):
        return {k: _fill(u, values) for k, u in v.items()}
    if isinstance(v, slice):
        return slice(_fill(v.start, values), _fill(v.stop, values), _fill(v.step, values))
    return v


def _child(module: nn.Module, name: str) -> Any:
    """``getattr(module, name, None)``, a submodule read from its table (:func:`member`)."""
    try:
        return member(module, name)
    except AttributeError:
        return None


def _state_tensors(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict(keep_vars=True)``: every module's parameters then persistent buffers,
    then its submodules', keyed by path (a tied tensor under each of its keys).  Walked here
    for plain modules (that walk is what ``state_dict`` does for them, without its metadata and
    per-module calls); a module with state_dict hooks, its own ``state_dict`` /
    ``_save_to_state_dict`` (on its class or the instance) or extra state gets torch's
    ``state_dict`` itself, without its non-tensor entries (extra state a module returns as a
    Python object has no axes to permute)."""
    out: dict[str, Any] = {}
    base = nn.Module
    todo: list[tuple[str, nn.Module]] = [("", model)]
    while todo:
        prefix, module = todo.pop()
        cls = type(module)
        if (module._state_dict_hooks or module._state_dict_pre_hooks
                or "state_dict" in module.__dict__ or "_save_to_state_dict" in module.__dict__
                or cls.state_dict is not base.state_dict
                or cls._save_to_state_dict is not base._save_to_state_dict
                or getattr(cls, "get_extra_state", base.get_extra_state) is not base.get_extra_state):
            return {k: t for k, t in model.state_dict(keep_vars=True).items()
                    if isinstance(t, torch.Tensor)}
        for name, p in module._parameters.items():
            if p is not None:
                out[prefix + name] = p
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip:
                out[prefix + name] = b
        todo += [(f"{prefix}{name}.", sub) for name, sub in reversed(module._modules.items())
                 if sub is not None]
    return out


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``[*named_parameters(remove_duplicate=False), *named_buffers(remove_duplicate=False)]``;
    for a module without submodules (most called modules) read from its own tables, which is
    what those two walks read there."""
    cls, base = type(module), nn.Module
    if (module._modules or cls.named_parameters is not base.named_parameters
            or cls.named_buffers is not base.named_buffers
            or cls.named_modules is not base.named_modules):
        return [(name, t) for name, t in [*module.named_parameters(remove_duplicate=False),
                                          *module.named_buffers(remove_duplicate=False)]
                if t is not None]
    return [(name, t) for table in (module._parameters, module._buffers)
            for name, t in table.items() if t is not None]


@lru_cache(maxsize=8192)
def _param_origins(key: str, ndim: int) -> Origins:
    """Each axis ``d`` of parameter ``key`` is made of ``(key, d)`` (immutable, so shared)."""
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


def _recipe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return repr(node.target)
    return target_name(node.target)


TRACERS = ("auto", "symbolic", "export")


def symbolic_graph(model: nn.Module, inputs: tuple[Any, ...], strict: bool = False) -> GraphTrace:
    """The model's symbolic trace (with stack traces in strict mode), its values recorded on
    ``inputs``: what the symbolic path of :func:`discover` starts from."""
    gm = trace_graph(model, stack_traces=strict)
    record_values(gm, inputs)
    return gm


def _symbolic(model: nn.Module, inputs: tuple[Any, ...], strict: bool, fix_io: bool,
              probe: bool, gm: GraphTrace | None = None) -> Discovery:
    if gm is None:
        gm = symbolic_graph(model, inputs, strict)
    driver = _Driver(model, gm, strict, fix_io, probe=probe)
    driver.run()
    cuts, probed = driver.cuts, driver.probed
    if cuts or probed:  # name the user's source lines: trace again, recording stack traces
        sources = {n.name: source_line(n) for n in trace_graph(model).graph.nodes}
        cuts = [replace(c, source=sources.get(c.node)) for c in cuts]
        probed = [replace(c, source=sources.get(c.node)) for c in probed]
    return Discovery(gm, driver.table, driver.param_axes, driver.param_shapes, driver.aliases,
                     cuts, roles=driver.roles, buffers=driver.buffers, probed=probed)


def _export(model: nn.Module, inputs: tuple[Any, ...], strict: bool, fix_io: bool,
            probe: bool) -> Discovery:
    exported, lifted = export_trace(model, inputs)
    gm = GraphTrace.of(exported)
    driver = _Driver(model, gm, strict, fix_io, lifted, probe=probe)
    driver.run()
    return Discovery(gm, driver.table, driver.param_axes, driver.param_shapes, driver.aliases,
                     driver.cuts, tracer="torch.export", lifted=lifted, roles=driver.roles,
                     buffers=driver.buffers, probed=driver.probed)


def export_after(model: nn.Module, inputs: tuple[Any, ...], failed: TraceError, *,
                 strict: bool = False, fix_io: bool = True, probe: bool = True) -> Discovery:
    """The ``torch.export`` discovery that ``tracer="auto"`` falls back to where the symbolic
    trace failed with ``failed`` (both errors in the one raised where export fails too)."""
    try:
        return _export(model, inputs, strict, fix_io, probe and not strict)
    except TraceError as exc2:
        raise TraceError(f"{failed} Then: {exc2}") from exc2


def opaque_cuts(disc: Discovery) -> list[Reason]:
    """The cuts at calls symbolic tracing could not see into (``fxfuse.opaque``)."""
    opaque = disc.gm.meta.get(OPAQUE, {})
    return [c for c in disc.cuts if c.node in opaque]


def _covered(disc: Discovery) -> int:
    """Parameter axes (size > 1) that some group permutes."""
    table = disc.table
    return sum(len(disc.aliases[key]) for key, lays in disc.param_axes.items() for lay in lays
               if table.atoms_in(table.resolve(lay)))


def discover(
    model: nn.Module, example_inputs: Any, *, strict: bool = False, fix_io: bool = True,
    tracer: str = "auto", probe: bool = True, graph: GraphTrace | None = None,
) -> Discovery:
    """Trace ``model``, record its values on ``example_inputs`` and relate every axis.

    ``tracer``: ``"symbolic"`` (``torch.fx.symbolic_trace``, Python-level ops, opaque calls
    seen through where they are plain Python), ``"export"`` (``torch.export``, ATen-level ops,
    for models symbolic tracing can not handle: most Hugging Face models) or ``"auto"``
    (symbolic; export if that fails, and also when the symbolic trace has cuts at calls it
    could not see into, keeping the one with fewer cuts, then more permuted parameter axes,
    and saying so in ``notes``).  One rule table serves both levels (:mod:`fxfuse.rules.aten`).
    ``probe``: measure the relations of ops without a rule (:mod:`fxfuse.rules.probe`; never in
    strict mode).  ``graph``: the model's :func:`symbolic_graph` on these inputs (in this
    ``strict`` mode), where the caller made it already: the symbolic path starts from it.
    """
    if tracer not in TRACERS:
        raise InputError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    inputs = as_input_tuple(example_inputs)
    probe = probe and not strict
    if tracer == "export":
        return _export(model, inputs, strict, fix_io, probe)
    try:
        sym = _symbolic(model, inputs, strict, fix_io, probe, graph)
    except TraceError as exc:
        if tracer == "symbolic":
            raise
        return export_after(model, inputs, exc, strict=strict, fix_io=fix_io, probe=probe)
    opaque = opaque_cuts(sym)
    if tracer == "symbolic" or not opaque:
        return sym
    try:
        exp = _export(model, inputs, strict, fix_io, probe)
    except TraceError as exc:
        sym.notes.append(f"trace: the symbolic trace has {len(opaque)} cut(s) at calls it can "
                         f"not see into; torch.export could not do better ({quote_error(exc)})")
        return sym
    better = (len(exp.cuts), -_covered(exp)) < (len(sym.cuts), -_covered(sym))
    kept, other = (exp, sym) if better else (sym, exp)
    kept.notes.append(
        f"trace: the symbolic trace has {len(sym.cuts)} cut(s), {len(opaque)} at calls it can not "
        f"see into ({', '.join(sorted({c.op for c in opaque}))}); torch.export has "
        f"{len(exp.cuts)}; kept {kept.tracer} ({_covered(kept)} parameter axes permuted, "
        f"{other.tracer} {_covered(other)})")
    return kept
