"""The dimension algebra: how a permutation acts on one tensor axis.

A tensor axis of length ``n`` is described by a *layout*, a small tree:

* ``Atom(a)``          the axis is permuted by ``P_a``, the permutation of atom class ``a``;
* ``Fixed(n)``         ``n`` positions that never move (``P = I_n``);
* ``Prod(c1, .., ck)`` row-major product of the children:  ``P = P_1 ⊗ P_2 ⊗ .. ⊗ P_k``
                       (``reshape``/``view``/``flatten``, grouped convolution, channel shuffle);
* ``Sum(c1, .., ck)``  concatenation of the children:        ``P = P_1 ⊕ P_2 ⊕ .. ⊕ P_k``
                       (``cat``, ``split``, ``chunk``, GLU);
* ``Interleave(c1, .., ck)`` the children (all of one size ``n``) interleaved: position
                       ``i*k + j`` is child ``j``'s position ``i``, ``P(i*k + j) = P_j(i)*k + j``
                       (a channel shuffle of a concatenation: each block permuted on its own).

Atoms live in a union-find table (:class:`AtomTable`).  Discovery only ever *restricts* the
permutations an atom may take, through three substitutions applied uniformly everywhere the atom
occurs:

* ``union(a, b)``:      ``P_a = P_b``;
* ``refine(a, tree)``:  ``P_a`` is the permutation that ``tree`` describes (an atom splits into a
                        product or a sum of new atoms);
* ``fix(a)``:           ``P_a = I``.

:meth:`AtomTable.unify` makes two layouts describe the same permutation by the least restrictive
combination of those substitutions it can find (the common refinement of two factorisations); when
none exists it fixes both sides and records why.  Because every step is a uniform substitution, a
constraint that held once keeps holding: discovery is sound whatever order the rules run in.

Normal form (:meth:`AtomTable.resolve`): atoms of size 1 are ``Fixed(1)``; nested products and sums
are flattened; adjacent ``Fixed`` children merge; a product whose leading factor is a sum is
distributed, ``(A ⊕ B) ⊗ C = (A ⊗ C) ⊕ (B ⊗ C)`` (true for the leading factor only).
Interleaves (``I_k(c)`` for ``Interleave(c_1, .., c_k)``): one child is the child; all children
equal is a product, ``I_k(c, .., c) = c ⊗ Fixed(k)``; children flatten at the gcd ``m`` of
their periods (an interleave's count; ``f`` for ``Fixed(f)`` and ``X ⊗ Fixed(f)``, read as ``f``
equal children; 1 otherwise), every child read as ``I_m`` (``I_K(d) = I_m(I_K/m(d_j, d_j+m, ..)
for j)``), ``I_k(I_m(c_j0, .., c_j(m-1)) for j) = I_km(c_{j, j'} at j'*k + j)``, so an interleave
is kept at its finest count; cuts common to every child
(between blocks of a sum, anywhere in a ``Fixed``) distribute,
``I(A1 ⊕ A2, B1 ⊕ B2) = I(A1, B1) ⊕ I(A2, B2)`` for ``|A1| = |B1|``; a product ending in an
interleave (or in an interleave then a ``Fixed``) is the interleave of products,
``Y ⊗ I_k(c) = I_k(Y ⊗ c_1, .., Y ⊗ c_k)`` and ``I_k(c) ⊗ Fixed(f) = I_kf(c_j at j*f + t)``.
Equal permutation sets then give equal trees (tested by enumeration on small layouts) except for
three spellings left open: ``Fixed(k) ⊗ X = X ⊕ .. ⊕ X``, an interleave inside a product before a
free factor (``Y ⊗ I(c) ⊗ Z``), and a row rotation beside ``Fixed`` positions
(``Fixed(2) ⊕ I(A, Fixed(2)) = Fixed(1) ⊕ I(Fixed(2), A) ⊕ Fixed(1)``).  The interleave's normal
form, unification and cuts are in :mod:`fxfuse.ir.interleave`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class Atom:
    id: int


@dataclass(frozen=True, slots=True)
class Fixed:
    n: int


@dataclass(frozen=True, slots=True)
class Prod:
    """Row-major product.  Leaves are ``Atom``/``Fixed`` in layouts and axis references in the
    expressions rules build (:mod:`fxfuse.rules.registry`), hence ``Any``."""

    parts: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Sum:
    """Concatenation (leaves as for :class:`Prod`)."""

    parts: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Interleave:
    """Children of one size interleaved: position ``i*k + j`` is child ``j``'s position ``i``
    (leaves as for :class:`Prod`)."""

    parts: tuple[Any, ...]


NODES = (Prod, Sum, Interleave)  # the inner nodes of a layout tree (they have ``parts``)

# ``_ATOMS[i] == Atom(i)``: atoms are immutable values and every table numbers its atoms from 0,
# so one list of them serves every table (building a frozen dataclass costs more than the rest
# of :meth:`AtomTable.new_axes`); grown on demand up to ``_ATOMS_KEPT``, built beyond that
_ATOMS: list[Atom] = []
_ATOMS_KEPT = 1 << 16  # a few MB at most; discovery tables hold thousands


# ``_FIXED[n] == Fixed(n)``, shared as :data:`_ATOMS` is (the resolution of every fixed atom class:
# the batch and spatial axes of every node), filled on demand for up to ``_FIXED_KEPT`` sizes
_FIXED: dict[int, Fixed] = {}
_FIXED_KEPT = 4096


def _fixed(n: int) -> Fixed:
    """``Fixed(n)``, kept in :data:`_FIXED` while it has room."""
    out = Fixed(n)
    if len(_FIXED) < _FIXED_KEPT:
        _FIXED[n] = out
    return out


_NONES = [(None,) * k for k in range(9)]  # a new atom's entries in _fixed and _refined, k at once


def _atoms(lo: int, hi: int) -> list[Atom]:
    """``[Atom(i) for i in range(lo, hi)]``, from :data:`_ATOMS` where it reaches."""
    have = len(_ATOMS)
    if hi > have and have < _ATOMS_KEPT:
        _ATOMS.extend([Atom(i) for i in range(have, min(max(hi, 2 * have), _ATOMS_KEPT))])
    if hi <= len(_ATOMS):
        return _ATOMS[lo:hi]
    return [Atom(i) for i in range(lo, hi)]


@dataclass(frozen=True, slots=True)
class Unit:
    """The units of group ``group``: the leaf by which a spec's layouts name their groups, where
    discovery's layouts have union-find atoms."""

    group: str


