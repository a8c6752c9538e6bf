"""Interleaved sums in the layout algebra (:mod:`fxfuse.ir.layout`): normal form, unification
and cuts of ``I_k(c_0, .., c_(k-1))``, the layout of a channel shuffle of a concatenation.

Position ``i*k + j`` of ``I_k(c)`` is child ``j``'s position ``i``; a permutation of it is
``P(i*k + j) = P_j(i)*k + j``: each child permuted on its own, no position leaving its residue
class mod ``k``.  The functions here are :class:`~fxfuse.ir.layout.AtomTable`'s, for this node:

* normal form (:func:`resolve_interleave`): ``I_1(c) = c``; ``I_k(c, .., c) = c ⊗ Fixed(k)``;
  children flatten at the gcd ``m`` of their periods (an interleave's count, ``f`` for
  ``Fixed(f)`` and ``X ⊗ Fixed(f)``): ``I_K(d) = I_m(I_K/m(d_j, d_j+m, ..) for j)`` and
  ``I_k(I_m(c_j0, .., c_j(m-1)) for j) = I_km(c_jj' at j'*k + j)``; cuts common to every child
  distribute, ``I(A1 ⊕ A2, B1 ⊕ B2) = I(A1, B1) ⊕ I(A2, B2)`` for ``|A1| = |B1|``;
* ``I_k(c) = I_k'(d)`` (:func:`unify_interleaves`): both read at ``g = gcd(k, k')`` children,
  paired; coprime counts have no common refinement;
* ``I_k(c) = Y ⊗ Z`` (:func:`unify_interleave_prod`): trailing factors ``T`` with ``|T|``
  dividing ``k`` are fixed (position mod ``|T|`` is position mod ``k`` mod ``|T|``); the next,
  an atom ``z`` with ``need = k/|T|`` dividing ``|z|``, need only keep each position's residue
  mod ``need``: ``z = I_need(z_0, ..)``, so ``c_(j*|T| + t) = Y ⊗ z_j``; where the trailing
  factors make exactly ``k``, ``Z`` is fixed and every child is ``Y``;
* a cut at ``s = m*k + r`` (:func:`split_interleave`): every child cut at ``m``, and for
  ``r > 0`` the row between (one position of each child) fixed, each with the reason.
"""

from __future__ import annotations

from math import gcd
from typing import TYPE_CHECKING, Any

from .layout import Atom, Fixed, Interleave, Layout, Prod, Reason, Sum, _also

if TYPE_CHECKING:
    from .layout import AtomTable


def resolve_interleave(t: AtomTable, lay: Interleave) -> Layout:
    parts = [t.resolve(p) for p in lay.parts]
    k = len(parts)
    if k == 1:
        return parts[0]
    m = 0
    for p in parts:
        m = gcd(m, _period(p))
    if m > 1:  # I_k(I_m(c_j.) for j) = I_km(c_jj' at j'*k + j), m the children's gcd period
        views = [_as_interleave(p, m) for p in parts]
        return t.resolve(Interleave(tuple(v[jj] for jj in range(m) for v in views)))
    if all(p == parts[0] for p in parts):  # I_k(c, .., c) = c ⊗ Fixed(k)
        return t.resolve(Prod((parts[0], Fixed(k))))
    n = t.size(parts[0])
    common = set(range(1, n))
    for p in parts:
        common &= _free_cuts(t, p)
    if common:  # I(A1 ⊕ A2, B1 ⊕ B2) = I(A1, B1) ⊕ I(A2, B2)
        cuts = sorted(common)
        pieces = [_cut_at(t, p, cuts) for p in parts]
        return t.resolve(Sum(tuple(Interleave(tuple(pc[i] for pc in pieces))
                                      for i in range(len(cuts) + 1))))
    return Interleave(tuple(parts))


def _free_cuts(t: AtomTable, p: Layout) -> set[int]:
    """Positions ``0 < s < |p|`` where ``p`` (resolved) is a sum of two layouts as it stands:
    between the blocks of a sum, anywhere inside a ``Fixed``."""
    out: set[int] = set()
    off = 0
    for q in p.parts if isinstance(p, Sum) else (p,):
        n = t.size(q)
        if off:
            out.add(off)
        if isinstance(q, Fixed):
            out.update(range(off + 1, off + n))
        off += n
    return out


