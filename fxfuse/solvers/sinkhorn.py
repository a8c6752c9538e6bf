"""Sinkhorn normalisation: the doubly-stochastic matrix nearest a score matrix at a temperature.

For scores ``s: (n, n)`` and temperature ``tau > 0``, Sinkhorn finds

    S = diag(a) exp(s / tau) diag(b),   S 1 = 1,   S^T 1 = 1

by alternating row and column normalisation, here in the log domain (``log S`` minus the
``logsumexp`` of its rows, then of its columns), so a small ``tau`` (large ``s / tau``) does not
overflow.  As ``tau -> 0`` ``S`` tends to the maximum-weight permutation of ``s`` (the entropic
regularisation of the assignment problem, weight ``tau``), which is what graduated assignment
anneals towards (Gold & Rangarajan 1996; GAMF, Liu et al. 2022).

The iterations stop at ``max_iter`` or, checked every :data:`CHECK_EVERY` iterations, once every
row sum is within ``tol`` of 1 (the columns sum to 1 exactly after each column step).
"""

from __future__ import annotations

import torch

CHECK_EVERY = 10


def sinkhorn(scores: torch.Tensor, tau: float, max_iter: int, tol: float = 1e-3) -> torch.Tensor:
    """The doubly-stochastic ``S`` of ``scores: (n, n)`` at temperature ``tau`` (module doc)."""
    log = scores / tau
    for it in range(max_iter):
        log = log - torch.logsumexp(log, dim=1, keepdim=True)
        log = log - torch.logsumexp(log, dim=0, keepdim=True)
        if (it + 1) % CHECK_EVERY == 0 and tol > 0:
            rows = torch.logsumexp(log, dim=1).exp()
            if float((rows - 1).abs().max()) <= tol:
                break
    return log.exp()