Layout = Atom | Fixed | Prod | Sum | Interleave
# A spec's layout tree: the same Prod / Sum / Interleave / Fixed nodes over named groups (Unit)
# instead of atoms; frozen and hashable (fxfuse.groups.spec, fxfuse.ir.coords, fxfuse.maps).
Tree = Unit | Fixed | Prod | Sum | Interleave


@dataclass(frozen=True)
class Reason:
    """Why an atom was fixed: ``kind`` is one of ``input``, ``output``, ``no-rule``, ``rule``,
    ``constant``, ``unused``, ``conflict``, ``user``."""

    kind: str
    node: str
    op: str
    detail: str
    source: str | None = None

    def __init__(self, kind: str, node: str, op: str, detail: str,
                 source: str | None = None) -> None:
        # the instance dict written directly: a frozen dataclass's generated __init__ sets each
        # field through object.__setattr__, and discovery makes a reason per cut and fix
        d = self.__dict__
        d["kind"] = kind
        d["node"] = node
        d["op"] = op
        d["detail"] = detail
        d["source"] = source

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"{self.kind}: {self.detail} (node {self.node!r}, op {self.op}){where}"

    def short(self) -> str:
        """``kind: detail (op)`` without the node, so equal causes print once."""
        if self.kind in ("input", "output", "unused"):
            return f"{self.kind}: {self.detail}"
        return f"{self.kind}: {self.detail} ({self.op})"


class Link(NamedTuple):
    """Provenance of one union/refinement: which rule at which node related two atom classes.
    (A named tuple: a refinement into ``k`` atoms records ``k``, and deep concat networks
    refine long sums at every layer.)"""

    a: int
    b: int
    node: str
    op: str


