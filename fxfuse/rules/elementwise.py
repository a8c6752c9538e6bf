"""Rules for value-wise ops: elementwise maps with broadcasting, reductions, softmax-like ops.

Elementwise ``y = f(x1, .., xn)`` with numpy broadcasting is equivariant under any permutation of
an output axis applied to every input axis aligned with it (right-aligned); inputs of size 1 on
that axis are broadcast and need no permutation.  A residual add therefore joins the two streams'
groups, and a gate ``x * sigmoid(s)`` with ``s: (N, C, 1, 1)`` joins ``s``'s channels to ``x``'s.

A reduction over axis ``d`` (sum, mean, max, ...) is *invariant* to permuting ``d``; the kept
axes are equivariant.  Softmax-like ops act along an axis and are equivariant on every axis.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.layout import Sum
from .registry import (
    Cut,
    Free,
    OpView,
    Relation,
    Same,
    TensorHandle,
    axis_rule,
    decline,
    form_rule,
    register_many,
)

UNARY_FUNCTIONS = [
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.erf, torch.sin, torch.cos, torch.square, torch.reciprocal,
    torch.clamp, torch.clip, torch.nan_to_num, torch.sign, torch.log1p, torch.expm1,
    torch.nn.functional.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu,
    F.leaky_relu, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.tanhshrink,
    F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, operator.neg, operator.pos, torch.zeros_like, torch.ones_like,
    torch.full_like, torch.clone, torch.detach, operator.invert, torch.logical_not,
]
BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div,
    torch.divide, torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.where,
    torch.lerp, torch.addcmul, torch.addcdiv, torch.fmod, torch.remainder, torch.atan2,
    torch.hypot, torch.logaddexp, operator.gt, operator.lt, operator.ge, operator.le,
    operator.eq, operator.ne, operator.and_, operator.or_, operator.xor, torch.gt, torch.lt,
    torch.ge, torch.le, torch.eq, torch.ne, torch.logical_and, torch.logical_or,
    torch.logical_xor,
]
METHODS = [
    "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "erf", "sin", "cos",
    "square", "reciprocal", "clamp", "clip", "sign", "pow", "add", "sub", "mul", "div",
    "true_divide", "maximum", "minimum", "where", "lerp", "addcmul", "addcdiv", "float", "double",
    "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach", "cpu", "cuda",
    "requires_grad_", "expand", "expand_as", "masked_fill", "__add__", "__mul__", "__sub__",
    "__truediv__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__", "sigmoid_", "relu_",
]
MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Sigmoid, nn.Tanh,
    nn.LogSigmoid, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
]


def broadcast_relations(inputs: list[TensorHandle], y: TensorHandle) -> list[Relation]:
    """Right-aligned broadcasting: each input axis of the output's size joins that output axis.

    An output axis that every input broadcasts (size 1 or absent) holds identical copies:
    permuting it changes nothing, so it is left free (``Free``).  This is what lets an
    ``expand`` + ``reshape`` of k/v heads (grouped-query attention) permute the query heads
    within each kv group.
    """
    rels: list[Relation] = []
    fed = [False] * y.ndim
    ys, yaxes = y.shape, y.axes()
    for t in inputs:
        off = y.ndim - t.ndim
        if off < 0:
            raise decline(f"an input of shape {t.shape} does not broadcast to {y.shape}")
        for d, (n, ax) in enumerate(zip(t.shape, t.axes())):
            if n == ys[d + off]:
                rels.append(Same(ax, yaxes[d + off]))
                fed[d + off] = True
            elif n != 1:
                raise decline(f"an input of shape {t.shape} does not broadcast to {y.shape}")
    if not all(fed):
        rels += [Free(yaxes[d]) for d in range(y.ndim) if not fed[d]]
    return rels


@form_rule()
def elementwise_rule(op: OpView) -> list[Relation]:
    return broadcast_relations(op.tensors(), op.out)


register_many([*UNARY_FUNCTIONS, *BINARY_FUNCTIONS, *METHODS, *MODULES], elementwise_rule)


@axis_rule(nn.PReLU, F.prelu)
def prelu_rule(op: OpView) -> list[Relation]:
    """PReLU's weight has 1 or C entries; C acts on axis 1 of the input."""
    x, y = op.tensor(0, "input"), op.out
    w = op.param("weight") if op.module is not None else op.arg(1, "weight")
    rels = broadcast_relations([x], y)
    if w is not None and w.shape[0] > 1:
        rels.append(Same(w[0], x[1] if x.ndim > 1 else x[0]))
    return rels


