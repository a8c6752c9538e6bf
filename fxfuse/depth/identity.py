"""Exact identity levels: parameters that make a block compute ``y = x``, or a typed error.

Two kinds of block (:mod:`fxfuse.depth.blocks`):

* **residual** ``y = tail(x + branch(x))``: the branch is made to add exactly zero by zeroing the
  parameters of its last op that has them (``Linear`` / conv: ``W = 0, b = 0``; a norm:
  ``gamma = 0, beta = 0``; a layer scale ``gamma * h``: ``gamma = 0``; ``nn.MultiheadAttention``:
  its output projection), walking back through ops
  with ``f(0) = 0`` (ReLU, GELU, SiLU, dropout, reshapes, a scalar ``dt * f``).  The stream operand
  must be the block's input (through ``nn.Identity`` / dropout: no projection shortcut), and every
  op on the stream after the add must be the identity there: ``ReLU`` when the stream is
  non-negative (it comes out of a ReLU), dropout, ``nn.Identity``.  A norm after the add
  (post-LN: ``LN(x + 0) != x``) has no exact identity: :class:`NoExactIdentityError`.
* **layer** (a plain chain): every op is set to the identity by :data:`IDENTITY_RULES`
  (``Linear``: ``W = I, b = 0`` when in = out; conv: Dirac kernel, stride 1, same padding;
  BatchNorm: ``mean = 0, var = 1, gamma = sqrt(1 + eps), beta = 0``), and ``ReLU`` is the identity
  after a non-negative input (a ReLU before it), so ``Linear(+ReLU)`` after a ReLU is exact.

Nothing approximate is inserted silently: an op without a rule, a shape change or a weight-tied
block raises :class:`NoExactIdentityError` naming the block and the op, and :func:`expand`'s
numerical check (:mod:`fxfuse.depth.expand`) confirms the result.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .blocks import Block, BlockSequence, is_add
from .errors import NoExactIdentityError

State = dict[str, torch.Tensor]

RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU,)
RELU_FUNCTIONS: frozenset[Any] = frozenset({F.relu, torch.relu})
RELU_METHODS = frozenset({"relu", "relu_"})
# ops that are the identity on their (first) input in eval mode
PASS_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                              nn.Dropout3d, nn.AlphaDropout)
PASS_FUNCTIONS: frozenset[Any] = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d})
PASS_METHODS = frozenset({"contiguous", "clone"})
# ops with f(0) = 0 elementwise or by reshaping: a zero branch stays zero through them
ZERO_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.Hardswish, nn.Mish,
    nn.Flatten, nn.Unflatten, *PASS_MODULES)
ZERO_KEEPING_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.tanh, F.leaky_relu, F.hardswish, F.mish,
    torch.flatten, torch.reshape, torch.transpose, torch.permute, operator.neg, torch.neg,
    *PASS_FUNCTIONS})
ZERO_KEEPING_METHODS = frozenset({"view", "reshape", "transpose", "permute", "flatten",
                                  "contiguous", "clone", "relu", "neg", "squeeze", "unsqueeze"})
# modules whose (first) output is exactly zero once these tensors are zero: attention's output
# projection (a leaf nn.MultiheadAttention returns (output, weights); the branch reads [0])
ZERO_OUTPUT_TENSORS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj.weight", "out_proj.bias"),
}
# modules whose output is exactly zero once their tensors (weight, bias) are zero (eval mode)
ZEROABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _module(seq: BlockSequence, node: fx.Node) -> nn.Module | None:
    return seq.graph.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is(node: fx.Node, seq: BlockSequence, modules: tuple[type[nn.Module], ...],
        functions: frozenset[Any], methods: frozenset[str]) -> bool:
    if node.op == "call_module":
        return isinstance(_module(seq, node), modules)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return str(node.target) in methods
    return False


def is_relu(node: fx.Node, seq: BlockSequence) -> bool:
    return _is(node, seq, RELU_MODULES, RELU_FUNCTIONS, RELU_METHODS)


def is_pass(node: fx.Node, seq: BlockSequence) -> bool:
    return _is(node, seq, PASS_MODULES, PASS_FUNCTIONS, PASS_METHODS)


def nonnegative(node: fx.Node, seq: BlockSequence) -> bool:
    """Whether ``node``'s values are >= 0 for every input: a ReLU's output, or one passed on
    through identity ops, pooling, or the sum of two such values."""
    if is_relu(node, seq):
        return True
    mod = _module(seq, node)
    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
    if is_pass(node, seq) or isinstance(mod, pools) or (
            node.op == "call_function" and node.target in (torch.flatten, F.max_pool2d,
                                                             F.avg_pool2d)):
        first = node.args[0] if node.args else None
        return isinstance(first, fx.Node) and nonnegative(first, seq)
    if is_add(node):
        return all(isinstance(a, fx.Node) and nonnegative(a, seq) for a in node.args[:2])
    return False


def _describe(node: fx.Node, seq: BlockSequence) -> str:
    mod = _module(seq, node)
    what = type(mod).__name__ if mod is not None else getattr(node.target, "__name__",
                                                                 str(node.target))
    return f"{node.name} ({what})"


HINT = ("Give a level map (DepthAlignment(map=...)) that matches this block to one of the other "
        "model's blocks, or make the shallower model the target so the deeper one's blocks are "
        "collapsed (fitted on data)")


def _fail(block: Block, why: str) -> NoExactIdentityError:
    exc = NoExactIdentityError(
        f"block {block.index} ({block.kind} {block.name!r}) has no exact identity: {why}. {HINT}")
    exc.why = f"block {block.index} ({block.kind} {block.name!r}): {why}"
    return exc


# -- layer identities: one rule per op ------------------------------------------------------------
LayerRule = Callable[[nn.Module, str, State], None]
IDENTITY_RULES: dict[type[nn.Module], LayerRule] = {}


def identity_rule(*types: type[nn.Module]) -> Callable[[LayerRule], LayerRule]:
    """Register ``rule(module, prefix, out)`` writing the identity tensors of ``module`` (its
    state_dict keys under ``prefix``) into ``out``; raise ValueError where there is none."""
    def deco(fn: LayerRule) -> LayerRule:
        for t in types:
            IDENTITY_RULES[t] = fn
        return fn
    return deco


@identity_rule(nn.Linear)
def linear_identity(m: nn.Module, prefix: str, out: State) -> None:
    assert isinstance(m, nn.Linear)
    if m.in_features != m.out_features:
        raise ValueError(f"Linear {m.in_features} -> {m.out_features} changes the width")
    out[prefix + "weight"] = torch.eye(m.out_features, dtype=m.weight.dtype)
    if m.bias is not None:
        out[prefix + "bias"] = torch.zeros_like(m.bias.detach())


@identity_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_identity(m: nn.Module, prefix: str, out: State) -> None:
    assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    k, pad, dil = m.kernel_size, m.padding, m.dilation
    if m.in_channels != m.out_channels:
        raise ValueError(f"conv {m.in_channels} -> {m.out_channels} changes the width")
    if any(s != 1 for s in m.stride) or isinstance(pad, str) and pad != "same" or any(
            kk % 2 == 0 for kk in k) or (not isinstance(pad, str) and any(
            p != d * (kk - 1) // 2 for p, d, kk in zip(pad, dil, k))):
        raise ValueError(f"conv with stride {m.stride}, kernel {k}, padding {pad} does not keep "
                         f"the spatial size")
    if m.groups not in (1, m.in_channels):
        raise ValueError(f"grouped conv (groups={m.groups})")
    w = torch.zeros_like(m.weight.detach())
    centre = tuple(kk // 2 for kk in k)
    for c in range(m.out_channels):
        w[(c, 0 if m.groups != 1 else c, *centre)] = 1.0
    out[prefix + "weight"] = w
    if m.bias is not None:
        out[prefix + "bias"] = torch.zeros_like(m.bias.detach())


@identity_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_identity(m: nn.Module, prefix: str, out: State) -> None:
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    n = m.num_features
    if not m.track_running_stats:
        raise ValueError("BatchNorm without running statistics normalises every batch")
    out[prefix + "running_mean"] = torch.zeros(n)
    out[prefix + "running_var"] = torch.ones(n)
    if m.affine:
        out[prefix + "weight"] = torch.full((n,), math.sqrt(1.0 + m.eps))
        out[prefix + "bias"] = torch.zeros(n)
    else:
        raise ValueError("BatchNorm without affine parameters divides by sqrt(1 + eps)")


def _layer_identity(seq: BlockSequence, block: Block, out: State) -> list[str]:
    by_name = {n.name: n for n in seq.graph.graph.nodes}
    nonneg = nonnegative(by_name[block.input], seq)
    done: list[str] = []
    for name in block.nodes:
        node = by_name[name]
        if is_pass(node, seq):
            continue
        if is_relu(node, seq):
            if not nonneg:
                raise _fail(block, f"{_describe(node, seq)} is the identity only on "
                                   f"non-negative inputs, and the block's input "
                                   f"{block.input!r} is not the output of a ReLU")
            continue
        mod = _module(seq, node)
        rule = IDENTITY_RULES.get(type(mod)) if mod is not None else None
        if mod is None or rule is None:
            raise _fail(block, f"{_describe(node, seq)} has no identity rule")
        try:
            rule(mod, f"{node.target}.", out)
        except ValueError as exc:
            raise _fail(block, f"{_describe(node, seq)}: {exc}") from None
        done.append(f"{node.target} = identity")
    return done


# -- residual identities: a zero branch ------------------------------------------------------------
def _zero_branch(seq: BlockSequence, block: Block, node: fx.Node, out: State,
                 state: State) -> list[str]:
    """Zero the tensors that make ``node``'s value exactly 0; the keys zeroed."""
    mod = _module(seq, node)
    if mod is not None and isinstance(mod, ZEROABLE_MODULES):
        keys = [f"{node.target}.{k}" for k, _ in mod.named_parameters(recurse=False)]
        for k in keys:
            out[k] = torch.zeros_like(state[k])
        if not keys:
            raise _fail(block, f"the branch ends at {_describe(node, seq)}, which has no "
                               f"parameters to zero")
        return keys
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0 \
            and isinstance(node.args[0], fx.Node):
        inner = _module(seq, node.args[0])
        names = ZERO_OUTPUT_TENSORS.get(type(inner)) if inner is not None else None
        if names:
            keys = [f"{node.args[0].target}.{k}" for k in names
                    if f"{node.args[0].target}.{k}" in state]
            for k in keys:
                out[k] = torch.zeros_like(state[k])
            return keys
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        for a in node.args[:2]:
            if isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in state:
                out[str(a.target)] = torch.zeros_like(state[str(a.target)])
                return [str(a.target)]
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(tensors) == 1:  # a scalar times a branch (dt * f(x))
            return _zero_branch(seq, block, tensors[0], out, state)
        for t in tensors:
            try:
                return _zero_branch(seq, block, t, out, state)
            except NoExactIdentityError:
                continue
    if _is(node, seq, ZERO_KEEPING_MODULES, ZERO_KEEPING_FUNCTIONS, ZERO_KEEPING_METHODS):
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node):
            return _zero_branch(seq, block, first, out, state)
    raise _fail(block, f"its residual branch ends at {_describe(node, seq)}, whose output can "
                       f"not be made exactly zero")


