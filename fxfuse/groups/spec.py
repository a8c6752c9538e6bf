"""The permutation spec: derived from discovery, frozen, two-way, printable, serialisable.

* ``spec.groups``: each :class:`Group` has a ``name``, a ``size`` and ``members``, the
  ``(state_dict_key, axis)`` pairs it permutes (a :class:`Member` is that tuple, plus the axis
  layout in ``member.layout``).
* ``spec.axes[(key, axis)]``: the :class:`AxisSpec` of every parameter/buffer axis: its layout tree
  over group names and how it came to be (fixed reasons).

A layout tree (:data:`fxfuse.ir.layout.Tree`) is ``Unit(name)``, ``Fixed(n)``, ``Prod((t1, ..))``
(Kronecker product, row-major), ``Sum((t1, ..))`` (concatenation) or ``Interleave((t1, ..))``
(blocks of one length interleaved, a channel shuffle's; printed ``interleave(t1, ..)``):
discovery's own layout nodes over named groups (JSON: ``["g", name]``, ``["fixed", n]``,
``["prod", [..]]``, ``["sum", [..]]``, ``["interleave", [..]]``).  The index
permutation of an axis is :func:`axis_index`; permuting a tensor is
``t.index_select(axis, axis_index(layout, perms))``.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PermutationError, SpecError
from ..ir.layout import Atom, AtomTable, Fixed, Interleave, Layout, Prod, Reason, Sum, Tree, Unit
from ..ir.layout import _atom_ids as atom_ids
from .discover import AXES, Discovery, TensorAxes
from .roles import finish_roles

if TYPE_CHECKING:
    import networkx as nx



def pack_items(items: list[str], width: int) -> list[str]:
    """``items`` joined by ", " into lines of at most ``width`` characters, never breaking an
    item (a parameter name, an axis layout): one longer than ``width`` gets a line of its own."""
    lines: list[str] = []
    line = ""
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}" if line else piece
    return [*lines, line] if line or not lines else lines
FORMAT_VERSION = 1


class Member(tuple):  # type: ignore[type-arg]
    """``(state_dict_key, axis)``; ``.layout`` is the whole axis' layout tree."""

    layout: Tree

    def __new__(cls, key: str, axis: int, layout: Tree) -> Member:
        self = super().__new__(cls, (key, axis))
        self.layout = layout
        return self

    def __getnewargs__(self) -> tuple[str, int, Tree]:  # pickle / copy: Member(key, axis, layout)
        return (self[0], self[1], self.layout)

    @property
    def key(self) -> str:
        return str(self[0])

    @property
    def axis(self) -> int:
        return int(self[1])

    def __str__(self) -> str:
        text = f"{self.key}:{self.axis}"
        return text if isinstance(self.layout, Unit) else f"{text}[{tree_str(self.layout)}]"


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    members: list[Member]
    joined_by: tuple[str, ...] = ()  # provenance: "node (op)" of every rule that shaped it


@dataclass(frozen=True)
class AxisSpec:
    key: str
    axis: int
    size: int
    layout: Tree
    fixed_because: tuple[str, ...] = ()

    def __init__(self, key: str, axis: int, size: int, layout: Tree,
                 fixed_because: tuple[str, ...] = ()) -> None:
        # the instance dict written directly (as ``Reason``): a frozen dataclass's generated
        # __init__ sets each field through object.__setattr__, and a spec has one per axis
        d = self.__dict__
        d["key"] = key
        d["axis"] = axis
        d["size"] = size
        d["layout"] = layout
        d["fixed_because"] = fixed_because

    @property
    def groups(self) -> list[str]:
        return tree_groups(self.layout)


@dataclass(frozen=True)
class CutRecord:
    node: str
    op: str
    reason: str
    source: str | None = None


