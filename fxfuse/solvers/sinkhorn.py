"""Sinkhorn normalisation: the doubly-stochastic matrix nearest a score matrix at a temperature,
warm-started from the duals of the previous solve of the same problem.

For scores ``s: (n, n)`` and temperature ``tau > 0``, Sinkhorn finds

    S = diag(exp f) exp(s / tau) diag(exp g),   S 1 = 1,   S^T 1 = 1

by alternating column and row normalisation.  As ``tau -> 0`` ``S`` tends to the maximum-weight
permutation of ``s`` (the entropic regularisation of the assignment problem, weight ``tau``): what
graduated assignment anneals towards (Gold & Rangarajan 1996; GAMF, Liu et al. 2022).

**Rectangular scores** ``s: (n, m)`` (a model of ``n`` units matched into a universe of ``m``):
rows still sum to 1 (each unit carries mass 1) and columns to ``n / m`` (the mass spread evenly
over the universe), ``S 1 = 1``, ``S^T 1 = (n / m) 1``: the transport polytope with uniform
marginals scaled to one unit of mass per row, whose vertices are the exact transport plans; for
``n = m`` it is the doubly-stochastic case above, computed by the same operations.

Numerics (Schmitzer's stabilised scaling): the potentials ``f, g`` live in the log domain, the
iterations run on ``K = exp(s / tau + f 1^T + 1 g^T)`` in float64 as scalings ``u, v``
(``v = 1 / K^T u``, ``u = 1 / K v``: two matrix-vector products per iteration instead of two
``logsumexp`` passes over the matrix), and are absorbed into ``f, g`` (``K`` rebuilt) whenever a
scaling leaves ``[1e-30, 1e30]`` (checked every :data:`CHECK_EVERY` iterations, as convergence is: each
check waits for the values), so a small ``tau`` neither overflows nor underflows.

**Batches.**  :func:`sinkhorn_batch` solves a stack ``(B, n, n)`` of independent problems: the
iterations run as batched matrix-vector products, each problem taken out of the batch at the
first check where it has converged, and absorbed on its own, so each result is the one the
problem would get alone (up to the rounding of batched products), at one Python loop for the
stack instead of one per problem (graduated assignment solves one per group, many of one size).

``S`` is unique, so where the iterations start changes the time, not the answer:
:class:`WarmSinkhorn` starts each solve from the column potential of the previous solve of the
same key (rescaled to the new temperature).  The iterations stop at ``max_iter`` or, checked
every :data:`CHECK_EVERY` iterations, once every column sum is within ``tol`` of 1 (rows sum to 1
exactly after each row step).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

_ABSORB = 1e30  # a scaling outside [1 / _ABSORB, _ABSORB] is absorbed into the potentials
CHECK_EVERY = 10  # iterations between convergence / absorption checks (each syncs)
BATCH_MAX = 128  # larger problems are solved one at a time: measured on one CPU thread, batched
# vector-matrix products are 2-4x faster than a loop of them up to 128 x 128, 2x slower at 256


def sinkhorn(scores: torch.Tensor, tau: float, max_iter: int, tol: float = 1e-3,
             g0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, g * tau)``: the doubly-stochastic ``S`` of ``scores: (n, n)`` at temperature ``tau``
    (module doc, in ``scores``' dtype) and its column potential in score units, to warm-start
    the next solve; ``g0``: such a potential (None: zeros).  Rectangular ``scores: (n, m)``:
    columns sum to ``n / m`` (module doc)."""
    s = scores.double() / tau
    n = s.shape[1]
    col = s.shape[0] / n  # the column mass: 1 for a square problem
    g = torch.zeros(n, dtype=torch.float64, device=s.device) if g0 is None else g0.double() / tau
    f = -torch.logsumexp(s + g[None, :], dim=1)
    k = torch.exp(s + f[:, None] + g[None, :])
    u = torch.ones(s.shape[0], dtype=torch.float64, device=s.device)
    v = torch.ones(n, dtype=torch.float64, device=s.device)
    for it in range(max_iter):
        check = it % CHECK_EVERY == 0
        ktu = k.T @ u
        if col != 1:
            ktu.div_(col)
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


