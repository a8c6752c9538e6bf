"""Where a group sits along a tensor axis: the rows of a group's features.

For an axis with layout tree ``t`` and a group ``g`` acting on it, every position ``p`` of the axis
has a coordinate ``c(p)`` in ``g`` (or none, in a block of a sum that ``g`` does not touch).
:func:`group_rows` returns ``rows: (|g|, R)`` with ``rows[i]`` the positions whose coordinate is
``i``, in increasing order; position ``rows[i, r]`` and ``rows[j, r]`` then differ only in their
``g`` coordinate (the same "context" ``r``: the same index of every other factor and block).

So ``t.movedim(axis, 0)[rows.flatten()].reshape(|g|, -1)`` lays out a tensor's entries as one row
per unit of ``g``, whatever the block structure (``g x 16`` after a flatten, ``(g + h)`` after a
concat, ``(g + g)`` for GLU, ``interleave(g, h)`` after a channel shuffle): the matrix weight and
activation matching compare.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch

from ..errors import SpecError
from .layout import Fixed, Interleave, Prod, Sum, Tree, Unit


def _coords(t: Tree, group: str, sizes: Mapping[str, int]) -> tuple[torch.Tensor, bool] | None:
    """(coordinate of ``group`` at every position or -1, whether ``group`` occurs) or None when it
    occurs twice in one position (``g x g``)."""
    if isinstance(t, Unit):
        n = int(sizes[t.group])
        return (torch.arange(n), True) if t.group == group else (torch.full((n,), -1), False)
    if isinstance(t, Fixed):
        return torch.full((int(t.n),), -1), False
    parts = [_coords(c, group, sizes) for c in t.parts]
    if any(p is None for p in parts):
        return None
    parts_ok = [p for p in parts if p is not None]
    if isinstance(t, Sum):
        return torch.cat([c for c, _ in parts_ok]), any(f for _, f in parts_ok)
    if isinstance(t, Interleave):  # position i*k + j is block j's position i
        if len({c.numel() for c, _ in parts_ok}) > 1:
            raise SpecError(f"interleaved blocks of different lengths "
                            f"{[c.numel() for c, _ in parts_ok]} at group sizes {dict(sizes)}: "
                            f"the blocks of an interleaved axis change width together")
        return torch.stack([c for c, _ in parts_ok], dim=1).reshape(-1), any(
            f for _, f in parts_ok)
    if sum(f for _, f in parts_ok) > 1:
        return None
    out = torch.full((1,), -1)
    found = False
    for c, f in parts_ok:
        if f:
            out = (out[:, None] * 0 + c[None, :]).reshape(-1)
            found = True
        else:
            out = out[:, None].expand(-1, c.numel()).reshape(-1)
    return out, found


@lru_cache(maxsize=4096)
def _rows_cached(t: Tree, group: str, sizes: tuple[tuple[str, int], ...]
                 ) -> torch.Tensor | None:
    res = _coords(t, group, dict(sizes))
    if res is None or not res[1]:
        return None
    coord, _ = res
    n = int(coord.max().item()) + 1
    pos = torch.nonzero(coord >= 0).flatten()
    order = torch.argsort(coord[pos] * coord.numel() + pos)
    return pos[order].reshape(n, -1)


def group_rows(t: Tree, group: str, sizes: Mapping[str, int]) -> torch.Tensor | None:
    """``rows: (|group|, R)`` (see module doc), or None if ``group`` is not on this axis or occurs
    twice in one position."""
    used = tuple(sorted((g, int(sizes[g])) for g in _names(t)))
    return _rows_cached(t, group, used)


def _names(t: Tree) -> set[str]:
    if isinstance(t, Unit):
        return {t.group}
    return set() if isinstance(t, Fixed) else {n for c in t.parts for n in _names(c)}


def as_rows(x: torch.Tensor, axis: int, rows: torch.Tensor) -> torch.Tensor:
    """``x`` as a matrix ``(|g|, everything else)`` with one row per unit of the group."""
    n = rows.shape[0]
    moved = x.movedim(axis, 0)
    if rows.shape[1] == 1 and n == moved.shape[0] and bool(
            (rows[:, 0] == torch.arange(n, device=rows.device)).all()):
        return moved.reshape(n, -1)  # the whole axis is the group, in order: no gather
    return moved[rows.to(x.device).reshape(-1)].reshape(n, -1)


def has_interleave(t: Tree) -> bool:
    return isinstance(t, Interleave) or (not isinstance(t, (Unit, Fixed)) and any(
        has_interleave(c) for c in t.parts))


def deinterleaved(t: Tree, sizes: Mapping[str, int]) -> tuple[Tree, torch.Tensor]:
    """``(s, order)``: ``t`` with every interleave written as the sum of its blocks, and the
    positions that take an axis laid out as ``t`` to one laid out as ``s``
    (``x.index_select(axis, order)``).  A map that changes the width of the blocks is applied on
    ``s``, where blocks may have any widths, and interleaved back at the new widths."""
    if isinstance(t, Unit):
        return t, torch.arange(int(sizes[t.group]))
    if isinstance(t, Fixed):
        return t, torch.arange(int(t.n))
    parts = [deinterleaved(c, sizes) for c in t.parts]
    trees = tuple(c for c, _ in parts)
    orders = [o for _, o in parts]
    if isinstance(t, Interleave):
        if len({o.numel() for o in orders}) > 1:
            raise SpecError(f"interleaved blocks of different lengths {[o.numel() for o in orders]}"
                            f" at group sizes {dict(sizes)}: the blocks of an interleaved axis "
                            f"change width together")
        k = len(orders)
        return Sum(trees), torch.cat([o * k + j for j, o in enumerate(orders)])
    if isinstance(t, Sum):
        out, off = [], 0
        for o in orders:
            out.append(o + off)
            off += o.numel()
        return Sum(trees), torch.cat(out)
    order = orders[0]
    for o in orders[1:]:
        order = (order[:, None] * o.numel() + o[None, :]).reshape(-1)
    return Prod(trees), order