@dataclass(frozen=True)
class PermutationSpec:
    """Permutation groups of one model (see module doc).  Build with :func:`fxfuse.find_groups`."""

    groups: list[Group]
    axes: dict[tuple[str, int], AxisSpec]
    cuts: list[CutRecord] = field(default_factory=list)
    model: str = ""
    tracer: str = ""
    # traced node name -> layout tree of each axis of its (single tensor) output, for nodes a
    # group acts on: where activation-based passes read a group's features
    activations: dict[str, tuple[Tree, ...]] = field(default_factory=dict)
    # (state_dict key, axis) -> how an alignment map acts on it ("out", "in", "second:<mean>",
    # "conflict"; fxfuse.groups.roles); permutations do not need it
    roles: dict[tuple[str, int], str] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()  # state_dict keys that are buffers (not parameters)
    # calls without a rule whose relations were measured on the op (fxfuse.rules.probe), and
    # what discovery chose (which trace it kept, and why)
    probed: list[CutRecord] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    # -- queries --------------------------------------------------------------------------------
    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups are {[g.name for g in self.groups]}")

    def explain(self, name: str) -> str:
        """Why group ``name`` is as it is: its members and the nodes whose rules joined them."""
        g = self.group(name)
        lines = [f"group {g.name!r} (size {g.size}) permutes:"]
        lines += [f"  {m}" for m in g.members]
        if g.joined_by:
            lines.append("joined by the axis rules at:")
            lines += [f"  {j}" for j in g.joined_by]
        nodes = {j.split(" (", 1)[0] for j in g.joined_by}
        probed = [p for p in self.probed if p.node in nodes]
        if probed:
            lines.append("probed: relations measured on ops without a rule (not from a rule; "
                         "strict=True refuses them, fxfuse.verify checks the model):")
            for p in probed:
                src = f" at {p.source}" if p.source else ""
                lines.append(f"  node {p.node}: {p.op}{src}: {p.reason}")
        return "\n".join(lines)

    def groups_of(self, key: str, axis: int) -> list[str]:
        """Names of the groups acting on ``key``'s ``axis`` (axis -> group direction)."""
        spec = self.axes.get((key, axis))
        return spec.groups if spec else []

    @property
    def fixed_axes(self) -> list[AxisSpec]:
        """Parameter axes (size > 1) that no group permutes."""
        return [a for a in self.axes.values() if a.size > 1 and not a.groups]

    def random_perms(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random permutation per group, never the identity (so a test of it can fail)."""
        gen = torch.Generator().manual_seed(seed)
        perms = {}
        for g in self.groups:
            p = torch.randperm(g.size, generator=gen)
            if torch.equal(p, torch.arange(g.size)):
                p = torch.roll(p, 1)
            perms[g.name] = p
        return perms

    def lint(self, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """Check the spec's invariants (and, given ``shapes``, that it fits those tensors)."""
        sizes = {g.name: g.size for g in self.groups}
        known: dict[int, tuple[Tree, int]] = {}  # id(tree) -> its size (aliases share one tree)
        for (key, axis), a in self.axes.items():
            hit = known.get(id(a.layout))
            if hit is None:
                hit = known[id(a.layout)] = (a.layout, tree_size(a.layout, sizes))
            if hit[1] != a.size:
                raise SpecError(f"{key}:{axis}: layout {tree_str(a.layout)} does not have size "
                                f"{a.size}")
            if shapes is not None:
                if key not in shapes or len(shapes[key]) <= axis or shapes[key][axis] != a.size:
                    have = shapes.get(key)
                    raise SpecError(f"the spec permutes {key}:{axis} (size {a.size}) but the model "
                                    f"has {key} with shape {have}; the spec was discovered for "
                                    f"another model: run fxfuse.find_groups on this one")
        # axis -> its groups, computed once per axis and layout tree (a wide concat axis has
        # many groups; a norm's weight, bias and statistics share one tree)
        used: dict[tuple[str, int], set[str]] = {}
        of_tree: dict[int, tuple[Tree, set[str]]] = {}
        for g in self.groups:
            if not g.members:
                raise SpecError(f"group {g.name!r} has no members")
            for m in g.members:
                key, axis = m
                # ``(m.key, m.axis)``: the member itself where it holds a str and an int
                ka = (key, axis) if type(key) is str and type(axis) is int else (m.key, m.axis)
                groups = used.get(ka)
                if groups is None:
                    layout = self.axes[ka].layout
                    seen = of_tree.get(id(layout))
                    if seen is None:
                        seen = of_tree[id(layout)] = (layout, set(tree_groups(layout)))
                    groups = used[ka] = seen[1]
                if g.name not in groups:
                    raise SpecError(f"group {g.name!r} lists {m} but that axis does not use it")

    # -- text -----------------------------------------------------------------------------------
    def __str__(self) -> str:
        n_axes = sum(1 for a in self.axes.values() if a.groups)
        lines = [f"PermutationSpec for {self.model} ({self.tracer}): {len(self.groups)} groups "
                 f"permuting {n_axes} parameter axes"]
        width = max([len("group"), *(len(g.name) for g in self.groups)])
        lines.append(f"  {'group':<{width}}  {'size':>5}  members")
        indent = " " * (width + 11)
        for g in self.groups:
            wrapped = pack_items([str(m) for m in g.members], 100 - len(indent))
            lines.append(f"  {g.name:<{width}}  {g.size:>5}  {wrapped[0]}")
            lines += [indent + w for w in wrapped[1:]]
        by_reason: dict[str, list[str]] = {}
        for a in self.fixed_axes:
            why = "; ".join(a.fixed_because) or "fixed"
            by_reason.setdefault(why, []).append(f"{a.key}:{a.axis}")
        if by_reason:
            lines.append("fixed axes (never permuted), by reason:")
            for why, axes in by_reason.items():
                lines.append(f"  {why}")
                lines += ["      " + w for w in pack_items(axes, 94)]
        if self.cuts:
            lines.append("cuts (ops with no axis rule; the groups through them stay fixed):")
            for c in self.cuts:
                src = f"  at {c.source}" if c.source else ""
                lines.append(f"  node {c.node}: {c.op}{src}")
        if self.probed:
            lines.append("probed (relations measured on ops without a rule; strict=True refuses "
                         "them):")
            for c in self.probed:
                src = f"  at {c.source}" if c.source else ""
                lines.append(f"  node {c.node}: {c.op}{src}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "fxfuse.PermutationSpec",
            "version": FORMAT_VERSION,
            "model": self.model,
            "tracer": self.tracer,
            "groups": [{"name": g.name, "size": g.size,
                        "members": [[m.key, m.axis] for m in g.members],
                        "joined_by": list(g.joined_by)} for g in self.groups],
            "axes": [{"key": a.key, "axis": a.axis, "size": a.size,
                      "layout": _tree_to_json(a.layout), "fixed_because": list(a.fixed_because)}
                     for a in self.axes.values()],
            "cuts": [{"node": c.node, "op": c.op, "reason": c.reason, "source": c.source}
                     for c in self.cuts],
            "activations": {n: [_tree_to_json(t) for t in trees]
                            for n, trees in self.activations.items()},
            "roles": [[k, a, r] for (k, a), r in self.roles.items()],
            "buffers": sorted(self.buffers),
            **({"probed": [{"node": c.node, "op": c.op, "reason": c.reason, "source": c.source}
                           for c in self.probed]} if self.probed else {}),
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PermutationSpec:
        try:
            d = json.loads(text)
            if d.get("format") != "fxfuse.PermutationSpec" or d.get("version") != FORMAT_VERSION:
                raise SpecError(f"not an fxfuse PermutationSpec of version {FORMAT_VERSION}")
            axes = {}
            for a in d["axes"]:
                tree = _tree_from_json(a["layout"])
                axes[(a["key"], int(a["axis"]))] = AxisSpec(
                    a["key"], int(a["axis"]), int(a["size"]), tree, tuple(a["fixed_because"]))
            groups = [Group(g["name"], int(g["size"]),
                            [Member(k, int(ax), axes[(k, int(ax))].layout) for k, ax in g["members"]],
                            tuple(g.get("joined_by", ())))
                      for g in d["groups"]]
            cuts = [CutRecord(c["node"], c["op"], c["reason"], c.get("source")) for c in d["cuts"]]
            activations = {n: tuple(_tree_from_json(t) for t in trees)
                           for n, trees in d.get("activations", {}).items()}
            roles = {(str(k), int(a)): str(r) for k, a, r in d.get("roles", [])}
            buffers = frozenset(str(k) for k in d.get("buffers", []))
            probed = [CutRecord(c["node"], c["op"], c["reason"], c.get("source"))
                      for c in d.get("probed", [])]
            notes = tuple(str(n) for n in d.get("notes", []))
        except SpecError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"malformed PermutationSpec JSON: {type(exc).__name__}: {exc}") from exc
        spec = cls(groups, axes, cuts, d.get("model", ""), d.get("tracer", ""), activations,
                   roles, buffers, probed, notes)
        spec.lint()
        return spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PermutationSpec) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    # -- graph ----------------------------------------------------------------------------------
    def to_graph(self) -> nx.Graph:
        """Bipartite graph: group nodes and layer (module) nodes; an edge per axis a group acts on."""
        import networkx as nx  # only here: `import fxfuse` stays light

        graph = nx.Graph()
        for g in self.groups:
            graph.add_node(f"group:{g.name}", kind="group", label=g.name, size=g.size)
            for m in g.members:
                layer = m.key.rsplit(".", 1)[0] if "." in m.key else m.key
                graph.add_node(f"layer:{layer}", kind="layer", label=layer)
                node_g, node_l = f"group:{g.name}", f"layer:{layer}"
                old = graph.get_edge_data(node_g, node_l, {}).get("axes", "")
                axes = f"{old}, {m}" if old else str(m)
                graph.add_edge(node_g, node_l, axes=axes)
        return graph


