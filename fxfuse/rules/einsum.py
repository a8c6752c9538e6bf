"""``torch.einsum``: one rule for every equation, read from the equation itself.

``einsum("bhqd,bhkd->bhqk", q, k)`` names every axis by a letter.  A letter kept in the output is
equivariant: permuting that index in every operand where it occurs permutes the output's axis
the same way (``Same`` over all occurrences and the output axis).  A letter summed away is
invariant: permuting it consistently in every operand leaves the sum unchanged (``Same`` over
its occurrences; ``Free`` where it occurs once).  A letter repeated inside one operand (a
diagonal, ``"ii->i"``) joins both axes.  Operand axes of size 1 broadcast and need no
permutation.  The ellipsis ``...`` covers the remaining axes, right-aligned and broadcast like
elementwise operands; without ``->`` the output is, as in NumPy, the ellipsis followed by the
letters that occur once, in alphabetical order.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from .registry import AxisRef, Free, OpView, Relation, TensorHandle, axis_rule, decline, same

aten = torch.ops.aten
ELLIPSIS = "."  # one character for "..." once parsed


def parse_equation(equation: str, ndims: list[int]) -> tuple[list[str], str]:
    """Each operand's axis labels (``.`` for an ellipsis axis, one per axis) and the output's.

    >>> parse_equation("bij,bjk->bik", [3, 3])
    (['bij', 'bjk'], 'bik')
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise decline(f"equation {equation!r} names {len(terms)} operands, {len(ndims)} given")
    for term in [*terms, rhs]:
        if term.replace("...", "").replace(".", "x") != term.replace("...", "") or (
                not term.replace("...", "").isalpha() and term.replace("...", "")):
            raise decline(f"equation {equation!r} is not letters and '...'")
    labels: list[str] = []
    ell = 0
    for term, nd in zip(terms, ndims):
        letters = term.replace("...", "")
        if term.count("...") > 1 or ("..." not in term and len(letters) != nd) or len(letters) > nd:
            raise decline(f"term {term!r} does not fit a {nd}-d operand")
        k = nd - len(letters)
        ell = max(ell, k)
        labels.append(term.replace("...", ELLIPSIS * k))
    if not arrow:
        counts = Counter(c for t in terms for c in t.replace("...", ""))
        rhs = ("..." if ell else "") + "".join(sorted(c for c, n in counts.items() if n == 1))
    if rhs.count("...") > 1:
        raise decline(f"output {rhs!r} has two ellipses")
    return labels, rhs.replace("...", ELLIPSIS * ell)


def einsum_relations(equation: str, operands: list[TensorHandle], y: TensorHandle
                     ) -> list[Relation]:
    labels, out = parse_equation(equation, [t.ndim for t in operands])
    if len(out) != y.ndim:
        raise decline(f"output labels {out!r} do not fit a {y.ndim}-d result")
    ell = out.count(ELLIPSIS) if ELLIPSIS in out else max(
        (lab.count(ELLIPSIS) for lab in labels), default=0)
    # every axis by its index: a letter, or ("...", k) for ellipsis axis k counted from the right
    occurrences: dict[Any, list[tuple[AxisRef, int]]] = {}
    sizes: dict[Any, int] = {}

    def key(labs: str, d: int) -> Any:
        c = labs[d]
        if c != ELLIPSIS:
            return c
        return ("...", labs.count(ELLIPSIS) - labs[: d + 1].count(ELLIPSIS))

    for t, labs in zip(operands, labels):
        for d in range(t.ndim):
            k = key(labs, d)
            sizes[k] = max(sizes.get(k, 1), t.shape[d])
            occurrences.setdefault(k, []).append((t[d], t.shape[d]))
    rels: list[Relation] = []
    out_axis = {key(out, d): d for d in range(y.ndim)}
    if ell and ELLIPSIS in out and out.count(ELLIPSIS) < max(lab.count(ELLIPSIS) for lab in labels):
        raise decline("output ellipsis shorter than an operand's")
    for k, axes in occurrences.items():
        full = [a for a, n in axes if n == sizes[k] and n > 1]
        if any(n not in (1, sizes[k]) for _, n in axes):
            raise decline(f"index {k!r} has sizes that do not broadcast")
        if k in out_axis:
            rels += same(y[out_axis[k]], *full) if full else [Free(y[out_axis[k]])]
        elif len(full) == 1:
            rels.append(Free(full[0]))
        elif full:
            rels += same(*full)
    for k, d in out_axis.items():
        if k not in occurrences and y.shape[d] > 1:
            raise decline(f"output index {k!r} occurs in no operand")
    return rels


@axis_rule(torch.einsum, aten.einsum.default)
def einsum_rule(op: OpView) -> list[Relation]:
    equation = op.arg(0, "equation")
    rest = list(op.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])  # einsum(eq, [a, b]) and aten.einsum(eq, tensors, path)
    elif op.target is aten.einsum.default:
        rest = list(op.arg(1, "tensors"))
    if not isinstance(equation, str) or not all(isinstance(t, TensorHandle) for t in rest):
        raise decline("the sublist form of einsum (operand, [axes], ...)")
    return einsum_relations(equation, rest, op.out)
