"""Channel shuffles in a traced graph, read as one op where that keeps more symmetry.

A channel shuffle as libraries write it is three ops: ``x.view(b, g, n, h, w)`` ->
``transpose(1, 2)`` (-> ``contiguous()``) -> ``view(b, g*n, h, w)``.  Rule by rule, the middle
tensor's two axes are a Kronecker pair, so the input axis must be ``G ⊗ N`` and the output
``N ⊗ G``: one permutation ``P_N`` shared by every block.  Where the input axis is a
concatenation of ``g`` blocks of ``n`` (``cat(x1, branch(x2))``), the real symmetry is larger:
each block permuted on its own, interleaved in the output, which per-axis layouts of the middle
tensor can not say.  :func:`find_shuffles` finds each such chain (every intermediate result used
only by the next op), and the discovery driver applies
:func:`fxfuse.rules.shape.channel_shuffle_rule` to the chain as a whole where
:func:`prefer_interleave` says so; otherwise the three ops keep their own rules (a shuffle after
a grouped convolution, whose axis already is ``G ⊗ N``, is exact there).

Both readings are sound; neither contains the other in general.  On an input axis that is a
concatenation of segments (lengths ``l_i``, ``g`` blocks of ``n``), the Kronecker reading keeps
each segment ``G_i ⊗ N`` with one shared ``N``, ``prod_i (l_i/n)! * n!`` permutations (none at all,
a conflict, where a segment boundary is not a multiple of ``n``); the interleave keeps ``(n!)^g``.
The interleave is chosen where it keeps at least as many: always for ``g = 2`` (ShuffleNet V2),
not for a shuffle into many blocks of two of a concatenation of two halves.
"""

from __future__ import annotations

from itertools import accumulate
from math import lgamma
from typing import Any

import torch
import torch.fx as fx

from ..ir.layout import AtomTable, Interleave, Layout, Sum
from ..rules import canonical
from ..trace import VALUE, TensorMeta

RESHAPES = {"view", "reshape", "unflatten", "flatten", torch.reshape, torch.flatten,
            torch.unflatten}
TRANSPOSES = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes,
              torch.swapdims}
PERMUTES = {"permute", torch.permute}
COPIES = {"contiguous", "clone", torch.clone}


class Shuffle:
    """One chain: ``nodes`` (the view, the transpose, copies, the final reshape) shuffle axis
    ``dim`` of ``source`` in ``groups`` blocks."""

    __slots__ = ("source", "dim", "groups", "nodes")

    def __init__(self, source: fx.Node, dim: int, groups: int, nodes: list[fx.Node]) -> None:
        self.source, self.dim, self.groups, self.nodes = source, dim, groups, nodes

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def _shape(n: object) -> tuple[int, ...] | None:
    v = n.meta.get(VALUE) if isinstance(n, fx.Node) else None
    return v.shape if isinstance(v, TensorMeta) else None


def _target(n: fx.Node) -> object:
    return canonical(n.target) if n.op in ("call_function", "call_method") else None


def _swaps(n: fx.Node, ndim: int, d: int) -> bool:
    """Whether ``n`` (a transpose / permute) exchanges axes ``d`` and ``d + 1`` only."""
    t, args = _target(n), n.args
    if t in TRANSPOSES:
        a = args[1] if len(args) > 1 else n.kwargs.get("dim0")
        b = args[2] if len(args) > 2 else n.kwargs.get("dim1")
        return isinstance(a, int) and isinstance(b, int) and {a % ndim, b % ndim} == {d, d + 1}
    if t in PERMUTES:
        dims: tuple[Any, ...] = tuple(args[1:]) if len(args) > 1 else (n.kwargs.get("dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        want = list(range(ndim))
        want[d], want[d + 1] = d + 1, d
        ints = [i for i in dims if isinstance(i, int)]
        return len(ints) == len(dims) and [i % ndim for i in ints] == want
    return False


def _only_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _chain(view: fx.Node) -> Shuffle | None:
    if _target(view) not in RESHAPES or not view.args or not isinstance(view.args[0], fx.Node):
        return None
    x = view.args[0]
    xs, vs = _shape(x), _shape(view)
    if xs is None or vs is None or len(vs) != len(xs) + 1:
        return None
    for d in range(len(xs)):
        if not (xs[:d] == vs[:d] and xs[d + 1:] == vs[d + 2:] and vs[d] * vs[d + 1] == xs[d]
                and vs[d] > 1 and vs[d + 1] > 1):
            continue
        t = _only_user(view)
        if t is None or _target(t) not in TRANSPOSES | PERMUTES or not _swaps(t, len(vs), d):
            continue
        nodes = [view, t]
        r = _only_user(t)
        while r is not None and _target(r) in COPIES and r.args and r.args[0] is nodes[-1]:
            nodes.append(r)
            r = _only_user(r)
        if (r is None or _target(r) not in RESHAPES or not r.args or r.args[0] is not nodes[-1]
                or _shape(r) != xs):
            continue
        return Shuffle(x, d, vs[d], [*nodes, r])
    return None


def find_shuffles(graph: fx.Graph) -> dict[str, Shuffle]:
    """Node name -> the shuffle chain it belongs to, for every chain in ``graph``."""
    out: dict[str, Shuffle] = {}
    for node in graph.nodes:
        if node.name in out:
            continue
        chain = _chain(node)
        if chain is not None:
            for n in chain.nodes:
                out[n.name] = chain
    return out


def prefer_interleave(table: AtomTable, lay: Layout, groups: int) -> bool:
    """Whether a shuffle into ``groups`` blocks of an axis laid out as ``lay`` (resolved) keeps
    more permutations read as an interleave than as a Kronecker product (module doc)."""
    if isinstance(lay, Interleave):
        return True
    if not isinstance(lay, Sum):
        return False
    n = table.size(lay) // groups
    lengths = [table.size(p) for p in lay.parts]
    if any(c % n for c in accumulate(lengths[:-1])):
        return True  # the Kronecker reading has no common refinement with the segments
    kronecker = sum(lgamma(m // n + 1) for m in lengths) + lgamma(n + 1)
    return groups * lgamma(n + 1) >= kronecker
