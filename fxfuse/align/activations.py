"""Activation matching: each model's group permutations into model 0's basis, from what the
units compute on data.

Run the traced graph of both models over data (symbolic or ``torch.export`` graphs alike,
:mod:`fxfuse.ir.capture`), and for every group correlate the features of every node output ``g``
acts on (standardised, summed over those nodes); the permutation maximises the total
correlation.  Groups that share an axis are matched with each other's permutations applied to
their contexts (:func:`_solve_activations`); groups no traced node carries (inside a leaf module)
are matched on their weights with the rest fixed (:func:`_match_weights_of`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PipelineError
from ..groups.spec import PermutationSpec, axis_index, tree_groups
from ..ir.capture import ActivationCapture
from ..ir.coords import as_rows, group_rows
from ..passes.base import FusionState, Pass, batch_inputs, limited, on_device, progress
from ..solvers.assignment import max_assignment
from .weights import _CostCache, _identity, _WeightMatcher
from .widths import require_equal_widths


@dataclass(frozen=True)
class ActivationMatching:
    """Config: activation matching on ``data`` (batches ``x`` or ``(x, y)``)."""

    data: Iterable[Any] = field(repr=False, default=(), metadata={"data": True})
    max_batches: int | None = None


def _features(spec: PermutationSpec, device: torch.device
              ) -> dict[str, list[tuple[str, int, torch.Tensor]]]:
    """group -> [(node, axis, rows)] for every traced node output the group acts on."""
    sizes = {g.name: g.size for g in spec.groups}
    out: dict[str, list[tuple[str, int, torch.Tensor]]] = {g.name: [] for g in spec.groups}
    for node, trees in spec.activations.items():
        for axis, tree in enumerate(trees):
            for g in dict.fromkeys(tree_groups(tree)):
                rows = group_rows(tree, g, sizes)
                if rows is not None and g in out:
                    out[g].append((node, axis, rows.to(device)))
    return out


class AlignActivations(Pass):
    """Activation matching of every model to model 0 (correlation of group features)."""

    name = "align-activations"

    def __init__(self, config: ActivationMatching) -> None:
        self.config = config

    def requires(self, state: FusionState) -> None:
        if state.spec is None:
            raise PipelineError("align-activations needs the discovered groups")
        require_equal_widths(state, "ActivationMatching")
        if len(state.models) != len(state.states):
            raise PipelineError("activation matching runs the models: give them (on state "
                                "dicts, fxfuse.align_states(..., factory=...))")

    def call(self, state: FusionState) -> None:
        assert state.spec is not None
        spec = state.spec
        data = limited(self.config.data, self.config.max_batches)
        feats = _features(spec, state.device)
        wanted = {node for rows in feats.values() for node, _, _ in rows}
        models = [on_device(m, state.device) for m in state.models]
        captures = [ActivationCapture(m, spec.tracer, wanted) for m in models]
        shared = _shared_axes(spec, feats)
        blind = [g for g, rows in feats.items() if not rows]  # no traced node carries them
        perms = [_identity(spec, state.device)]
        for k in range(1, len(captures)):
            single: dict[str, list[torch.Tensor]] = {}
            full: dict[tuple[str, int], list[torch.Tensor]] = {}
            for batch in progress(data, f"activation statistics, model {k}", state.progress):
                xs = batch_inputs(batch, state.device)
                seen_a, seen_b = captures[0](*xs), captures[k](*xs)
                for g, rows_list in feats.items():
                    for node, axis, rows in rows_list:
                        if node not in seen_a or node not in seen_b:
                            continue
                        if (node, axis) in shared:  # whole axis: contexts move with other groups
                            if g == shared[(node, axis)]:  # once per batch
                                _accumulate(full, (node, axis),
                                            *(_axis_rows(s[node], axis) for s in (seen_a, seen_b)))
                            continue
                        _accumulate(single, f"{g}\0{node}\0{axis}",
                                    as_rows(seen_a[node], axis, rows).double(),
                                    as_rows(seen_b[node], axis, rows).double())
            found = _solve_activations(spec, single, full, state.device)
            if blind:
                found = _match_weights_of(blind, spec, state.states[0], state.states[k], found,
                                          state.device)
            perms.append(found)
        if blind:
            state.report.notes.append(
                f"align-activations: {len(blind)} groups have no activation in the traced graph "
                f"(inside leaf modules, e.g. {blind[0]}); matched on weights, the rest fixed")
        state.perms = perms


def _match_weights_of(groups: list[str], spec: PermutationSpec, ref: dict[str, torch.Tensor],
                      other: dict[str, torch.Tensor], perms: dict[str, torch.Tensor],
                      device: torch.device, rounds: int = 20) -> dict[str, torch.Tensor]:
    """Weight matching of ``groups`` alone, every other group held at ``perms``: coordinate
    ascent of ``<C_g, P>`` with weight matching's own costs (:class:`~fxfuse.align.weights.
    _CostCache`: ``C_g = sum_t A_(g) B'_(g)^T`` over the group's parameter axes)."""
    params = {k for k in ref if k not in spec.buffers}
    costs = _CostCache(_WeightMatcher(spec, device, params), ref, other, perms, pooled=False)
    for _ in range(rounds):
        changed = False
        for g in groups:
            new = max_assignment(costs.group(g)).to(device)
            if not torch.equal(new, costs.perms[g]):
                costs.accept(g, new)
                changed = True
        if not changed:
            break
    return costs.perms


def _shared_axes(spec: PermutationSpec, feats: dict[str, list[tuple[str, int, torch.Tensor]]]
                 ) -> dict[tuple[str, int], str]:
    """Node axes on which more than one group acts (head x head_dim, a concat of groups), each
    with the first group reading it (whose turn accumulates the axis's statistics)."""
    out: dict[tuple[str, int], str] = {}
    for g, rows_list in feats.items():
        for node, axis, _ in rows_list:
            if len(set(tree_groups(spec.activations[node][axis]))) > 1:
                out.setdefault((node, axis), g)
    return out


def _axis_rows(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, 0).reshape(x.shape[axis], -1).double()


def _accumulate(stats: dict[Any, list[torch.Tensor]], key: Any, a: torch.Tensor, b: torch.Tensor
                ) -> None:
    """Moments of features ``a``, ``b``: (units, samples) for one correlation matrix."""
    acc = stats.get(key)
    if acc is None:
        n, dev = a.shape[0], a.device
        acc = stats[key] = [torch.zeros(())] + [
            torch.zeros(n, dtype=torch.float64, device=dev) for _ in range(4)] + [
            torch.zeros(n, n, dtype=torch.float64, device=dev)]
    acc[0] = acc[0] + a.shape[1]
    acc[1] += a.sum(1)
    acc[2] += b.sum(1)
    acc[3] += (a * a).sum(1)
    acc[4] += (b * b).sum(1)
    acc[5] += a @ b.T


def _correlation(m: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, saa: torch.Tensor,
                 sbb: torch.Tensor, sab: torch.Tensor) -> torch.Tensor:
    mean_a, mean_b = sa / m, sb / m
    std_a = (saa / m - mean_a**2).clamp_min(0).sqrt() + 1e-8
    std_b = (sbb / m - mean_b**2).clamp_min(0).sqrt() + 1e-8
    return (sab / m - mean_a[:, None] * mean_b[None, :]) / (std_a[:, None] * std_b[None, :])


def _solve_activations(spec: PermutationSpec, single: dict[str, list[torch.Tensor]],
                       full: dict[tuple[str, int], list[torch.Tensor]], device: torch.device,
                       rounds: int = 20) -> dict[str, torch.Tensor]:
    """Permutations maximising the total correlation.  A group alone on its axes is one
    assignment.  On an axis several groups share, position ``(i, r)`` of model 0 (unit ``i`` of
    ``g``, context ``r``) meets the other model's unit ``j`` in context ``r`` *moved by the other
    groups' permutations*: ``S_g[i, j] = sum_r C[rows[i, r], idx[rows[j, r]]]`` with ``idx`` the
    axis index of every other group's current permutation; coordinate ascent over those groups
    until none changes (``rounds`` at most)."""
    out = _identity(spec, device)
    corr: dict[str, torch.Tensor] = {}
    for name, acc in single.items():
        g = name.split("\0")[0]
        c = _correlation(*acc)
        corr[g] = corr[g] + c if g in corr else c
    for g, c in corr.items():
        out[g] = max_assignment(c).to(device)
    if not full:
        return out
    sizes = {g.name: g.size for g in spec.groups}
    by_tree: dict[Any, torch.Tensor] = {}  # the same layout: correlations add up
    for (node, axis), acc in full.items():
        tree = spec.activations[node][axis]
        c = _correlation(*acc)
        by_tree[tree] = by_tree[tree] + c if tree in by_tree else c
    shared = list(dict.fromkeys(g for t in by_tree for g in tree_groups(t)))
    for g in shared:  # start: each unit pair scored at its best-matching contexts (invariant
        # to the other groups' permutations), so the ascent does not start from noise
        score = corr[g].clone() if g in corr else torch.zeros(
            sizes[g], sizes[g], dtype=torch.float64, device=device)
        for tree, c in by_tree.items():
            rows = group_rows(tree, g, sizes)
            if rows is not None:
                rows = rows.to(c.device)
                block = c[rows[:, None, :, None], rows[None, :, None, :]]  # (n, n, R, R)
                score += block.amax(-1).sum(-1).to(score.device)
        out[g] = max_assignment(score).to(device)
    for _ in range(rounds):
        changed = False
        for g in shared:
            score = corr[g].clone() if g in corr else torch.zeros(
                sizes[g], sizes[g], dtype=torch.float64, device=device)
            for tree, c in by_tree.items():
                rows = group_rows(tree, g, sizes)
                if rows is None:
                    continue
                rows = rows.to(c.device)
                idx = axis_index(tree, {**out, g: torch.arange(sizes[g], device=device)}, sizes,
                                 c.device)
                score += c[rows[:, None, :], idx[rows][None, :, :]].sum(-1).to(score.device)
            new = max_assignment(score).to(device)
            if not torch.equal(new, out[g]):
                out[g], changed = new, True
        if not changed:
            break
    return out
