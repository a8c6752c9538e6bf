"""Specs kept per *form* of a traced model, so that discovering one architecture again (every
federated round, every fusion of models of one architecture) does not relate its axes again.

A discovery is a function of what its axis walk reads, and of nothing else:

* the symbolic trace: every node's name, kind, target and arguments (the forward's Python,
  module attributes it read and constants it made are baked into them), and its recorded value
  (shapes, dtypes and the Python values shape arithmetic produced, on these example inputs:
  a data-dependent shape is in it);
* the axis rule each node's target has in the rule table now (a rule registered or removed
  since is another rule);
* for a called module: its class, which state_dict entries (or constants of which shapes) its
  tensors are, and the attributes its rule reads: those a form rule lists
  (:func:`~fxfuse.rules.registry.form_rule`, the contract discovery's per-form relations
  already rest on), else every attribute it and its submodules hold;
* for a ``get_attr``: which state_dict entry (or constant of which shape) it reads;
* the state_dict: its keys in order, each entry's shape, dtype, kind (parameter or buffer) and
  the first key of the tensor it shares (tied weights);
* the model's class name (the spec's ``model``).

:func:`form_key` makes that key after the trace and the recording (which run on every call),
or None where some of it is a value the key can not hold exactly (an attribute of an unknown
type, a tensor argument): then nothing is kept.

Where every op of the trace is one whose recorded value (shape, dtype, the Python values of shape
arithmetic) is a function of its arguments' recorded shapes and dtypes and of constants, never of
tensor data (:data:`SHAPE_FUNCTIONS`, :data:`SHAPE_METHODS`, :data:`SHAPE_MODULES`, hook-free, no
tensor index), the recorded values are a function of the inputs' and the state's shapes and dtypes:
node by node, each argument's recorded value is the same as before, so each output's is.  Such a
trace is keyed before the recording, by :func:`shape_key`: the same rows without the recorded
values, with the inputs' shapes, dtypes, strides and devices, the state's strides and devices and
torch's default dtype instead (strides and devices: whether the model runs on them at all); a hit
there does not run the model.  Anything else (an op not in those tables, a module with hooks, an
integer or boolean tensor as an argument after an op's first or any tensor in an index (its values
may be a size or a mask), autocast or a torch function / dispatch mode active, a tensor that is a
subclass or not strided, an input that is not a tensor or Python value) is keyed by
:func:`value_key` after the recording, as above.  Every leaf value is
tagged with its exact type (``1``, ``1.0`` and ``True`` are three keys; a float by its
``repr``, so ``-0.0`` and ``nan`` are themselves), containers with theirs.  Only discoveries
without cuts, probes or notes are kept (those name source lines or compare traces), from a
model's second discovery (the first of an outline, class, node count and state_dict size, is
neither keyed nor kept: a new architecture does not pay for its key), in a bounded table (least
recently used out); a kept spec is copied out and in (a caller may change
its lists and dicts), sharing its immutable parts (members, layout trees, axis specs).
"""

from __future__ import annotations

import builtins
import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..rules import canonical, lookup
from ..rules.registry import form_attrs
from ..trace import VALUE, GraphTrace, TensorMeta, attribute_reader
from .discover import _named_tensors
from .spec import Group, PermutationSpec

_KEPT = 32  # specs kept (least recently used out)
_SPECS: OrderedDict[_Key, PermutationSpec] = OrderedDict()
# (class, graph nodes, state tensors) of the models discovered so far: the exact key is made
# only for a model whose outline was seen before (its second discovery keeps the spec), so the
# first discovery of an architecture does not pay for it
_SEEN: OrderedDict[tuple[Any, int, int], None] = OrderedDict()
_SEEN_KEPT = 1024


class _Unkeyable(Exception):
    """A value the key can not hold exactly: nothing is kept for this model."""


# tags: objects no user value equals
_NODE, _FLOAT, _BOOL, _TENSOR, _STATE, _MISSING = (object() for _ in range(6))
_RAW = frozenset({int, str, type(None), torch.dtype, torch.device, torch.memory_format,
                  torch.layout, type(Ellipsis)})
_CONTAINERS = frozenset({tuple, list, torch.Size, fx.immutable_collections.immutable_list})
_DICTS = frozenset({dict, fx.immutable_collections.immutable_dict})
# nn.Module's own instance attributes but ``training``: its tables (their contents are keyed
# as the module's tensors and submodules) and its hooks (which act on discovery only through
# the values they make, recorded in the trace)
_INTERNAL = frozenset(nn.Module().__dict__) - {"training"}


