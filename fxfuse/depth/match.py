"""The level correspondence: a dynamic program over two block sequences (CLAFusion-style).

Given the shallower model's ``m`` blocks, the deeper one's ``n >= m`` blocks, a similarity
``sim: (m, n)``, which pairs may match (``allowed[i, j]``: equal signatures, so weights copy) and
which deeper blocks may stay unmatched (``free[j]``: an exact identity exists when expanding; any
block when collapsing), find the strictly increasing map ``phi: [m] -> [n]`` maximising
``sum_i sim[i, phi(i)]`` over the allowed pairs, every unmatched ``j`` free::

    best[i][j] = max(best[i][j-1]                    if free[j-1],
                     best[i-1][j-1] + sim[i-1, j-1]  if allowed[i-1, j-1])

``best[0][0] = 0``; ``O(m n)`` time.  ``None`` when no such map exists.
"""

from __future__ import annotations

import torch


def match_levels(sim: torch.Tensor, allowed: torch.Tensor, free: torch.Tensor
                 ) -> list[int] | None:
    """The best monotone map (module doc): ``phi[i]`` for each shallow block ``i``."""
    m, n = sim.shape
    neg = float("-inf")
    best = [[neg] * (n + 1) for _ in range(m + 1)]
    take = [[False] * (n + 1) for _ in range(m + 1)]
    best[0][0] = 0.0
    for i in range(m + 1):
        for j in range(1, n + 1):
            skip = best[i][j - 1] if bool(free[j - 1]) else neg
            pair = neg
            if i > 0 and bool(allowed[i - 1, j - 1]) and best[i - 1][j - 1] > neg:
                pair = best[i - 1][j - 1] + float(sim[i - 1, j - 1])
            if pair > neg and pair >= skip:
                best[i][j], take[i][j] = pair, True
            else:
                best[i][j] = skip
    if best[m][n] == neg:
        return None
    phi = [0] * m
    i, j = m, n
    while j > 0:
        if i > 0 and take[i][j]:
            phi[i - 1] = j - 1
            i -= 1
        j -= 1
    return phi
