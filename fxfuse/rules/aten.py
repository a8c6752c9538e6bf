"""ATen-level ops (graphs from ``torch.export``) served by the same rule table.

Most ATen overloads take the same arguments, in the same order, as a Python-level op that
already has a rule: :data:`ALIASES` maps them onto it (``aten.linear.default`` -> ``F.linear``,
``aten.view.default`` -> ``Tensor.view``, ...) and :func:`canonical` is what the discovery driver
looks rules up with.  The few whose signature differs (``aten.embedding``: weight first;
``aten.batch_norm``: affine before statistics; ``aten.slice``/``aten.select``: what Python
indexing lowers to) get small rules of their own here, and are checked numerically like every
other rule.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from .elementwise import broadcast_relations
from .layers import channel_norm_relations, embedding_relations
from .registry import Cut, Free, OpView, Relation, Same, axis_rule, decline
from .shape import window_relations

aten = torch.ops.aten

ALIASES: dict[Any, Any] = {
    # shape
    aten.view.default: "view", aten.reshape.default: "reshape", aten._unsafe_view.default: "view",
    aten.unsqueeze.default: "unsqueeze", aten.squeeze.dim: "squeeze", aten.squeeze.dims: "squeeze",
    aten.squeeze.default: "squeeze", aten.flatten.using_ints: "flatten",
    aten.unflatten.int: "unflatten", aten.transpose.int: torch.transpose,
    aten.permute.default: torch.permute, aten.t.default: torch.t, aten.cat.default: torch.cat,
    aten.stack.default: torch.stack, aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split, aten.chunk.default: torch.chunk,
    aten.unbind.int: torch.unbind, aten.expand.default: "expand",
    # elementwise
    aten.add.Tensor: torch.add, aten.add.Scalar: torch.add, aten.sub.Tensor: torch.sub,
    aten.sub.Scalar: torch.sub, aten.rsub.Scalar: torch.sub, aten.mul.Tensor: torch.mul,
    aten.mul.Scalar: torch.mul, aten.div.Tensor: torch.div, aten.div.Scalar: torch.div,
    aten.div.Tensor_mode: torch.div, aten.neg.default: torch.neg, aten.relu.default: torch.relu,
    aten.gelu.default: F.gelu, aten.silu.default: F.silu, aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh, aten.exp.default: torch.exp, aten.log.default: torch.log,
    aten.sqrt.default: torch.sqrt, aten.rsqrt.default: torch.rsqrt, aten.erf.default: torch.erf,
    aten.abs.default: torch.abs, aten.reciprocal.default: torch.reciprocal,
    aten.pow.Tensor_Scalar: torch.pow, aten.pow.Tensor_Tensor: torch.pow,
    aten.clamp.default: torch.clamp, aten.hardtanh.default: F.hardtanh,
    aten.leaky_relu.default: F.leaky_relu, aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid, aten.relu6.default: F.relu6,
    aten.dropout.default: torch.clone, aten.clone.default: torch.clone,
    aten.alias.default: torch.clone, aten.detach.default: torch.detach,
    aten._to_copy.default: torch.clone, aten.to.dtype: "to", aten.to.dtype_layout: "to",
    aten.type_as.default: "type_as", aten.contiguous.default: "contiguous",
    aten.where.self: torch.where, aten.masked_fill.Scalar: "masked_fill",
    aten.masked_fill.Tensor: "masked_fill", aten.ge.Scalar: torch.ge, aten.gt.Scalar: torch.gt,
    aten.le.Scalar: torch.le, aten.lt.Scalar: torch.lt, aten.eq.Scalar: torch.eq,
    aten.ne.Scalar: torch.ne, aten.ge.Tensor: torch.ge, aten.gt.Tensor: torch.gt,
    aten.eq.Tensor: torch.eq, aten.logical_not.default: torch.logical_not,
    aten.maximum.default: torch.maximum, aten.minimum.default: torch.minimum,
    aten.zeros_like.default: torch.zeros_like, aten.ones_like.default: torch.ones_like,
    aten.full_like.default: torch.full_like, aten.sin.default: torch.sin,
    aten.cos.default: torch.cos, aten.add_.Tensor: torch.add, aten.mul_.Tensor: torch.mul,
    aten.sub_.Tensor: torch.sub, aten.div_.Tensor: torch.div, aten.relu_.default: torch.relu,
    aten.hardtanh_.default: F.hardtanh, aten.fill_.Scalar: torch.full_like,
    aten.detach_.default: torch.detach, aten.roll.default: torch.roll,
    # reductions, softmax
    aten.mean.dim: torch.mean, aten.sum.dim_IntList: torch.sum, aten.amax.default: torch.amax,
    aten.amin.default: torch.amin, aten.var.correction: torch.var,
    aten.softmax.int: torch.softmax, aten._softmax.default: torch.softmax,
    aten.log_softmax.int: torch.log_softmax, aten._log_softmax.default: torch.log_softmax,
    # layers
    aten.linear.default: F.linear, aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d,
    aten.conv3d.default: F.conv3d, aten.layer_norm.default: F.layer_norm,
    aten.rms_norm.default: F.rms_norm, aten.group_norm.default: F.group_norm,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm, aten.mm.default: torch.matmul,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.max_pool1d.default: F.max_pool1d, aten.avg_pool1d.default: F.avg_pool1d,
    # what the export path makes of ordinary code: casts and moves, padding, masks (comparisons
    # and logical ops), position ids (cumsum)
    aten.to.device: "to", aten.pad.default: F.pad,
    aten.constant_pad_nd.default: F.pad, aten.le.Tensor: torch.le, aten.lt.Tensor: torch.lt,
    aten.ne.Tensor: torch.ne, aten.__and__.Tensor: operator.and_,
    aten.__or__.Tensor: operator.or_, aten.__xor__.Tensor: operator.xor,
    aten.bitwise_and.Tensor: operator.and_, aten.bitwise_or.Tensor: operator.or_,
    aten.bitwise_xor.Tensor: operator.xor, aten.bitwise_not.default: operator.invert,
    aten.logical_and.default: torch.logical_and, aten.logical_or.default: torch.logical_or,
    aten.logical_xor.default: torch.logical_xor, aten.min.other: torch.minimum,
    aten.max.other: torch.maximum, aten.where.ScalarOther: torch.where,
    aten.where.ScalarSelf: torch.where, aten.where.Scalar: torch.where,
    aten.cumsum.default: torch.cumsum, aten.any.dim: torch.amax, aten.all.dim: torch.amin,
    aten.clamp_min.default: torch.clamp, aten.clamp_max.default: torch.clamp,
    aten.expand_as.default: "expand_as",
}


def canonical(target: Any) -> Any:
    """The target whose rule serves ``target`` (itself unless it is an aliased ATen overload)."""
    return ALIASES.get(target, target)


@axis_rule(aten.embedding.default)
def aten_embedding_rule(op: OpView) -> list[Relation]:
    """``aten.embedding(weight, indices)``: the weight comes first at this level."""
    return embedding_relations(op.tensor(1, "indices"), op.out, op.tensor(0, "weight"))


@axis_rule(aten.batch_norm.default)
def aten_batch_norm_rule(op: OpView) -> list[Relation]:
    """``(input, weight, bias, running_mean, running_var, ...)``; extra outputs (saved
    statistics, empty in eval mode) follow the channels too."""
    x = op.tensor(0, "input")
    per_channel = [op.arg(i, "") for i in (1, 2, 3, 4)]
    y = op.outs[0]
    rels = channel_norm_relations(x, y, per_channel)
    for extra in op.outs[1:]:
        if extra.ndim == 1 and extra.shape[0] == x.shape[1]:
            rels.append(Same(extra[0], x[1]))
    return rels


@axis_rule(aten.slice.Tensor, torch.narrow, "narrow", aten.narrow.default)
def slice_rule(op: OpView) -> list[Relation]:
    """``aten.slice(x, dim, start, end, step)`` and ``narrow(x, dim, start, length)``: a
    contiguous window is a block of its axis (:func:`~fxfuse.rules.shape.window_relations`),
    so slices that partition an axis act as a split; a strided one is cut."""
    x, y = op.tensor(0, "input"), op.out
    dim = op.arg(1, "dim", 0)
    if not isinstance(dim, int) or x.ndim != y.ndim or not x.ndim:
        raise decline(f"slicing dim {dim!r} of a {x.ndim}-d tensor")
    dim %= x.ndim
    if op.target is aten.slice.Tensor:
        start, stop, step = op.arg(2, "start"), op.arg(3, "end"), op.arg(4, "step", 1)
    else:
        start, length = op.arg(2, "start"), op.arg(3, "length")
        stop, step = (start + length if isinstance(start, int) and isinstance(length, int)
                      else None), 1
        if stop is None:
            raise decline("narrow with a tensor start")
    if not all(isinstance(v, (int, type(None))) for v in (start, stop, step)):
        raise decline("slice bounds that are not integers")
    rels: list[Relation] = [Same(x[d], y[d]) for d in range(x.ndim) if d != dim]
    rels += window_relations(op, x, dim, start, stop, step, y, dim, "slice")
    return rels


@axis_rule(aten.select.int, torch.select, "select")
def select_rule(op: OpView) -> list[Relation]:
    """``select(x, dim, i)`` reads one position of ``dim``; the others may move freely."""
    x, y = op.tensor(0, "input"), op.out
    dim, i = op.arg(1, "dim"), op.arg(2, "index")
    if not isinstance(dim, int) or not isinstance(i, int) or y.ndim != x.ndim - 1:
        raise decline("select with a non-integer dim or index")
    dim %= x.ndim
    rels: list[Relation] = window_relations(op, x, dim, i % x.shape[dim], i % x.shape[dim] + 1,
                                            1, None, 0, "select")
    rels += [Same(x[d], y[d if d < dim else d - 1]) for d in range(x.ndim) if d != dim]
    return rels


@axis_rule(aten.addmm.default)
def aten_addmm_rule(op: OpView) -> list[Relation]:
    """``addmm(bias, m1, m2) = bias + m1 @ m2`` (Hugging Face's ``Conv1D``: weight is (in, out))."""
    bias, m1, m2 = op.tensor(0, "input"), op.tensor(1, "mat1"), op.tensor(2, "mat2")
    y = op.out
    rels: list[Relation] = [Same(m1[1], m2[0]), Same(m1[0], y[0]), Same(m2[1], y[1])]
    rels += broadcast_relations([bias], y)
    return rels


@axis_rule(aten._assert_tensor_metadata.default)
def assertion_rule(op: OpView) -> list[Relation]:
    """Checks of dtype/shape/device: they read no values."""
    return [Free(a) for t in op.tensors() for a in t.axes()]


CONSTANT = "a tensor made inside forward (a constant): not permuted"


@axis_rule(torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor,
           torch.linspace, aten.arange.default, aten.arange.start, aten.arange.start_step,
           aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format,
           aten.lift_fresh_copy.default, aten.linspace.default, aten.scalar_tensor.default)
def constant_rule(op: OpView) -> list[Relation]:
    rels: list[Relation] = [Cut(a, CONSTANT) for t in op.outs for a in t.axes()]
    return rels + [Cut(a, CONSTANT) for t in op.tensors() for a in t.axes()]

