"""Warm-started linear assignment: same optima as scipy cold, duals that satisfy LP duality."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fxfuse.solvers import assignment
from fxfuse.solvers.assignment import (
    WarmAssignment,
    _min_form,
    auction_prices,
    improve_duals,
    max_assignment,
)


def _optimum(cost: torch.Tensor) -> float:
    _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    return float(cost[torch.arange(cost.shape[0]), torch.as_tensor(cols)].sum())


def _score(cost: torch.Tensor, cols: torch.Tensor) -> float:
    assert sorted(cols.tolist()) == list(range(cost.shape[0]))  # a permutation
    return float(cost[torch.arange(cost.shape[0]), cols].sum())


def _costs(n: int, steps: int, seed: int) -> list[torch.Tensor]:
    """A drifting sequence like weight matching's: a near rank-1 cost (wide layers) plus
    structure, each step moved a little, one step replaced outright."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, n, generator=gen, dtype=torch.float64)
    base += 30 * torch.rand(n, 1, generator=gen, dtype=torch.float64) @ torch.rand(
        1, n, generator=gen, dtype=torch.float64)
    out = []
    for k in range(steps):
        base = base + 0.05 * torch.randn(n, n, generator=gen, dtype=torch.float64)
        out.append(torch.randn(n, n, generator=gen, dtype=torch.float64) if k == 2 else base)
    return out


@pytest.mark.parametrize("n", [1, 7, 300])
def test_max_assignment_is_optimal(n: int) -> None:
    for cost in _costs(n, 3, seed=n):
        assert _score(cost, max_assignment(cost)) == pytest.approx(_optimum(cost), rel=1e-12)


@pytest.mark.parametrize(("n", "warm_from", "auction_from"),
                         [(300, None, None), (20, 1, None), (40, 1, 1)],
                         ids=["default", "small", "auction"])
def test_warm_solves_reach_the_cold_optimum(n: int, warm_from: int | None,
                                            auction_from: int | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Any duals leave the optimum unchanged: each warm solve of a drifting sequence (one step an
    unrelated cost, one a different size under the same key) scores what scipy's cold solve does,
    and the warm path is really taken; cold starts from row/column reduction or from an auction's
    prices alike."""
    if warm_from is not None:
        monkeypatch.setattr(assignment, "WARM_MIN_SIZE", warm_from)
    if auction_from is not None:
        monkeypatch.setattr(assignment, "AUCTION_MIN_SIZE", auction_from)
    calls = []
    original = assignment.improve_duals
    monkeypatch.setattr(assignment, "improve_duals",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    solver = WarmAssignment()
    costs = _costs(n, 6, seed=1)
    costs.insert(4, _costs(n + 3, 1, seed=2)[0])
    for cost in costs:
        assert _score(cost, solver.solve("g", cost)) == pytest.approx(_optimum(cost), rel=1e-12)
    assert len(calls) == len(costs) - 3  # cold: the first, the resized one and the one after


def test_improve_duals_converges_to_lp_duals() -> None:
    """Run long enough, the label correcting ends at duals of the solved assignment:
    ``u_i + v_j <= c_ij`` everywhere, with equality on the assignment; warm-starting the same
    cost from them makes the old assignment tight and every reduced cost non-negative."""
    cost = _costs(200, 1, seed=5)[0]
    c = _min_form(cost)
    u0 = c.min(1).values
    v0 = (c - u0[:, None]).min(0).values
    cols = max_assignment(cost)
    rows = torch.arange(200)
    slack = (c - u0[:, None] - v0[None, :])[rows, cols]
    assert bool((slack > 1e-9).any())  # the cold duals are not yet optimal
    v = improve_duals(c, cols, v0, slack, rounds=201)
    u = c[rows, cols] - v[cols]
    reduced = c - u[:, None] - v[None, :]
    assert float(reduced.min()) >= -1e-9
    warm_u = (c - v[None, :]).min(1).values
    assert torch.allclose(warm_u, u, atol=1e-9)  # the row duals a warm start derives
    few = improve_duals(c, cols, v0, slack, rounds=1)
    assert float((c - (c[rows, cols] - few[cols])[:, None] - few[None, :]).min()) < -1e-9


@pytest.mark.parametrize("eps", [1e-3, 0.3])
def test_auction_prices_are_eps_optimal_duals(eps: float) -> None:
    """Run to the end, the auction's prices are duals within ``n * eps`` of the optimum:
    ``sum_i max_j (b_ij - p_j) + sum_j p_j`` bounds every assignment's benefit from above (weak
    duality) and exceeds the optimum by at most ``n * eps`` (Bertsekas); cut short, they are
    still an upper bound."""
    b = _costs(60, 1, seed=7)[0]
    best = _optimum(b)

    def dual(p: torch.Tensor) -> float:
        return float((b - p[None, :]).max(1).values.sum() + p.sum())

    gap = dual(auction_prices(b, eps, rounds=100_000)) - best
    assert -1e-9 <= gap <= 60 * eps
    assert dual(auction_prices(b, eps, rounds=3)) >= best - 1e-9