def _cut_at(t: AtomTable, p: Layout, cuts: list[int]) -> list[Layout]:
    """``p`` (resolved) cut at free cuts (:meth:`_free_cuts`): ``len(cuts) + 1`` pieces."""
    blocks: list[list[Layout]] = [[]]
    off, i = 0, 0
    for q in p.parts if isinstance(p, Sum) else (p,):
        n = t.size(q)
        if isinstance(q, Fixed):
            start = off
            while i < len(cuts) and cuts[i] < off + n:
                if cuts[i] > start:
                    blocks[-1].append(Fixed(cuts[i] - start))
                blocks.append([])
                start = cuts[i]
                i += 1
            blocks[-1].append(Fixed(off + n - start))
        else:
            if i < len(cuts) and cuts[i] == off:
                blocks.append([])
                i += 1
            blocks[-1].append(q)
        off += n
    return [b[0] if len(b) == 1 else Sum(tuple(b)) for b in blocks]


def unify_interleaves(t: AtomTable, a: Interleave, b: Interleave, why: Reason) -> None:
    """Children pairwise, after reading the one with more children as an interleave of the
    other's count (``I_km(d) = I_k(I_m(d_j, d_j+k, ..) for j)``); counts with no common factor
    have no common refinement here."""
    ka, kb = len(a.parts), len(b.parts)
    k = gcd(ka, kb)
    if k == 1:
        t._conflict(a, b, why)
        return
    xs, ys = _regroup(a.parts, k), _regroup(b.parts, k)
    for x, y in zip(xs, ys):
        t.unify(x, y, why)