# -- layout trees -------------------------------------------------------------------------------
def tree_str(t: Tree) -> str:
    if isinstance(t, Unit):
        return t.group
    if isinstance(t, Fixed):
        return str(t.n)
    inner = [tree_str(c) for c in t.parts]
    if isinstance(t, Interleave):
        return "interleave(" + ", ".join(inner) + ")"
    return " x ".join(inner) if isinstance(t, Prod) else "(" + " + ".join(inner) + ")"


def tree_groups(t: Tree) -> list[str]:
    if isinstance(t, Unit):
        return [t.group]
    if isinstance(t, Fixed):
        return []
    return [n for c in t.parts for n in tree_groups(c)]


def tree_size(t: Tree, sizes: Mapping[str, int]) -> int:
    if isinstance(t, Unit):
        if t.group not in sizes:
            raise SpecError(f"layout names an unknown group {t.group!r}")
        return sizes[t.group]
    if isinstance(t, Fixed):
        return int(t.n)
    if type(t) is Sum:  # a concatenation (long in dense networks): its leaves summed inline
        total = 0
        for c in t.parts:
            if type(c) is Unit and c.group in sizes:
                total += sizes[c.group]
            else:
                total += tree_size(c, sizes)
        return total
    vals = [tree_size(c, sizes) for c in t.parts]
    if isinstance(t, Interleave):
        if len(set(vals)) > 1:
            raise SpecError(f"interleave({', '.join(tree_str(c) for c in t.parts)}) has blocks of "
                            f"different lengths {vals}: interleaved blocks must have one length")
        return len(vals) * vals[0]
    out = 1
    if isinstance(t, Prod):
        for v in vals:
            out *= v
        return out
    return sum(vals)


