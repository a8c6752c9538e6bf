"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): each model's group permutations into
model 0's basis, from the weights alone.

For reference weights ``A`` and weights ``B`` to align, coordinate descent over the groups: for
group ``g`` with the other groups' permutations held fixed, solve

    max_P  <C_g, P>,   C_g = sum over every parameter axis g acts on of  A_(g) B'_(g)^T

where ``X_(g)`` lays the tensor out with one row per unit of ``g`` (:mod:`fxfuse.ir.coords`: block
structure from flattens, concats, grouped convs included) and ``B'`` is ``B`` with every other
permutation applied.  Buffers (BatchNorm running statistics) are permuted with their group but
not matched on, as in Git Re-Basin: they are statistics of the data, on another scale than the
weights (random or trained, their outer products would dominate the cost), and REPAIR /
ResetBatchNorm recompute them; a group that touches no parameter is matched on its buffers.
The descent starts from the identity and from a forward pass (each group in data-flow order
solved on the cost terms that no unsolved group changes, :meth:`_WeightMatcher.forward`), and the
one ending at the shorter distance is kept (``WeightMatching.start``).  Each step is a linear
assignment (``scipy.optimize.linear_sum_assignment``); sweeps repeat in
random order until no group changes, or (``WeightMatching.tol``) until a sweep shortens the
squared distance ``sum_t ||A_t - P(B_t)||^2`` by less than ``tol`` of its value.  The cost is
computed with torch on the models' device; only the ``|g| x |g|`` matrix goes to the host for the
solver, which runs in worker threads (scipy releases the GIL) while the next costs are computed,
each solve of a group warm-started from the duals of its last one
(:mod:`fxfuse.solvers.assignment`).