def _canon(v: Any) -> Any:
    """``v`` as a key: equal keys for values of one exact type that are equal."""
    t = type(v)
    if t in _RAW:
        return v
    if t is float:
        return (_FLOAT, repr(v))
    if t is bool:
        return (_BOOL, v)
    if t is fx.Node:
        return (_NODE, v.name)
    if t in _CONTAINERS:
        return (t, *[_canon(u) for u in v])
    if t is TensorMeta:
        return v  # a frozen (shape, dtype)
    if t is slice:
        return (slice, _canon(v.start), _canon(v.stop), _canon(v.step))
    if t in _DICTS:
        return (t, *[(_canon(k), _canon(u)) for k, u in v.items()])
    if callable(v) and (isinstance(v, type) or hasattr(v, "__qualname__")):
        return v  # a function or class: itself (equal only to itself)
    raise _Unkeyable(t.__name__)


def _state(model: nn.Module, tensors: dict[str, torch.Tensor]
           ) -> tuple[tuple[Any, ...], dict[int, str]]:
    first: dict[int, str] = {}
    rows = []
    param = nn.Parameter
    for key, t in tensors.items():
        owner = first.setdefault(id(t), key)
        rows.append((key, tuple(t.shape), t.dtype, type(t) is param or isinstance(t, param),
                     owner))
    return (type(model).__name__, *rows), first


def _tensor(t: Any, first: dict[int, str]) -> Any:
    key = first.get(id(t))
    if key is not None:
        return (_STATE, key)
    if isinstance(t, torch.Tensor):
        return (_TENSOR, tuple(t.shape), t.dtype)
    return _canon(t)


def _module(m: nn.Module, first: dict[int, str], rule: Any, tensor: Any = _tensor
            ) -> tuple[Any, ...]:
    """A called module's part of the key: its class, its tensors (as the rule sees them: named
    as ``named_parameters`` and ``named_buffers`` name them) and, for a form rule
    (:func:`~fxfuse.rules.registry.form_rule`, a function of the op's form and of the module
    attributes it lists), those attributes; for any other rule (or none), every attribute the
    module holds itself, and its submodules'."""
    tensors = tuple([(name, tensor(t, first)) for name, t in _named_tensors(m)])
    attrs = form_attrs(rule) if rule is not None else None
    if attrs is not None:
        return (type(m), tensors, *[(a, _canon(getattr(m, a, None))) for a in attrs])
    return (type(m), tensors, _attributes(m))


def _attributes(m: nn.Module) -> tuple[Any, ...]:
    rows: list[Any] = [type(m)]
    for name, v in m.__dict__.items():
        if name not in _INTERNAL:
            rows.append((name, _canon(v)))
    rows.append(tuple(sorted(m._non_persistent_buffers_set)))
    rows.append(tuple([(name, None if sub is None else _attributes(sub))
                       for name, sub in m._modules.items()]))
    return tuple(rows)


class _Key:
    """A key tuple with its hash computed once (a tuple hashes all of itself on every lookup)."""

    __slots__ = ("rows", "hash")

    def __init__(self, rows: tuple[Any, ...]) -> None:
        self.rows = rows
        self.hash = hash(rows)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return (type(other) is _Key and self.hash == other.hash
                and self.rows == other.rows)  # type: ignore[attr-defined]