def axis_index(t: Tree, perms: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
               device: torch.device | None = None) -> torch.Tensor:
    """Index permutation of an axis: permuted = tensor.index_select(axis, index).

    ``Unit``: the group's permutation (identity if absent); ``Fixed``: ``arange(n)``;
    ``Prod``: ``idx[i1, i2] = p1[i1] * |t2| + p2[i2]`` (Kronecker); ``Sum``: offsets concatenated;
    ``Interleave`` of ``k`` blocks: ``idx[i*k + j] = p_j[i] * k + j``.
    """
    if isinstance(t, Unit):
        p = perms.get(t.group)
        return torch.arange(sizes[t.group], device=device) if p is None else p.to(device)
    if isinstance(t, Fixed):
        return torch.arange(int(t.n), device=device)
    parts = [axis_index(c, perms, sizes, device) for c in t.parts]
    if isinstance(t, Interleave):
        k = len(parts)
        return torch.stack([p * k + j for j, p in enumerate(parts)], dim=1).reshape(-1)
    if isinstance(t, Prod):
        out = parts[0]
        for p in parts[1:]:
            out = (out[:, None] * p.numel() + p[None, :]).reshape(-1)
        return out
    out_parts, off = [], 0
    for p in parts:
        out_parts.append(p + off)
        off += p.numel()
    return torch.cat(out_parts)


