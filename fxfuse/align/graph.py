"""Graph-matching alignment (GAMF: Liu, Lou, Wang, Xi, Shen, Yan, ICML 2022): units are nodes,
weights are edges; N models are matched jointly through a shared universe by graduated assignment.

**Affinity over the whole group.**  For models ``i, j`` and a group ``g`` (``n`` units), with the
current soft pairwise matching ``X_ij[h] = U_i[h] U_j[h]^T: (n_h, n_h)`` of every group ``h``,

    A_ij[g](a, b) = 1/|T_g| sum_{t in T_g}  K_t(a, b) / mean_{a'b'} K_t(a', b'),
    K_t(a, b)     = exp(-d_t(a, b) / s_t),   s_t = bandwidth * mean_{a'b'} d_t(a', b'),
    d_t(a, b)     = || W_i,t(g)[a] - W'_j,t(g)[b] ||^2  =  |x_a|^2 + |y_b|^2 - 2 x_a . y_b

over ``T_g``, every tensor axis ``g`` acts on (the same members as weight matching's cost: weights,
biases, norm affines, the next layer's input side, flatten blocks, residual streams; buffers are
left out as there), ``W_(g)`` the tensor laid out one row per unit of ``g``
(:mod:`fxfuse.ir.coords`), and ``W'_j`` model ``j``'s tensor with every other group's soft
matching applied along its factor of each axis (``X_ij[h] W``).  This is GAMF's linearised
second-order term (its ``lap_prev + lap_next``: the edges into and out of a node compared under the
neighbours' matchings), one kernel per member tensor, each normalised by its mean.  One affinity
is one ``(n, n)`` product per member tensor, about one weight-matching sweep; the
``(n1 n2) x (n1 n2)`` affinity of the quadratic assignment problem is never formed.  The rows,
layouts and per-block sums are weight matching's (:class:`~fxfuse.align.weights._CostCache`).

**Graduated assignment into a universe.**  Every model ``k`` has a soft matching ``U_k[g]: (n, n)``
(model units x universe units) per group, started at ``(1 + init_noise * r) / n`` with
``r ~ U(-1, 1)`` (symmetry breaking, as GAMF's noisy uniform start); pairwise matchings are
``U_a U_b^T``, so every cycle of them is consistent by construction.  Each iteration updates every
model in turn from the others' latest matchings,

    G_i[g] = 1/(N-1) sum_{j != i} A_ij[g] U_j[g],    U_i[g] <- Sinkhorn(G_i[g], tau)

(GAMF's code updates all models at once, from the previous iteration's matchings; for two
models that runs two independent chains, ``U_a`` from ``U_b``'s past and ``U_b`` from ``U_a``'s,
whose universes need not agree: measured, it failed to recover a permuted copy of the zoo's MLP,
VGG and ResNet-20 that the sequential update recovers), which raises the linearised objective ``sum_j <A_ij[g], U_i[g] U_j[g]^T>``.  Convergence (GAMF's
rule): ``mean_k sum_g min(||U_k' - U_k||^2, ||U_k' - U_k^prev||^2) < tol`` (GAMF's second term
accepts a two-cycle) or ``patience`` iterations without
it; then ``tau *= tau_decay`` and ``sinkhorn_iter += sinkhorn_step`` until ``tau <= tau_min``,
then Hungarian steps (:func:`~fxfuse.solvers.assignment.max_assignment`) until they converge:
until the pairwise matchings ``U_a U_b^T`` are those of the last or the one before (the
universe's labels are free, and under ties they drift while every pairwise matching stays
put: measured on two ResNet-20 x4s, the rule on ``U`` ran the Hungarian tail to its end with
the pairwise matchings fixed for the last five iterations).  The costs read only the pairwise
matchings, so a repeat is a fixed point of the step up to the universe's labelling; with N > 2
models and ties a further step could still relabel its way to other pairwise matchings, so
"unchanged results" under this rule is measured (MLP, ResNet-20 x1 / x4 pairs), not proven.  At
most ``max_iter`` iterations, the last ``hungarian_tail`` of them Hungarian.  The defaults are the
paper code's schedule (tau 0.05 -> 0.005 by 0.9, 200 Sinkhorn iterations + 100 per step, tol
2e-3, patience 50, 2000 iterations, 75 Hungarian); its 4-norm distance is replaced by the squared
Euclidean one (matrix products) and its kernel's scale by ``s_t``.

**Cost.**  An update of model ``i`` forms ``X_ij[h]`` (one ``(n, n)`` product per group), maps
each member tensor of the other model by its neighbours' ``X`` and takes its kernel (about twice
weight matching's cost product for that member: the mapping and the distances), then
``A_ij[g] U_j[g]`` and Sinkhorn; the Sinkhorn problems of all groups of one size are solved as
one batch (:func:`~fxfuse.solvers.sinkhorn.sinkhorn`), a block of members whose neighbours'
matchings did not change is not recomputed, and the reference side's rows and norms are cached.

**Models of different widths** (:mod:`fxfuse.pairing`; ``fuse(..., target=)``).  The universe
has the target's widths ``m``; model ``k`` with ``n_k`` units has ``U_k[g]: (n_k, m)`` with the
Sinkhorn marginals ``U_k 1 = 1``, ``U_k^T 1 = (n_k / m) 1`` (each model unit carries mass 1,
spread evenly over the universe: :func:`~fxfuse.solvers.sinkhorn.sinkhorn` of a rectangular
score; for ``n_k = m`` the doubly-stochastic case), started at ``(1 + init_noise * r) / m``.
The pairwise matching is taken to rows summing to 1, ``X_ij = (m / n_j) U_i U_j^T: (n_i, n_j)``
(each unit of model ``i`` a convex combination of model ``j``'s, the way OT's features
average a wider model's units), so the kernels are rectangular: model ``i``'s rows laid out by
its own spec, model ``j``'s tensor with its neighbours mapped by ``X_ij`` to model ``i``'s
widths and its rows of ``g`` laid out at its own size; the gradient of
``<A_ij, X_ij>`` is ``(m / n_j) A_ij U_j``.  The hard steps are the assignment where
``n_k = m`` and otherwise the exact transport plan of ``G_k`` with uniform marginals (POT's
``emd``, as exact OT: a vertex of the same polytope: each unit copied ``m / n_k`` times into a
wider universe, ``n_k / m`` units clustered into each unit of a narrower one), times ``n_k``;
convergence is the same rule on the dense pairwise matchings.  Model ``k``'s map onto the
anchor's units (the model at the target's widths, :func:`fxfuse.fuse`'s ``anchor``) is
:meth:`GroupMap.from_coupling` of ``U_k U_a^T`` (the merge averages the units a fused unit
receives, the unmerge splits or sums outgoing weights; fused weights are then those of OT's
convention, and a narrow model fused with an exact widening of itself, every unit copied
``m / n`` times, gives back its function); with no model at the target's widths, onto the
universe's own units (``U_k``).  Where every model has the target's widths none of this runs:
the result is bit-identical to the equal-width algorithm above.

**Result.**  Each model's permutation into the universe, re-expressed in model 0's basis (the
report's convention: model 0's is the identity), so inputs and outputs (never in a group) stay
fixed and MergeWeights averages as for weight matching; for models of different widths, maps
(above).  :class:`GraphObjective` is the objective
``sum_{i != j} sum_g <A_ij[g], X_ij[g]>`` of hard matchings (what the tests compare with brute
force).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ArchitectureMismatchError, InputError, PipelineError
from ..groups.spec import PermutationSpec, tree_groups
from ..ir.coords import as_rows, group_rows
from ..ir.layout import Unit
from ..maps import OUT, GroupMap, index_perms, map_groups
from ..pairing import sizes_of
from ..passes.base import FusionState, Pass, progress
from ..solvers.assignment import WarmAssignment, max_assignment
from ..solvers.sinkhorn import WarmSinkhorn
from .weights import _CostCache, _identity, _WeightMatcher
from .widths import width_mismatch


@dataclass(frozen=True)
class GraphMatching:
    """Config: graph matching (GAMF), second-order weight affinity, N models through a universe.

    Schedule (module doc; defaults are the paper code's): Sinkhorn at temperature ``tau``
    (relative to the affinity, whose mean is 1) with ``sinkhorn_iter`` iterations; on
    convergence ``tau *= tau_decay`` and ``sinkhorn_iter += sinkhorn_step`` until
    ``tau <= tau_min``, then Hungarian.  ``tol``: the convergence threshold on the change of the
    matchings; ``patience``: iterations without convergence before the schedule moves on anyway;
    ``max_iter``: iterations at most, the last ``hungarian_tail`` Hungarian.  ``bandwidth``: the
    kernel scale ``s_t`` as a multiple of the member's mean squared distance; ``init_noise``:
    relative noise of the uniform start; ``sinkhorn_tol``: Sinkhorn stops once its row sums are
    within this of 1.  :meth:`short` is a brief schedule (tests, quick runs).
    """

    tau: float = 0.05
    tau_min: float = 0.005
    tau_decay: float = 0.9
    sinkhorn_iter: int = 200
    sinkhorn_step: int = 100
    tol: float = 2e-3
    patience: int = 50
    max_iter: int = 2000
    hungarian_tail: int = 75
    bandwidth: float = 1.0
    init_noise: float = 0.5
    sinkhorn_tol: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(what: str) -> InputError:
            return InputError(f"GraphMatching({what}); e.g. GraphMatching() (the paper's "
                              f"schedule) or GraphMatching.short()")

        for name in ("tau", "tau_min", "tau_decay", "tol", "bandwidth", "init_noise",
                     "sinkhorn_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise bad(f"{name}={v!r}: {name} must be a number")
        for name in ("sinkhorn_iter", "sinkhorn_step", "patience", "max_iter", "hungarian_tail",
                     "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(f"{name}={v!r}: {name} must be an integer")
        if not 0 < self.tau_min <= self.tau:
            raise bad(f"tau={self.tau!r}, tau_min={self.tau_min!r}: the temperatures must "
                      f"satisfy 0 < tau_min <= tau")
        if not 0 < self.tau_decay < 1:
            raise bad(f"tau_decay={self.tau_decay!r}: tau_decay must be in (0, 1)")
        if self.sinkhorn_iter < 1 or self.sinkhorn_step < 0:
            raise bad(f"sinkhorn_iter={self.sinkhorn_iter}, sinkhorn_step={self.sinkhorn_step}: "
                      f"sinkhorn_iter must be >= 1 and sinkhorn_step >= 0")
        if self.max_iter < 1 or self.patience < 1 or not 0 <= self.hungarian_tail <= self.max_iter:
            raise bad(f"max_iter={self.max_iter}, patience={self.patience}, hungarian_tail="
                      f"{self.hungarian_tail}: max_iter and patience must be >= 1 and "
                      f"0 <= hungarian_tail <= max_iter")
        if self.tol <= 0 or self.bandwidth <= 0 or self.sinkhorn_tol < 0:
            raise bad(f"tol={self.tol!r}, bandwidth={self.bandwidth!r}, sinkhorn_tol="
                      f"{self.sinkhorn_tol!r}: tol and bandwidth must be > 0, sinkhorn_tol >= 0")
        if not 0 <= self.init_noise < 1:
            raise bad(f"init_noise={self.init_noise!r}: init_noise must be in [0, 1) (the start "
                      f"must stay positive)")

    @classmethod
    def short(cls, **overrides: Any) -> GraphMatching:
        """A brief schedule: tau 0.05 -> 0.0125 by halving, 100 Sinkhorn iterations (+50),
        patience 5, at most 60 iterations (the last 10 Hungarian)."""
        base: dict[str, Any] = dict(tau=0.05, tau_min=0.0125, tau_decay=0.5, sinkhorn_iter=100,
                                    sinkhorn_step=50, patience=5, max_iter=60, hungarian_tail=10)
        return cls(**{**base, **overrides})


def _map_soft(t: torch.Tensor, axis: int, tree: Any, mats: Mapping[str, torch.Tensor],
              sizes: Mapping[str, int], index: Mapping[str, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """``t`` with ``mats[h]: (n'_h, n_h)`` applied to each group ``h``'s factor of ``axis``
    (``sizes``: ``t``'s group sizes, ``n_h``; ``n'_h = n_h`` but for models of different
    widths); ``index[h]``: ``mats[h]``'s permutation where it is one
    (``mats[h][a, index[h][a]] = 1``), applied by indexing instead (the same values: a 0/1
    product adds one term)."""
    index = index or {}
    if isinstance(tree, Unit):
        if tree.group in index:
            return t.index_select(axis, index[tree.group])
        mat = mats[tree.group]
        moved = t.movedim(axis, 0)
        out = (mat.to(t.dtype) @ moved.reshape(moved.shape[0], -1)).reshape(
            mat.shape[0], *moved.shape[1:])
        return out.movedim(0, axis)
    maps = {h: GroupMap(index=index[h]) if h in index else GroupMap(merge=m, unmerge=m.T)
            for h, m in mats.items()}
    return map_groups(t, axis, tree, maps, sizes, OUT)


def _kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float,
            x2: torch.Tensor | None = None) -> torch.Tensor:
    """``K / mean K`` with ``K = exp(-d / s)``, ``d`` the squared distances of the rows of
    ``x: (n, f)`` and ``y: (n, f)``, ``s = bandwidth * mean d`` (all ones when every d is 0);
    ``x2``: the squared norms of ``x``'s rows, if known."""
    if x2 is None:
        x2 = x.square().sum(1)
    d = (x2[:, None] + y.square().sum(1)[None, :]).addmm_(x, y.T, alpha=-2)
    d = d.clamp_min_(0)
    s = bandwidth * float(d.mean())
    if s <= 0:
        return torch.ones_like(d)
    k = torch.exp(d.div_(-s))
    return k.div_(k.mean())


class _Affinity(_CostCache):
    """The affinities ``A_ij[g]`` of one ordered pair of models (``ref`` = model ``i``, ``other``
    = model ``j``) under the soft pairwise matchings ``soft`` (module doc); weight matching's
    cache of reference rows and per-block sums, its cost replaced by the kernel sum.  A group's
    version is bumped only when its soft matching changed, so a block none of whose neighbours'
    matchings changed is reused (exact: the same inputs give the same kernel)."""

    def __init__(self, matcher: _WeightMatcher, ref: dict[str, torch.Tensor],
                 other: dict[str, torch.Tensor], bandwidth: float,
                 other_sizes: Mapping[str, int] | None = None) -> None:
        super().__init__(matcher, ref, other, _identity(matcher.spec, matcher.device), False)
        self.bandwidth = bandwidth
        self.soft: dict[str, torch.Tensor] = {}
        self._sq: dict[tuple[str, str, int], torch.Tensor] = {}
        self.index: dict[str, torch.Tensor] = {}
        # model j's group sizes where they differ from model i's (different widths: its rows
        # of the group matched are laid out at its own size, every other group at model i's)
        self.other_sizes = dict(other_sizes) if other_sizes is not None else dict(matcher.sizes)
        self._rows: dict[tuple[str, str, int], torch.Tensor] = {}

    def _other_rows(self, name: str, key: str, axis: int, rows: torch.Tensor) -> torch.Tensor:
        """The rows of model j's mapped tensor: ``rows`` where the group has model i's size,
        else laid out with the group at model j's size and the other groups at model i's."""
        n = self.other_sizes[name]
        if n == self.m.sizes[name]:
            return rows
        hit = self._rows.get((name, key, axis))
        if hit is None:
            r = group_rows(self.m.trees[key][axis], name, {**self.m.sizes, name: n})
            assert r is not None  # the same layout as model i's, whose rows exist
            hit = self._rows[(name, key, axis)] = r.to(self.m.device)
        return hit

    def set_soft(self, soft: dict[str, torch.Tensor],
                 index: dict[str, torch.Tensor] | None = None) -> None:
        """New pairwise matchings (``index``: those that are permutations, as
        :func:`_map_soft` takes them): the cost of every group next to one that changed is
        stale."""
        for name, mat in soft.items():
            old = self.soft.get(name)
            if old is None or not torch.equal(old, mat):
                self.version[name] += 1
        self.soft = soft
        self.index = index or {}

    def block(self, name: str, members: list[tuple[str, int, torch.Tensor]]) -> torch.Tensor:
        m = self.m
        total: torch.Tensor | None = None
        for key, axis, rows in members:
            b = self.other[key]
            for ax, tree in m.trees[key].items():
                mats = {h: self.soft[h] for h in dict.fromkeys(tree_groups(tree))
                        if (ax != axis or h != name) and h in self.soft}
                if mats:
                    b = _map_soft(b, ax, tree, mats, self.other_sizes, self.index)
            x = self._ref_rows(name, key, axis, rows, False)
            x2 = self._sq.get((name, key, axis))
            if x2 is None:
                x2 = self._sq[(name, key, axis)] = x.square().sum(1)
            y = as_rows(b, axis, self._other_rows(name, key, axis, rows))
            k = _kernel(x, y.to(x.dtype), self.bandwidth, x2)
            total = k if total is None else total.add_(k)
        assert total is not None
        return total

    def affinity(self, name: str) -> torch.Tensor:
        """``A_ij[name]``: the mean of the member kernels."""
        return self.group(name).div_(len(self.m.members[name]))


def _learned_params(state: FusionState) -> set[str]:
    """The tensors matched on (weight matching's choice): parameters, not buffers."""
    assert state.spec is not None
    if state.spec.buffers or not state.models:
        return {k for k in state.states[0] if k not in state.spec.buffers}
    return {k for k, _ in state.models[0].named_parameters(remove_duplicate=False)}


def _hard(g: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """The 0/1 matrix of the maximum-weight assignment ``cols`` of ``g`` (None: solved here)."""
    cols = (max_assignment(g) if cols is None else cols).to(g.device)
    out = torch.zeros_like(g)
    out[torch.arange(g.shape[0], device=g.device), cols] = 1.0
    return out


class _GraduatedAssignment:
    """The universe matchings ``U[k][g]`` of N models and the annealing loop (module doc)."""

    def __init__(self, spec: PermutationSpec, states: Sequence[dict[str, torch.Tensor]],
                 device: torch.device, params: set[str] | None, cfg: GraphMatching,
                 specs: Sequence[PermutationSpec] | None = None) -> None:
        self.cfg = cfg
        self.matcher = _WeightMatcher(spec, device, params)
        self.names = [g.name for g in spec.groups if self.matcher.members[g.name]]
        self.n = len(states)
        self.universe = dict(self.matcher.sizes)  # the target's widths
        # one matcher per model where widths differ (each model's rows by its own spec)
        self.matchers = [self.matcher if s is None or sizes_of(s) == self.universe else
                         _WeightMatcher(s, device, params)
                         for s in (specs if specs is not None else [None] * self.n)]
        self.rect = any(m is not self.matcher for m in self.matchers)
        dtype = next((v.dtype for v in states[0].values() if v.is_floating_point()),
                     torch.float32)
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.pairs = {(i, j): _Affinity(self.matchers[i], dict(states[i]), dict(states[j]),
                                        cfg.bandwidth, self.matchers[j].sizes)
                      for i in range(self.n) for j in range(self.n) if i != j}
        gen = torch.Generator().manual_seed(cfg.seed)
        self.u: list[dict[str, torch.Tensor]] = []
        for k in range(self.n):
            per: dict[str, torch.Tensor] = {}
            for name in self.names:
                size, width = self.matchers[k].sizes[name], self.universe[name]
                r = torch.rand(size, width, generator=gen, dtype=torch.float64) * 2 - 1
                per[name] = ((1 + cfg.init_noise * r) / width).to(device=device,
                                                                    dtype=self.dtype)
            self.u.append(per)
        self.iterations = 0
        self.soft_iterations = 0
        self.sinkhorn = WarmSinkhorn()
        self.assign = WarmAssignment()
        # model k's hard matchings (model unit -> universe unit) once U_k is hard, else None
        self.cols: list[dict[str, torch.Tensor] | None] = [None] * self.n

    def _pairwise(self, i: int, j: int, g: str) -> torch.Tensor:
        """``X_ij[g] = U_i U_j^T``, taken to rows summing to 1 where model ``j``'s width is not
        the universe's (``U_j``'s columns then sum to ``n_j / m``): each unit of model ``i`` a
        convex combination of model ``j``'s, as OT's features average a wider model's units."""
        x = self.u[i][g] @ self.u[j][g].T
        n_j, m = self.matchers[j].sizes[g], self.universe[g]
        return x if n_j == m else x.mul_(m / n_j)

    def gradient(self, i: int) -> dict[str, torch.Tensor]:
        """``G_i[g] = 1/(N-1) sum_{j != i} A_ij[g] U_j[g]`` under the current matchings.  Where
        ``U_i`` and ``U_j`` are both hard (the Hungarian phase), ``U_i U_j^T`` and ``A U_j``
        are taken by indexing (the same values as the products of 0/1 matrices)."""
        out: dict[str, torch.Tensor] = {}
        back: dict[int, dict[str, torch.Tensor]] = {}  # hard U_j: universe unit -> model unit
        for j, cols in enumerate(self.cols):
            if cols is not None:
                back[j] = {g: torch.argsort(c) for g, c in cols.items()}
        for j in range(self.n):
            if j == i:
                continue
            cols_i = self.cols[i]
            if cols_i is not None and j in back:
                index = {g: back[j][g][cols_i[g]] for g in self.names}
                soft = {g: torch.zeros_like(self.u[i][g]).scatter_(
                    1, index[g][:, None], 1.0) for g in self.names}
                self.pairs[(i, j)].set_soft(soft, index)
            else:
                self.pairs[(i, j)].set_soft({g: self._pairwise(i, j, g) for g in self.names})
        for g in self.names:
            acc: torch.Tensor | None = None
            for j in range(self.n):
                if j != i:
                    aff = self.pairs[(i, j)].affinity(g)
                    term = aff[:, back[j][g]] if j in back else aff @ self.u[j][g]
                    if self.matchers[j].sizes[g] != self.universe[g]:  # d<A, X_ij>/dU_i
                        term.mul_(self.universe[g] / self.matchers[j].sizes[g])
                    acc = term if acc is None else acc.add_(term)
            assert acc is not None
            out[g] = acc.div_(self.n - 1)
        return out

    def run(self, show: bool) -> list[dict[str, torch.Tensor]]:
        """Anneal, then Hungarian; returns hard ``U[k][g]``."""
        cfg = self.cfg
        tau, iters, hard, count = cfg.tau, cfg.sinkhorn_iter, False, 0
        prev = [dict(uk) for uk in self.u]
        pairwise: list[list[dict[str, list[int]]]] = []  # the last two hard iterations'
        pairs_dense: list[list[list[torch.Tensor]]] = []  # the same, models of other widths
        for e in progress(range(cfg.max_iter), "graph matching iterations", show):
            if e >= cfg.max_iter - cfg.hungarian_tail:
                hard = True
            check = 0.0
            for i in range(self.n):
                grad = self.gradient(i)
                if hard and self.rect:
                    new = {g: self.harden(i, g, grad[g]) for g in self.names}
                elif hard:  # warm-started from the group's last assignment, as weight matching's
                    cols = {g: self.assign.solve((i, g), grad[g]).to(grad[g].device)
                            for g in self.names}
                    new = {g: _hard(grad[g], cols[g]) for g in self.names}
                    self.cols[i] = cols
                else:
                    solved = self.sinkhorn.solve_many({(i, g): grad[g] for g in self.names},
                                                      tau, iters, cfg.sinkhorn_tol)
                    new = {g: solved[(i, g)] for g in self.names}
                if not hard:
                    check += sum(min(float((new[g] - self.u[i][g]).square().sum()),
                                     float((new[g] - prev[i][g]).square().sum()))
                                 for g in self.names) / self.n
                prev[i], self.u[i] = self.u[i], new
            self.iterations = e + 1
            self.soft_iterations += not hard
            if hard and self.rect:  # the same rule on the dense pairwise matchings
                dense = [[self._pairwise(0, k, g) for g in self.names] for k in range(self.n)]
                seen = any(all(torch.equal(a, b) for a, b in zip(sum(dense, []), sum(p, [])))
                           for p in pairs_dense[-2:])
                check = 0.0 if seen else float("inf")
                pairs_dense = [*pairs_dense[-1:], dense]
            elif hard:  # converged: the pairwise matchings (not the universe's labels) are stable
                rel = _relative(self.u)
                check = 0.0 if rel in pairwise[-2:] else float("inf")
                pairwise = [*pairwise[-1:], rel]
            if check < cfg.tol or count > cfg.patience:
                count = 0
                if hard:
                    break
                if tau > cfg.tau_min:
                    tau *= cfg.tau_decay
                    iters += cfg.sinkhorn_step
                else:
                    hard = True
            else:
                count += 1
        self.final_tau = tau
        if not hard and self.rect:
            self.u = [{g: self.harden(k, g, uk[g]) for g in self.names}
                      for k, uk in enumerate(self.u)]
        elif not hard:  # max_iter ended the schedule during annealing (hungarian_tail = 0)
            self.u = [{g: _hard(uk[g]) for g in self.names} for uk in self.u]
        return self.u

    def harden(self, k: int, g: str, scores: torch.Tensor) -> torch.Tensor:
        """The hard matching of model ``k``'s scores ``(n, m)`` into the universe, for models
        of different widths: the assignment where ``n = m`` (a permutation), else the exact
        transport plan maximising ``<scores, T>`` with uniform marginals (a vertex of the
        Sinkhorn polytope: rows sum to 1, columns to ``n / m``; copies of a unit where the
        universe is wider, clusters where it is narrower)."""
        n, m = scores.shape
        if n == m:
            return _hard(scores, self.assign.solve((k, g), scores))
        from .ot import transport  # POT: the fxfuse[ot] extra, as OT fusion needs

        s = scores.double().cpu()
        plan = transport(s.max() - s, torch.full((n,), 1.0 / n, dtype=torch.float64),
                         torch.full((m,), 1.0 / m, dtype=torch.float64), 0.0)
        return (plan * n).to(device=scores.device, dtype=scores.dtype)


def _relative(u: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, list[int]]]:
    """Hard universe matchings as each model's permutations into model 0's basis (as lists):
    what the pairwise matchings ``U_a U_b^T`` are, whatever the universe's labelling."""
    inv0 = {g: torch.argsort(m.argmax(0)) for g, m in u[0].items()}
    return [{g: m.argmax(0)[inv0[g]].tolist() for g, m in uk.items()} for uk in u]


def universe_perms(u: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec,
                   device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Hard universe matchings ``U[k][g]`` (model units x universe units, 0/1) as permutations
    into model 0's basis: ``perms[k][g][i]`` is model ``k``'s unit matched with model 0's unit
    ``i``; groups without a matching keep the identity."""
    out: list[dict[str, torch.Tensor]] = []
    base = _identity(spec, device)
    inv0 = {g: torch.argsort(m.argmax(0)) for g, m in u[0].items()}
    for uk in u:
        perms = dict(base)
        for g, m in uk.items():
            perms[g] = m.argmax(0)[inv0[g]].to(device)
        out.append(perms)
    return out


def universe_maps(u: Sequence[Mapping[str, torch.Tensor]], specs: Sequence[PermutationSpec],
                  anchor: int | None) -> list[dict[str, GroupMap]]:
    """Hard universe matchings ``U[k][g]: (n_k, m)`` of models of different widths as each
    model's maps onto model ``anchor``'s units: the coupling of model ``k``'s units with the
    anchor's is the pairwise matching ``U_k U_a^T`` (:meth:`GroupMap.from_coupling`: a
    permutation where both have ``m`` units, copies or clusters where widths differ), so the
    anchor's maps are the identity; ``anchor=None`` (no model has the target's widths): onto
    the universe's own units, ``U_k`` itself.  Groups without a matching keep the identity
    (their widths are equal: :meth:`AlignGraph.requires`)."""
    out: list[dict[str, GroupMap]] = []
    for k, uk in enumerate(u):
        maps: dict[str, GroupMap] = {}
        for g in specs[k].groups:
            if g.name not in uk:
                maps[g.name] = GroupMap(index=torch.arange(g.size))
                continue
            coupling = uk[g.name] if anchor is None else uk[g.name] @ u[anchor][g.name].T
            c = coupling.double().cpu()
            maps[g.name] = GroupMap.from_coupling(c.where(c > 1e-12, torch.zeros_like(c)))
        out.append(maps)
    return out


class GraphObjective:
    """``J(perms) = sum_{i != j} sum_g <A_ij[g], X_ij[g]>`` for hard matchings ``perms`` (each
    model's permutations into a common basis, as in ``FusionReport.perms``; a group left out is
    the identity): the objective graph matching raises, each group's affinity taken under the
    neighbours' matchings of ``perms``.  Built once per set of states, called per ``perms``."""

    def __init__(self, spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]],
                 bandwidth: float = 1.0, params: set[str] | None = None) -> None:
        if len(states) < 2:
            raise InputError("GraphObjective needs the states of two or more models")
        self.device = next(iter(states[0].values())).device
        self.matcher = _WeightMatcher(spec, self.device, params)
        self.names = [g.name for g in spec.groups if self.matcher.members[g.name]]
        self.ident = _identity(spec, self.device)
        self.n = len(states)
        self.pairs = {(i, j): _Affinity(self.matcher, dict(states[i]), dict(states[j]),
                                        bandwidth)
                      for i in range(self.n) for j in range(self.n) if i != j}

    def __call__(self, perms: Sequence[Mapping[str, Any]]) -> float:
        if len(perms) != self.n:
            raise InputError(f"GraphObjective: {len(perms)} permutation dicts for {self.n} "
                             f"models")
        full = [{**self.ident, **{g: torch.as_tensor(p).to(self.device) for g, p in pk.items()}}
                for pk in perms]
        total = 0.0
        for (i, j), aff in self.pairs.items():
            soft, index = {}, {}
            for g in self.names:
                x = torch.zeros(self.matcher.sizes[g], self.matcher.sizes[g], device=self.device)
                x[full[i][g], full[j][g]] = 1.0
                soft[g] = x
                index[g] = torch.empty_like(full[i][g])
                index[g][full[i][g]] = full[j][g]
            aff.set_soft(soft, index)
            for g in self.names:
                total += float(aff.affinity(g)[full[i][g], full[j][g]].double().sum())
        return total


