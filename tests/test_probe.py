"""Opaque calls: seen through where they are plain Python, probed where they are not, and never a
silent cut (rules that decline, rules that raise)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.groups.discover import discover
from fxfuse.rules import RuleDoesNotApply, RuleError, registry
from fxfuse.rules.probe import probe
from fxfuse.rules.registry import TensorHandle
from fxfuse.rules.validate import check_equivariance
from fxfuse.testing import randomize_constants


# -- library code written as third-party libraries write it ------------------------------------
def gated_scale(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Elementwise on the channels, with a per-channel parameter; the shape check is Python
    control flow on a traced value, so it can not be traced symbolically."""
    if x.shape[-1] != gamma.shape[0]:
        raise ValueError("channel mismatch")
    return F.gelu(x) * gamma


def channel_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Not equivariant on the channels: a prefix sum along them."""
    if x.dim() < 2:
        raise ValueError("expected a batch")
    return x.cumsum(-1)


def noisy(x: torch.Tensor) -> torch.Tensor:
    """Not deterministic."""
    if x.dim() < 2:
        raise ValueError("expected a batch")
    return x + torch.rand_like(x)


def attention(x: torch.Tensor, w_qkv: torch.Tensor, w_out: torch.Tensor, heads: int
              ) -> torch.Tensor:
    """A whole attention as one library function (weights passed in), plain Python over torch
    ops: it must be seen through, not probed."""
    b, t, c = x.shape
    q, k, v = F.linear(x, w_qkv).view(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    a = F.scaled_dot_product_attention(q, k, v)
    return F.linear(a.transpose(1, 2).reshape(b, t, c), w_out)


torch.fx.wrap("gated_scale")
torch.fx.wrap("channel_cumsum")
torch.fx.wrap("noisy")
torch.fx.wrap("attention")


class WithWrapped(nn.Module):
    def __init__(self, fn: str = "gated_scale") -> None:
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(6, 16)
        self.gamma = nn.Parameter(torch.randn(16))
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.fn == "gated_scale":
            h = gated_scale(h, self.gamma)
        else:
            h = channel_cumsum(h) if self.fn == "channel_cumsum" else noisy(h)
        return self.c(torch.relu(self.b(h)))


class LayerScale(nn.Module):
    """A third-party-style module: Python control flow in forward (not traceable)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(c))
        self.register_buffer("offset", torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.gamma.numel():
            raise ValueError("channel mismatch")
        return x * self.gamma + self.offset


class ChannelMix(nn.Module):
    """Not elementwise: mixes the channels by a fixed (unlearned) rotation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) < 2:
            raise ValueError("too few channels")
        return torch.roll(x, 1, dims=-1) + x


class Block(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.inner = inner
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(self.a(x))
        return self.c(torch.relu(self.b(h)))


X = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))


def test_probe_finds_an_elementwise_wrapped_function_and_marks_it() -> None:
    model = randomize_constants(WithWrapped(), seed=1)
    spec = fxfuse.find_groups(model, X, tracer="symbolic")
    group = spec.groups_of("a.weight", 0)
    assert group and spec.groups_of("gamma", 0) == group == spec.groups_of("b.weight", 1)
    assert [(p.node, p.op) for p in spec.probed] == [("gated_scale", f"{__name__}.gated_scale")]
    assert spec.probed[0].source and "test_probe.py" in spec.probed[0].source
    assert not spec.cuts
    text = spec.explain(group[0])
    assert "probed" in text and "gated_scale" in text and "strict=True refuses" in text
    assert "probed" in str(spec)
    fxfuse.verify(model, spec, X)
    with pytest.raises(fxfuse.UnsupportedOpError, match="strict mode does not probe"):
        fxfuse.find_groups(model, X, strict=True, tracer="symbolic")
    assert fxfuse.PermutationSpec.from_json(spec.to_json()) == spec


def test_probe_cuts_a_wrapped_function_that_is_not_elementwise() -> None:
    model = randomize_constants(WithWrapped("channel_cumsum"), seed=1)
    spec = fxfuse.find_groups(model, X, tracer="symbolic")
    assert spec.groups_of("a.weight", 0) == []  # the channels before the prefix sum: fixed
    assert spec.groups_of("b.weight", 0) != []  # groups resume after it
    cut = next(c for c in spec.cuts if c.node == "channel_cumsum")
    assert "probed" in cut.reason and "differs" in cut.reason
    assert any("probed" in r for r in spec.axes[("a.weight", 0)].fixed_because)
    fxfuse.verify(model, spec, X)


def test_a_nondeterministic_call_is_not_probed() -> None:
    spec = fxfuse.find_groups(WithWrapped("noisy"), X, tracer="symbolic")
    assert not spec.probed and spec.groups_of("a.weight", 0) == []
    assert "not deterministic" in next(c.reason for c in spec.cuts if c.node == "noisy")


def test_probe_on_a_third_party_leaf_module() -> None:
    model = randomize_constants(Block(LayerScale(16)), seed=1)
    spec = fxfuse.find_groups(model, X, tracer="symbolic")
    assert [p.node for p in spec.probed] == ["inner"]
    g = spec.groups_of("a.weight", 0)
    assert g and spec.groups_of("inner.gamma", 0) == g == spec.groups_of("inner.offset", 0)
    assert spec.groups_of("b.weight", 1) == g
    fxfuse.verify(model, spec, X)
    # the probe ran on a copy: the user's module is untouched and keeps its mode
    assert model.training


def test_probe_cuts_a_leaf_module_that_mixes_channels() -> None:
    model = randomize_constants(Block(ChannelMix()), seed=1)
    spec = fxfuse.find_groups(model, X, tracer="symbolic")
    assert spec.groups_of("a.weight", 0) == [] and spec.groups_of("b.weight", 0) != []
    assert any(c.node == "inner" and "ChannelMix" in c.op for c in spec.cuts)
    fxfuse.verify(model, spec, X)


class WrappedAttention(nn.Module):
    def __init__(self, c: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, c)
        self.w_qkv = nn.Parameter(torch.randn(3 * c, c) / c**0.5)
        self.w_out = nn.Parameter(torch.randn(c, c) / c**0.5)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + attention(h, self.w_qkv, self.w_out, self.heads)
        return self.head(h)


def test_a_wrapped_attention_function_is_seen_through() -> None:
    model = randomize_constants(WrappedAttention(), seed=1)
    disc = discover(model, X, tracer="symbolic")
    assert not disc.gm.meta["fxfuse.opaque"] and not disc.probed and not disc.cuts
    assert "attention" not in {str(getattr(n.target, "__name__", n.target))
                               for n in disc.gm.graph.nodes}
    spec = fxfuse.find_groups(model, X)
    assert spec.tracer == "torch.fx.symbolic_trace"
    rows = spec.axes[("w_qkv", 0)].layout  # 3 x heads x head_dim, heads found from the graph
    assert len(spec.axes[("w_qkv", 0)].groups) == 2, rows
    assert spec.groups_of("w_out", 0) == spec.groups_of("embed.weight", 0) != []
    fxfuse.verify(model, spec, X)


class SquareMix(nn.Module):
    """``x @ w^T`` with a square weight behind Python control flow: symbolic tracing keeps it
    opaque and the probe can not pair the two same-sized weight axes, so it cuts; torch.export
    traces through it (the check is on a static shape)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError("expected (batch, tokens, channels)")
        return x @ self.w.t()


def test_auto_tries_export_only_for_cuts_at_opaque_calls_and_says_so() -> None:
    model = randomize_constants(Block(SquareMix()), seed=1)
    sym = fxfuse.find_groups(model, X, tracer="symbolic")
    assert any(c.node == "inner" for c in sym.cuts)
    auto = fxfuse.find_groups(model, X)
    assert auto.tracer == "torch.export" and not auto.cuts
    assert auto.notes and "kept torch.export" in auto.notes[0] and "SquareMix" in auto.notes[0]
    assert auto.groups_of("inner.w", 1) == auto.groups_of("a.weight", 0) != []
    fxfuse.verify(model, auto, X)
    # a model whose opaque calls are all probed keeps the symbolic trace, with no note
    plain = fxfuse.find_groups(Block(LayerScale(16)), X)
    assert plain.tracer == "torch.fx.symbolic_trace" and not plain.notes


@pytest.mark.parametrize("fn,inputs", [
    (lambda x: torch.cummax(x, dim=-1).values, (torch.randn(2, 5, 4),)),
    (lambda x, w: gated_scale(x, w), (torch.randn(2, 5, 4), torch.randn(4))),
    (lambda x: torch.sort(x, dim=1).values * 2, (torch.randn(2, 5, 4),)),
    (lambda x: torch.logcumsumexp(x, dim=0), (torch.randn(3, 5, 4),)),
    (lambda x, y: torch.cdist(x, y), (torch.randn(2, 5, 4), torch.randn(2, 6, 4))),
])
def test_probed_relations_pass_the_rule_validator(fn: Any, inputs: tuple) -> None:
    """Ops without a rule: what the probe claims is checked by the same validator as rules."""
    check = check_equivariance(fn, inputs, probe=True)
    assert check.n_free > 0 and check.ok, check


def test_probe_measures_reductions_contractions_and_broadcast_copies() -> None:
    x, w = TensorHandle(0, (3, 4), torch.float32), TensorHandle(1, (5, 4), torch.float32)
    y = TensorHandle(2, (3, 5), torch.float32)
    result = probe(lambda v: v[0] @ v[1].t(), [x, w], [y], labels={0: "x", 1: "w", 2: "y"})
    assert "x[0] = y[0]" in result.holds and "w[0] = y[1]" in result.holds
    assert "x[1] = w[1] (contracted)" in result.holds
    s = TensorHandle(1, (3, 1), torch.float32)
    mean = probe(lambda v: v[0].mean(-1, keepdim=True), [x], [s], labels={0: "x", 1: "s"})
    assert "x[1] is reduced" in mean.holds and "x[0] = s[0]" in mean.holds
    ids = TensorHandle(0, (3,), torch.int64)
    assert "int64" in probe(lambda v: v[0] * 2, [ids], [TensorHandle(1, (3,), torch.int64)]).reason


# -- rules that decline, rules that raise ----------------------------------------------------------
class Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class WithTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.t, self.b = nn.Linear(6, 8), Twice(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.t(self.a(x)))


def _with_rule(rule: Any, fn: Any) -> Any:
    fxfuse.axis_rule(Twice)(rule)
    try:
        return fn()
    finally:
        registry._RULES.pop(Twice)


def test_a_rule_that_raises_is_an_error_naming_the_rule_and_the_node() -> None:
    def buggy_rule(op: Any) -> list[Any]:
        return [op.args[0][5]]  # axis 5 of a 3-d tensor: a bug, not a decline

    with pytest.raises(RuleError) as info:
        _with_rule(buggy_rule, lambda: fxfuse.find_groups(WithTwice(), X))
    msg = str(info.value)
    assert "buggy_rule" in msg and "'t'" in msg and "Twice" in msg and "IndexError" in msg
    assert "RuleDoesNotApply" in msg and isinstance(info.value, fxfuse.FxFuseError)

    def not_relations(op: Any) -> Any:
        return [op.out]  # a handle, not a relation

    with pytest.raises(RuleError, match="not_relations"):
        _with_rule(not_relations, lambda: fxfuse.find_groups(WithTwice(), X))


def test_a_rule_that_declines_is_probed_or_cut_with_its_reason() -> None:
    def declining_rule(op: Any) -> list[Any]:
        raise RuleDoesNotApply("only for 2-d inputs")

    spec = _with_rule(declining_rule, lambda: fxfuse.find_groups(WithTwice(), X))
    assert [p.node for p in spec.probed] == ["t"] and spec.groups_of("a.weight", 0)
    with pytest.raises(fxfuse.UnsupportedOpError, match="only for 2-d inputs"):
        _with_rule(declining_rule, lambda: fxfuse.find_groups(WithTwice(), X, strict=True))
    disc = _with_rule(declining_rule, lambda: discover(WithTwice(), X, probe=False))
    assert "only for 2-d inputs" in disc.cuts[0].detail


def test_every_rule_declines_instead_of_raising_on_calls_it_does_not_describe() -> None:
    """Forms of ops the rules were not written for are declines (cut or probed), not errors."""
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> Any:
            a = torch.matmul(x[0, 0], self.w)  # 1-d matmul
            b = x[[0, 1]]  # list index
            c = x.view(-1)[torch.tensor([True, False] * 30)]  # boolean mask
            return a + b.sum() + c.sum()
    x = torch.randn(3, 5, 4)
    disc = discover(Odd(), x, probe=False, fix_io=False)
    assert len(disc.cuts) >= 2 and all(c.kind == "no-rule" for c in disc.cuts)
    assert any("does not apply" in c.detail for c in disc.cuts)
