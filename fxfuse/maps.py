"""Alignment maps: how one model's units of a group enter the fused model (permutation = special case).

For a group ``g`` with ``n`` units in model ``k`` and ``m`` units in the fused model, the map is a
pair

    M: (m, n)   merge:   fused unit i  =  sum_j M[i, j] * model unit j
    U: (n, m)   unmerge: model unit j  =  sum_i U[j, i] * fused unit i

applied to every tensor the group touches by the *role* of the tensor's axis
(:mod:`fxfuse.groups.roles`): an output-side axis (the rows of the layer producing the units, its bias,
a norm's affine, BatchNorm's running mean) becomes ``M @ rows``; an input-side axis (the columns of
the layer reading the units) becomes ``U^T @ rows``, so ``W2' h' = W2 U h' = W2 h`` whenever
``h = U h'``; a second moment (BatchNorm's running variance ``v`` with mean ``mu``) is merged as a
mixture, ``v' = M (v + mu^2) - (M mu)^2`` (for a permutation, ``v' = P v``).

**One convention for every method: ZipIt!'s merge / unmerge, built from a coupling.**  Given a
non-negative coupling ``T: (n, m)`` (how much of model unit ``j`` goes to fused unit ``i``),

    M = rows of T^T normalised to sum 1     (each fused unit a convex combination of model units)
    U = rows of T   normalised to sum 1     (each model unit a convex combination of fused units)

* a permutation (``T = P^T``): ``M = P``, ``U = P^T``; kept as an index vector (the fast path:
  ``index_select``, exactly what :func:`fxfuse.permute.apply_perms` does);
* one-to-many (fused model wider, unit ``j`` copied ``c_j`` times): ``M`` copies, ``U = pinv(M)``
  (``U[j, i] = 1 / c_j``): the unit's outgoing weights are split over its copies, and the fused
  network computes the same function;
* many-to-one (clusters, ZipIt!'s merge): ``M`` averages a cluster, ``U`` is the 0/1 assignment, so
  outgoing weights of merged units are summed: exact when the merged units are identical;
* soft (optimal transport, Singh & Jaggi): ``M = diag(1/beta) T^T`` is OTFusion's row-normalised
  transport.  OTFusion aligns the *next* layer's input side with the same normalised plan
  (averaging columns); we use ``U`` instead because it is the choice that keeps the function for
  every hard map above (copies and identical merges), and both agree on permutations.

Block axes (a flatten's ``g x 16``, a concat's ``(g + h)``, a head split's ``heads x head_dim``)
apply the map to the group's factor only, through :mod:`fxfuse.ir.coords`: every context (the other
factors' indices, the other blocks) is mapped alike, and positions of other blocks are kept.  An
interleaved axis (a channel shuffle's ``interleave(g, h)``) is mapped with its blocks made
contiguous and interleaved back at the new widths: its blocks must end at one width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import PermutationError
from .groups.spec import PermutationSpec, axis_index, tree_groups, tree_size
from .ir.coords import deinterleaved, group_rows, has_interleave

OUT, IN, SECOND = "out", "in", "second"  # the roles of fxfuse.groups.roles


@dataclass(frozen=True, eq=False)
class GroupMap:
    """One model's map of a group into the fused basis (see module doc).

    ``index``: for a permutation, ``fused unit i = model unit index[i]`` (``M = P``, ``U = P^T``);
    otherwise None and ``merge: (m, n)`` / ``unmerge: (n, m)`` hold the dense pair.
    """

    index: torch.Tensor | None = None
    merge: torch.Tensor | None = None
    unmerge: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            if self.merge is None or self.unmerge is None:
                raise PermutationError("a GroupMap needs an index (permutation) or both merge "
                                       "and unmerge matrices")
            m, n = self.merge.shape
            if tuple(self.unmerge.shape) != (n, m):
                raise PermutationError(f"unmerge must be (n, m) = {(n, m)} for a merge of shape "
                                       f"{(m, n)}, got {tuple(self.unmerge.shape)}")

    # -- constructors -------------------------------------------------------------------------
    @staticmethod
    def permutation(index: Any) -> GroupMap:
        t = torch.as_tensor(index)
        n = t.numel()
        if t.dim() != 1 or t.dtype.is_floating_point or not torch.equal(
                torch.sort(t.cpu()).values, torch.arange(n)):
            raise PermutationError(f"a permutation map needs a permutation of range({n}) as a "
                                   f"1-D integer tensor, got shape {tuple(t.shape)}")
        return GroupMap(index=t.long())

    @staticmethod
    def from_coupling(coupling: torch.Tensor) -> GroupMap:
        """The map of a non-negative coupling ``T: (n, m)`` (module doc); a permutation coupling
        gives the index fast path."""
        t = torch.as_tensor(coupling, dtype=torch.float64)
        if t.dim() != 2 or bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
            raise PermutationError("a coupling must be a finite non-negative (n, m) matrix")
        if bool((t.sum(0) <= 0).any()) or bool((t.sum(1) <= 0).any()):
            raise PermutationError("every model unit and every fused unit needs positive mass in "
                                   "the coupling (an empty row or column has no map)")
        n, m = t.shape
        if n == m and bool(((t > 0).sum(0) == 1).all()) and bool(((t > 0).sum(1) == 1).all()):
            return GroupMap(index=t.T.argmax(1))
        merge = t.T / t.T.sum(1, keepdim=True)
        unmerge = t / t.sum(1, keepdim=True)
        return GroupMap(merge=merge, unmerge=unmerge)

    @staticmethod
    def copies(source: Any, n: int) -> GroupMap:
        """One-to-many: fused unit ``i`` copies model unit ``source[i]`` (every unit at least once)."""
        src = torch.as_tensor(source).long()
        t = torch.zeros(n, src.numel(), dtype=torch.float64)
        t[src, torch.arange(src.numel())] = 1.0
        return GroupMap.from_coupling(t)

    @staticmethod
    def clusters(assign: Any, m: int, weights: torch.Tensor | None = None) -> GroupMap:
        """Many-to-one: model unit ``j`` goes to fused unit ``assign[j]`` (with mass
        ``weights[j]``, default 1: the fused unit is the cluster's weighted mean)."""
        a = torch.as_tensor(assign).long()
        w = torch.ones(a.numel(), dtype=torch.float64) if weights is None else (
            torch.as_tensor(weights, dtype=torch.float64))
        t = torch.zeros(a.numel(), m, dtype=torch.float64)
        t[torch.arange(a.numel()), a] = w
        return GroupMap.from_coupling(t)

    # -- queries ------------------------------------------------------------------------------
    @property
    def is_permutation(self) -> bool:
        return self.index is not None

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: fused units, model units."""
        if self.index is not None:
            return (self.index.numel(), self.index.numel())
        assert self.merge is not None
        return (int(self.merge.shape[0]), int(self.merge.shape[1]))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, U)`` as float64 matrices."""
        if self.index is not None:
            n = self.index.numel()
            p = torch.zeros(n, n, dtype=torch.float64)
            p[torch.arange(n), self.index.cpu()] = 1.0
            return p, p.T.clone()
        assert self.merge is not None and self.unmerge is not None
        return self.merge.double(), self.unmerge.double()

    def to_dict(self, lists: bool = True) -> dict[str, Any]:
        """``{"index": ...}`` or ``{"merge": ..., "unmerge": ...}``, as nested lists (JSON) or,
        with ``lists=False``, as CPU tensors."""
        if self.index is not None:
            index = self.index.detach().cpu()
            return {"index": index.tolist() if lists else index}
        m, u = self.dense()
        return {"merge": m.tolist(), "unmerge": u.tolist()} if lists else {"merge": m,
                                                                              "unmerge": u}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> GroupMap:
        """The map of :meth:`to_dict`'s output (lists or tensors)."""
        if "index" in d:
            return GroupMap.permutation(d["index"])
        return GroupMap(merge=torch.as_tensor(d["merge"], dtype=torch.float64),
                        unmerge=torch.as_tensor(d["unmerge"], dtype=torch.float64))


Maps = Mapping[str, GroupMap]


def perm_maps(perms: Mapping[str, torch.Tensor]) -> dict[str, GroupMap]:
    """Index permutations (``perms[g][i]``: the model unit at fused position ``i``) as maps."""
    return {g: GroupMap(index=p) for g, p in perms.items()}


def rebase(maps: list[dict[str, GroupMap]], anchor: int) -> list[dict[str, GroupMap]]:
    """Every model's maps into model ``anchor``'s own basis instead of the one they were found
    in: where the anchor's map of a group is the permutation ``P_a``, each model's ``M`` becomes
    ``P_a^T M`` and ``U`` becomes ``U P_a`` (for permutations, ``index_k[argsort(index_a)]``), so
    the anchor's maps are the identity.  Groups whose anchor map is not a permutation are kept."""
    out = [dict(mk) for mk in maps]
    for g, ma in maps[anchor].items():
        if ma.index is None:
            continue
        inv = torch.argsort(ma.index)
        if torch.equal(inv, torch.arange(inv.numel(), device=inv.device)):
            continue
        for k, mk in enumerate(maps):
            m = mk[g]
            if m.index is not None:
                out[k][g] = GroupMap(index=m.index[inv.to(m.index.device)])
            else:
                merge, unmerge = m.dense()
                out[k][g] = GroupMap(merge=merge[inv.cpu()], unmerge=unmerge[:, inv.cpu()])
    return out


def index_perms(maps: Sequence[Mapping[str, GroupMap]]) -> list[dict[str, torch.Tensor]]:
    """The index permutations of the maps that are permutations (the inverse of
    :func:`perm_maps`; :attr:`FusionState.perms` of an alignment found as maps)."""
    return [{g: m.index for g, m in mk.items() if m.index is not None} for mk in maps]


def fused_sizes(spec: PermutationSpec, maps: Maps) -> dict[str, int]:
    """Group sizes of the fused model (a map's ``m``, the spec's size where no map is given)."""
    return {g.name: maps[g.name].shape[0] if g.name in maps else g.size for g in spec.groups}


def apply_maps(state: Mapping[str, torch.Tensor], spec: PermutationSpec, maps: Maps
               ) -> dict[str, torch.Tensor]:
    """``state`` taken into the fused basis by ``maps`` (module doc); tensors no map touches are
    shared, not copied.  Permutations take the index path of :func:`fxfuse.permute.apply_perms`;
    dense maps need every touched axis's role in ``spec.roles``."""
    from .permute import apply_perms, with_metadata

    perms = {g: m.index for g, m in maps.items() if m.index is not None}
    out = apply_perms(state, spec, perms) if perms else with_metadata(dict(state), state)
    dense = {g: m for g, m in maps.items() if m.index is None}
    if not dense:
        return out
    sizes = {g.name: g.size for g in spec.groups}
    before = dict(out)  # second moments read their mean in the model's own basis
    for (key, axis), a in spec.axes.items():
        touched = [g for g in dict.fromkeys(tree_groups(a.layout)) if g in dense]
        if not touched:
            continue
        role = spec.roles.get((key, axis))
        if role is None or role == "conflict":
            why = ("is used both as an output and as an input of the group (a tied weight)"
                   if role == "conflict" else "has no role the rules could derive")
            raise PermutationError(
                f"{key}:{axis} {why}; only a permutation can act on it, and group "
                f"{touched[0]!r} has a {dense[touched[0]].shape[0]}x"
                f"{dense[touched[0]].shape[1]} map")
        t, sub = out[key], {g: dense[g] for g in touched}
        if role.startswith(SECOND):
            mean = before[role.split(":", 1)[1]].double()
            t2 = map_groups(t.double() + mean * mean, axis, a.layout, sub, sizes, OUT)
            mean = map_groups(mean, axis, a.layout, sub, sizes, OUT)
            out[key] = (t2 - mean * mean).clamp_min(0).to(t.dtype)
            continue
        out[key] = map_groups(t, axis, a.layout, sub, sizes, role)
    return out


def map_groups(t: torch.Tensor, axis: int, tree: Any, maps: Maps, sizes: Mapping[str, int],
               role: str = OUT) -> torch.Tensor:
    """``t`` with each group's map of ``maps`` applied along ``axis`` (layout ``tree``, the
    spec's ``sizes``), as a tensor of that ``role`` (``OUT``: ``M``; ``IN``: ``U^T``):
    permutations by their index, dense maps by :func:`map_axis`.  Also the way to read an
    activation in the fused basis (an activation's units are output-side)."""
    perms = {g: m.index for g, m in maps.items() if m.index is not None}
    if perms:
        t = t.index_select(axis, axis_index(tree, perms, sizes, t.device))
    cur = dict(sizes)
    dense = [g for g in dict.fromkeys(tree_groups(tree)) if g in maps and maps[g].index is None]
    if not dense:
        return t
    layout = tree
    if has_interleave(tree):  # blocks contiguous while maps change their widths one by one
        layout, order = deinterleaved(tree, sizes)
        t = t.index_select(axis, order.to(t.device))
    for g in dense:
        merge, unmerge = maps[g].dense()
        mat = unmerge.T if role == IN else merge
        t = map_axis(t, axis, layout, g, cur, mat)
        cur[g] = mat.shape[0]
    if layout is not tree:
        t = t.index_select(axis, torch.argsort(deinterleaved(tree, cur)[1]).to(t.device))
    return t


def map_axis(t: torch.Tensor, axis: int, tree: Any, group: str, sizes: Mapping[str, int],
             mat: torch.Tensor) -> torch.Tensor:
    """``t`` with ``mat: (m, n)`` applied to ``group``'s factor of ``axis`` (layout ``tree``, group
    sizes ``sizes`` before the map): every context of the group is mapped alike, positions of
    blocks the group does not touch are kept in order."""
    sizes = dict(sizes)
    rows = group_rows(tree, group, sizes)
    new_sizes = {**sizes, group: int(mat.shape[0])}
    rows_new = group_rows(tree, group, new_sizes)
    if rows is None or rows_new is None:
        raise PermutationError(f"group {group!r} occurs twice along one position of an axis "
                               f"(a g x g layout): only a permutation can act on it")
    moved = t.movedim(axis, 0)
    rest = moved.shape[1:]
    total = tree_size(tree, new_sizes)
    new = moved.new_zeros((total, *rest))
    keep_old = _complement(rows, moved.shape[0], t.device)
    keep_new = _complement(rows_new, total, t.device)
    new[keep_new] = moved[keep_old]
    n, r = rows.shape
    block = moved[rows.reshape(-1).to(t.device)].reshape(n, r, -1)
    mapped = torch.einsum("mn,nrk->mrk", mat.to(device=t.device, dtype=torch.float64),
                          block.double())
    new[rows_new.reshape(-1).to(t.device)] = mapped.reshape(-1, *rest).to(t.dtype)
    return new.movedim(0, axis)


def _complement(rows: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[rows.reshape(-1)] = False
    return torch.nonzero(mask).flatten().to(device)
