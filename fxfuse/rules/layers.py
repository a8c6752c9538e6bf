"""Rules for layers with parameters (module and functional forms share one relation builder).

* Linear ``y = x W^T + b``, ``W: (out, in)``: ``x[-1] = W[1]`` (contracted), ``y[-1] = W[0] = b[0]``.
* Conv ``W: (out, in/G, *k)`` with ``G`` groups: the channels split as ``x[1] = g ⊗ W[1]`` and
  ``y[1] = W[0] = b[0] = g ⊗ c_out`` with a shared group atom ``g`` of size ``G``, so a
  permutation moves whole conv groups and permutes within them (depthwise: ``W[1]`` has size 1,
  any channel permutation).  Spatial axes are never permuted (the kernel is not equivariant).
* BatchNorm/InstanceNorm: every per-channel tensor (affine, running stats) shares ``x[1]``.
* LayerNorm/RMSNorm over the trailing ``k`` axes: weight/bias axes join those axes; statistics are
  invariant to the permutation.
* GroupNorm(G, C): ``x[1] = g ⊗ c`` (``|g| = G``): permutations respect the normalisation groups.
* Embedding: ``y[-1] = W[1]``; rows ``W[0]`` are addressed by token ids and stay fixed.
* Pooling: channels and batch pass through; a global pool is invariant to spatial permutations.
* matmul ``(.., n, k) @ (.., k, m)``: ``k`` is contracted, batch axes broadcast.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.layout import Prod
from .elementwise import broadcast_relations
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
    same,
)

SPATIAL = "the kernel mixes neighbouring positions along this axis"


def linear_relations(
    x: TensorHandle, y: TensorHandle, w: TensorHandle, b: TensorHandle | None
) -> list[Relation]:
    if x.ndim < 1 or w.ndim != 2 or y.ndim != x.ndim:
        raise decline(f"linear of a {x.ndim}-d input with a {w.ndim}-d weight")
    rels: list[Relation] = [Same(x[-1], w[1]), *same(y[-1], w[0], *([b[0]] if b else []))]
    rels += [Same(x[d], y[d]) for d in range(x.ndim - 1)]
    return rels


@axis_rule(nn.Linear)
@form_rule()
def linear_module_rule(op: OpView) -> list[Relation]:
    return linear_relations(op.tensor(0, "input"), op.out, op.required_param("weight"),
                            op.param("bias"))


@axis_rule(F.linear)
@form_rule()
def linear_function_rule(op: OpView) -> list[Relation]:
    return linear_relations(op.tensor(0, "input"), op.out, op.tensor(1, "weight"),
                            op.arg(2, "bias"))


def conv_relations(
    op: OpView, k: int, x: TensorHandle, w: TensorHandle, b: TensorHandle | None, group_arg: Any
) -> list[Relation]:
    y = op.out
    c = x.ndim - k - 1  # channel axis (0 for unbatched input)
    groups = _count(group_arg)
    if c not in (0, 1) or y.ndim != x.ndim or w.ndim != k + 2 or groups is None:
        raise decline(f"a {k}-d convolution of a {x.ndim}-d input")
    xa, ya, wa = x.axes(), y.axes(), w.axes()  # in range: the ranks were checked
    rels: list[Relation] = []
    out_axes = [wa[0], *([b[0]] if b else [])]
    if groups == 1:
        rels += [Same(xa[c], wa[1]), *same(ya[c], *out_axes)]
    else:
        g = op.new("groups", groups)
        per_out = op.new("out_per_group", w.shape[0] // groups)
        rels += [Same(xa[c], Prod((g, wa[1]))), *same(Prod((g, per_out)), ya[c], *out_axes)]
    if c == 1:
        rels.append(Same(xa[0], ya[0]))
    for d in range(c + 1, x.ndim):
        rels += [Cut(xa[d], SPATIAL), Cut(ya[d], SPATIAL)]
    rels += [Cut(wa[d], SPATIAL) for d in range(2, w.ndim)]
    return rels


def _conv_module_rule(k: int):  # type: ignore[no-untyped-def]
    def conv_module_rule(op: OpView) -> list[Relation]:
        w = op.required_param("weight")
        if not isinstance(op.module, nn.modules.conv._ConvNd):
            raise decline("not a torch convolution module")
        return conv_relations(op, k, op.tensor(0, "input"), w, op.param("bias"), op.module.groups)

    return form_rule("groups")(conv_module_rule)


def _conv_function_rule(k: int):  # type: ignore[no-untyped-def]
    def conv_function_rule(op: OpView) -> list[Relation]:
        groups = op.arg(6, "groups", 1)
        return conv_relations(op, k, op.tensor(0, "input"), op.tensor(1, "weight"),
                              op.arg(2, "bias"), groups)

    return form_rule()(conv_function_rule)


for _k, (_mod, _fn) in enumerate(
    [(nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d)], start=1
):
    axis_rule(_mod)(_conv_module_rule(_k))
    axis_rule(_fn)(_conv_function_rule(_k))


def channel_norm_relations(
    x: TensorHandle, y: TensorHandle, per_channel: list[TensorHandle | None]
) -> list[Relation]:
    """BatchNorm/InstanceNorm: per-channel tensors share axis 1; other axes pass through."""
    if x.ndim < 2 or y.shape != x.shape:
        raise decline(f"channel normalisation of a {x.ndim}-d input")
    xa, ya = x.axes(), y.axes()
    rels: list[Relation] = [Same(xa[d], ya[d]) for d in range(x.ndim) if d != 1]
    rels += same(xa[1], ya[1], *(t[0] for t in per_channel if t is not None))
    return rels


@axis_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
@form_rule()
def batchnorm_module_rule(op: OpView) -> list[Relation]:
    names = ("weight", "bias", "running_mean", "running_var")
    return channel_norm_relations(op.tensor(0, "input"), op.out, [op.param(n) for n in names])


@axis_rule(F.batch_norm, F.instance_norm)
@form_rule()
def batchnorm_function_rule(op: OpView) -> list[Relation]:
    names = ("running_mean", "running_var", "weight", "bias")  # same order in both signatures
    per_channel = [op.arg(i, n) for i, n in enumerate(names, start=1)]
    return channel_norm_relations(op.tensor(0, "input"), op.out, per_channel)


def trailing_norm_relations(
    x: TensorHandle, y: TensorHandle, k: int, params: list[TensorHandle | None]
) -> list[Relation]:
    """LayerNorm/RMSNorm over the last ``k`` axes."""
    if not 0 < k <= x.ndim or y.shape != x.shape:
        raise decline(f"normalisation of the last {k} axes of a {x.ndim}-d input")
    rels: list[Relation] = []
    for d in range(x.ndim):
        j = d - (x.ndim - k)
        rels += same(x[d], y[d], *(p[j] for p in params if p is not None and j >= 0))
    return rels


@axis_rule(nn.LayerNorm, nn.RMSNorm)
@form_rule("normalized_shape")
def layernorm_module_rule(op: OpView) -> list[Relation]:
    if not isinstance(op.module, (nn.LayerNorm, nn.RMSNorm)):
        raise decline("not a torch LayerNorm / RMSNorm module")
    k = len(op.module.normalized_shape)
    return trailing_norm_relations(op.tensor(0, "input"), op.out, k, [op.param("weight"), op.param("bias")])


@axis_rule(F.layer_norm, F.rms_norm)
@form_rule()
def layernorm_function_rule(op: OpView) -> list[Relation]:
    shape = op.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape) if isinstance(shape, (list, tuple)) else -1
    params = [op.arg(2, "weight"), op.arg(3, "bias") if op.target is F.layer_norm else None]
    return trailing_norm_relations(op.tensor(0, "input"), op.out, k, params)


def group_norm_relations(
    op: OpView, x: TensorHandle, groups: Any, params: list[TensorHandle | None]
) -> list[Relation]:
    y = op.out
    count = _count(groups)
    if x.ndim < 2 or count is None or count < 1 or x.shape[1] % count:
        raise decline(f"group norm with {groups!r} groups of a {x.ndim}-d input")
    channels = Prod((op.new("groups", count), op.new("per_group", x.shape[1] // count)))
    rels = same(channels, x[1], y[1], *(p[0] for p in params if p is not None))
    rels += [Same(x[d], y[d]) for d in range(x.ndim) if d != 1]
    return rels


@axis_rule(nn.GroupNorm)
@form_rule("num_groups")
def groupnorm_module_rule(op: OpView) -> list[Relation]:
    if not isinstance(op.module, nn.GroupNorm):
        raise decline("not a torch GroupNorm module")
    params = [op.param("weight"), op.param("bias")]
    return group_norm_relations(op, op.tensor(0, "input"), op.module.num_groups, params)


@axis_rule(F.group_norm)
@form_rule()
def groupnorm_function_rule(op: OpView) -> list[Relation]:
    params = [op.arg(2, "weight"), op.arg(3, "bias")]
    return group_norm_relations(op, op.tensor(0, "input"), op.arg(1, "num_groups"), params)


def embedding_relations(
    ids: TensorHandle, y: TensorHandle, w: TensorHandle
) -> list[Relation]:
    if w.ndim != 2 or y.ndim != ids.ndim + 1:
        raise decline(f"embedding of {ids.ndim}-d ids in a {w.ndim}-d table")
    rels: list[Relation] = [Same(y[-1], w[1]), Cut(w[0], "embedding rows are addressed by ids")]
    rels += [Same(ids[d], y[d]) for d in range(ids.ndim)]
    return rels


@axis_rule(nn.Embedding)
def embedding_module_rule(op: OpView) -> list[Relation]:
    return embedding_relations(op.tensor(0, "input"), op.out, op.required_param("weight"))


@axis_rule(F.embedding)
def embedding_function_rule(op: OpView) -> list[Relation]:
    return embedding_relations(op.tensor(0, "input"), op.out, op.tensor(1, "weight"))


POOLS = {
    1: [nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
        F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d],
    2: [nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
        F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
        nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d],
    3: [nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
        F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d],
}


_ADAPTIVE = frozenset((nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool2d,
                       nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
                       F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.adaptive_avg_pool2d,
                       F.adaptive_max_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d))
_WINDOWED = frozenset((nn.MaxPool1d, nn.AvgPool1d, nn.LPPool1d, nn.MaxPool2d, nn.AvgPool2d,
                       nn.LPPool2d, nn.MaxPool3d, nn.AvgPool3d, F.max_pool1d, F.avg_pool1d,
                       F.max_pool2d, F.avg_pool2d, F.max_pool3d, F.avg_pool3d))


def _count(v: Any) -> int | None:
    """A group count as an ``int`` (a numpy integer from a config is one too); None if ``v``
    is not an integer (a bool is not)."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _per_axis(v: Any, k: int) -> tuple[Any, ...] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * k
    if isinstance(v, (tuple, list)) and len(v) == k and all(
            isinstance(e, int) and not isinstance(e, bool) for e in v):
        return tuple(v)
    return None


