"""The axis-rule table: how each op relates the axes of its inputs, parameters and outputs.

A rule is a small pure function ``rule(op: OpView) -> list[Relation]``, registered for one or more
fx targets with :func:`axis_rule` (``call_function`` targets are the function objects,
``call_method`` targets the method name string, ``call_module`` targets the module class).

A rule states the op's equivariance: if every input/parameter axis is permuted as the relations
say, the output is permuted as they say.  Relations are

* ``Same(a, b)``: axis expressions ``a`` and ``b`` carry the same permutation.  Expressions are
  ``op.x[d]`` (axis ``d`` of a tensor handle), ``Prod(...)``/``Sum(...)``/``Interleave(...)`` of
  expressions (see
  :mod:`fxfuse.ir.layout`) and ``op.new(key, n)`` (a fresh atom local to this op application);
* ``Free(a)``: the op is *invariant* to permuting ``a`` (a reduced or shape-only axis);
* ``Cut(a, why)``: ``a`` can not be permuted (stays fixed), for the stated reason.

Any axis of size > 1 that a rule does not mention is cut by the driver: a rule never has to be
complete to be safe, only correct in what it claims.  :mod:`fxfuse.rules.validate` checks every rule
numerically.

A rule that does not describe a particular call (a form of the op it was not written for:
advanced indexing, an unbatched input, a packed attention with separate projections) *declines*
by raising :class:`RuleDoesNotApply` with the reason; the driver then treats the call as an op
without a rule (probe it, or cut it).  Any other exception from a rule is a bug in the rule and
surfaces as :class:`RuleError` naming the rule and the node: a rule bug is never a silent cut.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..errors import FxFuseError
from ..ir.layout import Interleave, Prod, Sum

__all__ = [
    "AxisRef",
    "Cut",
    "Free",
    "NewAxis",
    "OpView",
    "Relation",
    "Rule",
    "RuleDoesNotApply",
    "RuleError",
    "Same",
    "TensorHandle",
    "axis_rule",
    "lookup",
    "rule_table",
    "same",
]


class RuleDoesNotApply(Exception):
    """Raised by a rule for a call it does not describe (the message says why).  Not an error:
    discovery treats the call as an op without a rule (probed, or cut with this reason)."""


class RuleError(FxFuseError):
    """An axis rule raised something other than :class:`RuleDoesNotApply`, or returned
    something that is not a list of relations: a bug in the rule (message names the rule, the
    node, the op and the user's source line)."""


def decline(why: str) -> RuleDoesNotApply:
    """``raise decline("...")`` in a rule: the rule does not describe this call."""
    return RuleDoesNotApply(why)


@dataclass(frozen=True, slots=True)
class AxisRef:
    """Axis ``axis`` of the op's tensor number ``tensor``."""

    tensor: int
    axis: int


@dataclass(frozen=True, slots=True)
class NewAxis:
    """A fresh atom of ``size``, local to one op application; equal keys give the same atom.
    ``named``: the key names the groups the atom ends up in ("heads", "groups"); anonymous
    atoms (the blocks around a slice) do not."""

    key: str
    size: int
    named: bool = True


Expr = AxisRef | NewAxis | Prod | Sum | Interleave


# The relations are frozen dataclasses (values: equal, hashable, immutable) whose ``__init__``
# writes the instance dict itself: a frozen dataclass's generated one sets each field through
# ``object.__setattr__``, twice the cost, and rules build several relations per op application.
# ``dataclass`` keeps an ``__init__`` the class defines; everything else is generated.


@dataclass(frozen=True)
class Same:
    a: Expr
    b: Expr

    def __init__(self, a: Expr, b: Expr) -> None:
        d = self.__dict__
        d["a"] = a
        d["b"] = b


@dataclass(frozen=True)
class Free:
    a: Expr

    def __init__(self, a: Expr) -> None:
        self.__dict__["a"] = a


@dataclass(frozen=True)
class Cut:
    a: Expr
    why: str

    def __init__(self, a: Expr, why: str) -> None:
        d = self.__dict__
        d["a"] = a
        d["why"] = why


Relation = Same | Free | Cut


@lru_cache(maxsize=4096)
def _axis_refs(tensor: int, ndim: int) -> tuple[AxisRef, ...]:
    """The axis references of a tensor handle (immutable values, so every handle of one index
    and rank shares them: rules index axes many times, and most handles have 2-4 axes)."""
    return tuple(AxisRef(tensor, d) for d in range(ndim))


# shape -> ``tuple(map(int, shape))``, for the shapes handles were made of (equal shapes have
# equal integers, so a hit is the conversion's result); cleared when full
_INT_SHAPES: dict[tuple[Any, ...], tuple[int, ...]] = {}
_INT_SHAPES_KEPT = 4096


class TensorHandle:
    """What a rule sees of one tensor: its shape and its axes (``t[d]``, negative ``d`` allowed)."""

    __slots__ = ("index", "shape", "dtype", "ndim", "_axes")

    def __init__(self, index: int, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.index = index
        try:  # a shape seen before: its integers from the table (converting costs more)
            ints = _INT_SHAPES.get(shape)  # type: ignore[call-overload]
        except TypeError:  # an unhashable shape (a list, a symbolic size)
            ints = None
        if ints is None:
            ints = tuple(map(int, shape))
            try:
                if len(_INT_SHAPES) >= _INT_SHAPES_KEPT:
                    _INT_SHAPES.clear()
                _INT_SHAPES[shape] = ints  # type: ignore[index]
            except TypeError:
                pass
        self.shape = ints
        self.dtype = dtype
        self.ndim = n = len(ints)
        self._axes = _axis_refs(index, n)

    def __getitem__(self, d: int) -> AxisRef:
        try:  # tuple indexing accepts exactly -ndim <= d < ndim, negative d from the end
            return self._axes[operator.index(d)]  # an axis is one integer: no slices, no floats
        except IndexError:
            raise IndexError(f"axis {d} out of range for a tensor of shape {self.shape}") from None

    def axes(self) -> list[AxisRef]:
        return list(self._axes)

    def __repr__(self) -> str:
        return f"TensorHandle(#{self.index}, shape={self.shape})"


@dataclass
class OpView:
    """One op application as a rule sees it.

    ``args``/``kwargs`` are the node's arguments with every tensor replaced by a
    :class:`TensorHandle` and every other value concrete (as recorded while running the example
    inputs).  ``out`` is the single output tensor (``None`` if the op returns a tuple: see
    ``outs``).  ``module`` and ``params`` are set for ``call_module`` nodes.
    """

    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outs: list[TensorHandle]
    out_value: Any
    module: nn.Module | None = None
    params: dict[str, TensorHandle] = field(default_factory=dict)

    @property
    def out(self) -> TensorHandle:
        if len(self.outs) != 1 or not isinstance(self.out_value, TensorHandle):
            raise RuleDoesNotApply("the call does not return a single tensor")
        return self.outs[0]

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def tensors(self) -> list[TensorHandle]:
        """Every tensor argument, in order (inside lists and tuples too)."""
        out: list[TensorHandle] = []
        _tensor_handles(self.args, out)
        _tensor_handles(self.kwargs, out)
        return out

    def tensor(self, i: int, name: str) -> TensorHandle:
        """Tensor argument ``i`` / ``name``; a call without one there is not the call the rule
        describes (it declines)."""
        v = self.arg(i, name)
        if not isinstance(v, TensorHandle):
            raise RuleDoesNotApply(f"argument {name!r} is not a tensor ({type(v).__name__})")
        return v

    def param(self, name: str) -> TensorHandle | None:
        return self.params.get(name)

    def required_param(self, name: str) -> TensorHandle:
        """The called module's parameter ``name``; a module without it declines."""
        p = self.params.get(name)
        if p is None:
            raise RuleDoesNotApply(f"the module has no tensor {name!r}")
        return p

    def new(self, key: str, size: int, named: bool = True) -> NewAxis:
        return NewAxis(key, size, named)


Rule = Callable[[OpView], list[Relation]]

_RULES: dict[Any, Rule] = {}


def _tensor_handles(v: Any, out: list[TensorHandle]) -> None:
    """Append the tensor handles inside ``v`` (lists, tuples, dict values) to ``out``."""
    if isinstance(v, TensorHandle):
        out.append(v)
    elif isinstance(v, (list, tuple)):
        for u in v:
            _tensor_handles(u, out)
    elif isinstance(v, dict):
        for u in v.values():
            _tensor_handles(u, out)


def axis_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the axis rule of every target (function, method name, module class).

    Example, for a user module that scales channels by a learned vector::

        @fxfuse.axis_rule(MyScale)
        def my_scale_rule(op):
            x, y, w = op.args[0], op.out, op.param("weight")
            return [*fxfuse.rules.same(x[1], y[1], w[0]), *(Same(x[d], y[d]) for d in (0, 2, 3))]
    """

    def deco(fn: Rule) -> Rule:
        for t in targets:
            _RULES[t] = fn
        return fn

    return deco


def lookup(target: Any) -> Rule | None:
    return _RULES.get(target)


# Rules whose relations are a function of the op's *form* alone: its target (for a call_module,
# the module's class: the rule reads neither the module's path nor its other state), the
# tensors' shapes and dtypes in order, the other argument values, the parameter names and the
# module attributes listed here.  Discovery keeps their relations per form
# (:mod:`fxfuse.groups.discover`): every conv (norm, activation) of one form calls its rule once.
# Only fxfuse's own rules are marked; a rule registered by a user always runs.
_FORM_RULES: dict[Any, tuple[str, ...]] = {}


def form_rule(*module_attrs: str) -> Callable[[Rule], Rule]:
    """Mark a rule as a function of the op's form and of the module attributes ``module_attrs``
    (see :data:`_FORM_RULES`)."""

    def deco(fn: Rule) -> Rule:
        _FORM_RULES[fn] = module_attrs
        return fn

    return deco


def form_attrs(rule: Rule) -> tuple[str, ...] | None:
    """The module attributes ``rule``'s relations depend on, if it is a function of the op's
    form (:func:`form_rule`); None if its relations may depend on anything."""
    return _FORM_RULES.get(rule)


def rule_table() -> dict[Any, Rule]:
    """A copy of the rule table (target -> rule)."""
    return dict(_RULES)


def same(*exprs: Expr) -> list[Relation]:
    """``Same`` relations chaining all of ``exprs`` together."""
    return [Same(exprs[0], e) for e in exprs[1:]]


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{mod}.{name}" if mod else str(name)


def register_many(targets: Iterable[Any], fn: Rule) -> None:
    for t in targets:
        _RULES[t] = fn
