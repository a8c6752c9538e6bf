"""Block-to-block similarity: linear CKA on activations, or a weight-spectrum fallback.

**Linear CKA** (Kornblith et al. 2019) of two representations of the same ``n`` samples,
``X: (n, p)`` and ``Y: (n, q)`` flattened per sample, through their Gram matrices
``K = X X^T``, ``L = Y Y^T`` and the centring ``H = I - 11^T / n``::

    CKA(K, L) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)        in [0, 1]

It is invariant to permutations (and any orthogonal map) of the units, so two models' blocks
compare without alignment.  A block is compared by what it maps from and to:
``sim(a, b) = (CKA(in_a, in_b) + CKA(out_a, out_b)) / 2``, so an identity block (in = out) does
not look like the block it sits next to.

**Without data**, blocks with equal signatures compare by their weights' singular values
``s`` (sorted, every tensor reshaped to ``(shape[0], -1)``; permutation invariant, scale aware):
``sim = 1 - ||s_a - s_b|| / (||s_a|| + ||s_b||)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .blocks import BlockSequence


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """``H X X^T H`` for ``x: (n, ...)`` (flattened per sample, in float64)."""
    x = x.reshape(x.shape[0], -1).double()
    x = x - x.mean(dim=0, keepdim=True)  # H X: centring the features centres the Gram
    return x @ x.T


def cka(k: torch.Tensor, ell: torch.Tensor) -> float:
    """Linear CKA of two centred Gram matrices (0 when either is constant)."""
    den = float(k.norm() * ell.norm())
    return float((k * ell).sum()) / den if den > 0 else 0.0


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.seen[n.name] = out.detach()
        return out


@torch.no_grad()
def block_grams(seq: BlockSequence, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Centred Gram matrices of every block's input and output node over the samples of
    ``inputs`` (batches of the model's first input, concatenated)."""
    names = {b.input for b in seq.blocks} | {b.output for b in seq.blocks}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    was = seq.graph.training
    seq.graph.eval()
    try:
        for x in inputs:
            cap = _Capture(seq.graph, names)
            cap.run(x)
            for n, v in cap.seen.items():
                feats[n].append(v.reshape(v.shape[0], -1).cpu())
    finally:
        seq.graph.train(was)
    return {n: centred_gram(torch.cat(v)) for n, v in feats.items() if v}


def activation_similarity(a: BlockSequence, b: BlockSequence,
                          inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sim[i, j]`` of block ``i`` of ``a`` and block ``j`` of ``b`` (module doc, CKA)."""
    ga, gb = block_grams(a, inputs), block_grams(b, inputs)
    sim = torch.zeros(len(a.blocks), len(b.blocks), dtype=torch.float64)
    for i, x in enumerate(a.blocks):
        for j, y in enumerate(b.blocks):
            sim[i, j] = 0.5 * (cka(ga[x.input], gb[y.input]) + cka(ga[x.output], gb[y.output]))
    return sim


def _spectrum(seq: BlockSequence, keys: Sequence[str]) -> torch.Tensor:
    state = seq.graph.state_dict()
    parts = []
    for k in keys:
        t = state[k].detach().double()
        if not t.is_floating_point() or t.dim() == 0:
            continue
        if t.dim() == 1:
            parts.append(t.abs().sort(descending=True).values)
        else:
            parts.append(torch.linalg.svdvals(t.reshape(t.shape[0], -1)))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def weight_similarity(a: BlockSequence, b: BlockSequence) -> torch.Tensor:
    """``sim[i, j]`` from weight spectra (module doc); 0 where the signatures differ."""
    sim = torch.zeros(len(a.blocks), len(b.blocks), dtype=torch.float64)
    spec_a = [_spectrum(a, x.keys) for x in a.blocks]
    spec_b = [_spectrum(b, y.keys) for y in b.blocks]
    for i, x in enumerate(a.blocks):
        for j, y in enumerate(b.blocks):
            if x.signature != y.signature or spec_a[i].numel() != spec_b[j].numel():
                continue
            sa, sb = spec_a[i], spec_b[j]
            den = float(sa.norm() + sb.norm())
            sim[i, j] = 1.0 - float((sa - sb).norm()) / den if den > 0 else 1.0
    return sim