def _one_window_over_all(op: OpView, kind: Any, sizes: tuple[int, ...]) -> bool:
    """Whether a windowed pool's single output window holds every input position of each
    spatial axis (sizes ``sizes``): window ``[-padding, -padding + kernel)`` without dilation
    covers ``[0, n)`` where ``kernel - padding >= n``.  A smaller window drops positions (a
    2x2 pool of a 3x3 map reads 4 of 9), so spatial order matters."""
    k = len(sizes)
    if op.module is not None:
        m = op.module
        kernel, padding = getattr(m, "kernel_size", None), getattr(m, "padding", 0)
        dilation = getattr(m, "dilation", 1)
    else:
        kernel = op.arg(1, "kernel_size")
        padding = op.arg(3, "padding", 0)
        dilation = op.arg(4, "dilation", 1) if kind in (F.max_pool1d, F.max_pool2d,
                                                         F.max_pool3d) else 1
    ks, ps, ds = _per_axis(kernel, k), _per_axis(padding, k), _per_axis(dilation, k)
    if ks is None or ps is None or ds is None:
        return False
    return all(d == 1 and kk - pp >= n for kk, pp, d, n in zip(ks, ps, ds, sizes))


@form_rule("kernel_size", "padding", "dilation")  # and op.target / the module's class
def spatial_rule(op: OpView) -> list[Relation]:
    """Channel/batch axes pass through; spatial axes stay fixed unless globally pooled away:
    an adaptive pool to size 1, or a windowed pool whose one window reads every position (a
    pool to size 1 that drops positions, or an upsampling to size 1, depends on their order)."""
    x, y = op.tensor(0, "input"), op.out
    k = next((k for k, ts in POOLS.items() if op.target in ts or type(op.module) in ts), 0)
    if x.ndim != y.ndim or not 0 < k < x.ndim:
        raise decline(f"pooling output of shape {y.shape} for an input of shape {x.shape}")
    kind = type(op.module) if op.module is not None else op.target
    pooled = all(s == 1 for s in y.shape[x.ndim - k:]) and (
        kind in _ADAPTIVE or (kind in _WINDOWED and _one_window_over_all(
            op, kind, tuple(x.shape[x.ndim - k:]))))
    rels: list[Relation] = []
    for d in range(x.ndim):
        if d < x.ndim - k:
            rels.append(Same(x[d], y[d]))
        elif pooled:
            rels.append(Free(x[d]))  # a global pool (mean, max, Lp) ignores spatial order
        else:
            rels += [Cut(x[d], SPATIAL), Cut(y[d], SPATIAL)]
    return rels