def check_perms(spec: PermutationSpec, perms: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Validate ``perms`` (group name -> permutation) and return them as LongTensors."""
    sizes = {g.name: g.size for g in spec.groups}
    out = {}
    for name, p in perms.items():
        if name not in sizes:
            raise PermutationError(f"unknown group {name!r}; the spec's groups are {list(sizes)}")
        t = torch.as_tensor(p)
        n = sizes[name]
        if t.dim() != 1 or t.numel() != n or t.dtype.is_floating_point or not torch.equal(
            torch.sort(t.cpu()).values, torch.arange(n)
        ):
            raise PermutationError(f"perms[{name!r}] must be a permutation of range({n}) as a 1-D "
                                   f"integer tensor, got shape {tuple(t.shape)}")
        out[name] = t.long()
    return out


def _tree_to_json(t: Tree) -> list[Any]:
    if isinstance(t, Unit):
        return ["g", t.group]
    if isinstance(t, Fixed):
        return ["fixed", t.n]
    kind = "prod" if isinstance(t, Prod) else "interleave" if isinstance(t, Interleave) else "sum"
    return [kind, [_tree_to_json(c) for c in t.parts]]


def _tree_from_json(v: Any) -> Tree:
    kind = v[0]
    if kind == "g":
        return Unit(str(v[1]))
    if kind == "fixed":
        return Fixed(int(v[1]))
    if kind in ("prod", "sum", "interleave"):
        parts = tuple(_tree_from_json(c) for c in v[1])
        return Prod(parts) if kind == "prod" else Sum(parts) if kind == "sum" else Interleave(parts)
    raise SpecError(f"unknown layout node {kind!r}")


def to_tree(lay: Layout, name: Callable[[int], str | None],
            size: Callable[[int], int] | None = None) -> Tree:
    """A resolved layout as a tree over group names (``name(atom_id)``; an atom without a name
    is written as ``Fixed(size(atom_id))``)."""
    if isinstance(lay, Atom):
        n = name(lay.id)
        if n is None:
            assert size is not None
            return Fixed(size(lay.id))
        return Unit(n)
    if isinstance(lay, Fixed):
        return Fixed(lay.n)
    parts = tuple(to_tree(c, name, size) for c in lay.parts)
    return Prod(parts) if isinstance(lay, Prod) else Sum(parts) if isinstance(lay, Sum) else (
        Interleave(parts))


# -- derivation from discovery ---------------------------------------------------------------------
def build_spec(disc: Discovery, model_name: str) -> PermutationSpec:
    """The frozen spec of a finished discovery: one group per free atom class of the parameter
    axes (named after the first parameter that has it), each axis' layout as a tree over group
    names, the nodes whose rules joined each group, and the activation layouts.

    Layouts resolved by the atom table are in normal form (``resolve`` is idempotent on them)
    and the table hands out one resolved object per atom class, shared by every axis made of it
    (every input channel of a DenseNet block's convs reads the same concatenation), so each
    resolved layout is converted to a tree once and its atoms listed once (:class:`_Trees`)."""
    table = disc.table
    names: dict[int, str] = {}
    taken: set[str] = set()

    axes: dict[tuple[str, int], AxisSpec] = {}
    members: dict[int, list[Member]] = {}
    # a rule's label ("heads", "groups") names an atom only where it is a proper factor; an atom
    # that fills an axis by itself (a depthwise conv's "groups") is a plain channel group
    resolve_all = table.resolve_all
    param_lays = [(key, lays, resolve_all(lays)) for key, lays in disc.param_axes.items()]
    whole = {r.id for _, _, rs in param_lays for r in rs if isinstance(r, Atom)}
    labels = {a: lab for a, lab in table.labels().items() if a not in whole}
    param_trees = _Trees(names.__getitem__)
    fixed_because = _FixedBecause(table)
    for key, lays, resolved_lays in param_lays:
        for axis, (raw, resolved) in enumerate(zip(lays, resolved_lays)):
            atoms = param_trees.atoms(resolved)
            for atom in atoms:
                if atom not in names:
                    base = key.rsplit(".", 1)[0] if "." in key else key
                    if atom in labels:
                        base = f"{base}.{labels[atom]}"
                    name, k = base, 1
                    while name in taken:
                        k += 1
                        name = f"{base}#{k}"
                    names[atom] = name
                    taken.add(name)
            tree = param_trees.tree(resolved)
            size = disc.param_shapes[key][axis]
            because = fixed_because(raw)  # also partly fixed
            distinct = list(dict.fromkeys(atoms))
            for alias in disc.aliases[key]:
                axes[(alias, axis)] = AxisSpec(alias, axis, size, tree, because)
                member = Member(alias, axis, tree)  # one object in each of its groups' lists
                for atom in distinct:
                    members.setdefault(atom, []).append(member)
    node_trees = _Trees(names.get, table.atom_size, param_trees._atoms)
    joined = _joined_by(table, names, node_trees.atoms)
    groups = [Group(names[a], table.atom_size(a), members[a], tuple(joined[a])) for a in names]
    cuts = [CutRecord(r.node, r.op, r.detail, r.source) for r in _unique(disc.cuts)]
    activations: dict[str, tuple[Tree, ...]] = {}
    node_atoms = node_trees.atoms
    for node in disc.gm.graph.nodes:
        axes_meta = node.meta.get(AXES)
        if node.op.startswith("call") and isinstance(axes_meta, TensorAxes):
            node_lays = resolve_all(axes_meta.layouts)
            for lay_ in node_lays:  # a group acts on one of its axes
                if not names.keys().isdisjoint(node_atoms(lay_)):
                    activations[node.name] = tuple([node_trees.tree(x) for x in node_lays])
                    break
    roles = {ka: r for ka, r in finish_roles(disc.roles, disc.aliases).items() if ka in axes}
    probed = [CutRecord(r.node, r.op, r.detail, r.source) for r in _unique(disc.probed)]
    return PermutationSpec(groups, axes, cuts, model_name, disc.tracer, activations, roles,
                           disc.buffers, probed, tuple(disc.notes))


class _FixedBecause:
    """An axis' ``fixed_because`` (the short reasons of the fixed atom classes under its raw
    layout, :meth:`AtomTable.fixed_reasons`) on a finished table: of an atom, a function of its
    class (its root's fixing, refinement and later reasons), so found once per class; each
    reason's text made once."""

    def __init__(self, table: AtomTable) -> None:
        self.table = table
        self._of_root: dict[int, tuple[str, ...]] = {}
        self._short: dict[int, str] = {}  # id(reason) -> reason.short(); the table holds them

    def __call__(self, raw: Layout) -> tuple[str, ...]:
        if type(raw) is not Atom:
            return self._texts(self.table.fixed_reasons(raw))
        root = self.table.find(raw.id)
        hit = self._of_root.get(root)
        if hit is None:
            hit = self._of_root[root] = self._texts(self.table.fixed_reasons(raw))
        return hit

    def _texts(self, reasons: list[Reason]) -> tuple[str, ...]:
        if not reasons:
            return ()
        short = self._short
        out = []
        for r in reasons:
            text = short.get(id(r))
            if text is None:
                text = short[id(r)] = r.short()
            out.append(text)
        return tuple(out)


class _Trees:
    """Trees and atom lists of resolved layouts, each computed once per layout object (the
    memo holds the layout, so an id is never reused while it is in use), with one ``Unit`` per
    atom: :func:`to_tree` with the same ``name`` / ``size``, whose answers must not change while
    the memo is used (the table is final; an atom's name, once given, stays)."""

    def __init__(self, name: Callable[[int], str | None],
                 size: Callable[[int], int] | None = None,
                 atoms: dict[int, tuple[Layout, list[int]]] | None = None) -> None:
        self.name, self.size = name, size
        self._trees: dict[int, tuple[Layout, Tree]] = {}
        self._atoms = {} if atoms is None else atoms  # may be shared: it does not depend on names
        self._leaves: dict[int, Tree] = {}

    def atoms(self, resolved: Layout) -> list[int]:
        """The atom ids of ``resolved``, left to right (``AtomTable.atoms_in`` of a layout in
        normal form, without resolving it again)."""
        hit = self._atoms.get(id(resolved))
        if hit is None:
            hit = self._atoms[id(resolved)] = (resolved, atom_ids(resolved))
        return hit[1]

    def tree(self, resolved: Layout) -> Tree:
        hit = self._trees.get(id(resolved))
        if hit is None:
            hit = self._trees[id(resolved)] = (resolved, self._convert(resolved))
        return hit[1]

    def _convert(self, lay: Layout) -> Tree:
        if isinstance(lay, Atom):
            leaf = self._leaves.get(lay.id)
            if leaf is None:
                leaf = self._leaves[lay.id] = to_tree(lay, self.name, self.size)
            return leaf
        if isinstance(lay, Fixed):
            return lay  # a frozen Fixed(n) is its own tree
        return type(lay)(tuple([self._convert(c) for c in lay.parts]))  # Prod / Sum / Interleave


def _joined_by(table: AtomTable, names: Mapping[int, str],
               atoms: Callable[[Layout], list[int]]) -> dict[int, dict[str, None]]:
    """Provenance: for every named atom, the ``"node (op)"`` of each rule that linked an atom
    it is made of, in the order the links were made (``atoms``: a resolved layout's atom ids).

    Links come in runs from one node (a rule's unions and refinements, a refinement into ``k``
    atoms recording ``k`` links from one end): a run adds its one key to the named atoms under
    its distinct ends, so it is read as a set of ends.  Each atom's keys keep the order of their
    first links, as link by link (a key seen again in a later run is already there)."""
    joined: dict[int, dict[str, None]] = {a: {} for a in names}
    # atom -> its named atoms now (the table is final), through its class's root: every atom of
    # a class resolves as its root does
    named_under: dict[int, list[int]] = {}
    find = table.find
    for (node, op), run in itertools.groupby(table.links, key=operator.itemgetter(2, 3)):
        where = f"{node} ({op})"
        ends: dict[int, None] = {}
        for link in run:
            ends[link.a] = ends[link.b] = None
        for end in ends:
            root = find(end)
            under = named_under.get(root)
            if under is None:
                under = named_under[root] = [a for a in atoms(table.resolve(Atom(root)))
                                             if a in joined]
            for atom in under:
                joined[atom][where] = None
    return joined


def _unique(reasons: list[Reason]) -> list[Reason]:
    return list(dict.fromkeys(reasons))