def _through_pass(node: fx.Node, seq: BlockSequence) -> fx.Node:
    while is_pass(node, seq) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _residual_identity(seq: BlockSequence, block: Block, out: State, state: State) -> list[str]:
    by_name = {n.name: n for n in seq.graph.graph.nodes}
    stream = by_name[block.input]
    nonneg = nonnegative(stream, seq)
    done: list[str] = []
    for joint in block.joints:
        node = by_name[joint]
        if is_add(node):
            a, b = node.args[0], node.args[1]
            assert isinstance(a, fx.Node) and isinstance(b, fx.Node)
            if _through_pass(a, seq) is stream:
                branch = b
            elif _through_pass(b, seq) is stream:
                branch = a
            else:
                raise _fail(block, f"neither operand of the residual add {node.name} is the "
                                   f"block's input stream {stream.name!r} (a projection "
                                   f"shortcut changes the stream)")
            keys = _zero_branch(seq, block, branch, out, state)
            done.append(f"branch into {node.name} = 0 ({', '.join(keys)})")
        elif is_relu(node, seq):
            if not nonneg:
                raise _fail(block, f"{_describe(node, seq)} after the residual add is the "
                                   f"identity only on a non-negative stream")
        elif not is_pass(node, seq):
            raise _fail(block, f"{_describe(node, seq)} follows the residual add on the stream "
                               f"(post-norm: norm(x + 0) != x)")
        stream = node
    return done


def identity_tensors(seq: BlockSequence, block: Block, state: State) -> tuple[State, list[str]]:
    """The tensors (state_dict key -> value) that make ``block`` of ``seq`` the identity, given
    the model's current ``state``, and one line per change; raises
    :class:`NoExactIdentityError` where no exact identity exists."""
    if block.tied_to is not None or any(
            b.tied_to == block.index for b in seq.blocks):
        raise _fail(block, "it is weight-tied to another block (setting it would change both)")
    if not block.keeps_shape:
        raise _fail(block, f"it changes the stream's shape {block.shape_in} -> {block.shape_out}")
    out: State = {}
    if block.kind == "residual":
        done = _residual_identity(seq, block, out, state)
    else:
        done = _layer_identity(seq, block, out)
    for k, v in out.items():
        out[k] = v.to(dtype=state[k].dtype, device=state[k].device)
    return out, done


def has_identity(seq: BlockSequence, block: Block) -> str | None:
    """None when ``block`` has an exact identity, else the reason (the error's message)."""
    try:
        identity_tensors(seq, block, seq.graph.state_dict())
    except NoExactIdentityError as exc:
        return exc.why or str(exc)
    return None