def seen(model: nn.Module, gm: GraphTrace, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a model of this one's outline (class, node count, state_dict size) was discovered
    before; it counts as seen from now on.  The first discovery of an architecture is neither
    keyed nor kept (it does not pay for a key), its second is."""
    outline = (type(model), len(gm.graph.nodes), len(tensors))
    if outline not in _SEEN:
        _SEEN[outline] = None
        if len(_SEEN) > _SEEN_KEPT:
            _SEEN.popitem(last=False)
        return False
    _SEEN.move_to_end(outline)
    return True


def form_key(model: nn.Module, gm: GraphTrace, tensors: dict[str, torch.Tensor],
             options: tuple[Any, ...]) -> _Key | None:
    """:func:`value_key`, where a model of this one's outline was discovered before
    (:func:`seen`, which this call counts), else None."""
    return value_key(model, gm, tensors, options) if seen(model, gm, tensors) else None


def value_key(model: nn.Module, gm: GraphTrace, tensors: dict[str, torch.Tensor],
              options: tuple[Any, ...]) -> _Key | None:
    """The key of a discovery of ``model`` from its recorded symbolic trace ``gm``
    (``tensors``: its state_dict, keep_vars), or None where it has no exact one."""
    try:
        return _key(model, gm, tensors, [options], None)
    except _Unkeyable:
        return None


def shape_key(model: nn.Module, gm: GraphTrace, tensors: dict[str, torch.Tensor],
              inputs: Sequence[Any], options: tuple[Any, ...]) -> _Key | None:
    """The key of a discovery of ``model`` from its symbolic trace ``gm`` *before* its values are
    recorded on ``inputs``, where every op of the trace records a value that is a function of its
    arguments' shapes and dtypes (see the module's docstring), else None.  A discovery is kept
    under it only where its recording confirms that (:func:`shapes_suffice`); else under its
    :func:`value_key`."""
    context = _shape_context()
    if context is None:
        return None
    try:
        return _key(model, gm, tensors, [options, _SHAPES, context,
                                         tuple([_input(v) for v in inputs])], _shape_op)
    except _Unkeyable:
        return None


def _key(model: nn.Module, gm: GraphTrace, tensors: dict[str, torch.Tensor], rows: list[Any],
         shape_op: Any) -> _Key:
    """The rows of a key: ``rows``, the state, then one per node (its recorded value where
    ``shape_op`` is None; else ``shape_op(node, module)`` vets each op, raising _Unkeyable)."""
    tensor = _tensor if shape_op is None else _shape_tensor
    try:
        state, first = _state(model, tensors)
        rows.append(state)
        if shape_op is not None:  # where each runs: a view needs the strides, an op one device
            rows.append(tuple([_layout(t) for t in tensors.values()]))
        fetch = attribute_reader(gm.root)
        for node in gm.graph.nodes:
            op, target = node.op, node.target
            row: list[Any] = [node.name, op, _canon(node.args), _canon(node.kwargs)]
            if shape_op is None:
                row.append(_canon(node.meta.get(VALUE, _MISSING)))
            if op == "call_module":
                mod = fetch(str(target))
                rule = lookup(type(mod))
                if shape_op is None:
                    row += [target, rule, _module(mod, first, rule)]
                else:
                    shape_op(node, mod)  # the output's shape: from every attribute the module holds
                    row += [target, rule, _module(mod, first, None, tensor)]
            elif op == "get_attr":
                row += [target, tensor(fetch(str(target)), first)]
            elif op == "call_function" or op == "call_method":
                if shape_op is not None:
                    shape_op(node, None)
                row += [_canon(target), lookup(canonical(target))]
            else:
                row.append(target)
            rows.append(tuple(row))
        return _Key(tuple(rows))
    except (TypeError, AttributeError) as exc:
        raise _Unkeyable(type(exc).__name__) from None


# -- keys from the trace alone ------------------------------------------------------------------
# Ops whose output's shape and dtype (and a Python value they return) are a function of their
# arguments' shapes, dtypes and Python values, never of tensor data.  Not here (so keyed after the
# recording): data-dependent shapes (nonzero, masked_select, unique, boolean indexing), Python
# values read from tensors (item, tolist), any user function or module.
SHAPE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.neg, operator.pos, operator.pow, operator.matmul, operator.getitem,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.matmul, torch.bmm, torch.einsum,
    torch.cat, torch.stack, torch.flatten, torch.transpose, torch.permute, torch.reshape,
    torch.split, torch.chunk, torch.unsqueeze, torch.squeeze, torch.mean, torch.sum,
    torch.sigmoid, torch.tanh, torch.relu, torch.softmax,
    F.relu, F.gelu, F.silu, F.glu, F.sigmoid, F.tanh, F.softmax, F.dropout, F.linear, F.conv1d,
    F.conv2d, F.conv3d, F.layer_norm, F.group_norm, F.scaled_dot_product_attention,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d,
})
SHAPE_METHODS: frozenset[str] = frozenset({
    "add", "sub", "mul", "div", "neg", "matmul", "chunk", "split", "contiguous", "expand",
    "expand_as", "flatten", "mean", "sum", "permute", "reshape", "size", "dim", "transpose",
    "unsqueeze", "squeeze", "view", "view_as", "softmax", "relu", "sigmoid", "tanh", "float",
})
# exact classes (a subclass may compute anything), without hooks
SHAPE_MODULES: frozenset[type] = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Softmax, nn.Identity, nn.Dropout,
    nn.Flatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.Embedding, nn.MultiheadAttention,
})
_PLAIN = frozenset({torch.Tensor, nn.Parameter})
_SHAPES = object()  # tags a shape key's first rows (never equal to a value key's)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "T", "mT"})


def _shape_op(node: fx.Node, module: nn.Module | None) -> None:
    if module is not None:  # a forward set on the instance may compute anything
        ok = (type(module) in SHAPE_MODULES and "forward" not in module.__dict__
              and not any(getattr(module, h) for h in _HOOKS))
    elif node.target is builtins.getattr:  # x.shape, x.dtype: not x.device (not in the key)
        ok = len(node.args) == 2 and node.args[1] in _SHAPE_ATTRIBUTES
    elif node.op == "call_function":
        ok = node.target in SHAPE_FUNCTIONS
    else:
        ok = node.target in SHAPE_METHODS
    if not ok:
        raise _Unkeyable(str(node.target))


def _shape_context() -> tuple[Any, ...] | None:
    """What besides the inputs the recorded shapes and dtypes can depend on (torch's default
    dtype), or None where something may change them that the key does not hold (autocast, a
    torch function or dispatch mode, a global module hook)."""
    mod = nn.modules.module
    any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)  # every device type
    autocast = (any_autocast() if any_autocast is not None
                else torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))
    if (autocast or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0
            or mod._global_forward_hooks or mod._global_forward_pre_hooks):
        return None
    return (torch.get_default_dtype(),)


def _input(v: Any) -> Any:
    """An example input as a shape key holds it: a tensor by shape, dtype, strides and device
    (:func:`_layout`), containers by their items, any other value exactly."""
    if isinstance(v, torch.Tensor):
        return (_TENSOR, tuple(v.shape), v.dtype, *_layout(v))
    if type(v) in _CONTAINERS:
        return (type(v), *[_input(u) for u in v])
    return _canon(v)


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    """Where a plain strided tensor's elements are (whether a view of it runs) and its device
    (whether an op with it runs); a tensor subclass, a sparse or other layout has no shape key
    (it may compute anything, or has no strides)."""
    if type(t) not in _PLAIN or t.layout is not torch.strided:
        raise _Unkeyable(type(t).__name__)
    return (t.stride(), t.device)


def _shape_tensor(t: Any, first: dict[int, str]) -> Any:
    """:func:`_tensor` for a shape key: a state entry by its key (the state's rows hold its
    shape, dtype, strides and device), any other tensor (a non-persistent buffer, a constant)
    by its shape, dtype, strides and device."""
    row = _tensor(t, first)
    if isinstance(t, torch.Tensor) and id(t) not in first:
        return (*row, *_layout(t))
    return row


def shapes_suffice(gm: GraphTrace) -> bool:
    """After the recording: whether the values :func:`shape_key` leaves out follow from the
    shapes.  They do not where an op's argument after its first (the tensor it acts on) is an
    integer or boolean tensor (its *values* may be a size, a dim, a count: ``x.view(n, self.heads,
    -1)`` with a 0-dim buffer; a mask), or where an index holds any tensor (a boolean mask makes
    a data-dependent shape, an integer one reads values).  (Two models with one shape key record
    the same kinds of argument: every value before them is the same, node by node.)"""
    for node in gm.graph.nodes:
        if node.op not in _CALLS:
            continue
        found: list[fx.Node] = []
        fx.node.map_arg((node.args[1:], node.kwargs), found.append)
        test = _any_tensor if node.target is operator.getitem else _integer_tensor
        if any(_holds(n.meta.get(VALUE), test) for n in found):
            return False
    return True


_CALLS = frozenset({"call_function", "call_method", "call_module"})


def _any_tensor(meta: TensorMeta) -> bool:
    return True


def _integer_tensor(meta: TensorMeta) -> bool:
    return not (meta.dtype.is_floating_point or meta.dtype.is_complex)


def _holds(v: Any, test: Any) -> bool:
    """Whether a recorded value holds a tensor (its TensorMeta) that ``test`` accepts."""
    if type(v) is TensorMeta:
        return bool(test(v))
    if isinstance(v, (tuple, list)):
        return any(_holds(u, test) for u in v)
    if isinstance(v, dict):
        return any(_holds(u, test) for u in v.values())
    return False


def cached(key: _Key | None) -> PermutationSpec | None:
    """A copy of the spec kept under ``key``, if any."""
    if key is None:
        return None
    spec = _SPECS.get(key)
    if spec is None:
        return None
    _SPECS.move_to_end(key)
    return _copy(spec)


def keep(key: _Key | None, spec: PermutationSpec) -> None:
    """Keep a copy of ``spec`` under ``key`` (a spec without cuts, probes or notes)."""
    if key is None or spec.cuts or spec.probed or spec.notes:
        return
    _SPECS[key] = _copy(spec)
    _SPECS.move_to_end(key)
    while len(_SPECS) > _KEPT:
        _SPECS.popitem(last=False)


def clear() -> None:
    """Forget every kept spec and every outline seen (the next discovery of each model relates
    its axes again, and is not kept: the one after it is)."""
    _SPECS.clear()
    _SEEN.clear()


def _copy(spec: PermutationSpec) -> PermutationSpec:
    """``spec`` with fresh lists and dicts, sharing its immutable parts."""
    groups = [Group(g.name, g.size, list(g.members), g.joined_by) for g in spec.groups]
    return PermutationSpec(groups, dict(spec.axes), list(spec.cuts), spec.model, spec.tracer,
                           dict(spec.activations), dict(spec.roles), spec.buffers,
                           list(spec.probed), spec.notes)
