"""Indexing by tensors (gather, index_select, advanced indexing), differences along an axis, and
tensors made from another's dtype and device (``new_ones``), at both levels (Python and ATen).

* ``gather(x, dim, idx)``: ``y[..i..] = x[..i..][idx[..i..]]`` along ``dim``.  ``x[dim]`` is
  addressed by the index *values* (cut); ``idx`` and ``y`` share every axis (permuting ``idx``
  permutes ``y`` the same way); other axes of ``x`` are read as the window ``[0, idx.size(d))``.
* Advanced indexing ``x[i1, .., ik]`` (``aten.index.Tensor``; ``None`` = a whole axis, trailing
  axes implicit): the index tensors broadcast to ``B``; ``y`` has ``B`` in place of the indexed
  axes (or first, if they are not adjacent, as in NumPy).  Indexed axes of ``x`` are cut;
  ``B``'s axes follow the index tensors; the other axes pass through.
* ``diff(x, dim)`` subtracts neighbours: ``dim`` is cut, every other axis passes through.
* ``x.new_ones(size)``: only ``x``'s dtype and device are read (``x`` free, the result a
  constant).
"""

from __future__ import annotations

import torch

from .registry import Cut, Free, OpView, Relation, Same, TensorHandle, axis_rule, decline, same
from .shape import window_relations

aten = torch.ops.aten
BY_VALUE = "positions along this axis are addressed by index values"
CONSTANT = "a tensor made inside forward (a constant): not permuted"


@axis_rule(torch.gather, "gather", aten.gather.default)
def gather_rule(op: OpView) -> list[Relation]:
    x, dim, idx, y = op.tensor(0, "input"), op.arg(1, "dim"), op.tensor(2, "index"), op.out
    if not isinstance(dim, int) or not x.ndim == idx.ndim == y.ndim or y.shape != idx.shape:
        raise decline("gather with a non-integer dim or mismatched ranks")
    dim %= x.ndim
    rels: list[Relation] = [Cut(x[dim], BY_VALUE), Same(idx[dim], y[dim])]
    for d in range(x.ndim):
        if d != dim:
            rels.append(Same(idx[d], y[d]))
            rels += window_relations(op, x, d, 0, idx.shape[d], 1, y, d, f"gather{d}")
    return rels


@axis_rule(torch.index_select, "index_select", aten.index_select.default)
def index_select_rule(op: OpView) -> list[Relation]:
    x, dim, idx, y = op.tensor(0, "input"), op.arg(1, "dim"), op.tensor(2, "index"), op.out
    if not isinstance(dim, int) or idx.ndim > 1 or y.ndim != x.ndim:
        raise decline("index_select with a non-integer dim or a multi-dimensional index")
    dim %= x.ndim
    rels: list[Relation] = [Cut(x[dim], BY_VALUE)]
    if idx.ndim == 1:
        rels.append(Same(idx[0], y[dim]))
    rels += [Same(x[d], y[d]) for d in range(x.ndim) if d != dim]
    return rels


def advanced_index_relations(x: TensorHandle, indices: list[TensorHandle | None],
                             y: TensorHandle) -> list[Relation]:
    """``y = x[indices]`` with one entry per leading axis of ``x`` (``None``: the whole axis)."""
    if len(indices) > x.ndim:
        raise decline(f"{len(indices)} indices into a {x.ndim}-d tensor")
    idx = [*indices, *([None] * (x.ndim - len(indices)))]
    pos = [d for d, t in enumerate(idx) if t is not None]
    if not pos:
        raise decline("no index tensor")
    ts = [t for t in idx if t is not None]
    if any(t.dtype in (torch.bool, torch.uint8) for t in ts):
        raise decline("a boolean mask index (the result's size depends on its values)")
    nb = max(t.ndim for t in ts)
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    b0 = pos[0] if adjacent else 0
    if y.ndim != x.ndim - len(pos) + nb:
        raise decline(f"a result of shape {y.shape} for indexing {x.shape}")
    rels: list[Relation] = [Cut(x[d], BY_VALUE) for d in pos]
    rest = [d for d in range(x.ndim) if idx[d] is None]
    out_rest = ([*range(b0), *range(b0 + nb, y.ndim)] if adjacent else list(range(nb, y.ndim)))
    rels += [Same(x[d], y[e]) for d, e in zip(rest, out_rest)]
    for t in ts:
        off = nb - t.ndim
        for d in range(t.ndim):
            if t.shape[d] == y.shape[b0 + off + d]:
                rels.append(Same(t[d], y[b0 + off + d]))
            elif t.shape[d] != 1:
                raise decline("index tensors that do not broadcast")
    return rels


@axis_rule(aten.index.Tensor)
def aten_index_rule(op: OpView) -> list[Relation]:
    indices = op.arg(1, "indices")
    if not isinstance(indices, (list, tuple)) or not all(
            t is None or isinstance(t, TensorHandle) for t in indices):
        raise decline("indices that are not tensors or None")
    return advanced_index_relations(op.tensor(0, "input"), list(indices), op.out)


@axis_rule(torch.diff, "diff", aten.diff.default)
def diff_rule(op: OpView) -> list[Relation]:
    x, y = op.tensor(0, "input"), op.out
    dim = op.arg(2, "dim", -1)
    if not isinstance(dim, int) or y.ndim != x.ndim or not x.ndim:
        raise decline("diff with a non-integer dim")
    dim %= x.ndim
    ends = [t for t in (op.arg(3, "prepend"), op.arg(4, "append")) if isinstance(t, TensorHandle)]
    if any(t.ndim != x.ndim for t in ends):
        raise decline("prepend/append of another rank")
    why = "a difference of neighbouring positions along this axis"
    rels: list[Relation] = [Cut(t[dim], why) for t in (x, y, *ends)]
    for d in range(x.ndim):
        if d != dim:
            rels += same(y[d], x[d], *(t[d] for t in ends))
    return rels


@axis_rule("new_ones", "new_zeros", "new_full", "new_empty", "new_tensor",
           aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
           aten.new_empty.default)
def new_tensor_rule(op: OpView) -> list[Relation]:
    """Only ``x``'s dtype and device are read; the result is a constant."""
    x = op.tensor(0, "input")
    rels: list[Relation] = [Free(a) for a in x.axes()]
    return rels + [Cut(a, CONSTANT) for t in op.outs for a in t.axes()]


@axis_rule(torch.triu, torch.tril, "triu", "tril", aten.triu.default, aten.tril.default)
def triangle_rule(op: OpView) -> list[Relation]:
    """A triangle of the last two axes (a causal mask): those positions matter."""
    x, y = op.tensor(0, "input"), op.out
    if x.ndim < 2 or y.shape != x.shape:
        raise decline("a triangle of a tensor with fewer than 2 axes")
    why = "the triangle depends on positions along this axis"
    rels: list[Relation] = [Same(x[d], y[d]) for d in range(x.ndim - 2)]
    return rels + [Cut(t[d], why) for t in (x, y) for d in (-2, -1)]