def unify_interleave_prod(t: AtomTable, a: Interleave, b: Prod, why: Reason) -> None:
    """``I_k(c) = Y ⊗ Z`` with ``|Z| = k``: ``P_Z`` would move a position to another child, so
    ``Z`` is fixed and every child is ``Y``.  Trailing factors ``T`` with ``|T|`` dividing
    ``k`` are consumed (and fixed: position mod ``|T|`` is position mod ``k`` mod ``|T|``);
    where the next one, an atom ``z``, is larger and ``need = k / |T|`` divides ``|z|``,
    ``P_z`` need only keep each position's residue mod ``need``: ``z`` is refined into
    ``I_need(z_0, .., z_need-1)`` and the sides unified again, the normal form reading
    ``Y ⊗ I(z) ⊗ T`` as ``I_k(Y ⊗ z_j repeated |T| times)``.  A larger ``Fixed`` is split."""
    k = len(a.parts)
    parts = list(b.parts)
    need, i = k, len(parts)
    while need > 1 and i > 0:
        f = t.size(parts[i - 1])
        if need % f == 0:
            need //= f
            i -= 1
            continue
        z = parts[i - 1]
        if isinstance(z, Atom) and f % need == 0:
            if i < len(parts):
                t.fix(Prod(tuple(parts[i:])), _between_blocks(why))
            t._refine(z.id, Interleave(tuple(t.new(f // need) for _ in range(need))),
                         why)
            t.unify(a, b, why)
            return
        pieces = t._split_prod(z, f // need) if f % need == 0 else None
        if pieces is None:
            t._conflict(a, b, why)
            return
        parts[i - 1: i] = list(pieces)
        need = 1
    if need > 1:  # pragma: no cover - |b| = k * |child| is a multiple of k
        t._conflict(a, b, why)
        return
    t.fix(Prod(tuple(parts[i:])), _between_blocks(why))
    head = Prod(tuple(parts[:i]))
    for c in a.parts:
        t.unify(c, head, why)


def _between_blocks(why: Reason) -> Reason:
    detail = _also(why, "an interleaved axis is also a product: the factor that would move "
                        "positions between the interleaved blocks is fixed")
    return Reason("conflict", why.node, why.op, detail, why.source)


def split_interleave(t: AtomTable, y: Interleave, s: int, why: Reason | None = None
                     ) -> tuple[Layout, Layout] | None:
    """``I_k(c)`` cut at ``s = m*k + r``: every child cut at ``m``; for ``r > 0`` also at
    ``m + 1``, the row between (one position of each child) fixed:
    ``I(c) = I(c[:m]) ⊕ c_0[m] ⊕ .. ⊕ c_k-1[m] ⊕ I(c[m+1:])``, cut after ``c_r-1[m]``.  The
    row's pieces are size-1 atoms (fixed, with the reason, for every axis that holds them) or
    ``Fixed(1)`` where the child was fixed there already."""
    k = len(y.parts)
    n = t.size(y.parts[0])
    m, r = divmod(s, k)
    heads: list[Layout] = []
    tails: list[Layout] = []
    row: list[Layout] = []  # the row the cut falls in, one position of each child
    for c in y.parts:
        head: Layout | None = None
        tail: Layout | None = c
        if m:
            pieces = t._split_any(c, m, why)
            if pieces is None:
                return None
            head, tail = pieces
        if r and m + 1 < n:
            assert tail is not None
            pieces = t._split_any(tail, 1, why)  # a size-1 piece resolves to Fixed(1)
            if pieces is None:
                return None
            row.append(pieces[0])
            tail = pieces[1]
        elif r:  # the cut is in the last row: the tail is that row's position
            assert tail is not None
            row.append(tail)
            tail = None
        if head is not None:
            heads.append(head)
        if tail is not None:
            tails.append(tail)
    if why is not None:  # say why the positions left alone in their block stay fixed
        detail = _also(why, "a split of an interleaved axis (inside a row, or into blocks of "
                            "one position) fixes those positions")
        fixed = Reason("conflict", why.node, why.op, detail, why.source)
        for root in t._raw_roots(Sum(tuple(heads + row + tails))):
            if t._size[root] == 1 and t._fixed[root] is None:
                t._fixed[root] = fixed
                t._any_cut = True
                if t._rows is not None:
                    t._rows.append(root)
    first = [Interleave(tuple(heads))] if heads else []
    rest = [Interleave(tuple(tails))] if tails else []
    if r:
        return Sum((*first, *row[:r])), Sum((*row[r:], *rest))
    return first[0], rest[0]


def _period(p: Layout) -> int:
    """The ``m`` for which :func:`_as_interleave` reads ``p`` (resolved) as ``I_m`` (and so as
    ``I_d`` for every ``d | m``): its count for an interleave, ``f`` for ``Fixed(f)`` and
    ``X ⊗ Fixed(f)`` (``m`` equal children ``X ⊗ Fixed(f/m)``), 1 for anything else."""
    if isinstance(p, Interleave):
        return len(p.parts)
    if isinstance(p, Fixed):
        return p.n
    if isinstance(p, Prod) and isinstance(p.parts[-1], Fixed):
        return p.parts[-1].n
    return 1


def _as_interleave(p: Layout, m: int) -> tuple[Layout, ...]:
    """``p`` (resolved, ``m`` dividing :func:`_period`) read as an interleave of ``m`` children:
    ``I_K(d) = I_m(I_K/m(d_j, d_j+m, ..) for j)``, ``X ⊗ Fixed(f) = I_m(X ⊗ Fixed(f/m), ..)``."""
    if isinstance(p, Interleave):
        return _regroup(p.parts, m)
    if isinstance(p, Fixed):
        return (Fixed(p.n // m),) * m
    assert isinstance(p, Prod) and isinstance(p.parts[-1], Fixed)
    return (Prod(p.parts[:-1] + (Fixed(p.parts[-1].n // m),)),) * m


def _regroup(parts: tuple[Any, ...], k: int) -> tuple[Any, ...]:
    """The children of ``I_{k*m}(parts)`` read as ``I_k(I_m(..))``: child ``j`` of the outer
    interleave is ``I_m(parts[j], parts[j + k], ..)``."""
    m = len(parts) // k
    if m == 1:
        return parts
    return tuple(Interleave(tuple(parts[jj * k + j] for jj in range(m))) for j in range(k))
