"""Optimal-transport fusion (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020).

Every model's units of a group are *transported* onto the anchor's units (the anchor: the model
whose units are the fused basis, :func:`fxfuse.fuse`'s ``anchor``), so models of different widths
fuse: model ``k`` with ``n`` units, the anchor with ``m``, the plan ``T: (n, m)`` solves

    min_T <C, T>   s.t.  T 1 = a,  T^T 1 = b,  T >= 0

with ``a`` and ``b`` the units' masses (uniform, or the given per-unit ``importance`` normalised
to 1), exactly (``reg=0``: ``ot.emd``, a vertex of the transport polytope: a permutation when
``n = m`` and the masses are uniform, hard copies when ``m`` is a whole multiple of ``n``) or with
entropic regularisation (``reg > 0``: ``ot.sinkhorn`` on the cost divided by its largest entry,
so ``reg`` is relative).  The plan becomes the group's :class:`~fxfuse.maps.GroupMap` by the
core's one convention (``GroupMap.from_coupling``: the merge averages the model units a fused unit
receives, the unmerge splits a unit's outgoing weights over the fused units it went to).

**Ground cost** ``C[j, i] = ||f_j - f'_i||^2`` between model unit ``j`` and anchor unit ``i``:

* ``cost="weights"``: ``f`` is everything the group's unit touches, over every member tensor
  (the producers' rows and biases, norms, a residual stream's every writer and reader), with each
  *other* grouped axis of that tensor already taken into the anchor's basis by its group's map
  where that group is solved (its merge ``M``: input columns averaged into the fused units, as
  OTFusion aligns incoming weights, so widths compare on one scale), and summarised by its root
  mean square (invariant to the map not yet known) where it is not;
* ``cost="activations"``: ``f`` is the unit's activation over ``data`` at every traced node the
  group acts on (other groups sharing that axis averaged out); groups no traced node carries
  fall back to the weight cost (reported).

**Order.**  Groups are solved one at a time in data-flow order: by the first traced node that
carries them (:attr:`PermutationSpec.activations`, in graph order), groups no node carries last
in the spec's order.  A residual stream is *one* group: solved once, where it is first produced
(the stem), from every tensor it touches; the blocks on it read the stream and write back into
it, so stream and block groups form a cycle: at the stream's turn, a block's own inner group is
not solved yet and enters the stream's cost through its root-mean-square summary; each block's
group, solved after, sees the stream's map.  One pass, no iteration (OTFusion's layer-wise
order); the anchor's maps are the identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, PipelineError
from ..groups.spec import PermutationSpec, tree_groups
from ..ir.capture import ActivationCapture
from ..ir.coords import as_rows, group_rows
from ..maps import OUT, GroupMap, index_perms, map_groups
from ..pairing import sizes_of
from ..passes.base import FusionState, Pass, batch_inputs, limited, on_device, progress
from .activations import _features

COSTS = ("weights", "activations")


@dataclass(frozen=True)
class OptimalTransport:
    """Config: OT fusion (module doc).

    ``cost``: ``"weights"`` (no data) or ``"activations"`` (on ``data``: batches ``x`` or
    ``(x, y)``).  ``reg``: 0 for exact OT, > 0 for Sinkhorn (relative to the largest cost).
    ``importance``: None (uniform masses) or one mapping per model, group name -> a positive mass
    per unit (groups not listed uniform).  ``max_batches``: batches of ``data`` used at most.
    """

    data: Iterable[Any] = field(repr=False, default=(),
                                metadata={"data": True, "optional": True})
    cost: str = "weights"
    reg: float = 0.0
    importance: Sequence[Mapping[str, Any]] | None = field(default=None, repr=False)
    max_batches: int | None = None
    sinkhorn_iters: int = 1000

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise InputError(f"OptimalTransport(cost={self.cost!r}): cost must be one of "
                             f"{', '.join(map(repr, COSTS))}")
        if not isinstance(self.reg, (int, float)) or not 0 <= self.reg < float("inf"):
            raise InputError(f"OptimalTransport(reg={self.reg!r}): reg must be a number >= 0 "
                             f"(0: exact OT)")
        if self.sinkhorn_iters < 1:
            raise InputError("OptimalTransport(sinkhorn_iters=...) must be >= 1")


def data_flow_order(spec: PermutationSpec) -> list[str]:
    """Group names in data-flow order (module doc)."""
    order: dict[str, None] = {}
    for trees in spec.activations.values():
        for tree in trees:
            for g in tree_groups(tree):
                order.setdefault(g, None)
    return [*order, *[g.name for g in spec.groups if g.name not in order]]


def _rms(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.double().pow(2).mean(dim=axis, keepdim=True).sqrt()


def unit_features(spec: PermutationSpec, state: Mapping[str, torch.Tensor], group: str,
                  solved: Mapping[str, GroupMap]) -> torch.Tensor:
    """``(n, d)``: each unit of ``group``'s weight features in the anchor's basis (module doc:
    solved groups' axes mapped by their merge, unsolved ones reduced to their RMS)."""
    sizes = sizes_of(spec)
    feats = []
    for key, axis in spec.group(group).members:
        t = state[key].detach().double()
        for ax in range(t.dim()):
            a = spec.axes.get((key, ax))
            if a is None or not a.groups:
                continue
            others = [g for g in dict.fromkeys(tree_groups(a.layout)) if g != group]
            if ax == axis:
                if any(g not in solved for g in others):
                    continue  # contexts pooled below
                if others:
                    t = map_groups(t, ax, a.layout, {g: solved[g] for g in others}, sizes, OUT)
            elif all(g in solved for g in tree_groups(a.layout)):
                t = map_groups(t, ax, a.layout, {g: solved[g] for g in dict.fromkeys(
                    tree_groups(a.layout))}, sizes, OUT)
            else:
                t = _rms(t, ax)
        layout = spec.axes[(key, axis)].layout
        mapped_sizes = {**sizes, **{g: solved[g].shape[0] for g in solved if g != group}}
        rows = group_rows(layout, group, mapped_sizes)
        if rows is None:
            continue
        others = [g for g in tree_groups(layout) if g != group]
        x = as_rows(t, axis, rows)
        if any(g not in solved for g in others):  # contexts in unaligned bases: RMS over them
            x = x.reshape(rows.shape[0], rows.shape[1], -1).pow(2).mean(1).sqrt()
        feats.append(x.reshape(rows.shape[0], -1))
    if not feats:
        raise PipelineError(f"group {group!r} touches no tensor; OT has nothing to compare")
    return torch.cat(feats, dim=1)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``C[j, i] = ||x_j - y_i||^2`` (float64)."""
    x, y = x.double(), y.double()
    c = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return c.clamp_min(0)


def masses(importance: Any, n: int, what: str) -> torch.Tensor:
    """Unit masses summing to 1: uniform, or ``importance`` (n positive finite numbers)."""
    if importance is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(importance, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise InputError(f"OptimalTransport importance for {what} has {w.numel()} values but the "
                         f"group has {n} units")
    if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise InputError(f"OptimalTransport importance for {what} must be positive and finite "
                         f"(a unit with no mass has no place in the plan)")
    return w / w.sum()


def transport(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float,
              iters: int = 1000) -> torch.Tensor:
    """The plan ``T: (n, m)`` of ``min <C, T>`` with marginals ``a``, ``b`` (module doc)."""
    import ot  # POT: the fxfuse[ot] extra

    c = cost.double().cpu()
    if reg == 0:
        t = torch.as_tensor(ot.emd(a, b, c), dtype=torch.float64)
        t[t < 1e-12 * float(t.max())] = 0.0  # round-off of the simplex, never a row's mass
    else:
        scale = float(c.max()) if float(c.max()) > 0 else 1.0
        t = torch.as_tensor(ot.sinkhorn(a, b, c / scale, reg, numItermax=iters),
                            dtype=torch.float64)
    return t


def plan_map(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float, iters: int
             ) -> GroupMap:
    """The group map of the optimal plan (a permutation's index path when it is one)."""
    t = transport(cost, a, b, reg, iters)
    if not bool((t.sum(1) > 0).all()) or not bool((t.sum(0) > 0).all()):
        raise PipelineError("the transport plan left a unit without mass (Sinkhorn underflow: "
                            "raise reg)")
    return GroupMap.from_coupling(t)


class _ActivationCosts:
    """Per group, ``C = |x|^2 + |y|^2 - 2 x y^T`` summed over batches and the group's nodes,
    ``x`` model ``k``'s unit features, ``y`` the anchor's."""

    def __init__(self, spec_k: PermutationSpec, spec_a: PermutationSpec) -> None:
        self.rows_k = _node_rows(spec_k)
        self.rows_a = _node_rows(spec_a)
        self.cost: dict[str, torch.Tensor] = {}

    def nodes(self) -> set[str]:
        return {node for rows in self.rows_a.values() for node, _, _, _ in rows}

    def add(self, seen_k: Mapping[str, torch.Tensor], seen_a: Mapping[str, torch.Tensor]) -> None:
        for g, rows in self.rows_a.items():
            for (node, axis, ra, pool), (_, _, rk, _) in zip(rows, self.rows_k.get(g, [])):
                if node not in seen_k or node not in seen_a:
                    continue
                x = _activation_rows(seen_k[node], axis, rk, pool)
                y = _activation_rows(seen_a[node], axis, ra, pool)
                c = squared_distances(x, y)
                self.cost[g] = self.cost[g] + c if g in self.cost else c


def _node_rows(spec: PermutationSpec) -> dict[str, list[tuple[str, int, torch.Tensor, bool]]]:
    """group -> [(node, axis, rows, whether other groups share the axis)]: activation
    matching's feature rows (:func:`fxfuse.align.activations._features`) with the sharing flag."""
    return {g: [(node, axis, rows, len(set(tree_groups(spec.activations[node][axis]))) > 1)
                for node, axis, rows in found]
            for g, found in _features(spec, torch.device("cpu")).items() if found}


def _activation_rows(x: torch.Tensor, axis: int, rows: torch.Tensor, pool: bool) -> torch.Tensor:
    r = as_rows(x.detach(), axis, rows).double()
    if pool:  # other groups' positions are in unaligned bases: average them out
        r = r.reshape(rows.shape[0], rows.shape[1], -1).mean(1)
    return r


class AlignOptimalTransport(Pass):
    """OT of every model onto the anchor (module doc)."""

    name = "align-ot"

    def __init__(self, config: OptimalTransport) -> None:
        self.config = config

    def requires(self, state: FusionState) -> None:
        if state.spec is None or not state.states:
            raise PipelineError("align-ot needs the discovered groups and model states")
        if state.anchor is None:
            raise InputError(
                "OptimalTransport transports every model onto the anchor's units, but no model "
                "has the target's widths: pick the target among the models (target=INDEX), or "
                "use neuron interpolation to fuse into widths none of them has")
        imp = self.config.importance
        if imp is not None and len(imp) != len(state.states):
            raise InputError(f"OptimalTransport importance has {len(imp)} entries for "
                             f"{len(state.states)} models: give one mapping per model")
        if self.config.cost == "activations":
            if len(state.models) != len(state.states):
                raise PipelineError("cost='activations' runs the models: give them")
            if not self.config.data:
                raise InputError("OptimalTransport(cost='activations') needs data: pass "
                                 "fuse(..., data=batches) or OptimalTransport(data=batches)")

    def call(self, state: FusionState) -> None:
        assert state.spec is not None and state.anchor is not None
        cfg, a_idx = self.config, state.anchor
        spec_a = state.spec_of(a_idx)
        act = self._activation_costs(state) if cfg.cost == "activations" else {}
        blind: set[str] = set()
        maps: list[dict[str, GroupMap]] = []
        order = data_flow_order(spec_a)
        for k in range(len(state.states)):
            if k == a_idx:
                maps.append({g.name: GroupMap(index=torch.arange(g.size)) for g in spec_a.groups})
                continue
            spec_k = state.spec_of(k)
            solved_k: dict[str, GroupMap] = {}
            solved_a: dict[str, GroupMap] = {}
            for g in progress(order, f"optimal transport, model {k}", state.progress):
                if g in act.get(k, {}):
                    cost = act[k][g]
                else:
                    if cfg.cost == "activations":
                        blind.add(g)
                    cost = squared_distances(
                        unit_features(spec_k, state.states[k], g, solved_k),
                        unit_features(spec_a, state.states[a_idx], g, solved_a))
                n, m = cost.shape
                imp = cfg.importance
                a = masses(None if imp is None else imp[k].get(g), n, f"models[{k}] {g!r}")
                b = masses(None if imp is None else imp[a_idx].get(g), m,
                           f"models[{a_idx}] {g!r}")
                solved_k[g] = plan_map(cost, a, b, float(cfg.reg), cfg.sinkhorn_iters)
                solved_a[g] = GroupMap(index=torch.arange(m))
            maps.append(solved_k)
        if blind:
            state.report.notes.append(
                f"align-ot: {len(blind)} groups carried by no traced node (e.g. "
                f"{sorted(blind)[0]}) used the weight cost")
        moved = [f"models[{k}]: " + ", ".join(f"{g} {mp.shape[1]}->{mp.shape[0]}"
                                              for g, mp in list(mk.items())[:3])
                 for k, mk in enumerate(maps) if k != a_idx and state.specs is not None]
        if moved:
            state.report.notes.append(f"align-ot: transported onto models[{a_idx}]'s units; "
                                      + "; ".join(moved))
        state.maps = maps
        if all(mp.is_permutation for mk in maps for mp in mk.values()):
            state.perms = index_perms(maps)

    def _activation_costs(self, state: FusionState) -> dict[int, dict[str, torch.Tensor]]:
        assert state.anchor is not None
        a_idx = state.anchor
        data = limited(self.config.data, self.config.max_batches)
        spec_a = state.spec_of(a_idx)
        out: dict[int, dict[str, torch.Tensor]] = {}
        costs = {k: _ActivationCosts(state.spec_of(k), spec_a)
                 for k in range(len(state.models)) if k != a_idx}
        wanted = set().union(*(c.nodes() for c in costs.values())) if costs else set()
        models = [on_device(m, state.device) for m in state.models]
        captures = {k: ActivationCapture(models[k], state.spec_of(k).tracer, wanted)
                    for k in range(len(models))}
        for batch in progress(data, "activation costs", state.progress):
            xs = batch_inputs(batch, state.device)
            seen_a = captures[a_idx](*xs)
            for k, c in costs.items():
                c.add(captures[k](*xs), seen_a)
        for k, c in costs.items():
            out[k] = c.cost
        return out
