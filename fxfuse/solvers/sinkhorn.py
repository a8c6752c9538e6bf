"""Sinkhorn normalisation: the doubly-stochastic matrix nearest a score matrix at a temperature,
warm-started from the duals of the previous solve of the same problem.

For scores ``s: (n, n)`` and temperature ``tau > 0``, Sinkhorn finds

    S = diag(exp f) exp(s / tau) diag(exp g),   S 1 = 1,   S^T 1 = 1

by alternating column and row normalisation.  As ``tau -> 0`` ``S`` tends to the maximum-weight
permutation of ``s`` (the entropic regularisation of the assignment problem, weight ``tau``): what
graduated assignment anneals towards (Gold & Rangarajan 1996; GAMF, Liu et al. 2022).

Numerics (Schmitzer's stabilised scaling): the potentials ``f, g`` live in the log domain, the
iterations run on ``K = exp(s / tau + f 1^T + 1 g^T)`` in float64 as scalings ``u, v``
(``v = 1 / K^T u``, ``u = 1 / K v``: two matrix-vector products per iteration instead of two
``logsumexp`` passes over the matrix), and are absorbed into ``f, g`` (``K`` rebuilt) whenever a
scaling leaves ``[1e-30, 1e30]`` (checked every :data:`CHECK_EVERY` iterations, as convergence is: each
check waits for the values), so a small ``tau`` neither overflows nor underflows.

``S`` is unique, so where the iterations start changes the time, not the answer:
:class:`WarmSinkhorn` starts each solve from the column potential of the previous solve of the
same key (rescaled to the new temperature).  The iterations stop at ``max_iter`` or, checked
every :data:`CHECK_EVERY` iterations, once every column sum is within ``tol`` of 1 (rows sum to 1
exactly after each row step).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

_ABSORB = 1e30  # a scaling outside [1 / _ABSORB, _ABSORB] is absorbed into the potentials
CHECK_EVERY = 10  # iterations between convergence / absorption checks (each syncs)


def sinkhorn(scores: torch.Tensor, tau: float, max_iter: int, tol: float = 1e-3,
             g0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, g * tau)``: the doubly-stochastic ``S`` of ``scores: (n, n)`` at temperature ``tau``
    (module doc, in ``scores``' dtype) and its column potential in score units, to warm-start
    the next solve; ``g0``: such a potential (None: zeros)."""
    s = scores.double() / tau
    n = s.shape[1]
    g = torch.zeros(n, dtype=torch.float64, device=s.device) if g0 is None else g0.double() / tau
    f = -torch.logsumexp(s + g[None, :], dim=1)
    k = torch.exp(s + f[:, None] + g[None, :])
    u = torch.ones(s.shape[0], dtype=torch.float64, device=s.device)
    v = torch.ones(n, dtype=torch.float64, device=s.device)
    for it in range(max_iter):
        check = it % CHECK_EVERY == 0
        ktu = k.T @ u
        if check and tol > 0 and float((v * ktu - 1).abs().max()) <= tol:
            break
        v = (ktu.clamp_min_(1e-300)).reciprocal_()
        u = (k @ v).clamp_min_(1e-300).reciprocal_()
        if check and (float(torch.maximum(u.max(), v.max())) > _ABSORB
                      or float(torch.minimum(u.min(), v.min())) < 1 / _ABSORB):
            f, g = f + u.log(), g + v.log()
            k = torch.exp(s + f[:, None] + g[None, :])
            u, v = torch.ones_like(u), torch.ones_like(v)
    out = u[:, None] * k * v[None, :]
    return out.to(scores.dtype), (g + v.log()) * tau


class WarmSinkhorn:
    """Sinkhorn solves of a sequence of score matrices per key, each started from the column
    potential of the key's previous solve (module doc).  Keys are independent."""

    def __init__(self) -> None:
        self._g: dict[Hashable, torch.Tensor] = {}

    def solve(self, key: Hashable, scores: torch.Tensor, tau: float, max_iter: int,
              tol: float = 1e-3) -> torch.Tensor:
        g0 = self._g.get(key)
        if g0 is not None and g0.numel() != scores.shape[1]:
            g0 = None
        out, self._g[key] = sinkhorn(scores, tau, max_iter, tol, g0)
        return out
