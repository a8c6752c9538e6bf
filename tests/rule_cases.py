"""Sample calls for every target in the axis-rule table (used by test_rules.py).

``CASES[target]`` is a list of ``(callable_or_module, inputs)``; the validator permutes what the
rule claims and checks the output is permuted as claimed.  A new rule without a case here fails
``test_every_rule_has_a_case``.  Module cases may be built with default constants: the test gives
every constant tensor (norm affines, running statistics, PReLU slopes, attention biases)
channel-distinct random values before checking, and fails if one stays constant.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxfuse.rules.elementwise import BINARY_FUNCTIONS, METHODS, MODULES, UNARY_FUNCTIONS
from fxfuse.rules.shape import channel_shuffle
from models.leaf import GatedMixer

g = torch.Generator().manual_seed(0)


def pos(*shape: int) -> torch.Tensor:
    """Positive random values (safe for log/sqrt/pow/div)."""
    return torch.rand(*shape, generator=g) + 0.5


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


Case = tuple[Any, Any]
CASES: dict[Any, list[Case]] = {}


def add(target: Any, fn: Any, inputs: Any) -> None:
    CASES.setdefault(target, []).append((fn, inputs))


X3 = (2, 6, 4)

# -- elementwise families ----------------------------------------------------------------------
UNARY_EXTRA: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    torch.clamp: lambda x: torch.clamp(x, 0.7, 1.2),
    torch.clip: lambda x: torch.clip(x, 0.7, 1.2),
    torch.full_like: lambda x: torch.full_like(x, 2.0),
    F.dropout: lambda x: F.dropout(x, 0.5, training=False),
    F.dropout1d: lambda x: F.dropout1d(x, 0.5, training=False),
    F.dropout2d: lambda x: F.dropout2d(x.unsqueeze(-1), 0.5, training=False),
    F.dropout3d: lambda x: F.dropout3d(x.unsqueeze(-1).unsqueeze(-1), 0.5, training=False),
    F.alpha_dropout: lambda x: F.alpha_dropout(x, 0.5, training=False),
    operator.invert: lambda x: (~(x > 1)).float(),
    torch.logical_not: lambda x: torch.logical_not(x > 1),
}
for f in UNARY_FUNCTIONS:
    add(f, UNARY_EXTRA.get(f, f), pos(*X3))

BINARY_EXTRA: dict[Any, Any] = {
    torch.where: (lambda c, x, y: torch.where(c > 0.9, x, y), (pos(*X3), pos(*X3), pos(6, 1))),
    torch.lerp: (lambda x, y: torch.lerp(x, y, 0.3), (pos(*X3), pos(6, 1))),
    torch.addcmul: (lambda x, y, z: torch.addcmul(x, y, z), (pos(*X3), pos(6, 1), pos(4))),
    torch.addcdiv: (lambda x, y, z: torch.addcdiv(x, y, z), (pos(*X3), pos(6, 1), pos(4))),
    operator.pow: (lambda x: x**2.0, (pos(*X3),)),
    operator.and_: (lambda x, y: (x > 1) & (y > 1), (pos(*X3), pos(6, 1))),
    operator.or_: (lambda x, y: (x > 1) | (y > 1), (pos(*X3), pos(6, 1))),
    operator.xor: (lambda x, y: (x > 1) ^ (y > 1), (pos(*X3), pos(6, 1))),
}
for f in BINARY_FUNCTIONS:
    fn, xs = BINARY_EXTRA.get(f, (f, (pos(*X3), pos(6, 1))))
    add(f, fn, xs)
    if f not in BINARY_EXTRA:
        add(f, f, (pos(2, 1, 4), pos(*X3)))  # broadcasting from the left operand too

METHOD_CALLS: dict[str, Any] = {
    "clamp": (lambda x: x.clamp(0.7, 1.2), 1),
    "clip": (lambda x: x.clip(0.7, 1.2), 1),
    "pow": (lambda x: x.pow(2), 1),
    "add": (lambda x, y: x.add(y), 2),
    "sub": (lambda x, y: x.sub(y), 2),
    "mul": (lambda x, y: x.mul(y), 2),
    "div": (lambda x, y: x.div(y), 2),
    "true_divide": (lambda x, y: x.true_divide(y), 2),
    "maximum": (lambda x, y: x.maximum(y), 2),
    "minimum": (lambda x, y: x.minimum(y), 2),
    "where": (lambda x, y: x.where(x > 0.9, y), 2),
    "lerp": (lambda x, y: x.lerp(y, 0.3), 2),
    "addcmul": (lambda x, y: x.addcmul(y, y), 2),
    "addcdiv": (lambda x, y: x.addcdiv(y, y), 2),
    "to": (lambda x: x.to(torch.float64), 1),
    "type": (lambda x: x.type(torch.float64), 1),
    "type_as": (lambda x, y: x.type_as(y), 2),
    "expand": (lambda x: x.sum(1, keepdim=True).expand(2, 6, 4), 1),
    "expand_as": (lambda x: x.sum(1, keepdim=True).expand_as(x), 1),
    "masked_fill": (lambda x, y: x.masked_fill(y > 1.0, 0.0), 2),
    "requires_grad_": (lambda x: x.requires_grad_(False), 1),
    "__add__": (lambda x, y: x.__add__(y), 2),
    "__mul__": (lambda x, y: x.__mul__(y), 2),
    "__sub__": (lambda x, y: x.__sub__(y), 2),
    "__truediv__": (lambda x, y: x.__truediv__(y), 2),
    "__radd__": (lambda x: x.__radd__(2.0), 1),
    "__rmul__": (lambda x: x.__rmul__(2.0), 1),
    "__rsub__": (lambda x: x.__rsub__(2.0), 1),
    "__rtruediv__": (lambda x: x.__rtruediv__(2.0), 1),
    "sigmoid_": (lambda x: (x * 1.0).sigmoid_(), 1),
    "relu_": (lambda x: (x - 1.0).relu_(), 1),
}
for m in METHODS:
    if m == "cuda":
        continue  # needs a GPU: covered by test_cuda_method_rule
    fn, arity = METHOD_CALLS.get(m, (lambda x, _m=m: getattr(x, _m)(), 1))
    add(m, fn, (pos(*X3),) if arity == 1 else (pos(*X3), pos(6, 1)))

MODULE_INPUTS: dict[Any, Any] = {nn.Dropout3d: pos(2, 6, 4, 3, 3), nn.Dropout2d: pos(2, 6, 4, 3)}
for mod in MODULES:
    add(mod, mod(), MODULE_INPUTS.get(mod, pos(*X3)))

add(nn.PReLU, nn.PReLU(6), rnd(*X3))
add(nn.PReLU, nn.PReLU(), rnd(*X3))
add(F.prelu, lambda x: F.prelu(x, torch.linspace(0.1, 0.6, 6)), rnd(*X3))

# -- reductions, softmax-like --------------------------------------------------------------------
for f in (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
          torch.nansum, torch.nanmean):
    add(f, lambda x, _f=f: _f(x, 2), pos(*X3))
    add(f, lambda x, _f=f: _f(x, (0, 2), keepdim=True), pos(*X3))
for m in ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nansum", "nanmean"):
    add(m, lambda x, _m=m: getattr(x, _m)(-1), pos(*X3))
add(torch.mean, lambda x: torch.mean(x), pos(*X3))
for f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
    add(f, lambda x, _f=f: _f(x, dim=1), rnd(*X3))
for m in ("softmax", "log_softmax"):
    add(m, lambda x, _m=m: getattr(x, _m)(-1), rnd(*X3))
add(nn.Softmax, nn.Softmax(dim=1), rnd(*X3))
add(nn.LogSoftmax, nn.LogSoftmax(dim=-1), rnd(*X3))
add(torch.cumsum, lambda x: torch.cumsum(x, 1), rnd(*X3))
add("cumsum", lambda x: x.cumsum(-1), rnd(*X3))
add(F.glu, lambda x: F.glu(x, 1), rnd(*X3))
add(nn.GLU, nn.GLU(dim=-1), rnd(*X3))

# -- shape ops ---------------------------------------------------------------------------------
X4 = rnd(2, 6, 3, 4)
add("view", lambda x: x.view(2, -1), X4)
add("view", lambda x: x.view(2, 2, 3, 3, 4), X4)
add("reshape", lambda x: x.reshape(2, 2, 3, 3, 4).transpose(1, 2).reshape(2, 6, 3, 4), X4)
add("reshape", lambda x: x.reshape(2, 6, 12), X4)
add("flatten", lambda x: x.flatten(1), X4)
add("unflatten", lambda x: x.unflatten(1, (3, 2)), X4)
add("squeeze", lambda x: x.unsqueeze(2).squeeze(2), X4)
add("unsqueeze", lambda x: x.unsqueeze(1), X4)
add("view_as", lambda x, y: x.view_as(y), (X4, rnd(2, 6, 12)))
add("reshape_as", lambda x, y: x.reshape_as(y), (X4, rnd(12, 2, 6)))
add(torch.reshape, lambda x: torch.reshape(x, (12, 12)), X4)
add(torch.flatten, lambda x: torch.flatten(x, 1), X4)
add(torch.squeeze, lambda x: torch.squeeze(x.unsqueeze(0), 0), X4)
add(torch.unsqueeze, lambda x: torch.unsqueeze(x, -1), X4)
add(torch.unflatten, lambda x: torch.unflatten(x, -1, (2, 2)), X4)
add(nn.Flatten, nn.Flatten(), X4)
add(nn.Unflatten, nn.Unflatten(1, (2, 3)), X4)
for t in ("transpose", "swapaxes", "swapdims"):
    add(t, lambda x, _t=t: getattr(x, _t)(1, 3), X4)
for f in (torch.transpose, torch.swapaxes, torch.swapdims):
    add(f, lambda x, _f=f: _f(x, 0, 2), X4)
add("permute", lambda x: x.permute(0, 2, 3, 1), X4)
add("permute", lambda x: x.permute((3, 1, 0, 2)), X4)
add(torch.permute, lambda x: torch.permute(x, (0, 3, 1, 2)), X4)
for t in ("movedim", "moveaxis"):
    add(t, lambda x, _t=t: getattr(x, _t)(1, -1), X4)
for f in (torch.movedim, torch.moveaxis):
    add(f, lambda x, _f=f: _f(x, (0, 1), (2, 3)), X4)
add("t", lambda x: x.t(), rnd(5, 6))
add(torch.t, lambda x: torch.t(x), rnd(5, 6))
for f in (torch.cat, torch.concat, torch.concatenate):
    add(f, lambda x, y, _f=f: _f([x, y, x], 1), (X4, rnd(2, 3, 3, 4)))
add(torch.stack, lambda x, y: torch.stack([x, y], 1), (X4, X4 * 2))
add("split", lambda x: x.split([2, 4], 1)[1] * x.split([2, 4], 1)[0].sum(1, keepdim=True), X4)
add("chunk", lambda x: x.chunk(3, 1)[2], X4)
add("tensor_split", lambda x: x.tensor_split(2, 1)[0], X4)
add("split_with_sizes", lambda x: x.split_with_sizes([1, 5], 1)[1], X4)
add("unbind", lambda x: x.unbind(1)[0], X4)
add(torch.split, lambda x: torch.cat(torch.split(x, 3, 1)[::-1], 1), X4)
add(torch.chunk, lambda x: torch.chunk(x, 2, -1)[1], X4)
add(torch.tensor_split, lambda x: torch.tensor_split(x, [1, 4], 1)[1], X4)
add(torch.unbind, lambda x: torch.unbind(x, 0)[1], X4)
add(operator.getitem, lambda x: x[:, :, None, ..., 1:3], X4)
add(operator.getitem, lambda x: x[:, 1], X4)
add(operator.getitem, lambda x: x.chunk(2, 1)[0], X4)
add(builtins.getattr, lambda x: x.view(x.shape[0], -1), X4)
add(builtins.getattr, lambda x: x.T, rnd(5, 6))
add(builtins.getattr, lambda x: x.mT, rnd(3, 5, 6))
add("size", lambda x: x.reshape(x.size(0), -1) * x.size(-1), X4)
for m in ("dim", "numel", "nelement", "ndimension"):
    add(m, lambda x, _m=m: x.reshape(2, -1) * getattr(x, _m)(), X4)
add("get_device", lambda x: x * x.get_device(), X4)
add(torch.numel, lambda x: x.reshape(torch.numel(x) // 2, 2), X4)
add(F.pad, lambda x: F.pad(x, (1, 1)), X4)
add(F.pad, lambda x: F.pad(x, (0, 0, 1, 0)), X4)

# -- layers ------------------------------------------------------------------------------------
add(nn.Linear, nn.Linear(4, 5), rnd(2, 6, 4))
add(nn.Linear, nn.Linear(4, 5, bias=False), rnd(3, 4))
add(F.linear, lambda x, w: F.linear(x, w), (rnd(2, 6, 4), rnd(5, 4)))
add(F.linear, lambda x, w, b: F.linear(x, w, b), (rnd(2, 6, 4), rnd(5, 4), rnd(5)))
for k, (mod, fn) in enumerate([(nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d),
                                (nn.Conv3d, F.conv3d)], start=1):
    x = rnd(2, 4, *([5] * k))
    add(mod, mod(4, 6, 3, padding=1), x)
    add(mod, mod(4, 6, 3, groups=2), x)
    add(mod, mod(4, 8, 3, groups=4, bias=False), x)  # depthwise with multiplier 2
    add(mod, mod(4, 6, 1), rnd(4, *([5] * k)))  # unbatched
    add(fn, lambda x, w, _fn=fn: _fn(x, w, None, 1, 0, 1, 2), (x, rnd(6, 2, *([3] * k))))
for mod, shape in ((nn.BatchNorm1d, (4, 6, 5)), (nn.BatchNorm2d, (4, 6, 3, 3)),
                   (nn.BatchNorm3d, (4, 6, 2, 2, 2)), (nn.SyncBatchNorm, (4, 6, 3, 3)),
                   (nn.InstanceNorm1d, (4, 6, 5)), (nn.InstanceNorm2d, (4, 6, 3, 3)),
                   (nn.InstanceNorm3d, (4, 6, 2, 2, 2))):
    m = mod(6, affine=True, track_running_stats=True) if "Instance" in mod.__name__ else mod(6)
    add(mod, m, rnd(*shape))
add(nn.BatchNorm1d, nn.BatchNorm1d(6), rnd(4, 6))
add(F.batch_norm, lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b),
    (rnd(4, 6, 3), rnd(6), pos(6), rnd(6), rnd(6)))
add(F.instance_norm, lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    (rnd(4, 6, 3), rnd(6), rnd(6)))
add(nn.LayerNorm, nn.LayerNorm(4), rnd(2, 6, 4))
add(nn.LayerNorm, nn.LayerNorm((6, 4)), rnd(2, 6, 4))
add(nn.RMSNorm, nn.RMSNorm(4), rnd(2, 6, 4))
add(F.layer_norm, lambda x, w, b: F.layer_norm(x, (4,), w, b), (rnd(2, 6, 4), rnd(4), rnd(4)))
add(F.rms_norm, lambda x, w: F.rms_norm(x, (4,), w), (rnd(2, 6, 4), rnd(4)))
add(nn.GroupNorm, nn.GroupNorm(3, 6), rnd(2, 6, 3, 3))
add(nn.GroupNorm, nn.GroupNorm(6, 6), rnd(2, 6, 3))
add(F.group_norm, lambda x, w, b: F.group_norm(x, 2, w, b), (rnd(2, 6, 3), rnd(6), rnd(6)))
add(nn.Embedding, nn.Embedding(10, 6), torch.randint(0, 10, (2, 5), generator=g))
add(F.embedding, lambda i, w: F.embedding(i, w), (torch.randint(0, 10, (2, 5), generator=g),
                                                   rnd(10, 6)))
POOL_INPUT = {1: rnd(2, 6, 8), 2: rnd(2, 6, 8, 8), 3: rnd(2, 6, 4, 4, 4)}
POOL_MODULES = {
    nn.MaxPool1d: lambda: nn.MaxPool1d(2), nn.AvgPool1d: lambda: nn.AvgPool1d(2),
    nn.AdaptiveAvgPool1d: lambda: nn.AdaptiveAvgPool1d(1),
    nn.AdaptiveMaxPool1d: lambda: nn.AdaptiveMaxPool1d(1), nn.LPPool1d: lambda: nn.LPPool1d(2, 2),
    nn.MaxPool2d: lambda: nn.MaxPool2d(2), nn.AvgPool2d: lambda: nn.AvgPool2d(2),
    nn.AdaptiveAvgPool2d: lambda: nn.AdaptiveAvgPool2d(1),
    nn.AdaptiveMaxPool2d: lambda: nn.AdaptiveMaxPool2d((1, 1)),
    nn.LPPool2d: lambda: nn.LPPool2d(2, 2), nn.Upsample: lambda: nn.Upsample(scale_factor=2),
    nn.UpsamplingNearest2d: lambda: nn.UpsamplingNearest2d(scale_factor=2),
    nn.UpsamplingBilinear2d: lambda: nn.UpsamplingBilinear2d(scale_factor=2),
    nn.MaxPool3d: lambda: nn.MaxPool3d(2), nn.AvgPool3d: lambda: nn.AvgPool3d(2),
    nn.AdaptiveAvgPool3d: lambda: nn.AdaptiveAvgPool3d(1),
    nn.AdaptiveMaxPool3d: lambda: nn.AdaptiveMaxPool3d(2),
}
for mod, make in POOL_MODULES.items():
    k = 1 if "1d" in mod.__name__ else 3 if "3d" in mod.__name__ else 2
    add(mod, make(), POOL_INPUT[k])
for k, fns in ((1, (F.max_pool1d, F.avg_pool1d)), (2, (F.max_pool2d, F.avg_pool2d)),
               (3, (F.max_pool3d, F.avg_pool3d))):
    for f in fns:
        add(f, lambda x, _f=f: _f(x, 2), POOL_INPUT[k])
for k, fns in ((1, (F.adaptive_avg_pool1d, F.adaptive_max_pool1d)),
               (2, (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)),
               (3, (F.adaptive_avg_pool3d, F.adaptive_max_pool3d))):
    for f in fns:
        add(f, lambda x, _f=f: _f(x, 1), POOL_INPUT[k])
add(F.adaptive_avg_pool2d, lambda x: F.adaptive_avg_pool2d(x, 3), POOL_INPUT[2])
add(F.interpolate, lambda x: F.interpolate(x, scale_factor=2.0), POOL_INPUT[2])
for f in (torch.matmul, operator.matmul, torch.bmm):
    add(f, lambda a, b, _f=f: _f(a, b), (rnd(3, 4, 5), rnd(3, 5, 6)))
add(torch.matmul, lambda a, b: a @ b, (rnd(2, 3, 4, 5), rnd(5, 6)))
for m in ("matmul", "bmm", "__matmul__"):
    add(m, lambda a, b, _m=m: getattr(a, _m)(b), (rnd(3, 4, 5), rnd(3, 5, 6)))

# -- attention ---------------------------------------------------------------------------------
Q, K, V = rnd(2, 4, 5, 8), rnd(2, 4, 6, 8), rnd(2, 4, 6, 3)
add(F.scaled_dot_product_attention, lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    (Q, K, V))
add(F.scaled_dot_product_attention,
    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (Q, K[:, :, :5], V[:, :, :5]))
add(F.scaled_dot_product_attention,
    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    (Q, rnd(2, 2, 6, 8), rnd(2, 2, 6, 3)))
add(F.scaled_dot_product_attention,
    lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (Q, K, V, rnd(5, 6)))


class _SelfAttention(nn.Module):
    def __init__(self, batch_first: bool = True, **kwargs: Any) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> Any:
        return self.attn(x, x, x, **self.kwargs)


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, pad: torch.Tensor) -> Any:
        return self.attn(x, mem, mem, key_padding_mask=pad, need_weights=False)[0]


add(nn.MultiheadAttention, _SelfAttention(), rnd(2, 5, 8))
add(nn.MultiheadAttention, _SelfAttention(False, average_attn_weights=False), rnd(5, 2, 8))
add(nn.MultiheadAttention, _CrossAttention(),
    (rnd(2, 5, 8), rnd(2, 7, 8), torch.rand(2, 7, generator=g) > 0.7))
# a user's own module kept whole as a leaf (models/leaf.py registers its rule)
add(GatedMixer, GatedMixer(6, 4, 5), rnd(3, 6))

# -- ATen-level rules (graphs from torch.export): EXPORT_CASES[target] must contain target -------
EXPORT_CASES: dict[Any, list[Case]] = {}
aten = torch.ops.aten


def add_export(target: Any, fn: Any, inputs: Any) -> None:
    EXPORT_CASES.setdefault(target, []).append((fn, inputs))


X2 = rnd(2, 4)
add_export(aten.embedding.default, nn.Embedding(10, 6), torch.randint(0, 10, (2, 5), generator=g))
add_export(aten.batch_norm.default, nn.BatchNorm1d(6), rnd(4, 6, 3))
add_export(aten.slice.Tensor, lambda x: x[:, 1:3] * x[:, :2], rnd(2, 6, 4))
add_export(aten.slice.Tensor, lambda x: x[:, 0:6:1] + x[:, :, 1:3].sum(-1, keepdim=True), rnd(2, 6, 4))
add_export(aten.select.int, lambda x: x[:, 1], rnd(2, 6, 4))
add_export(aten.addmm.default, lambda x, w, b: torch.addmm(b, x, w), (rnd(3, 4), rnd(4, 5), rnd(5)))
add_export(aten._assert_tensor_metadata.default, lambda x: x.to(torch.float64), X2)
add_export(aten.arange.default, lambda x: x + torch.arange(4.0), X2)
add_export(aten.arange.start, lambda x: x + torch.arange(1, 5), X2)
add_export(aten.arange.start_step, lambda x: x + torch.arange(0, 8, 2), X2)
add_export(aten.zeros.default, lambda x: x + torch.zeros(4), X2)
add_export(aten.ones.default, lambda x: x + torch.ones(4), X2)
add_export(aten.full.default, lambda x: x + torch.full((4,), 2.0), X2)
add_export(aten.empty.memory_format, lambda x: x + torch.empty(4).fill_(1.0), X2)
add_export(aten.lift_fresh_copy.default, lambda x: x + torch.tensor([1.0, 2.0, 3.0, 4.0]), X2)
add_export(aten.linspace.default, lambda x: x + torch.linspace(0, 1, 4), X2)
add(torch.arange, lambda x: x + torch.arange(4.0), X2)
add(torch.zeros, lambda x: x + torch.zeros(4), X2)
add(torch.ones, lambda x: x + torch.ones(4), X2)
add(torch.full, lambda x: x + torch.full((4,), 2.0), X2)
add(torch.empty, lambda x: x * 0 + torch.empty(4).fill_(1.0), X2)
add(torch.tensor, lambda x: x + torch.tensor([1.0, 2.0, 3.0, 4.0]), X2)
add(torch.linspace, lambda x: x + torch.linspace(0, 1, 4), X2)
add(torch.roll, lambda x: torch.roll(x, (1, 2), (2, 3)), X4)
add("roll", lambda x: x.roll(1, -1), X4)

# -- einsum: one rule for every equation ---------------------------------------------------------
EINSUMS: list[tuple[str, tuple[torch.Tensor, ...]]] = [
    ("bhqd,bhkd->bhqk", (rnd(2, 3, 4, 5), rnd(2, 3, 6, 5))),  # attention scores
    ("bhqk,bhkd->bhqd", (rnd(2, 3, 4, 6), rnd(2, 3, 6, 5))),  # attention output
    ("bij,bjk", (rnd(2, 3, 4), rnd(2, 4, 5))),  # implicit output
    ("ii->i", (rnd(4, 4),)),  # diagonal
    ("...ij,jk->...ik", (rnd(2, 3, 4), rnd(4, 5))),  # ellipsis batch
    ("b...d,d->b...", (rnd(2, 3, 5, 4), rnd(4))),  # ellipsis kept, d summed
    ("ij->", (rnd(3, 4),)),  # full sum
    ("ij,ij->ij", (rnd(3, 4), rnd(1, 4))),  # broadcast size-1 operand axis
    ("i,j->ij", (rnd(3), rnd(4))),  # outer product
    ("bnd,hd->bnh", (rnd(2, 3, 4), rnd(6, 4))),  # a projection
]
for eq, xs in EINSUMS:
    add(torch.einsum, lambda *a, _e=eq: torch.einsum(_e, *a), xs)
add(torch.einsum, lambda a, b: torch.einsum("ij,jk->ik", [a, b]), (rnd(3, 4), rnd(4, 5)))

# -- indexing: windows of an axis (slices that partition an axis act as a split) ----------------
QKV = rnd(2, 5, 12)
add(operator.getitem, lambda x: x[:, :, :4] * x[:, :, 4:8] + x[:, :, 8:], QKV)  # fused qkv
add(operator.getitem, lambda x: x[..., :4] @ x[..., 4:8].transpose(-1, -2) @ x[..., 8:], QKV)
add(operator.getitem, lambda x: x[:, 0], QKV)  # class token: trailing axis implicit
add(operator.getitem, lambda x: x[..., 2], QKV)
add(operator.getitem, lambda x: x[1:, ::3], QKV)  # strided: cut
add(operator.getitem, lambda x: x[:, 1:3] * x[:, :2], X4)  # overlapping windows
add(torch.narrow, lambda x: torch.narrow(x, -1, 4, 4) * torch.narrow(x, -1, 0, 4), QKV)
add("narrow", lambda x: x.narrow(2, 8, 4), QKV)
add(torch.select, lambda x: torch.select(x, 1, 0), QKV)
add("select", lambda x: x.select(-1, 3), QKV)

# -- indexing by tensors, differences, tensors made from another's dtype --------------------------
IDX = torch.randint(0, 5, (2, 3, 12), generator=g)
add(torch.gather, lambda x, i: torch.gather(x, 1, i), (QKV, IDX))
add("gather", lambda x, i: x.gather(-1, i[:, :, :6] % 12), (QKV, IDX))
add(torch.index_select, lambda x, i: torch.index_select(x, 1, i), (QKV, IDX[0, 0, :4]))
add("index_select", lambda x, i: x.index_select(-1, i), (QKV, IDX[0, 0]))
add(operator.getitem, lambda x, i: x[:, i], (QKV, IDX[0, :2, :4]))  # trailing axis implicit
add(operator.getitem, lambda x, i: x[i, :, i], (QKV, IDX[0, :2, :4] % 2))  # not adjacent
add(operator.getitem, lambda x, i: x[..., i], (QKV, IDX[0, 0, :7]))
add(torch.diff, lambda x: torch.diff(x, dim=1), QKV)
add("diff", lambda x, p: x.diff(dim=-1, prepend=p), (QKV, rnd(2, 5, 1)))
for m in ("new_ones", "new_zeros", "new_empty"):
    add(m, lambda x, _m=m: x * 2 + getattr(x, _m)(12).fill_(1.0), QKV)
add("new_full", lambda x: x + x.new_full((12,), 2.0), QKV)
add("new_tensor", lambda x: x + x.new_tensor([1.0] * 12), QKV)
for f in (torch.triu, torch.tril):
    add(f, lambda x, _f=f: _f(x, 1), rnd(2, 3, 4, 4))
for m in ("triu", "tril"):
    add(m, lambda x, _m=m: getattr(x, _m)(), rnd(2, 3, 4, 4))

# -- what the export path makes of ordinary code (each case must produce its op) ------------------
MASK = (torch.rand(2, 5, 12, generator=g) > 0.5)
add_export(aten.einsum.default, lambda a, b: torch.einsum("bhqd,bhkd->bhqk", a, b),
           (rnd(2, 3, 4, 5), rnd(2, 3, 6, 5)))
add_export(aten.narrow.default, lambda x: torch.narrow(x, -1, 4, 4) * x[..., :4], QKV)
add_export(aten.to.device, lambda x: x.to(x.device, torch.float64) * 2, QKV)
add_export(aten.pad.default, lambda x: F.pad(x, (0, 0, 1, 2), mode="reflect"), QKV)
add_export(aten.constant_pad_nd.default, lambda x: torch.constant_pad_nd(x, (0, 0, 1, 2)), QKV)
for t, fn in ((aten.le.Tensor, torch.le), (aten.lt.Tensor, torch.lt), (aten.ne.Tensor, torch.ne)):
    add_export(t, lambda x, y, _f=fn: _f(x, y).float() * x, (QKV, rnd(5, 12)))
for t, fn in ((aten.__and__.Tensor, operator.and_), (aten.__or__.Tensor, operator.or_),
              (aten.__xor__.Tensor, operator.xor)):
    add_export(t, lambda x, m, _f=fn: torch.where(_f(x > 0, m), x, 0.0), (QKV, MASK))
for t, fn in ((aten.bitwise_and.Tensor, torch.bitwise_and), (aten.bitwise_or.Tensor, torch.bitwise_or),
              (aten.bitwise_xor.Tensor, torch.bitwise_xor)):
    add_export(t, lambda x, m, _f=fn: torch.where(_f(x > 0, m), x, 0.0), (QKV, MASK))
add_export(aten.bitwise_not.default, lambda x: torch.where(torch.bitwise_not(x > 0), x, 0.0), QKV)
for t, fn in ((aten.logical_and.default, torch.logical_and), (aten.logical_or.default, torch.logical_or),
              (aten.logical_xor.default, torch.logical_xor)):
    add_export(t, lambda x, m, _f=fn: torch.where(_f(x > 0, m), x, 0.0), (QKV, MASK))
add_export(aten.min.other, lambda x, y: torch.min(x, y), (QKV, rnd(5, 12)))
add_export(aten.max.other, lambda x, y: torch.max(x, y), (QKV, rnd(5, 12)))
add_export(aten.where.ScalarOther, lambda x: torch.where(x > 0, x, 0.0), QKV)
add_export(aten.where.ScalarSelf, lambda x: torch.where(x > 0, 1.0, x), QKV)
add_export(aten.where.Scalar, lambda x: x * torch.where(x > 0, 1.0, 0.0), QKV)
add_export(aten.cumsum.default, lambda x: torch.cumsum(x, 1), QKV)
add_export(aten.any.dim, lambda x: x * (x > 1).any(1, keepdim=True), QKV)
add_export(aten.all.dim, lambda x: x * (x > -3).all(-1, keepdim=True), QKV)
add_export(aten.clamp_min.default, lambda x: torch.clamp_min(x, 0.1), QKV)
add_export(aten.clamp_max.default, lambda x: torch.clamp_max(x, 0.1), QKV)
add_export(aten.expand_as.default, lambda x, y: x.expand_as(y) * y, (rnd(1, 12), QKV))
add_export(aten.scalar_tensor.default, lambda x: x * torch.scalar_tensor(2.0), QKV)
add_export(aten.gather.default, lambda x, i: torch.gather(x, 1, i), (QKV, IDX))
add_export(aten.index_select.default, lambda x, i: torch.index_select(x, 1, i), (QKV, IDX[0, 0, :4]))
add_export(aten.index.Tensor, lambda x, i: x[:, i], (QKV, IDX[0, :2, :4]))
add_export(aten.index.Tensor, lambda x, i: x[i, :, i], (QKV, IDX[0, :2, :4] % 2))
add_export(aten.diff.default, lambda x: torch.diff(x, dim=1), QKV)
for t, m in ((aten.new_ones.default, "new_ones"), (aten.new_zeros.default, "new_zeros"),
             (aten.new_empty.default, "new_empty")):
    add_export(t, lambda x, _m=m: x * 2 + getattr(x, _m)(12).fill_(1.0), QKV)
add_export(aten.new_full.default, lambda x: x + x.new_full((12,), 2.0), QKV)
add_export(aten.triu.default, lambda x: torch.triu(x, 1), rnd(2, 3, 4, 4))
add_export(aten.tril.default, lambda x: torch.tril(x), rnd(2, 3, 4, 4))

# -- max / min in their three forms, and fields of named results ---------------------------------
add(torch.max, lambda x: torch.max(x, 1).values * 2, X4)
add(torch.max, lambda x: torch.max(x, -1, keepdim=True)[1] * x, X4)
add(torch.max, lambda x, y: torch.max(x, y), (pos(*X3), pos(6, 1)))
add(torch.max, lambda x: x * torch.max(x), X4)
add(torch.min, lambda x: torch.min(x, 0).values, X4)
add("max", lambda x: x.max(dim=2).indices * 2, X4)
add("min", lambda x: x.min(-1)[0], X4)
add(builtins.getattr, lambda x: torch.max(x, 1).values, X4)
add_export(aten.max.dim, lambda x: torch.max(x, 1).values * 2, X4)
add_export(aten.min.dim, lambda x: torch.min(x, -1)[0], X4)

# -- a channel shuffle of a concatenation, read as one op (fxfuse.groups.shuffle) ----------------
def _lib_shuffle(x: torch.Tensor, g: int = 2) -> torch.Tensor:
    """As libraries write it: view (b, g, c/g, h, w), transpose, contiguous, view back."""
    b, c, h, w = x.shape
    return torch.transpose(x.view(b, g, c // g, h, w), 1, 2).contiguous().view(b, -1, h, w)


add(channel_shuffle, lambda a, b: _lib_shuffle(torch.cat((a, b), 1)), (X4, rnd(2, 6, 3, 4)))
add(channel_shuffle, lambda a, b: channel_shuffle(torch.cat((a, b), 1), 1, 2),
    (X4, rnd(2, 6, 3, 4)))
add(channel_shuffle, lambda a, b, c: torch.cat((a, b, c), 1).reshape(2, 3, 4, 12).permute(
    0, 2, 1, 3).reshape(2, 12, 12), (rnd(2, 4, 12), rnd(2, 4, 12), rnd(2, 4, 12)))  # 3 blocks
add(channel_shuffle, lambda a, b: _lib_shuffle(torch.cat((a, b), 1)),
    (rnd(2, 4, 3, 4), rnd(2, 8, 3, 4)))  # a sum cut off the blocks' boundary (4 + 8, blocks of 6)
add(channel_shuffle, lambda a, b: _lib_shuffle(_lib_shuffle(torch.cat((a, b), 1))),
    (X4, rnd(2, 6, 3, 4)))  # a shuffle of a shuffle: an interleave in, a finer one out
add(channel_shuffle, lambda a, b: torch.cat(_lib_shuffle(torch.cat((a, b), 1)).chunk(2, 1)[::-1],
                                            1), (rnd(2, 8, 3, 4), rnd(2, 8, 3, 4)))