**N models**: every model is first matched to model 0, then MergeMany rounds re-match each model to
the mean of the others (all in the common basis), each from its current permutations, until no
permutation changes.
"""

from __future__ import annotations

import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, PipelineError
from ..groups.spec import PermutationSpec, axis_index, tree_groups
from ..ir.coords import as_rows, group_rows
from ..passes.base import FusionState, Pass, progress
from ..permute import apply_perms
from ..solvers.assignment import WarmAssignment, max_assignment


@dataclass(frozen=True)
class WeightMatching:
    """Config: Git Re-Basin weight matching.

    ``max_iter``: sweeps at most; ``merge_many_rounds``: MergeMany rounds for N > 2 models.
    ``tol``: the descent ends at the first sweep that shortens the squared distance
    ``sum_t ||A_t - P(B_t)||^2`` (over the matched parameters) by no more than ``tol`` of its
    value, or when no group changes.  ``tol=0`` runs to the exact fixed point (no group changes:
    Git Re-Basin's rule).  The default ``1e-3`` stops where a sweep gains under 0.1%: measured on
    two random ResNet-50s (benchmarks/RESULTS.md) the exact descent needs ~27 sweeps to shorten
    the distance by a further 0.1%; on trained MNIST MLPs the fused accuracy moves by < 0.1 points.
    ``start``: where each model's first match to model 0 starts: ``"init"`` (the identity, Git
    Re-Basin's start), ``"forward"`` (one pass in data-flow order on exact costs,
    :meth:`_WeightMatcher.forward`) or ``"both"`` (the default: a descent from each, keeping the
    shorter distance, so never farther than Git Re-Basin's start alone; for N > 2 models the
    MergeMany run from the identity and the one from both starts, keeping the models closer
    together).  MergeMany rounds descend from the model's current permutations.
    From the identity alone the descent stalls far from a known permutation on fire modules and
    depthwise inverted residuals (tests/test_fuse.py, ``squeezenet`` / ``mobilenetv2_lib``).
    """

    max_iter: int = 100
    seed: int = 0
    merge_many_rounds: int = 20
    tol: float = 1e-3
    start: str = "both"

    def __post_init__(self) -> None:
        if self.start not in _STARTS:
            raise InputError(f"WeightMatching(start={self.start!r}): start must be one of "
                             f"{', '.join(map(repr, _STARTS))}")
        if not (isinstance(self.tol, (int, float)) and 0 <= self.tol < 1):
            raise InputError(f"WeightMatching(tol={self.tol!r}): tol must be a number in [0, 1) "
                             f"(0 runs the descent until no group changes)")
        if self.max_iter < 1 or self.merge_many_rounds < 0:
            raise InputError(f"WeightMatching(max_iter={self.max_iter}, merge_many_rounds="
                             f"{self.merge_many_rounds}): max_iter must be >= 1 and "
                             f"merge_many_rounds >= 0")


_STARTS = ("both", "forward", "init")


def _identity(spec: PermutationSpec, device: torch.device) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size, device=device) for g in spec.groups}


class _WeightMatcher:
    """Precomputed row layouts for every (group, tensor axis) pair of a spec."""

    def __init__(self, spec: PermutationSpec, device: torch.device,
                 params: set[str] | None = None) -> None:
        self.spec = spec
        self.sizes = {g.name: g.size for g in spec.groups}
        self.device = device
        self.trees: dict[str, dict[int, Any]] = {}
        for (key, axis), a in spec.axes.items():
            if a.groups:
                self.trees.setdefault(key, {})[axis] = a.layout
        self.members: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
        for g in spec.groups:
            rows = []
            for key, axis in g.members:
                r = group_rows(self.trees[key][axis], g.name, self.sizes)
                if r is not None:
                    rows.append((key, axis, r.to(device)))
            learned = [m for m in rows if params is None or m[0] in params]
            self.members[g.name] = learned or rows
        # (key, axis) -> whether other groups share that axis with the one being matched;
        # group -> its members partitioned by the groups their cost depends on
        self.shared = {(key, axis): len(set(tree_groups(t))) > 1
                       for key, axes in self.trees.items() for axis, t in axes.items()}
        self.blocks: dict[str, dict[tuple[str, ...], list[tuple[str, int, torch.Tensor]]]] = {}
        self.deps: dict[str, tuple[str, ...]] = {}
        for name, ms in self.members.items():
            parts: dict[tuple[str, ...], list[tuple[str, int, torch.Tensor]]] = {}
            for key, axis, unit_rows in ms:
                used = {d for ax, t in self.trees[key].items() for d in tree_groups(t)
                        if d != name or ax != axis}
                parts.setdefault(tuple(sorted(used)), []).append((key, axis, unit_rows))
            self.blocks[name] = parts
            self.deps[name] = tuple(sorted({d for deps in parts for d in deps}))
        self.neighbours = {name: set(deps) for name, deps in self.deps.items()}
        for name, deps in self.deps.items():
            for d in deps:
                self.neighbours.setdefault(d, set()).add(name)

    def _index(self, key: str, axis: int, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        return axis_index(self.trees[key][axis], perms, self.sizes, self.device)

    def match(self, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
              init: dict[str, torch.Tensor], max_iter: int, seed: int,
              show: bool, tol: float = 0.0, start: str = "both") -> dict[str, torch.Tensor]:
        """The descent (pooled, coarse, then exact) from ``init`` (``start="init"``), from
        :meth:`forward`'s permutations (``"forward"``) or from both, keeping the one that ends at
        the shorter distance (``"both"``; a tie keeps ``init``'s).  Where no group has more than
        one context on any axis (plain chains, ResNets) pooling changes nothing: skipped."""
        pooled = any(rows.shape[1] > 1 for ms in self.members.values() for _, _, rows in ms)
        starts = {"init": [init], "forward": [], "both": [init]}[start]
        if start != "init":
            starts.append(self.forward(ref, other, init, pooled))
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        for first in starts:
            if pooled:
                first = self.descend(ref, other, first, max_iter, seed, False, pooled=True)
            perms = self.descend(ref, other, first, max_iter, seed, show, pooled=False, tol=tol)
            d = self._distance2(ref, other, perms) if len(starts) > 1 else 0.0
            if best is None or d < best[0]:
                best = (d, perms)
        assert best is not None
        return best[1]

    def forward(self, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                init: dict[str, torch.Tensor], pooled: bool) -> dict[str, torch.Tensor]:
        """One pass in data-flow order, each group solved on its *exact* cost only: the blocks
        of members whose every other group is already solved in this pass (the group next to the
        fixed input first, then the layers reading it, ...).  A cost term that reads a group
        still at its start is noise: on a permuted copy it pulls towards that start; on the
        exact terms the right permutation is the optimum (for ``B = P(A)``, ``<A_i, B'_j>`` is
        largest at ``j = P(i)`` by Cauchy-Schwarz).  Coordinate descent from the identity reaches
        a fixed point far from the known optimum on networks where every group's cost has such
        a term (fire modules, depthwise inverted residuals); from this start it does not.  The
        order (:meth:`_order`) takes next the first group, in the spec's order, with an exact
        block that holds a weight (more than one entry per unit), then one with any exact
        block, else the first one left; groups with no exact block are solved on all blocks."""
        costs = _CostCache(self, ref, other, init, pooled)
        solved: set[str] = set()
        for name in self._order({k: v.numel() for k, v in other.items()}):
            cost = costs.group(name, solved) if self._exact(name, solved) else costs.group(name)
            costs.accept(name, max_assignment(cost))
            solved.add(name)
        return costs.perms

    def _exact(self, name: str, solved: set[str]) -> list[tuple[str, int, torch.Tensor]]:
        """The members of ``name`` whose cost no unsolved group changes."""
        return [m for deps, ms in self.blocks[name].items() if solved.issuperset(deps) for m in ms]

    def _order(self, numel: dict[str, int]) -> list[str]:
        left = [g.name for g in self.spec.groups if self.members[g.name]]
        order: list[str] = []
        solved: set[str] = set()
        while left:
            def weighted(name: str) -> bool:
                return any(rows.shape[0] < numel[key]
                           for key, _, rows in self._exact(name, solved))
            pick = next((n for n in left if weighted(n)),
                        next((n for n in left if self._exact(n, solved)), left[0]))
            left.remove(pick)
            order.append(pick)
            solved.add(pick)
        return order

    def descend(self, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                init: dict[str, torch.Tensor], max_iter: int, seed: int, show: bool,
                pooled: bool, tol: float = 0.0) -> dict[str, torch.Tensor]:
        """Coordinate descent.  ``pooled``: each unit's features are summed over its contexts
        (other factors of the same axis, spatial blocks), which no in-axis partner group's
        permutation changes: a Kronecker factor (conv groups x channels per group) can then be
        found before its partner is.

        A group's cost depends only on the permutations of the groups it shares a tensor with
        (``self.deps``), so a group none of whose neighbours changed since its last solve would
        get the same cost, the same assignment and the same accept/reject decision: it is skipped
        (:class:`_CostCache` keeps the cost per block of members with the same neighbours too).
        Both are exact: the sweeps visit groups in the same order and reach the same
        permutations as a full recomputation.  The sweeps end by :class:`_StoppingRule`; pooled,
        each group's cost is of its own pooled objective (pooling over a partner's axis), so
        the sweeps need not settle (a random VGG pair ran all ``max_iter`` sweeps, never
        revisiting a state): the pooled descent keeps the state with the shortest exact
        distance and ends at the first sweep that does not shorten it.

        Assignments are solved in worker threads (scipy releases the GIL) while the next costs
        are computed (:class:`_Solves`).  A group waits for every in-flight neighbour first, so
        the groups in flight never share a tensor: their steps commute, and the result is the
        sequential sweep's."""
        costs = _CostCache(self, ref, other, init, pooled)
        names = [g.name for g in self.spec.groups if self.members[g.name]]
        rng = random.Random(seed)
        solved_at: dict[str, tuple[int, ...]] = {}
        rule = _StoppingRule(tol, self._distance2(ref, other, costs.perms) if tol > 0 else 0.0)
        best = (self._distance2(ref, other, costs.perms), dict(costs.perms)) if pooled else None
        with _Solves(costs) as solves:
            for _ in progress(range(max_iter), "weight matching sweeps", show):
                rng.shuffle(names)
                for name in names:
                    solves.wait_for(self.neighbours[name])
                    stamp = costs.stamp(self.deps[name])
                    if solved_at.get(name) == stamp:
                        continue
                    solved_at[name] = stamp
                    solves.submit(name, costs.group(name))
                gains = solves.finish_sweep()
                if best is not None:
                    d = self._distance2(ref, other, costs.perms)
                    if not gains or d >= best[0]:
                        return best[1]
                    best = (d, dict(costs.perms))
                elif rule.done(gains):
                    break
        return costs.perms

    def spread(self, states: list[dict[str, torch.Tensor]],
               perms: list[dict[str, torch.Tensor]]) -> float:
        """``sum_k ||P_k(theta_k) - mean||^2`` over the matched tensors: N models' weight-matching
        objective (``1/N`` of the sum of their pairwise squared distances)."""
        aligned = [apply_perms(s, self.spec, p) for s, p in zip(states, perms)]
        total = 0.0
        for key in {key for ms in self.members.values() for key, _, _ in ms}:
            stack = torch.stack([a[key].double() for a in aligned])
            total += float((stack - stack.mean(0)).square().sum())
        return total

    def _distance2(self, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                   perms: dict[str, torch.Tensor]) -> float:
        """``sum_t ||A_t - P(B_t)||^2`` over the tensors the matching reads."""
        moved = apply_perms(other, self.spec, perms)
        return sum(float((ref[key].double() - moved[key].double()).square().sum())
                   for key in {key for ms in self.members.values() for key, _, _ in ms})


