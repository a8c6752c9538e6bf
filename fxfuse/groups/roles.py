"""Member roles: how an alignment map acts on each parameter axis a group touches.

A group's map ``(M, U)`` (:mod:`fxfuse.maps`) acts on an axis by its role:

* ``out``: the axis carries the group's units as the op *produces* them (a Linear/Conv weight's
  output rows, its bias, a norm's affine, BatchNorm's running mean, a layer scale): ``M @ rows``;
* ``in``: the axis is *contracted* with the group's units of an input activation (a Linear/Conv
  weight's input columns): ``U^T @ rows``;
* ``second:<mean key>``: a second-moment statistic of the units (BatchNorm's running variance),
  merged as a mixture with its mean (see :mod:`fxfuse.maps`);
* ``conflict``: uses disagree (a weight tied between an embedding and an output head): only a
  permutation can act on it.

Roles are derived from the axis rules, not from layer classes: at every op that reads a parameter
next to an activation, a parameter axis the rule relates (directly, or through one of the rule's
own new atoms) to an axis of the op's output is output-side; one related only to an activation
input is input-side.  An op whose inputs are all parameters (``t``, ``view``, ``chunk`` of a
weight in an exported graph) is a view: its axes inherit the parameter axes they relate to, and
the role is decided where the view meets an activation.  The small :data:`ROLE_TABLE` covers ops
whose rules relate parameters only to internal atoms (packed attention), and
:data:`SECOND_MOMENTS` the statistics that are variances.  Permutations need no roles (``M`` and
``U^T`` are the same index map), so an axis without a role only stops dense maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..rules import AxisRef, NewAxis, Same

OUT, IN, SECOND, CONFLICT = "out", "in", "second", "conflict"

# per axis of a tensor handle: the (state_dict key, axis) pairs it is a view of
Origins = tuple[frozenset[tuple[str, int]], ...]

# module class -> {(parameter name, axis): role}: ops whose rule relates these axes only to atoms
# of its own (the heads of a packed attention)
ROLE_TABLE: dict[type[nn.Module], dict[tuple[str, int], str]] = {
    nn.MultiheadAttention: {
        ("in_proj_weight", 0): OUT, ("in_proj_weight", 1): IN, ("in_proj_bias", 0): OUT,
        ("q_proj_weight", 0): OUT, ("q_proj_weight", 1): IN,
        ("k_proj_weight", 0): OUT, ("k_proj_weight", 1): IN,
        ("v_proj_weight", 0): OUT, ("v_proj_weight", 1): IN,
        ("bias_k", 2): OUT, ("bias_v", 2): OUT,
        ("out_proj.weight", 0): OUT, ("out_proj.weight", 1): IN, ("out_proj.bias", 0): OUT,
    },
}

# statistics that are second moments of the units, and the first moment beside them (torch's
# _BatchNorm / _InstanceNorm buffers)
SECOND_MOMENTS = {"running_var": "running_mean"}


def role_table(module: nn.Module | None) -> dict[tuple[str, int], str]:
    if module is None:
        return {}
    for cls, table in ROLE_TABLE.items():
        if isinstance(module, cls):
            return table
    return {}


def _refs(e: Any, out: list[tuple[Any, Any]] | None = None) -> list[tuple[Any, Any]]:
    """The (tensor, axis) pairs and ("new", key) atoms an axis expression mentions, in order."""
    out = [] if out is None else out
    if isinstance(e, AxisRef):
        out.append((e.tensor, e.axis))
    elif isinstance(e, NewAxis):
        out.append(("new", e.key))
    else:
        for p in getattr(e, "parts", ()):
            _refs(p, out)
    return out


def _link(edges: dict[tuple[Any, Any], set[tuple[Any, Any]]], a: list[Any], b: list[Any]) -> None:
    """Edges from every ref of ``a`` to every ref of ``b``, and back."""
    for x in a:
        edges.setdefault(x, set()).update(b)
    for y in b:
        edges.setdefault(y, set()).update(a)


def _closure(ident: dict[tuple[Any, Any], set[tuple[Any, Any]]],
             start: Iterable[tuple[Any, Any]]) -> set[tuple[Any, Any]]:
    """Everything ``start`` reaches by identity edges."""
    seen = set(start)
    todo = list(seen)
    while todo:
        for u in ident.get(todo.pop(), ()):
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def related_axes(relations: Iterable[Any], wanted: Iterable[tuple[Any, Any]] | None = None
                 ) -> dict[tuple[Any, Any], set[tuple[Any, Any]]]:
    """(tensor, axis) -> the tensor axes one rule application relates it to as a whole (for the
    ``wanted`` axes only, when given: each is a search of its own).

    ``Same(x, y)`` between two single axes (or rule-local atoms) is an identity edge; a ``Same``
    whose side is a product or sum relates each part to the other side as a *factor* edge.  An
    axis reaches its identity class, plus one factor step from it (and that side's identity
    class), never a second factor step sideways: a grouped conv's ``Prod(groups, w[1]) = x[1]``
    and ``Prod(groups, w[0] / groups) = out[1]`` relate ``w[1]`` to ``x[1]``, not to the output.
    """
    ident: dict[tuple[Any, Any], set[tuple[Any, Any]]] = {}
    factor: dict[tuple[Any, Any], set[tuple[Any, Any]]] = {}
    equal_to: dict[Any, set[tuple[Any, Any]]] = {}  # axes set equal to one whole expression

    for r in relations:
        if not isinstance(r, Same):
            continue
        a, b = _refs(r.a), _refs(r.b)
        single_a, single_b = not hasattr(r.a, "parts"), not hasattr(r.b, "parts")
        _link(ident if single_a and single_b else factor, a, b)
        if single_b and not single_a:  # an expression set equal to one axis
            equal_to.setdefault(r.a, set()).update(b)
        elif single_a and not single_b:
            equal_to.setdefault(r.b, set()).update(a)
    for equal in equal_to.values():  # same(Prod(g, n), y[1], w[0], b[0]): y[1] = w[0] = b[0]
        _link(ident, list(equal), list(equal))

    out: dict[tuple[Any, Any], set[tuple[Any, Any]]] = {}
    known = {*ident, *factor}
    for ref in known if wanted is None else known.intersection(wanted):
        if ref[0] == "new":
            continue
        cls = _closure(ident, [ref])
        reach = cls | _closure(ident, {u for x in cls for u in factor.get(x, ())})
        out[ref] = {u for u in reach if u[0] != "new" and u != ref}
        out[ref].discard(ref)
    return out


def axis_classes(relations: Iterable[Any]) -> dict[tuple[Any, Any], list[tuple[Any, Any]]] | None:
    """The identity classes of a rule application whose ``Same`` relations all join single axes
    (or rule-local atoms): ref -> every ref of its class, itself included.  There
    :func:`related_axes` relates an axis to exactly the other axes of its class (no factor
    edges), so the class is the answer without a search per axis.  None where a side is a
    product, sum or interleave."""
    parent: dict[tuple[Any, Any], tuple[Any, Any]] = {}
    for r in relations:
        if not isinstance(r, Same):
            continue
        if hasattr(r.a, "parts") or hasattr(r.b, "parts"):
            return None
        refs = _refs(r.a) + _refs(r.b)
        if len(refs) < 2:
            continue
        x, y = _class_root(parent, refs[0]), _class_root(parent, refs[1])
        if x != y:
            parent[x] = y
    members: dict[tuple[Any, Any], list[tuple[Any, Any]]] = {}
    for ref in parent:
        members.setdefault(_class_root(parent, ref), []).append(ref)
    return {ref: members[_class_root(parent, ref)] for ref in parent}


def _class_root(parent: dict[tuple[Any, Any], tuple[Any, Any]], ref: tuple[Any, Any]
                ) -> tuple[Any, Any]:
    root = parent.setdefault(ref, ref)
    while parent[root] != root:
        root = parent[root]
    return root


def finish_roles(seen: Mapping[tuple[str, int], set[str | None]],
                 aliases: Mapping[str, list[str]]) -> dict[tuple[str, int], str]:
    """One role per (state_dict key, axis), for every alias of a tied tensor."""
    out: dict[tuple[str, int], str] = {}
    for (key, axis), roles in seen.items():
        known = {r for r in roles if r is not None}
        if not known:
            continue
        role = known.pop() if len(known) == 1 else CONFLICT
        leaf = key.rsplit(".", 1)[-1]
        if role == OUT and leaf in SECOND_MOMENTS:
            role = f"{SECOND}:{key[: len(key) - len(leaf)]}{SECOND_MOMENTS[leaf]}"
        for alias in aliases.get(key, [key]):
            out[(alias, axis)] = role
    return out
