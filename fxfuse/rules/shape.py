"""Rules for ops that move axes around without touching values: view/reshape/flatten (the
dimension algebra), transpose/permute, concat/split/chunk, indexing, expand, padding.

Reshape is one function for every case (``flatten``, ``unflatten``, ``view``, ``squeeze``,
head-splitting reshapes, channel shuffle): the input and output shapes are cut into the smallest
chunks whose element counts agree, and each chunk states
``Prod(input axes of the chunk) = Prod(output axes of the chunk)``; :mod:`fxfuse.ir.layout` then finds
the common refinement (e.g. ``C ⊗ H ⊗ W = CHW`` for conv -> flatten -> linear, or
``C = g ⊗ C/g`` for channel shuffle).
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.layout import Prod, Sum
from .registry import Cut, Free, OpView, Relation, Same, TensorHandle, axis_rule, same


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
                return []
        rels.append(Same(Prod(tuple(x[d] for d in xs)), Prod(tuple(y[d] for d in ys))))
    return rels


@axis_rule(
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
    nn.Flatten, nn.Unflatten,
)
def reshape_rule(op: OpView) -> list[Relation]:
    x = op.args[0]
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
    x, y = op.args[0], op.out
    perm = _permutation_of(op, x.ndim)
    if perm is None or sorted(perm) != list(range(x.ndim)):
        return []
    return [Same(x[p], y[i]) for i, p in enumerate(perm)]


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
    x, outs = op.args[0], op.outs
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


def _full_slice(s: slice, n: int) -> bool:
    return s.indices(n) == (0, n, 1)


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
            return []
        others = [Free(a) for t in src if isinstance(t, TensorHandle) and t is not elem
                  for a in t.axes()]  # elements not picked are not read
        picks: list[Relation] = [Same(elem[d], op.out[d]) for d in range(elem.ndim)]
        return picks + others
    x, y = src, op.out
    index = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (TensorHandle, list)) for i in index):
        return []
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
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
            rels.append(Cut(x[i], "indexing picks positions along this axis"))
            i += 1
        elif isinstance(item, slice):
            if _full_slice(item, x.shape[i]):
                rels.append(Same(x[i], y[j]))
            else:
                why = "slicing picks positions along this axis"
                rels += [Cut(x[i], why), Cut(y[j], why)]
            i += 1
            j += 1
        else:
            return []
    while i < x.ndim:
        rels.append(Same(x[i], y[j]))
        i += 1
        j += 1
    return rels


@axis_rule(builtins.getattr)
def getattr_rule(op: OpView) -> list[Relation]:
    x, name = op.args[0], op.args[1]
    if name in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"):
        return [Free(a) for a in x.axes()]
    if name in ("T", "mT") and x.ndim >= 2:
        perm = list(range(x.ndim))[::-1] if name == "T" else [*range(x.ndim - 2), x.ndim - 1, x.ndim - 2]
        return [Same(x[p], op.out[i]) for i, p in enumerate(perm)]
    return []


@axis_rule("size", "dim", "numel", "nelement", "ndimension", "get_device", torch.numel)
def shape_query_rule(op: OpView) -> list[Relation]:
    """Shape queries do not depend on the order of elements."""
    return [Free(a) for t in op.tensors() for a in t.axes()]


@axis_rule(F.pad)
def pad_rule(op: OpView) -> list[Relation]:
    x, y = op.args[0], op.out
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
    x, y = op.args[0], op.out
    dims = op.arg(2, "dims")
    if dims is None:
        return []  # rolls the flattened tensor: every axis moves
    rolled = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    why = "roll shifts positions along this axis"
    rels: list[Relation] = []
    for d in range(x.ndim):
        rels += [Cut(x[d], why), Cut(y[d], why)] if d in rolled else [Same(x[d], y[d])]
    return rels