def _dims(dim: object, ndim: int) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return list(range(ndim))
    if isinstance(dim, int) and ndim:
        return [dim % ndim]
    if isinstance(dim, (list, tuple)) and ndim and all(isinstance(d, int) for d in dim):
        return sorted(d % ndim for d in dim)
    raise decline(f"reduction over dim={dim!r} of a {ndim}-d tensor")


@axis_rule(
    torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
    torch.nansum, torch.nanmean, "mean", "sum", "amax", "amin", "std", "var", "logsumexp",
    "nansum", "nanmean",
)
def reduction_rule(op: OpView) -> list[Relation]:
    x, y = op.tensor(0, "input"), op.out
    reduced = _dims(op.arg(1, "dim"), x.ndim)
    keep = y.ndim == x.ndim
    rels: list[Relation] = []
    j = 0
    for d in range(x.ndim):
        if d in reduced:
            rels.append(Free(x[d]))
            j += keep
        else:
            rels.append(Same(x[d], y[j]))
            j += 1
    return rels


@axis_rule(torch.max, torch.min, "max", "min", torch.ops.aten.max.dim, torch.ops.aten.min.dim)
def max_min_rule(op: OpView) -> list[Relation]:
    """``max(x)`` reduces everything, ``max(x, y)`` is elementwise, ``max(x, dim)`` returns
    (values, indices) over ``dim``: the values do not depend on its order but the indices are
    positions along it, so ``dim`` is cut (``amax`` is the values alone); the kept axes pass."""
    if isinstance(op.arg(1, "other"), TensorHandle):
        return broadcast_relations(op.tensors(), op.out)
    x, dim = op.tensor(0, "input"), op.arg(1, "dim")
    if dim is None:
        return [Free(a) for a in x.axes()]
    if not isinstance(dim, int) or not x.ndim:
        raise decline(f"max/min over dim={dim!r}")
    dim %= x.ndim
    rels: list[Relation] = [Cut(x[dim], "max/min returns indices: positions along this axis")]
    for y in op.outs:
        keep = y.ndim == x.ndim
        rels += [Same(x[d], y[d if keep or d < dim else d - 1]) for d in range(x.ndim) if d != dim]
    return rels


@axis_rule(
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
    nn.Softmax, nn.LogSoftmax, torch.cumsum, "cumsum",
)
def along_axis_rule(op: OpView) -> list[Relation]:
    """Softmax along ``dim`` permutes with it; other axes are elementwise."""
    x, y = op.tensor(0, "input"), op.out
    if x.ndim != y.ndim:
        raise decline(f"output of shape {y.shape} for an input of shape {x.shape}")
    if op.target in (torch.cumsum, "cumsum"):  # a prefix sum is not equivariant along its axis
        d = op.arg(1, "dim") % x.ndim
        return [Same(x[i], y[i]) for i in range(x.ndim) if i != d]
    return [Same(x[d], y[d]) for d in range(x.ndim)]


@axis_rule(F.glu, nn.GLU)
def glu_rule(op: OpView) -> list[Relation]:
    """``glu(x) = a * sigmoid(b)`` with ``x = cat(a, b)``: the halves share one permutation."""
    x, y = op.tensor(0, "input"), op.out
    dim = (op.module.dim if isinstance(op.module, nn.GLU) else op.arg(1, "dim", -1)) % x.ndim
    rels: list[Relation] = [Same(x[dim], Sum((y[dim], y[dim])))]
    rels += [Same(x[d], y[d]) for d in range(x.ndim) if d != dim]
    return rels