for _ts in POOLS.values():
    axis_rule(*_ts)(spatial_rule)


@axis_rule(F.interpolate)
def interpolate_rule(op: OpView) -> list[Relation]:
    x, y = op.tensor(0, "input"), op.out
    if x.ndim < 3 or y.ndim != x.ndim:
        raise decline(f"interpolation of a {x.ndim}-d input")
    rels: list[Relation] = [Same(x[d], y[d]) for d in range(2)]
    for d in range(2, x.ndim):
        rels += [Cut(x[d], SPATIAL), Cut(y[d], SPATIAL)]
    return rels


@axis_rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
def matmul_rule(op: OpView) -> list[Relation]:
    """``(.., n, k) @ (.., k, m) -> (.., n, m)``: ``k`` is summed over, batch axes broadcast."""
    a, b = op.tensor(0, "input"), op.tensor(1, "other")
    y = op.out
    if a.ndim < 2 or b.ndim < 2:
        raise decline("matmul of a 1-d operand")
    rels: list[Relation] = [Same(a[-1], b[-2]), Same(a[-2], y[-2]), Same(b[-1], y[-1])]
    batch_y = TensorHandle(y.index, y.shape[:-2], y.dtype)
    for t in (a, b):
        batch_t = TensorHandle(t.index, t.shape[:-2], t.dtype)
        rels += broadcast_relations([batch_t], batch_y)
    return rels
