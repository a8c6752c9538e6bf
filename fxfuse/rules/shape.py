"""Rules for ops that move axes around without touching values: view/reshape/flatten (the
dimension algebra), transpose/permute, concat/split/chunk, indexing, expand, padding.

Reshape is one function for every case (``flatten``, ``unflatten``, ``view``, ``squeeze``,
head-splitting reshapes, channel shuffle): the input and output shapes are cut into the smallest
chunks whose element counts agree, and each chunk states
``Prod(input axes of the chunk) = Prod(output axes of the chunk)``; :mod:`fxfuse.ir.layout` then finds
the common refinement (e.g. ``C ⊗ H ⊗ W = CHW`` for conv -> flatten -> linear, or
``C = g ⊗ C/g`` for channel shuffle).

A channel shuffle of a concatenation (``view`` to ``(g, n)`` -> ``transpose`` -> ``reshape`` back,
ShuffleNet V2's ``shuffle(cat(x1, branch(x2)))``) is read as one op,
:func:`channel_shuffle` (:func:`channel_shuffle_rule`): ``x = B_1 ⊕ .. ⊕ B_g`` and
``y = interleave(B_1, .., B_g)``, each block permuted on its own, where the Kronecker reading of
the three ops would force ``B_1 = .. = B_g``.  The discovery driver chooses it
(:mod:`fxfuse.groups.shuffle`) where the input axis already is a sum or an interleave.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.layout import Interleave, Prod, Sum
from .registry import Cut, Free, OpView, Relation, Same, TensorHandle, axis_rule, decline, same


def reshape_relations(x: TensorHandle, y: TensorHandle) -> list[Relation]:
    """``Prod(x axes) = Prod(y axes)`` chunk by chunk, for any reshape of ``x`` into ``y``."""
    rels: list[Relation] = []
    i = j = 0
    nx, ny = x.ndim, y.ndim
    while i < nx or j < ny:
        xs: list[int] = []
        ys: list[int] = []
        px = py = 1
        if i < nx:
            xs.append(i)
            px *= x.shape[i]
            i += 1
        if j < ny:
            ys.append(j)
            py *= y.shape[j]
            j += 1
        while px != py:
            if px < py and i < nx:
                xs.append(i)
                px *= x.shape[i]
                i += 1
            elif py < px and j < ny:
                ys.append(j)
                py *= y.shape[j]
                j += 1
            else:
                raise decline(f"shape {x.shape} is not a reshape of {y.shape}")
        rels.append(Same(Prod(tuple(x[d] for d in xs)), Prod(tuple(y[d] for d in ys))))
    return rels


@axis_rule(
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
    nn.Flatten, nn.Unflatten,
)
def reshape_rule(op: OpView) -> list[Relation]:
    x = op.tensor(0, "input")
    rels = reshape_relations(x, op.out)
    others = [Free(t[d]) for t in op.tensors()[1:] for d in range(t.ndim)]  # view_as(other)
    return rels + others


def _permutation_of(op: OpView, ndim: int) -> list[int] | None:
    """Output axis i comes from input axis perm[i]."""
    t = op.target
    if t in ("transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims):
        a, b = op.arg(1, "dim0"), op.arg(2, "dim1")
        perm = list(range(ndim))
        perm[a % ndim], perm[b % ndim] = perm[b % ndim], perm[a % ndim]
        return perm
    if t in ("permute", torch.permute):
        dims = op.args[1:] if t == "permute" else (op.arg(1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if not dims:
            dims = tuple(op.kwargs.get("dims", ()))
        return [d % ndim for d in dims]
    if t in ("movedim", "moveaxis", torch.movedim, torch.moveaxis):
        src, dst = op.arg(1, "source"), op.arg(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [s % ndim for s in src]
        dst = [d % ndim for d in dst]
        rest = iter([d for d in range(ndim) if d not in src])
        placed = dict(zip(dst, src))
        return [placed[i] if i in placed else next(rest) for i in range(ndim)]
    if t in ("t", torch.t):
        return list(range(ndim))[::-1]
    return None


@axis_rule(
    "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t",
    torch.transpose, torch.swapaxes, torch.swapdims, torch.permute, torch.movedim,
    torch.moveaxis, torch.t,
)
def transpose_rule(op: OpView) -> list[Relation]:
    x, y = op.tensor(0, "input"), op.out
    perm = _permutation_of(op, x.ndim)
    if perm is None or sorted(perm) != list(range(x.ndim)):
        raise decline(f"arguments that are not a permutation of {x.ndim} axes")
    return [Same(x[p], y[i]) for i, p in enumerate(perm)]


def channel_shuffle(x: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """Channel shuffle along ``dim``: the axis read as ``(groups, n)``, transposed to
    ``(n, groups)``, merged back: output position ``i*groups + j`` is input position ``j*n + i``."""
    return x.unflatten(dim, (groups, -1)).transpose(dim, dim + 1).flatten(dim, dim + 1)


@axis_rule(channel_shuffle)
def channel_shuffle_rule(op: OpView) -> list[Relation]:
    """``x[dim] = B_1 ⊕ .. ⊕ B_g`` (blocks of ``n``) and ``y[dim] = interleave(B_1, .., B_g)``;
    the other axes pass through."""
    x, y = op.tensor(0, "x"), op.out
    dim, groups = op.arg(1, "dim") % x.ndim, op.arg(2, "groups")
    n, rem = divmod(x.shape[dim], groups)
    if rem or groups < 2 or y.shape != x.shape:
        raise decline(f"axis {dim} of {x.shape} is not {groups} blocks shuffled")
    blocks = tuple(op.new(f"block{j}", n, named=False) for j in range(groups))
    rels: list[Relation] = [Same(x[dim], Sum(blocks)), Same(y[dim], Interleave(blocks))]
    return rels + [Same(x[d], y[d]) for d in range(x.ndim) if d != dim]


@axis_rule(torch.cat, torch.concat, torch.concatenate)
def cat_rule(op: OpView) -> list[Relation]:
    ts = [t for t in op.arg(0, "tensors") if t.shape != (0,)]
    y = op.out
    dim = op.arg(1, "dim", 0) % y.ndim
    rels: list[Relation] = [Same(y[dim], Sum(tuple(t[dim] for t in ts)))]
    for d in range(y.ndim):
        if d != dim:
            rels += same(y[d], *(t[d] for t in ts))
    return rels


@axis_rule(torch.stack)
def stack_rule(op: OpView) -> list[Relation]:
    ts, y = op.arg(0, "tensors"), op.out
    dim = op.arg(1, "dim", 0) % y.ndim
    rels: list[Relation] = [Cut(y[dim], "stack: the new axis indexes the stacked inputs")]
    for d in range(ts[0].ndim):
        rels += same(y[d if d < dim else d + 1], *(t[d] for t in ts))
    return rels


@axis_rule(
    "split", "chunk", "tensor_split", "split_with_sizes", "unbind",
    torch.split, torch.chunk, torch.tensor_split, torch.unbind,
)
def split_rule(op: OpView) -> list[Relation]:
    x, outs = op.tensor(0, "input"), op.outs
    if op.target in ("unbind", torch.unbind):
        dim = op.arg(1, "dim", 0) % x.ndim
        rels: list[Relation] = [Cut(x[dim], "unbind: outputs are addressed by position")]
        for d in range(x.ndim):
            if d != dim:
                rels += same(x[d], *(o[d if d < dim else d - 1] for o in outs))
        return rels
    dim = op.arg(2, "dim", 0) % x.ndim
    rels = [Same(x[dim], Sum(tuple(o[dim] for o in outs)))]
    for d in range(x.ndim):
        if d != dim:
            rels += same(x[d], *(o[d] for o in outs))
    return rels


PICKS = "indexing picks positions along this axis"
STRIDED = "a strided slice picks positions along this axis"


def window_relations(op: OpView, x: TensorHandle, d: int, start: int, stop: int, step: int,
                     y: TensorHandle | None, e: int, key: str) -> list[Relation]:
    """``y`` (axis ``e``) reads positions ``start:stop:step`` of ``x``'s axis ``d`` (``y=None``:
    one position, the axis dropped).  A contiguous window is one block of
    ``x[d] = before + window + after``: permuting within each block permutes the window by its
    own block, so consecutive windows that partition an axis (a fused qkv projection sliced
    into q, k, v) act on it as a split does.  Positions of a strided slice are not contiguous:
    they are cut."""
    n = x.shape[d]
    start, stop, step = slice(start, stop, step).indices(n)
    stop = max(stop, start)
    if step != 1 and stop - start > 1:
        return [Cut(x[d], STRIDED), *([Cut(y[e], STRIDED)] if y is not None else [])]
    if stop - start <= 0:
        return [Free(x[d])]  # nothing is read along this axis
    if (start, stop) == (0, n) and y is not None:
        return [Same(x[d], y[e])]
    stop = start + 1 if step != 1 else stop
    window = y[e] if y is not None else op.new(f"{key}.picked", 1, named=False)
    parts = [*([op.new(f"{key}.before", start, named=False)] if start else []), window,
             *([op.new(f"{key}.after", n - stop, named=False)] if stop < n else [])]
    return [Same(x[d], Sum(tuple(parts)))]


@axis_rule(operator.getitem)
def getitem_rule(op: OpView) -> list[Relation]:
    src, idx = op.args[0], op.args[1]
    if isinstance(src, (list, tuple)) and isinstance(idx, slice):  # a sub-tuple
        picked = list(src[idx])
        sub: list[Relation] = [Free(a) for t in src if not any(t is p for p in picked)
                               for a in t.axes()]
        for t, o in zip(picked, op.outs):
            sub += [Same(t[d], o[d]) for d in range(t.ndim)]
        return sub
    if isinstance(src, (list, tuple)):  # an element of a tuple of tensors (split, chunk, ...)
        elem = src[idx] if isinstance(idx, int) else None
        if not isinstance(elem, TensorHandle):
            raise decline("an element of a tuple that is not a tensor")
        others = [Free(a) for t in src if isinstance(t, TensorHandle) and t is not elem
                  for a in t.axes()]  # elements not picked are not read
        picks: list[Relation] = [Same(elem[d], op.out[d]) for d in range(elem.ndim)]
        return picks + others
    if not isinstance(src, TensorHandle):
        raise decline(f"indexing a {type(src).__name__}")
    x, y = src, op.out
    index = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, TensorHandle) for i in index):
        return _tensor_index(x, index, y)
    if any(isinstance(i, (list, bool)) for i in index):
        raise decline("indexing by a list or a bool")
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if used > x.ndim or sum(1 for i in index if i is Ellipsis) > 1:
        raise decline(f"an index of {used} axes into a {x.ndim}-d tensor")
    rels: list[Relation] = []
    i = j = 0
    for item in index:
        if item is Ellipsis:
            for _ in range(x.ndim - used):
                rels.append(Same(x[i], y[j]))
                i += 1
                j += 1
        elif item is None:
            j += 1
        elif isinstance(item, int):
            rels += window_relations(op, x, i, item % max(x.shape[i], 1), item % max(x.shape[i], 1)
                                     + 1, 1, None, 0, f"axis{i}")
            i += 1
        elif isinstance(item, slice) and all(isinstance(v, (int, type(None)))
                                             for v in (item.start, item.stop, item.step)):
            rels += window_relations(op, x, i, item.start, item.stop, item.step, y, j, f"axis{i}")
            i += 1
            j += 1
        else:
            raise decline(f"an index item {item!r}")
    while i < x.ndim:  # trailing axes the index leaves out are taken whole
        rels.append(Same(x[i], y[j]))
        i += 1
        j += 1
    return rels


def _tensor_index(x: TensorHandle, index: tuple[object, ...], y: TensorHandle) -> list[Relation]:
    """``x[..., idx, :]``: index tensors among whole axes (``:`` and ``...``) are advanced
    indexing (:func:`fxfuse.rules.indexing.advanced_index_relations`)."""
    from .indexing import advanced_index_relations  # indexing builds on this module

    per_axis: list[TensorHandle | None] = []
    for item in index:
        if item is Ellipsis:
            per_axis += [None] * (x.ndim - (len(index) - 1))
        elif isinstance(item, TensorHandle):
            per_axis.append(item)
        elif isinstance(item, slice) and item == slice(None):
            per_axis.append(None)
        else:
            raise decline(f"advanced indexing mixed with {item!r}")
    return advanced_index_relations(x, per_axis, y)


@axis_rule(builtins.getattr)
def getattr_rule(op: OpView) -> list[Relation]:
    x, name = op.args[0], op.args[1]
    if isinstance(x, tuple) and isinstance(name, str) and hasattr(type(x), name) and not hasattr(
            tuple, name):  # a field of a named result (sort, max, cummax)
        elem = getattr(x, name)
        if not isinstance(elem, TensorHandle):
            raise decline(f"field {name!r} is not a tensor")
        rels: list[Relation] = [Same(elem[d], op.out[d]) for d in range(elem.ndim)]
        return rels + [Free(a) for t in x if isinstance(t, TensorHandle) and t is not elem
                       for a in t.axes()]
    if not isinstance(x, TensorHandle):
        raise decline(f"attribute {name!r} of a {type(x).__name__}")
    if name in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"):
        return [Free(a) for a in x.axes()]
    if name in ("T", "mT") and x.ndim >= 2:
        perm = list(range(x.ndim))[::-1] if name == "T" else [*range(x.ndim - 2), x.ndim - 1, x.ndim - 2]
        return [Same(x[p], op.out[i]) for i, p in enumerate(perm)]
    raise decline(f"attribute {name!r} is not described")


@axis_rule("size", "dim", "numel", "nelement", "ndimension", "get_device", torch.numel)
def shape_query_rule(op: OpView) -> list[Relation]:
    """Shape queries do not depend on the order of elements."""
    return [Free(a) for t in op.tensors() for a in t.axes()]


@axis_rule(F.pad)
def pad_rule(op: OpView) -> list[Relation]:
    x, y = op.tensor(0, "input"), op.out
    pad = op.arg(1, "pad")
    k = len(pad) // 2
    rels: list[Relation] = []
    for d in range(x.ndim):
        if d >= x.ndim - k and (pad[2 * (x.ndim - 1 - d)] or pad[2 * (x.ndim - 1 - d) + 1]):
            why = "padding shifts positions along this axis"
            rels += [Cut(x[d], why), Cut(y[d], why)]
        else:
            rels.append(Same(x[d], y[d]))
    return rels


@axis_rule(torch.roll, "roll")
def roll_rule(op: OpView) -> list[Relation]:
    """``roll(x, shifts, dims)`` (Swin's shifted windows): rolled axes move positions, the
    others (channels) pass through."""
    x, y = op.tensor(0, "input"), op.out
    dims = op.arg(2, "dims")
    if dims is None:  # rolls the flattened tensor: every axis moves
        why = "roll of the flattened tensor shifts positions along every axis"
        return [*(Cut(a, why) for a in x.axes()), *(Cut(a, why) for a in y.axes())]
    rolled = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    why = "roll shifts positions along this axis"
    rels: list[Relation] = []
    for d in range(x.ndim):
        rels += [Cut(x[d], why), Cut(y[d], why)] if d in rolled else [Same(x[d], y[d])]
    return rels