class AlignGraph(Pass):
    """Graph matching of every model into a universe (graduated assignment), as permutations
    into model 0's basis; models of different widths: as maps onto the anchor's units (module
    doc)."""

    name = "align-graph"

    def __init__(self, config: GraphMatching) -> None:
        self.config = config

    def requires(self, state: FusionState) -> None:
        if state.spec is None or not state.states:
            raise PipelineError("align-graph needs the discovered groups and model states")
        if width_mismatch(state) is not None:  # a group with no rows can not be matched
            members = _WeightMatcher(state.spec, torch.device("cpu")).members
            differ = [g.name for g in state.spec.groups if not members[g.name]
                      and any(s.group(g.name).size != g.size for s in state.specs or [])]
            try:
                import ot  # noqa: F401  (the hard steps of unequal widths: exact transport)
            except ImportError as exc:
                raise InputError(
                    f"GraphMatching of models of different widths needs POT for its exact "
                    f"transport steps (import failed: {exc}); install the extra: python -m pip "
                    f"install 'fxfuse[ot]'") from exc
            if differ:
                raise ArchitectureMismatchError(
                    f"GraphMatching: group {differ[0]!r} has no tensor laid out one row per "
                    f"unit to compare its units on, and its width differs between the models: "
                    f"fuse models that have its width")

    def call(self, state: FusionState) -> None:
        assert state.spec is not None
        cfg = self.config
        specs = state.specs if width_mismatch(state) is not None else None
        solver = _GraduatedAssignment(state.spec, state.states, state.device,
                                      _learned_params(state), cfg, specs)
        u = solver.run(state.progress)
        if solver.rect:
            state.maps = universe_maps(u, [state.spec_of(k) for k in range(solver.n)],
                                       state.anchor)
            if all(mp.is_permutation for mk in state.maps for mp in mk.values()):
                state.perms = index_perms(state.maps)
            where = ("the universe's units (the target is none of the models)"
                     if state.anchor is None else f"models[{state.anchor}]'s units")
            state.report.notes.append(f"graph matching: models of different widths matched "
                                      f"into a universe at the target's widths, maps onto "
                                      f"{where}")
        else:
            state.perms = universe_perms(u, state.spec, state.device)
        state.report.notes.append(
            f"graph matching: {solver.iterations} iterations ({solver.soft_iterations} Sinkhorn, "
            f"tau {cfg.tau:g} -> {solver.final_tau:g}, then Hungarian), "
            f"{len(solver.names)} groups, {solver.n} models")