class AtomTable:
    """Union-find over atoms, with refinement into products/sums and fixing."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._fixed: list[Reason | None] = []
        self._refined: list[Layout | None] = []
        self.links: list[Link] = []
        self._where: tuple[str, str] = ("", "")
        self._labels: dict[int, str] = {}  # atom -> what a rule called it ("heads", "groups")
        self._also: dict[int, list[Reason]] = {}  # fixed root -> later input/output reasons
        self._fixed_from: dict[int, list[int]] = {}  # root fixed by unifying with these roots
        # refined root -> the size-1 atoms fixed by an interleave's cut (:meth:`_split_interleave`)
        # in the layout it was refined to: resolved, they are plain Fixed(1), and their reason
        # would be lost to every axis that holds them
        self._cut_rows: dict[int, list[int]] = {}
        # during one (outermost) unify: the cut-fixed size-1 atoms of both sides, and those its
        # cuts make; the pieces the recursion relates are resolved (Fixed(1), no atom to follow)
        self._rows: list[int] | None = None
        self._any_cut = False
        # root -> its resolved layout: a refined atom resolves through the whole chain of its
        # refinements, and deep concat networks (DenseNet) resolve the same long chains again for
        # every layout that holds them.  A resolved layout changes only when one of its free atoms
        # is substituted (every other atom of the chain is refined or fixed, for good), so
        # ``_holders`` (free atom -> roots whose cached layout holds it) says which entries a
        # substitution makes stale (:meth:`_substituted`)
        self._resolved: dict[int, Layout] = {}
        self._holders: dict[int, set[int]] = {}

    # -- provenance ---------------------------------------------------------------------------
    def at(self, node: str, op: str) -> None:
        """Name the node/op that subsequent unions come from (for ``explain``)."""
        self._where = (node, op)

    # -- atoms ------------------------------------------------------------------------------------
    def new(self, size: int, label: str | None = None) -> Atom:
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._fixed.append(None)
        self._refined.append(None)
        i = len(self._parent) - 1
        if label is not None:
            self._labels[i] = label
        return _ATOMS[i] if i < len(_ATOMS) else _atoms(i, i + 1)[0]

    def new_axes(self, shape: tuple[int, ...]) -> tuple[Atom, ...]:
        """One new atom per axis of a tensor of ``shape`` (:meth:`new` for each, in order)."""
        parent = self._parent
        i = len(parent)
        k = len(shape)
        j = i + k
        parent += range(i, j)
        self._size += shape
        nones = _NONES[k] if k < len(_NONES) else (None,) * k
        self._fixed += nones
        self._refined += nones
        return tuple(_ATOMS[i:j] if j <= len(_ATOMS) else _atoms(i, j))

    def labels(self) -> dict[int, str]:
        """Root atom -> the label a rule gave one of its members (first one wins)."""
        out: dict[int, str] = {}
        for atom, label in self._labels.items():
            out.setdefault(self.find(atom), label)
        return out

    def find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def atom_size(self, i: int) -> int:
        return self._size[self.find(i)]

    def reason(self, i: int) -> Reason | None:
        return self._fixed[self.find(i)]

    def size(self, lay: Layout) -> int:
        if isinstance(lay, Atom):
            return self._size[self.find(lay.id)]
        if isinstance(lay, Fixed):
            return lay.n
        if isinstance(lay, Prod):
            return prod(self.size(p) for p in lay.parts)
        if isinstance(lay, Interleave):
            return len(lay.parts) * self.size(lay.parts[0])
        return sum(self.size(p) for p in lay.parts)

    # -- normal form --------------------------------------------------------------------------
    def resolve(self, lay: Layout) -> Layout:
        if isinstance(lay, Atom):
            r = self.find(lay.id)
            hit = self._resolved.get(r)
            if hit is not None:
                return hit
            ref = self._refined[r]
            if self._fixed[r] is not None or self._size[r] == 1:  # for good, and holds no atom
                n = self._size[r]
                out: Layout = _FIXED.get(n) or _fixed(n)
                self._resolved[r] = out
                return out
            elif ref is None:  # a free atom is itself: nothing to cache (or forget when it changes)
                return _ATOMS[r] if r < len(_ATOMS) else Atom(r)
            else:
                out = self.resolve(ref)
            self._resolved[r] = out
            for leaf in _atom_ids(out):
                self._holders.setdefault(leaf, set()).add(r)
            return out
        if isinstance(lay, Fixed):
            return lay
        if isinstance(lay, Prod):
            return self._resolve_prod(lay)
        if isinstance(lay, Interleave):
            return _il.resolve_interleave(self, lay)
        return self._resolve_sum(lay)

    def resolve_all(self, lays: Iterable[Layout]) -> list[Layout]:
        """``[resolve(lay) for lay in lays]``, with :meth:`resolve`'s first cases (an atom whose
        class is cached, or free and not refined) inline: most layouts a finished discovery
        resolves again (every axis of every node, for the spec) are such atoms."""
        find, cached = self.find, self._resolved
        fixed, size, refined = self._fixed, self._size, self._refined
        resolve = self.resolve
        kept = len(_ATOMS)
        out: list[Layout] = []
        for lay in lays:
            if type(lay) is Atom:
                r = find(lay.id)
                hit = cached.get(r)
                if hit is None:
                    if fixed[r] is None and size[r] != 1 and refined[r] is None:
                        hit = _ATOMS[r] if r < kept else Atom(r)
                    else:
                        hit = resolve(lay)
                out.append(hit)
            else:
                out.append(resolve(lay))
        return out

    def _resolve_prod(self, lay: Prod) -> Layout:
        parts: list[Layout] = []
        for p in lay.parts:
            q = self.resolve(p)
            for f in q.parts if isinstance(q, Prod) else (q,):
                if isinstance(f, Fixed) and parts and isinstance(parts[-1], Fixed):
                    parts[-1] = Fixed(parts[-1].n * f.n)
                elif not (isinstance(f, Fixed) and f.n == 1):
                    parts.append(f)
        if any(isinstance(f, Fixed) and f.n == 0 for f in parts):
            return Fixed(0)
        if not parts:
            return Fixed(1)
        if isinstance(parts[0], Sum):  # (A ⊕ B) ⊗ C = (A ⊗ C) ⊕ (B ⊗ C)
            rest = tuple(parts[1:])
            return self.resolve(Sum(tuple(Prod((s,) + rest) for s in parts[0].parts)))
        f = parts[-1].n if len(parts) > 1 and isinstance(parts[-1], Fixed) else 1
        last = parts[-2] if f > 1 else parts[-1]
        if len(parts) > 1 and isinstance(last, Interleave):
            # Y ⊗ I_k(c) = I_k(Y ⊗ c_j);  I_k(c) ⊗ Fixed(f) = I_kf(c_j at j*f + t)
            head = tuple(parts[: len(parts) - (2 if f > 1 else 1)])
            return self.resolve(Interleave(tuple(Prod(head + (c,)) for c in last.parts
                                                 for _ in range(f))))
        if len(parts) == 1:
            return parts[0]
        return Prod(tuple(parts))

    def _resolve_sum(self, lay: Sum) -> Layout:
        parts: list[Layout] = []
        for q in self.resolve_all(lay.parts):  # a long sum's parts are mostly plain atoms
            for f in q.parts if isinstance(q, Sum) else (q,):
                if isinstance(f, Fixed) and parts and isinstance(parts[-1], Fixed):
                    parts[-1] = Fixed(parts[-1].n + f.n)
                elif not (isinstance(f, Fixed) and f.n == 0):
                    parts.append(f)
        if not parts:
            return Fixed(0)
        if len(parts) == 1:
            return parts[0]
        if all(isinstance(f, Fixed) for f in parts):
            return Fixed(sum(f.n for f in parts if isinstance(f, Fixed)))
        return Sum(tuple(parts))

    def atoms_in(self, lay: Layout) -> list[int]:
        """Root ids of the free atoms of ``lay`` (after resolution), left to right."""
        return _atom_ids(self.resolve(lay))

    def fixed_reasons(self, lay: Layout) -> list[Reason]:
        """Reasons recorded on the fixed atom classes underneath ``lay`` (unresolved walk)."""
        return self._reasons_of(self._fixed_roots(lay))

    def _reasons_of(self, roots: list[int]) -> list[Reason]:
        """The reasons of fixed roots ``roots``, each once, in order (:meth:`fixed_reasons`)."""
        out: list[Reason] = []
        for r in roots:
            why = self._fixed[r]
            for w in (why, *self._also.get(r, ())):
                if w is not None and w not in out:
                    out.append(w)
        return out

    # -- substitutions --------------------------------------------------------------------------
    def _substituted(self, a: int) -> None:
        """Forget the cached resolutions that hold the free atom ``a``, which a substitution
        (union, refinement, fixing) is about to change."""
        for r in self._holders.pop(a, ()):
            self._resolved.pop(r, None)

    def _free_roots(self, lay: Layout) -> list[int]:
        """:meth:`atoms_in`, without building the layout of an atom whose class is not refined
        (``[root]`` if free and of size > 1, else none: :meth:`resolve`'s first cases)."""
        if type(lay) is Atom:
            r = self.find(lay.id)
            if self._fixed[r] is not None or self._size[r] == 1:
                return []
            if self._refined[r] is None:
                return [r]
        return self.atoms_in(lay)

    def fix(self, lay: Layout, why: Reason) -> None:
        for r in self._free_roots(lay):
            self._fixed[r] = why
            self._substituted(r)
        if why.kind in ("input", "output"):  # also note it where something else fixed it first
            todo, seen = self._fixed_roots(lay), set()
            while todo:
                r = todo.pop()
                if r in seen:
                    continue
                seen.add(r)
                if self._fixed[r] != why and why not in self._also.setdefault(r, []):
                    self._also[r].append(why)
                todo += self._fixed_from.get(r, [])

    def _fixed_roots(self, lay: Layout, out: list[int] | None = None) -> list[int]:
        """The fixed atom classes underneath ``lay`` (through refinements), left to right.
        (Recursive methods, not nested closures, here and below: a closure that calls itself is
        a reference cycle, garbage for the cyclic collector on every call.)"""
        out = [] if out is None else out
        if isinstance(lay, Atom):
            r = self.find(lay.id)
            if self._fixed[r] is not None:
                out.append(r)
            elif self._refined[r] is not None:
                self._fixed_roots(self._refined[r], out)  # type: ignore[arg-type]
                out += self._cut_rows.get(r, ())
        elif isinstance(lay, NODES):
            for p in lay.parts:
                self._fixed_roots(p, out)
        return out

    def _union(self, a: int, b: int) -> None:
        if a == b:
            return
        if self._size[a] != self._size[b]:  # pragma: no cover - guarded by unify
            raise AssertionError("union of atoms of different sizes")
        self._parent[b] = a
        if b in self._holders:  # _substituted(b), without the call where nothing holds b
            self._substituted(b)
        node, op = self._where
        self.links.append(tuple.__new__(Link, (a, b, node, op)))  # Link(...) without its __new__

    def _refine(self, a: int, tree: Layout, why: Reason, source: Layout | None = None,
                resolved: bool = False) -> None:
        """``P_a`` := ``tree``; ``source``, ``tree`` before resolution, says which of its
        ``Fixed(1)`` positions an interleave's cut fixed (their reasons stay with ``a``).
        ``resolved``: ``tree`` is :meth:`resolve`'s output on the table as it is now."""
        # ``atoms_in(tree)``, not changed by refining ``a`` (which is not among them); of a
        # resolved tree without interleaves its leaves, as they stand (resolving it again only
        # flattens and merges, and keeps the atoms in order)
        atoms = _plain_atoms(tree) if resolved else None
        if atoms is None:
            atoms = self.atoms_in(tree)
        if a in atoms:  # occurs check: a = f(a) has no solution but the identity
            self.fix(Prod((Atom(a), tree)), why)
            return
        # size-1 atoms are fixed only by an interleave's cut (:attr:`_any_cut`): without one,
        # ``source`` holds none and the walk is skipped
        rows = ([r for r in self._fixed_roots(source) if self._size[r] == 1]
                if source is not None and self._any_cut else [])
        if not rows and self._rows and _has_fixed(tree):
            rows = list(dict.fromkeys(self._rows))
        if rows:
            self._cut_rows[a] = rows
        self._refined[a] = tree
        self._substituted(a)
        node, op = self._where
        self.links += [tuple.__new__(Link, (a, b, node, op)) for b in atoms]  # as in _union

    def unify(self, x: Layout, y: Layout, why: Reason) -> None:
        """Constrain ``x`` and ``y`` to describe the same permutation of one axis."""
        if type(x) is Atom and type(y) is Atom and self.unify_atoms(x.id, y.id):
            return
        self.unify_layouts(x, y, why)

    def unify_layouts(self, x: Layout, y: Layout, why: Reason) -> None:
        """:meth:`unify` without its atom-atom shortcut (for a caller that tried
        :meth:`unify_atoms` first, or knows a side is not an atom)."""
        if self._rows is not None:  # inside another unify
            self._unify(x, y, why)
            return
        self._rows = [r for r in (*self._fixed_roots(x), *self._fixed_roots(y))
                      if self._size[r] == 1] if self._any_cut else []
        try:
            self._unify(x, y, why)
        finally:
            self._rows = None

    def unify_atoms(self, i: int, j: int) -> bool:
        """The common case of :meth:`unify`, two atoms whose classes are not refined and have
        one size ``n > 1``, done as :meth:`_unify` does it without building their layouts: both
        free, a union; one fixed, the other is fixed with its first reason and remembers where
        it came from; both fixed, nothing (unless an interleave's cut rows are pending: then,
        and in every other case, False: :meth:`_unify` decides)."""
        parent = self._parent
        a = i if parent[i] == i else self.find(i)
        b = j if parent[j] == j else self.find(j)
        size, refined = self._size, self._refined
        if size[a] != size[b] or size[a] == 1 or refined[a] is not None or refined[b] is not None:
            return False
        fa, fb = self._fixed[a], self._fixed[b]
        if fa is None and fb is None:
            self._union(a, b)
        elif fa is None or fb is None:
            # fix(Atom(free), reason): a free root was never fixed, so nothing was fixed from
            # it and an input/output reason has nothing further to reach
            fixed, free = (a, b) if fb is None else (b, a)
            self._fixed[free] = self._fixed[fixed]
            if free in self._holders:
                self._substituted(free)
            self._fixed_from.setdefault(free, []).append(fixed)
        elif self._rows:
            return False
        return True

    def _unify(self, x: Layout, y: Layout, why: Reason) -> None:
        a, b = self.resolve(x), self.resolve(y)
        sa, sb = self._size_of(x, a), self._size_of(y, b)
        if sa != sb:
            raise ValueError(f"cannot relate axes of sizes {sa} and {sb}")
        if a is b or (type(a) is type(b) and a == b):  # a == b (unequal across node types)
            if isinstance(a, Fixed) and self._rows:
                self._mark_rows(x, y)
            return
        if isinstance(a, Fixed) or isinstance(b, Fixed):
            # the free side inherits the reason the other side is fixed (e.g. "model input"),
            # and remembers where it came from, so a later input/output reason reaches both
            fixed_side, free_side = (x, b) if isinstance(a, Fixed) else (y, a)
            sources = self._fixed_roots(fixed_side)
            known = self._reasons_of(sources)
            if not known and self._rows:  # a resolved piece of a cut interleave
                known = self._row_reasons()
            free_roots = self.atoms_in(free_side)
            self.fix(free_side, known[0] if known else why)
            for r in free_roots:
                self._fixed_from.setdefault(r, []).extend(sources)
        elif isinstance(a, Atom) and isinstance(b, Atom):
            self._union(a.id, b.id)
        elif isinstance(a, Atom):
            self._refine(a.id, b, why, y, resolved=True)
        elif isinstance(b, Atom):
            self._refine(b.id, a, why, x, resolved=True)
        elif isinstance(a, Prod) and isinstance(b, Prod):
            self._unify_prod(a, b, why)
        elif isinstance(a, Interleave) and isinstance(b, Interleave):
            _il.unify_interleaves(self, a, b, why)
        elif isinstance(a, Interleave) and isinstance(b, Prod):
            _il.unify_interleave_prod(self, a, b, why)
        elif isinstance(a, Prod) and isinstance(b, Interleave):
            _il.unify_interleave_prod(self, b, a, why)
        else:
            self._unify_sum(a, b, why)

    def _size_of(self, lay: Layout, resolved: Layout) -> int:
        """``|lay|``, its resolution being ``resolved``: an atom's size is its class's (every
        refinement keeps the size), no walk of a long refinement."""
        return self._size[self.find(lay.id)] if type(lay) is Atom else self.size(resolved)

    def _unify_prod(self, a: Prod, b: Prod, why: Reason) -> None:
        x, ra = a.parts[0], a.parts[1:]
        y, rb = b.parts[0], b.parts[1:]
        sx, sy = self.size(x), self.size(y)
        if sx > sy:
            x, ra, y, rb, sx, sy = y, rb, x, ra, sy, sx
        if sx != sy:
            pieces = self._split_prod(y, sx) if sy % sx == 0 else None
            if pieces is None:
                self._conflict(a, b, why)
                return
            y, rb = pieces[0], (pieces[1],) + rb
        self.unify(x, y, why)
        self.unify(Prod(ra), Prod(rb), why)

    def _unify_sum(self, a: Layout, b: Layout, why: Reason) -> None:
        pa = a.parts if isinstance(a, Sum) else (a,)
        pb = b.parts if isinstance(b, Sum) else (b,)
        x, ra = pa[0], pa[1:]
        y, rb = pb[0], pb[1:]
        sx, sy = self.size(x), self.size(y)
        if sx > sy:
            x, ra, y, rb, sx, sy = y, rb, x, ra, sy, sx
        if sx != sy:
            pieces = self._split_any(y, sx, why)
            if pieces is None:
                self._conflict(a, b, why)
                return
            y, rb = pieces[0], (pieces[1],) + rb
        self.unify(x, y, why)
        self.unify(Sum(ra), Sum(rb), why)

    def _split_prod(self, y: Layout, k: int) -> tuple[Layout, Layout] | None:
        """Write ``y`` (resolved, not a product) as ``Prod(y1, y2)`` with ``|y1| = k``."""
        n = self.size(y)
        if isinstance(y, Fixed):
            return Fixed(k), Fixed(n // k)
        if isinstance(y, Atom):
            y1, y2 = self.new(k), self.new(n // k)
            self._refined[y.id] = Prod((y1, y2))
            self._substituted(y.id)
            self.links += [Link(y.id, y1.id, *self._where), Link(y.id, y2.id, *self._where)]
            return y1, y2
        return None

    def _split_sum(self, y: Layout, k: int, why: Reason | None = None
                   ) -> tuple[Layout, Layout] | None:
        """Write ``y`` (resolved, not a sum) as ``Sum(y1, y2)`` with ``|y1| = k``."""
        n = self.size(y)
        if isinstance(y, Fixed):
            return Fixed(k), Fixed(n - k)
        if isinstance(y, Atom):
            y1, y2 = self.new(k), self.new(n - k)
            self._refined[y.id] = Sum((y1, y2))
            self._substituted(y.id)
            self.links += [Link(y.id, y1.id, *self._where), Link(y.id, y2.id, *self._where)]
            return y1, y2
        if isinstance(y, Prod):  # (H ⊗ R) split at k = j*|R|: split the leading factor H at j
            head, rest = y.parts[0], y.parts[1:]
            r = prod(self.size(p) for p in rest)
            if k % r:
                return None
            pieces = self._split_sum(head, k // r, why)
            if pieces is None:
                return None
            return Prod((pieces[0],) + rest), Prod((pieces[1],) + rest)
        if isinstance(y, Interleave):
            return _il.split_interleave(self, y, k, why)
        return None

    def _split_any(self, y: Layout, k: int, why: Reason | None = None
                   ) -> tuple[Layout, Layout] | None:
        """:meth:`_split_sum` for any ``y`` (a sum is cut between or inside its blocks)."""
        y = self.resolve(y)
        if not isinstance(y, Sum):
            return self._split_sum(y, k, why)
        off = 0
        for i, p in enumerate(y.parts):
            n = self.size(p)
            if off == k:
                return Sum(y.parts[:i]), Sum(y.parts[i:])
            if off + n > k:
                pieces = self._split_any(p, k - off, why)
                if pieces is None:
                    return None
                return Sum(y.parts[:i] + (pieces[0],)), Sum((pieces[1],) + y.parts[i + 1:])
            off += n
        return None  # pragma: no cover - 0 < k < |y|

    def _raw_roots(self, lay: Layout, out: list[int] | None = None) -> list[int]:
        """Roots of every atom ``lay`` is made of, through refinements, fixed or not (a size-1
        atom resolves to ``Fixed(1)``, so :meth:`fix` does not see it)."""
        out = [] if out is None else out
        if isinstance(lay, Atom):
            r = self.find(lay.id)
            ref = self._refined[r]
            if ref is not None:
                self._raw_roots(ref, out)
            else:
                out.append(r)
        elif isinstance(lay, NODES):
            for p in lay.parts:
                self._raw_roots(p, out)
        return out

    def _row_reasons(self) -> list[Reason]:
        """The reasons of this unify's cut-fixed rows (:attr:`_rows`)."""
        out: list[Reason] = []
        for r in self._rows or ():
            why = self._fixed[r]
            if why is not None and why not in out:
                out.append(why)
        return out

    def _mark_rows(self, x: Layout, y: Layout) -> None:
        """``x`` and ``y`` both fixed, inside a unify that cut an interleave: their size-1 atoms
        (which resolve to ``Fixed(1)`` and so are never fixed) get the cut's reason, where
        neither side has a reason of its own."""
        if self.fixed_reasons(x) or self.fixed_reasons(y):
            return
        why = self._row_reasons()
        for r in (*self._raw_roots(x), *self._raw_roots(y)):
            if self._size[r] == 1 and self._fixed[r] is None and why:
                self._fixed[r] = why[0]

    def _conflict(self, a: Layout, b: Layout, why: Reason) -> None:
        detail = f"{why.detail}; no common refinement of the two axis structures, fixed both"
        why2 = Reason("conflict", why.node, why.op, detail, why.source)
        self.fix(a, why2)
        self.fix(b, why2)


def _also(why: Reason, what: str) -> str:
    """``what``, after the rule's own detail where it has one."""
    return f"{why.detail}; {what}" if why.detail else what


def _has_fixed(lay: Layout) -> bool:
    return isinstance(lay, Fixed) or (isinstance(lay, NODES) and any(map(_has_fixed, lay.parts)))


def _atom_ids(lay: Layout, out: list[int] | None = None) -> list[int]:
    """The atom ids of a layout's leaves, left to right (no resolution)."""
    out = [] if out is None else out
    if isinstance(lay, Atom):
        out.append(lay.id)
    elif isinstance(lay, NODES):
        for p in lay.parts:
            if type(p) is Atom:  # a leaf here, not a call
                out.append(p.id)
            elif type(p) is not Fixed:
                _atom_ids(p, out)
    return out


def _plain_atoms(lay: Layout, out: list[int] | None = None) -> list[int] | None:
    """:func:`_atom_ids` of a layout made of atoms, ``Fixed``, sums and products only; None if
    it holds an interleave."""
    out = [] if out is None else out
    if type(lay) is Atom:
        out.append(lay.id)
    elif type(lay) is Sum or type(lay) is Prod:
        for p in lay.parts:
            if type(p) is Atom:
                out.append(p.id)
            elif type(p) is not Fixed and _plain_atoms(p, out) is None:
                return None
    elif type(lay) is not Fixed:
        return None
    return out


from . import interleave as _il  # noqa: E402  (interleave.py builds on the nodes above)