_LAP_WORKERS = 2
# Groups up to this size are solved in the sweep's own thread: the same solve, in the same order
# as the threaded path's (whose in-flight groups never share a tensor), without the hand-off
# that dominated small models' descents (vgg, 3 models: ~1.6 ms per solve of a 16-64 unit group)
_INLINE_SIZE = 128


class _CostCache:
    """The costs ``C_g = sum_t A_(g) B'_(g)^T`` of one descent, ``B'`` = the other model with every
    current permutation applied except ``g``'s on the axis read.  ``perms`` (the descent's
    state) and ``version`` (bumped when a group's permutation changes) live here; the reference
    side's rows never change and are cached, and each block of members with the same neighbours
    is recomputed only when one of their versions changed."""

    def __init__(self, matcher: _WeightMatcher, ref: dict[str, torch.Tensor],
                 other: dict[str, torch.Tensor], init: dict[str, torch.Tensor],
                 pooled: bool) -> None:
        self.m, self.ref, self.other, self.pooled = matcher, ref, other, pooled
        self.perms = {k: v.clone() for k, v in init.items()}
        self.version = dict.fromkeys(matcher.sizes, 0)
        self._blocks: dict[tuple[str, tuple[str, ...]], tuple[tuple[int, ...], torch.Tensor]] = {}
        self._ref: dict[tuple[str, str, int, bool], torch.Tensor] = {}

    def stamp(self, deps: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.version[d] for d in deps)

    def accept(self, name: str, new: torch.Tensor) -> None:
        self.perms[name] = new
        self.version[name] += 1

    def _ref_rows(self, name: str, key: str, axis: int, rows: torch.Tensor, pool: bool
                  ) -> torch.Tensor:
        k = (name, key, axis, pool)
        if k not in self._ref:
            r = as_rows(self.ref[key], axis, rows)
            self._ref[k] = _pool(r, rows.shape[1]) if pool else r
        return self._ref[k]

    def block(self, name: str, members: list[tuple[str, int, torch.Tensor]]) -> torch.Tensor:
        m, perms = self.m, self.perms
        cost: torch.Tensor | None = None
        without = {**perms, name: torch.arange(m.sizes[name], device=m.device)}
        for key, axis, rows in members:
            b = self.other[key]  # every permutation applied except name's on this axis
            for ax in m.trees[key]:
                if ax != axis or m.shared[(key, axis)]:
                    b = b.index_select(ax, m._index(key, ax, perms if ax != axis else without))
            pool = self.pooled and rows.shape[1] > 1
            b_rows = as_rows(b, axis, rows)
            if pool:
                b_rows = _pool(b_rows, rows.shape[1])
            a_rows = self._ref_rows(name, key, axis, rows, pool)
            cost = a_rows @ b_rows.T if cost is None else cost.addmm_(a_rows, b_rows.T)
        assert cost is not None
        return cost

    def group(self, name: str, solved: set[str] | None = None) -> torch.Tensor:
        """``C_g``; with ``solved``, only the blocks none of whose groups is outside it."""
        cost: torch.Tensor | None = None
        for deps, members in self.m.blocks[name].items():
            if solved is not None and not solved.issuperset(deps):
                continue
            stamp = self.stamp(deps)
            hit = self._blocks.get((name, deps))
            if hit is None or hit[0] != stamp:
                hit = (stamp, self.block(name, members))
                self._blocks[(name, deps)] = hit
            cost = hit[1].clone() if cost is None else cost.add_(hit[1])
        assert cost is not None
        return cost


