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
type, a tensor argument): then nothing is kept.  Every leaf value is
tagged with its exact type (``1``, ``1.0`` and ``True`` are three keys; a float by its
``repr``, so ``-0.0`` and ``nan`` are themselves), containers with theirs.  Only discoveries
without cuts, probes or notes are kept (those name source lines or compare traces), from a
model's second discovery (the first of an outline, class, node count and state_dict size, is
neither keyed nor kept: a new architecture does not pay for its key), in a bounded table (least
recently used out); a kept spec is copied out and in (a caller may change
its lists and dicts), sharing its immutable parts (members, layout trees, axis specs).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
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


def _module(m: nn.Module, first: dict[int, str], rule: Any) -> tuple[Any, ...]:
    """A called module's part of the key: its class, its tensors (as the rule sees them: named
    as ``named_parameters`` and ``named_buffers`` name them) and, for a form rule
    (:func:`~fxfuse.rules.registry.form_rule`, a function of the op's form and of the module
    attributes it lists), those attributes; for any other rule (or none), every attribute the
    module holds itself, and its submodules'."""
    tensors = tuple([(name, _tensor(t, first)) for name, t in _named_tensors(m)])
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


def form_key(model: nn.Module, gm: GraphTrace, tensors: dict[str, torch.Tensor],
             options: tuple[Any, ...]) -> _Key | None:
    """The key of a discovery of ``model`` from its recorded symbolic trace ``gm``
    (``tensors``: its state_dict, keep_vars), or None where it has no exact one, or where no
    model of its outline (class, node count, state_dict size) was discovered before: the first
    discovery of an architecture is not keyed (nor kept), its second is."""
    outline = (type(model), len(gm.graph.nodes), len(tensors))
    if outline not in _SEEN:
        _SEEN[outline] = None
        if len(_SEEN) > _SEEN_KEPT:
            _SEEN.popitem(last=False)
        return None
    _SEEN.move_to_end(outline)
    try:
        state, first = _state(model, tensors)
        rows: list[Any] = [options, state]
        fetch = attribute_reader(gm.root)
        for node in gm.graph.nodes:
            op, target = node.op, node.target
            row: list[Any] = [node.name, op, _canon(node.args), _canon(node.kwargs),
                              _canon(node.meta.get(VALUE, _MISSING))]
            if op == "call_module":
                mod = fetch(str(target))
                rule = lookup(type(mod))
                row += [target, rule, _module(mod, first, rule)]
            elif op == "get_attr":
                row += [target, _tensor(fetch(str(target)), first)]
            elif op == "call_function" or op == "call_method":
                row += [_canon(target), lookup(canonical(target))]
            else:
                row.append(target)
            rows.append(tuple(row))
        return _Key(tuple(rows))
    except (_Unkeyable, TypeError, AttributeError):
        return None


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