def sinkhorn_batch(scores: torch.Tensor, tau: float, max_iter: int, tol: float = 1e-3,
                   g0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sinkhorn` of each matrix of a stack ``scores: (B, n, n)`` (potentials ``(B, n)``),
    as one batch (module doc): each problem leaves the batch at the first check where it has
    converged and is absorbed on its own, so it gets :func:`sinkhorn`'s result alone."""
    s = scores.double() / tau
    b, n = s.shape[0], s.shape[2]
    dev = s.device
    g = (torch.zeros(b, 1, n, dtype=torch.float64, device=dev) if g0 is None else
         g0.reshape(b, 1, n).double() / tau)
    f = -torch.logsumexp(s + g, dim=2, keepdim=True)  # (B, n, 1)
    k = torch.exp(s + f + g)
    kt = k.transpose(1, 2).contiguous()  # both layouts: row-vector products are the fast kernel
    u = torch.ones(b, 1, s.shape[1], dtype=torch.float64, device=dev)  # (B, 1, n): u^T, v^T
    v = torch.ones(b, 1, n, dtype=torch.float64, device=dev)
    out = torch.empty_like(s)
    pot = torch.empty_like(g)
    ids = torch.arange(b, device=dev)  # the problems still in the batch

    def finish(done: torch.Tensor) -> None:
        out[ids[done]] = u[done].transpose(1, 2) * k[done] * v[done]
        pot[ids[done]] = g[done] + v[done].log()

    for it in range(max_iter):
        check = it % CHECK_EVERY == 0
        ktu = torch.matmul(u, k)
        if check and tol > 0:
            done = (v * ktu - 1).abs().amax((1, 2)) <= tol
            if bool(done.any()):
                finish(done)
                keep = torch.nonzero(~done).flatten()
                if keep.numel() == 0:
                    break
                ids, s, f, g, k, kt, u, v, ktu = (t[keep] for t in (ids, s, f, g, k, kt, u, v,
                                                                   ktu))
        v = ktu.clamp_min_(1e-300).reciprocal_()
        u = torch.matmul(v, kt).clamp_min_(1e-300).reciprocal_()
        if check:
            bad = ((torch.maximum(u.amax((1, 2)), v.amax((1, 2))) > _ABSORB)
                   | (torch.minimum(u.amin((1, 2)), v.amin((1, 2))) < 1 / _ABSORB))
            if bool(bad.any()):
                idx = torch.nonzero(bad).flatten()
                f[idx] += u[idx].log().transpose(1, 2)
                g[idx] += v[idx].log()
                k[idx] = torch.exp(s[idx] + f[idx] + g[idx])
                kt[idx] = k[idx].transpose(1, 2)
                u[idx], v[idx] = 1.0, 1.0
    else:
        finish(torch.ones(ids.numel(), dtype=torch.bool, device=dev))
    return out.to(scores.dtype), pot[:, 0] * tau


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

    def solve_many(self, problems: Mapping[Hashable, torch.Tensor], tau: float, max_iter: int,
                   tol: float = 1e-3) -> dict[Hashable, torch.Tensor]:
        """:meth:`solve` of every ``key: scores`` of ``problems``, those of one shape (and with
        or without a warm start) solved as one batch (module doc); the same matrices as one
        :meth:`solve` each, up to rounding."""
        buckets: dict[tuple[Any, ...], list[Hashable]] = {}
        for key, scores in problems.items():
            g0 = self._g.get(key)
            warm = g0 is not None and g0.numel() == scores.shape[1]
            alone = (key,) if scores.shape[1] > BATCH_MAX or scores.shape[0] != scores.shape[1] \
                else ()  # rectangular problems (module doc) are solved alone
            buckets.setdefault((tuple(scores.shape), scores.dtype, warm, alone), []).append(key)
        out: dict[Hashable, torch.Tensor] = {}
        for (_, _, warm, _), keys in buckets.items():
            g0s = torch.stack([self._g[key] for key in keys]) if warm else None
            if len(keys) == 1:
                out[keys[0]], self._g[keys[0]] = sinkhorn(problems[keys[0]], tau, max_iter, tol,
                                                          None if g0s is None else g0s[0])
                continue
            mats, pots = sinkhorn_batch(torch.stack([problems[key] for key in keys]), tau,
                                        max_iter, tol, g0s)
            for i, key in enumerate(keys):
                out[key], self._g[key] = mats[i], pots[i]
        return {key: out[key] for key in problems}