class _Solves:
    """Assignments in flight in worker threads, each warm-started from its group's last solve
    (:class:`~fxfuse.solvers.assignment.WarmAssignment`); a finished one is accepted if it raises the
    matching score, and its gain (the increase of ``sum_t <A_t, P(B_t)>``) recorded."""

    def __init__(self, costs: _CostCache) -> None:
        self.costs = costs
        self.assign = WarmAssignment()
        self.in_flight: dict[str, tuple[Future[torch.Tensor], torch.Tensor]] = {}
        self.gains: list[float] = []

    def __enter__(self) -> _Solves:
        self.pool = ThreadPoolExecutor(max_workers=_LAP_WORKERS)
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)

    def submit(self, name: str, cost: torch.Tensor) -> None:
        if cost.shape[0] <= _INLINE_SIZE:  # a thread hand-off costs more than the solve
            self._accept(name, cost, self.assign.solve(name, cost))
            return
        if len(self.in_flight) >= _LAP_WORKERS:
            self.finish(next(iter(self.in_flight)))
        self.in_flight[name] = (self.pool.submit(self.assign.solve, name, cost), cost)

    def wait_for(self, groups: set[str]) -> None:
        for busy in [b for b in self.in_flight if b in groups]:
            self.finish(busy)

    def finish(self, name: str) -> None:
        future, cost = self.in_flight.pop(name)
        self._accept(name, cost, future.result())

    def _accept(self, name: str, cost: torch.Tensor, solution: torch.Tensor) -> None:
        perms, dev = self.costs.perms, self.costs.m.device
        new = solution.to(dev)
        idx = torch.arange(perms[name].numel(), device=dev)
        old_score = float(cost[idx, perms[name]].double().sum())
        new_score = float(cost[idx, new].double().sum())
        if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
            self.costs.accept(name, new)
            self.gains.append(new_score - old_score)

    def finish_sweep(self) -> list[float]:
        """Finish every solve in flight; the gains accepted since the last call."""
        for busy in list(self.in_flight):
            self.finish(busy)
        gains, self.gains = self.gains, []
        return gains


class _StoppingRule:
    """Every accepted step raises ``J = sum_t <A_t, P(B_t)>`` by its gain, so the squared distance
    ``D = sum_t ||A_t - P(B_t)||^2 = const - 2 J`` is tracked for free: the descent ends after a
    sweep with no accepted step, or (``tol > 0``) one that lowers ``D`` by no more than
    ``tol * D``."""

    def __init__(self, tol: float, distance2: float) -> None:
        self.tol, self.distance2 = tol, distance2

    def done(self, gains: list[float]) -> bool:
        if not gains or 2 * sum(gains) <= self.tol * self.distance2:
            return True
        self.distance2 -= 2 * sum(gains)
        return False


def _pool(x: torch.Tensor, contexts: int) -> torch.Tensor:
    """``(n, R * rest)`` -> ``(n, 2 * rest)``: sum and root-sum-of-squares over the R contexts."""
    y = x.reshape(x.shape[0], contexts, -1)
    return torch.cat([y.sum(1), y.square().sum(1).sqrt()], dim=1)


def _float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


class AlignWeights(Pass):
    """Weight matching of every model into model 0's basis, then MergeMany rounds for N > 2."""

    name = "align-weights"

    def __init__(self, config: WeightMatching) -> None:
        self.config = config

    def requires(self, state: FusionState) -> None:
        if state.spec is None or not state.states:
            raise PipelineError("align-weights needs the discovered groups and model states")
        from .widths import require_equal_widths

        require_equal_widths(state, "WeightMatching")

    def call(self, state: FusionState) -> None:
        assert state.spec is not None
        params = ({k for k in state.states[0] if k not in state.spec.buffers}
                  if state.spec.buffers or not state.models else
                  {k for k, _ in state.models[0].named_parameters(remove_duplicate=False)})
        matcher = _WeightMatcher(state.spec, state.device, params)
        if len(state.states) == 2 or self.config.start != "both":
            state.perms = self._align(state, matcher, self.config.start)
            return
        # N models: MergeMany from Git Re-Basin's start and from both starts, the one whose models
        # end closer together kept (a tie keeps the first), so never farther apart than the
        # identity start alone (on five trained MNIST MLPs the start="both" run alone merged to
        # a 0.0025 higher test loss); with two models match() already does this
        runs = [self._align(state, matcher, start) for start in ("init", "both")]
        state.perms = min(runs, key=lambda perms: matcher.spread(state.states, perms))

    def _align(self, state: FusionState, matcher: _WeightMatcher, start: str
               ) -> list[dict[str, torch.Tensor]]:
        """Every model matched to model 0 from ``start``, then MergeMany rounds for N > 2,
        each re-match descending from the model's current permutations (a second start in
        every round cost 2-4x the time for a spread 0.1-1% lower on the zoo's 3-model cases)."""
        assert state.spec is not None
        cfg = self.config
        ident = _identity(state.spec, state.device)
        perms = [ident] + [matcher.match(state.states[0], s, ident, cfg.max_iter, cfg.seed + k,
                                         state.progress, cfg.tol, start)
                           for k, s in enumerate(state.states[1:], start=1)]
        n = len(state.states)
        if n > 2:
            keys = _float_keys(state.states[0])
            rng = random.Random(cfg.seed)
            for _ in range(cfg.merge_many_rounds):
                changed = False
                for k in rng.sample(range(n), n):
                    aligned = [apply_perms(s, state.spec, p) for s, p in zip(state.states, perms)]
                    mean = {key: torch.stack([aligned[j][key] for j in range(n) if j != k]).mean(0)
                            for key in keys}
                    new = matcher.match(mean, state.states[k], perms[k], cfg.max_iter,
                                        cfg.seed + k, False, cfg.tol, "init")
                    if any(not torch.equal(new[g], perms[k][g]) for g in new):
                        perms[k] = new
                        changed = True
                if not changed:
                    break
        return perms
