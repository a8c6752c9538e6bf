"""Targeted discovery tests: one per feature the groups issue lists, each on a model that uses it."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fxfuse
import models
from fxfuse.groups.spec import Member
from fxfuse.ir.layout import Fixed, Interleave, Prod, Sum, Unit
from fxfuse.rules import Same
from fxfuse.testing import randomize_constants


def spec_of(name: str, **kwargs: object) -> tuple[nn.Module, tuple, fxfuse.PermutationSpec]:
    entry = models.get(name)
    model = randomize_constants(entry.factory(**kwargs) if kwargs else entry.factory(), seed=2)
    inputs = entry.example_inputs()
    return model, inputs, fxfuse.find_groups(model, inputs)


def groups_of(spec: fxfuse.PermutationSpec, key: str, axis: int = 0) -> list[str]:
    return spec.groups_of(key, axis)


def out_changes(model: nn.Module, other: nn.Module, inputs: tuple) -> bool:
    with torch.no_grad():
        a, b = model.eval()(*inputs), other.eval()(*inputs)
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# -- layers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "conv1d_net", "conv3d_net"])
def test_linear_and_conv_outputs_join_next_inputs_and_bias(name: str) -> None:
    model, inputs, spec = spec_of(name)
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    for (n1, m1), (n2, _) in zip(layers, layers[1:]):
        g = groups_of(spec, f"{n1}.weight", 0)
        assert g and groups_of(spec, f"{n2}.weight", 1) == g
        if m1.bias is not None:
            assert groups_of(spec, f"{n1}.bias", 0) == g
    fxfuse.verify(model, spec, inputs)


def test_grouped_conv_permutations_respect_conv_groups() -> None:
    model, inputs, spec = spec_of("grouped_conv")
    layout = spec.axes[("gconv2.weight", 0)].layout
    assert isinstance(layout, Prod) and spec.group(layout.parts[0].group).size == 2  # the 2 conv groups
    # whole-group swap and within-group shuffles are in the spec and keep the function
    fxfuse.verify(model, spec, inputs)
    # a permutation mixing channels across the conv groups of gconv2 breaks it
    bad = copy.deepcopy(model)
    p = torch.arange(16)
    p[[0, 8]] = p[[8, 0]]  # swap channel 0 (group 0) with channel 8 (group 1) of conv1's output
    with torch.no_grad():
        bad.conv1.weight.copy_(model.conv1.weight[p])
        bad.conv1.bias.copy_(model.conv1.bias[p])
        bad.gconv2.weight.copy_(model.gconv2.weight)  # cannot follow across groups
    assert out_changes(model, bad, inputs)


def test_depthwise_conv_shares_the_expand_group() -> None:
    model, inputs, spec = spec_of("mobilenetv2")
    dw = [n for n, m in model.named_modules()
          if isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.groups > 1]
    assert dw
    for n in dw:
        assert groups_of(spec, f"{n}.weight", 0), f"{n} output is fixed"
        assert groups_of(spec, f"{n}.weight", 1) == []  # in/groups == 1: nothing to permute


def test_batchnorm_params_and_running_stats_follow_the_conv() -> None:
    _, _, spec = spec_of("vgg_bn")
    g = groups_of(spec, "features.0.weight")
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        assert groups_of(spec, f"features.1.{suffix}") == g
    assert ("features.1.num_batches_tracked", 0) not in spec.axes


def test_layernorm_channels_last_after_permute() -> None:
    model, inputs, spec = spec_of("convnext")
    lns = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    covered = [n for n in lns if groups_of(spec, f"{n}.weight")]
    assert covered == lns
    fxfuse.verify(model, spec, inputs)


def test_groupnorm_groups_are_kept_together() -> None:
    model, inputs, spec = spec_of("groupnorm_net")
    layout = spec.axes[("gn1.weight", 0)].layout
    assert isinstance(layout, Prod)
    outer, inner = (spec.group(t.group) for t in layout.parts)
    assert (outer.size, inner.size) == (model.gn1.num_groups, 16 // model.gn1.num_groups)
    fxfuse.verify(model, spec, inputs)


def test_rmsnorm_weight_is_permuted() -> None:
    model, inputs, spec = spec_of("rmsnorm_mlp")
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.RMSNorm)]
    assert norms and all(groups_of(spec, f"{n}.weight") for n in norms)
    fxfuse.verify(model, spec, inputs)


# -- elementwise, residual, gates --------------------------------------------------------------
def test_residual_stream_is_one_group() -> None:
    _, _, spec = spec_of("resnet20")
    stream = {groups_of(spec, f"layer1.{i}.conv2.weight")[0] for i in range(3)}
    assert stream == {groups_of(spec, "conv1.weight")[0]}


def test_broadcast_parameters_join_channels() -> None:
    model, inputs, spec = spec_of("broadcast_net")
    per_channel = [(k, v) for k, v in model.state_dict().items()
                   if v.dim() >= 1 and v.shape[0] == 1 and v.dim() == 4]
    for k, _ in per_channel:
        assert groups_of(spec, k, 1), f"{k} not permuted"
    fxfuse.verify(model, spec, inputs)


def test_squeeze_excitation_gate_shares_the_gated_group() -> None:
    _, _, spec = spec_of("se_net")
    assert groups_of(spec, "se.fc2.weight", 0) == groups_of(spec, "features.3.weight", 0)


def test_swiglu_gate_and_up_share_a_group() -> None:
    _, _, spec = spec_of("swiglu_mlp")
    assert groups_of(spec, "block1.gate.weight") == groups_of(spec, "block1.up.weight")
    assert groups_of(spec, "block1.down.weight", 1) == groups_of(spec, "block1.gate.weight")


def test_glu_halves_share_one_permutation() -> None:
    _, _, spec = spec_of("glu_mlp")
    layout = spec.axes[("fc1.weight", 0)].layout
    assert isinstance(layout, Sum) and layout.parts[0] == layout.parts[1]


# -- concat, split, reshape, transpose, shuffle ------------------------------------------------
def test_concat_gives_block_structure() -> None:
    _, _, spec = spec_of("concat_split_net")
    layout = spec.axes[("fc.weight", 1)].layout
    assert layout == Sum((Unit("conv_q1"), Unit("conv_q2")))


def test_densenet_concat_layers_read_sums() -> None:
    model, inputs, spec = spec_of("densenet")
    sums = [a for a in spec.axes.values() if isinstance(a.layout, Sum)]
    assert len(sums) >= 3
    fxfuse.verify(model, spec, inputs)


def test_flatten_acts_blockwise_on_the_next_linear() -> None:
    _, _, spec = spec_of("flatten_net")
    for key, conv in (("fc_view.weight", "conv1"), ("fc_flat.weight", "conv2")):
        layout = spec.axes[(key, 1)].layout
        assert isinstance(layout, Prod) and layout.parts[0] == Unit(conv)
        spatial = layout.parts[1]
        assert isinstance(spatial, Fixed) and spatial.n > 1  # the spatial positions


def test_vgg_conv_flatten_linear() -> None:
    model, inputs, spec = spec_of("vgg")
    linear = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    assert isinstance(spec.axes[(f"{linear}.weight", 1)].layout, Prod)
    fxfuse.verify(model, spec, inputs)


def test_transpose_carries_the_group_to_conv1d() -> None:
    _, _, spec = spec_of("transpose_net")
    assert groups_of(spec, "fc1.weight") == groups_of(spec, "conv.weight", 1)


def test_channel_shuffle_reorders_kronecker_factors() -> None:
    model, inputs, spec = spec_of("channel_shuffle_net")
    produce = spec.axes[("conv1.weight", 0)].layout
    consume = spec.axes[("conv2.weight", 1)].layout
    assert isinstance(produce, Prod) and isinstance(consume, Prod)
    assert list(produce.parts) == list(consume.parts)[::-1]
    fxfuse.verify(model, spec, inputs)


def test_shufflenet_split_and_shuffle() -> None:
    model, inputs, spec = spec_of("shufflenet")
    assert any(isinstance(a.layout, Sum) for a in spec.axes.values())
    assert any(isinstance(a.layout, Interleave) for a in spec.axes.values())
    fxfuse.verify(model, spec, inputs)


class _CatShuffle(nn.Module):
    """Two convs concatenated, shuffled as libraries write it, read by a 1x1 conv."""

    def __init__(self, width: int = 4, groups: int = 2) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, width, 1), nn.Conv2d(3, width, 1)
        self.c = nn.Conv2d(2 * width, 5, 1)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat((self.a(x), self.b(x)), 1)
        n, c, h, w = y.size()
        g = self.groups
        y = torch.transpose(y.view(n, g, c // g, h, w), 1, 2).contiguous().view(n, -1, h, w)
        return self.c(y)


def test_a_shuffle_into_many_small_blocks_keeps_the_kronecker_reading() -> None:
    """cat(a, b) (6 + 6) shuffled into 6 blocks of 2: the interleave would keep 2^6
    permutations, the Kronecker reading (3! * 3! * 2, pairs permuted in each half) more."""
    model, x = randomize_constants(_CatShuffle(width=6, groups=6), seed=0), torch.randn(2, 3, 4, 4)
    spec = fxfuse.find_groups(model, x)
    layout = spec.axes[("c.weight", 1)].layout
    assert isinstance(layout, Prod), layout
    fxfuse.verify(model, spec, x)


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_shuffle_of_a_concatenation_interleaves_independent_blocks(tracer: str) -> None:
    """Each half of cat(a, b) keeps its own permutation through the shuffle (the Kronecker
    reading of view / transpose / view would tie them into one)."""
    model, x = randomize_constants(_CatShuffle(), seed=0), torch.randn(2, 3, 4, 4)
    spec = fxfuse.find_groups(model, x, tracer=tracer)
    assert spec.axes[("c.weight", 1)].layout == Interleave((Unit("a"), Unit("b")))
    assert spec.groups_of("a.weight", 0) == ["a"] and spec.groups_of("b.weight", 0) == ["b"]
    fxfuse.verify(model, spec, x)
    state = model.state_dict()  # a's rows alone permuted, c's even columns with them: same function
    p = torch.tensor([2, 0, 3, 1])
    moved = copy.deepcopy(model)
    cols = torch.arange(8)
    cols[0::2] = cols[0::2][p]
    moved.load_state_dict({**state, "a.weight": state["a.weight"][p], "a.bias": state["a.bias"][p],
                           "c.weight": state["c.weight"][:, cols]})
    assert not out_changes(model, moved, (x,))


class _CatShuffleGroupNorm(nn.Module):
    """cat(a, b) (8 + 8) shuffled into 2 blocks, then GroupNorm(2, 16) or a conv of 2 groups."""

    def __init__(self, after: str) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.after = nn.GroupNorm(2, 16) if after == "groupnorm" else nn.Conv2d(16, 6, 1, groups=2)
        self.c = nn.Conv2d(16 if after == "groupnorm" else 6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat((self.a(x), self.b(x)), 1)
        n, c, h, w = y.size()
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, -1, h, w)
        return self.c(self.after(y)).mean((2, 3))


@pytest.mark.parametrize("after", ["groupnorm", "grouped_conv"])
def test_groups_after_a_shuffle_keep_the_shuffled_blocks_apart(after: str) -> None:
    """``I_2(a, b) = G ⊗ W`` (``|G| = 2`` normalisation or conv groups, ``|W| = 8``): ``W`` need
    only keep each position's parity, ``W = I_2(w_0, w_1)``, so ``a = G ⊗ w_0`` and
    ``b = G ⊗ w_1`` are permuted independently (not one ``G ⊗ W_1`` for both)."""
    model, x = randomize_constants(_CatShuffleGroupNorm(after), seed=0), torch.randn(2, 3, 4, 4)
    spec = fxfuse.find_groups(model, x)
    ga, gb = groups_of(spec, "a.weight"), groups_of(spec, "b.weight")
    assert len(ga) == len(gb) == 2 and ga[0] == gb[0] and ga[1] != gb[1], (ga, gb)
    fxfuse.verify(model, spec, x)
    # a's and b's rows permuted differently within each group (and the shuffled axis with them)
    w0, w1 = torch.tensor([1, 3, 0, 2]), torch.tensor([2, 0, 3, 1])
    rows_a, rows_b = torch.cat([w0, w0 + 4]), torch.cat([w1, w1 + 4])
    w = torch.stack([w0 * 2, w1 * 2 + 1], 1).reshape(-1)
    cols = torch.cat([w, w + 8])  # the shuffled axis: group g, position u*2 + j
    state, moved = model.state_dict(), copy.deepcopy(model)
    new = {**state, "a.weight": state["a.weight"][rows_a], "a.bias": state["a.bias"][rows_a],
           "b.weight": state["b.weight"][rows_b], "b.bias": state["b.bias"][rows_b]}
    if after == "groupnorm":
        new.update({"after.weight": state["after.weight"][cols],
                    "after.bias": state["after.bias"][cols], "c.weight": state["c.weight"][:, cols]})
    else:
        new["after.weight"] = state["after.weight"][:, w]
    moved.load_state_dict(new)
    assert not out_changes(model, moved, (x,))


class _ShuffleSliced(nn.Module):
    """cat(a, b) (3 + 3) shuffled, then sliced at ``cut`` and read by two convs."""

    def __init__(self, cut: int) -> None:
        super().__init__()
        self.cut = cut
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.c1, self.c2 = nn.Conv2d(cut, 4, 1), nn.Conv2d(6 - cut, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat((self.a(x), self.b(x)), 1)
        n, c, h, w = y.size()
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, -1, h, w)
        return (self.c1(y[:, :self.cut]) + self.c2(y[:, self.cut:])).mean((2, 3))


@pytest.mark.parametrize("cut", [1, 5])
def test_a_slice_inside_a_shuffled_row_says_why_on_every_axis_it_fixes(cut: int) -> None:
    """A cut in the first or the last row of interleave(a, b) fixes that row's positions: the
    reason is on both blocks' axes and on the axis of the conv that reads the bigger slice."""
    model, x = randomize_constants(_ShuffleSliced(cut), seed=0), torch.randn(2, 3, 4, 4)
    spec = fxfuse.find_groups(model, x)
    reader = ("c2.weight", 1) if cut == 1 else ("c1.weight", 1)
    for key in (("a.weight", 0), ("b.weight", 0), reader):
        assert spec.groups_of(*key), key  # partly permuted
        assert any("interleaved axis" in w for w in spec.axes[key].fixed_because), key
    fxfuse.verify(model, spec, x)


# -- weight tying ------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_neural_ode_block_iterated_k_times_has_one_set_of_groups(steps: int) -> None:
    model, inputs, spec = spec_of("node_net", steps=steps)
    assert len(spec.groups) == 2
    assert groups_of(spec, "f.conv2.weight") == groups_of(spec, "stem.0.weight")
    fxfuse.verify(model, spec, inputs)


def test_tied_block_called_three_times() -> None:
    _, _, spec = spec_of("tied_block_net")
    g = groups_of(spec, "block.0.weight", 0)
    assert g and groups_of(spec, "block.0.weight", 1) == g


class TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(ids))))


def test_tied_embedding_keys_are_both_members() -> None:
    model = TiedEmbedding()
    ids = torch.randint(0, 20, (2, 5))
    spec = fxfuse.find_groups(model, ids)
    g = groups_of(spec, "embed.weight", 1)
    assert g and groups_of(spec, "head.weight", 1) == g
    assert groups_of(spec, "embed.weight", 0) == []  # rows are addressed by token ids
    fxfuse.verify(model, spec, ids)


# -- boundaries, unknown ops, strict mode, user rules --------------------------------------------
def test_inputs_and_outputs_are_never_permuted() -> None:
    _, _, spec = spec_of("resnet20")
    assert spec.groups_of("conv1.weight", 1) == []
    assert spec.axes[("conv1.weight", 1)].fixed_because[0].startswith("input:")
    assert spec.axes[("fc.weight", 0)].fixed_because[0].startswith("output:")


class WithUnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.cummax(h, dim=-1).values  # no axis rule: must cut, not guess
        return self.c(torch.relu(self.b(h)))


def test_unknown_op_cuts_groups_and_records_why() -> None:
    model = WithUnknownOp()
    x = torch.randn(3, 8)
    spec = fxfuse.find_groups(model, x)
    assert groups_of(spec, "a.weight") == [] and groups_of(spec, "b.weight", 1) == []
    assert groups_of(spec, "b.weight") != []  # after the cut, groups resume
    cut = spec.cuts[0]
    assert "cummax" in cut.op and cut.node.startswith("cummax")
    assert cut.source and "test_discovery.py" in cut.source and "cummax" in cut.source
    assert "no-rule" in spec.axes[("a.weight", 0)].fixed_because[0]
    assert "cuts (ops with no axis rule" in str(spec)
    fxfuse.verify(model, spec, x)


def test_strict_mode_raises_a_typed_error_with_recipe() -> None:
    with pytest.raises(fxfuse.UnsupportedOpError) as info:
        fxfuse.find_groups(WithUnknownOp(), torch.randn(3, 8), strict=True)
    msg = str(info.value)
    assert "cummax" in msg and "test_discovery.py" in msg and "fxfuse.axis_rule" in msg


class ChannelScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # Python control flow: symbolic_trace needs it as a leaf
            raise ValueError
        return x * self.weight


class WithUserModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.s = ChannelScale(16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.s(self.a(x))))


def test_user_registered_rule_for_own_module() -> None:
    model = WithUserModule()
    x = torch.randn(3, 8)
    with pytest.raises(fxfuse.UnsupportedOpError):  # Python control flow: opaque, no rule
        fxfuse.find_groups(model, x, strict=True, tracer="symbolic")
    probed = fxfuse.find_groups(model, x, tracer="symbolic")  # kept opaque, and probed
    assert [p.node for p in probed.probed] == ["s"] and not probed.cuts
    assert groups_of(probed, "s.weight") == groups_of(probed, "a.weight") != []

    @fxfuse.axis_rule(ChannelScale)
    def channel_scale_rule(op):  # type: ignore[no-untyped-def]
        x, y, w = op.args[0], op.out, op.param("weight")
        return [Same(x[0], y[0]), Same(x[1], y[1]), Same(w[0], y[1])]

    try:
        spec = fxfuse.find_groups(model, x, strict=True)
        assert groups_of(spec, "s.weight") == groups_of(spec, "a.weight") != []
        assert not spec.probed  # the rule, not a measurement
        fxfuse.verify(model, spec, x)
    finally:
        from fxfuse.rules import registry

        registry._RULES.pop(ChannelScale)


# -- permute / verify / spec ---------------------------------------------------------------------
def test_permute_returns_a_new_model_and_leaves_the_input_untouched() -> None:
    model, inputs, spec = spec_of("vgg_bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permuted = fxfuse.permute(model, spec, spec.random_perms(seed=3))
    assert type(permuted) is type(model) and permuted is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in permuted.state_dict().items())
    fresh = models.get("vgg_bn").factory()
    fresh.load_state_dict(permuted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(*inputs), model.eval()(*inputs), rtol=1e-4,
                                   atol=1e-5)


def test_random_perms_are_never_identity() -> None:
    _, _, spec = spec_of("grouped_conv")
    for seed in range(5):
        for name, p in spec.random_perms(seed).items():
            assert not torch.equal(p, torch.arange(len(p))), name


def test_bad_permutations_are_refused() -> None:
    model, _, spec = spec_of("mlp")
    g = spec.groups[0]
    with pytest.raises(fxfuse.PermutationError):
        fxfuse.permute(model, spec, {g.name: torch.zeros(g.size, dtype=torch.long)})
    with pytest.raises(fxfuse.PermutationError):
        fxfuse.permute(model, spec, {"nope": torch.arange(3)})


def test_spec_of_another_model_is_refused() -> None:
    _, _, spec = spec_of("mlp")
    other = models.get("vgg").factory()
    with pytest.raises(fxfuse.SpecError):
        fxfuse.permute(other, spec, spec.random_perms())


def test_verify_detects_a_wrong_spec_and_names_the_group() -> None:
    model, inputs, spec = spec_of("mlp")
    data = json.loads(spec.to_json())
    victim = data["groups"][0]
    dropped = victim["members"].pop()  # forget that the next layer reads this group
    data["axes"] = [a for a in data["axes"] if [a["key"], a["axis"]] != dropped]
    broken = fxfuse.PermutationSpec.from_json(json.dumps(data))
    with pytest.raises(fxfuse.VerificationError) as info:
        fxfuse.verify(model, broken, inputs)
    assert victim["name"] in str(info.value)


def test_find_groups_does_not_modify_the_model() -> None:
    model = randomize_constants(models.get("resnet20").factory(), seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxfuse.find_groups(model, models.get("resnet20").example_inputs())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_malformed_json_is_a_spec_error() -> None:
    with pytest.raises(fxfuse.SpecError):
        fxfuse.PermutationSpec.from_json('{"format": "fxfuse.PermutationSpec", "version": 1}')
    with pytest.raises(fxfuse.SpecError):
        fxfuse.PermutationSpec.from_json('{"format": "other"}')


def test_bad_example_inputs_are_input_errors() -> None:
    model = models.get("mlp").factory()
    with pytest.raises(fxfuse.InputError):
        fxfuse.find_groups(model, torch.randn(2, 3, 5, 5))
    with pytest.raises(fxfuse.InputError):
        fxfuse.find_groups(model, "not a tensor")


def test_group_graph_links_groups_to_layers() -> None:
    _, _, spec = spec_of("resnet20")
    graph = spec.to_graph()
    kinds = {d["kind"] for _, d in graph.nodes(data=True)}
    assert kinds == {"group", "layer"}
    stem = f"group:{groups_of(spec, 'conv1.weight')[0]}"
    assert "layer:layer1.0.conv2" in graph[stem]


def test_public_api_is_pinned() -> None:
    assert sorted(fxfuse.__all__) == sorted([
        "ActivationMatching", "ArchitectureMismatchError", "AxisSpec", "ExportError", "ExportReport",
        "FusionReport", "FxFuseError", "Group", "InputError", "Member", "Pass", "PermutationError",
        "PermutationSpec", "Pipeline", "PipelineError", "Repair", "ResetBatchNorm", "SpecError",
        "TraceError", "UnsupportedOpError", "VerificationError", "VerifyResult", "WeightMatching",
        "axis_rule", "export", "find_groups", "fuse", "permute", "verify",
        "RouteReport", "Router", "adaptive_selection",
        "GroupMap", "align_states", "apply_fusion", "apply_maps", "load_fusion", "merge_states", "neuron_disturbance",
        "repair_states",
        "recipe_from_json", "recipe_to_json", "register_method", "save_fusion",
        "WeightScopeRegularizer", "weight_scopes",
        "OptimalTransport", "NeuronInterpolation", "neuron_interpolation", "GraphMatching",
        "DepthAlignment", "align_depth", "DepthError", "NoExactIdentityError",
    ])


def test_explain_names_the_rules_that_joined_a_group() -> None:
    _, _, spec = spec_of("resnet20")
    name = groups_of(spec, "layer1.0.conv1.weight")[0]
    text = spec.explain(name)
    assert "layer1.0.norm1.running_var:0" in text
    assert "layer1_0_norm1 (BatchNorm2d)" in text and "layer1_0_conv2 (Conv2d)" in text


# -- issue 15: einsum, sliced fused projections, class-token indexing ------------------------------
class EinsumSlicedAttention(nn.Module):
    """Attention written as libraries write it: a fused qkv projection split by slicing, einsum
    for scores and values, the class token taken by ``x[:, 0]`` for the head."""

    def __init__(self, c: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.c, self.heads = c, heads
        self.embed = nn.Linear(6, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, t, c = h.shape
        qkv = self.qkv(h)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads) for z in (q, k, v))
        a = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        h = h + self.proj(torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, c))
        return self.head(h[:, 0])


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_einsum_attention_with_sliced_qkv_and_class_token(tracer: str) -> None:
    model = randomize_constants(EinsumSlicedAttention(), seed=1)
    x = torch.randn(2, 5, 6)
    spec = fxfuse.find_groups(model, x, tracer=tracer)
    assert not spec.cuts and not spec.probed
    rows = spec.axes[("qkv.weight", 0)].layout  # q + k + v blocks, each heads x head_dim
    assert isinstance(rows, Sum) and len(rows.parts) == 3, rows
    q, k, v = rows.parts
    assert q == k and q != v  # q and k are contracted together; v has its own head_dim
    assert spec.groups_of("embed.weight", 0) == spec.groups_of("head.weight", 1) != []
    assert spec.groups_of("proj.weight", 1) == spec.axes[("qkv.weight", 0)].groups[-2:]
    fxfuse.verify(model, spec, x)


class _PoolToOne(nn.Module):
    """A linear layer's 9 features seen as a 3x3 map, pooled to 1x1 (found in review: every
    pool to size 1 was taken for a global one)."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.fc, self.pool, self.out = nn.Linear(4, 9), pool, nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(self.fc(x).view(-1, 1, 3, 3)).flatten(1))


@pytest.mark.parametrize("pool, global_", [
    (nn.AvgPool2d(2), False), (nn.MaxPool2d(2), False), (nn.MaxPool2d(2, dilation=2), False),
    (nn.Upsample(size=1), False), (nn.AvgPool2d(3), True), (nn.MaxPool2d(3), True),
    (nn.LPPool2d(2, 3), True), (nn.AdaptiveAvgPool2d(1), True), (nn.AdaptiveMaxPool2d(1), True),
])
def test_a_pool_to_size_one_frees_spatial_order_only_when_it_reads_every_position(
        pool: nn.Module, global_: bool) -> None:
    model, x = _PoolToOne(pool).eval(), torch.randn(5, 4)
    spec = fxfuse.find_groups(model, x)
    assert bool(spec.groups_of("fc.weight", 0)) is global_
    fxfuse.verify(model, spec, x)


def _densenet_spec_json() -> dict[str, Any]:
    entry = models.get("densenet")
    return json.loads(fxfuse.find_groups(entry.factory(), entry.example_inputs()).to_json())


def _first_sum_axis(data: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in data["axes"] if a["layout"][0] == "sum")


def _wrong_size(data: dict[str, Any]) -> str:
    _first_sum_axis(data)["size"] += 1
    return "does not have size"


def _unknown_group_in_a_sum(data: dict[str, Any]) -> str:
    _first_sum_axis(data)["layout"][1][1] = ["g", "nowhere"]
    return "unknown group 'nowhere'"


def _member_not_in_its_axis(data: dict[str, Any]) -> str:
    axis = _first_sum_axis(data)
    used = {g for _, g in axis["layout"][1]}
    other = next(g for g in data["groups"] if g["name"] not in used)
    other["members"].append([axis["key"], axis["axis"]])
    return f"group '{other['name']}' lists {axis['key']}:{axis['axis']}"


def _group_without_members(data: dict[str, Any]) -> str:
    data["groups"].append({"name": "lonely", "size": 3, "members": []})
    return "group 'lonely' has no members"


@pytest.mark.parametrize("edit", [_wrong_size, _unknown_group_in_a_sum, _member_not_in_its_axis,
                                  _group_without_members], ids=lambda f: f.__name__.strip("_"))
def test_lint_refuses_each_broken_invariant(edit: Callable[[dict[str, Any]], str]) -> None:
    data = _densenet_spec_json()
    fxfuse.PermutationSpec.from_json(json.dumps(data))  # the spec as found lints
    message = edit(data)
    with pytest.raises(fxfuse.SpecError, match=re.escape(message)):
        fxfuse.PermutationSpec.from_json(json.dumps(data))


def test_lint_reads_members_of_other_integer_types() -> None:
    """A hand-built member ``(key, numpy integer)`` names the same axis as ``(key, int)``."""
    import dataclasses

    import numpy as np

    spec = fxfuse.PermutationSpec.from_json(json.dumps(_densenet_spec_json()))
    groups = [dataclasses.replace(g, members=[Member(m.key, np.int64(m.axis), m.layout)
                                              for m in g.members]) for g in spec.groups]
    dataclasses.replace(spec, groups=groups).lint()
    first = groups[0]
    key, axis = next(ka for ka, a in spec.axes.items() if first.name not in a.groups)
    wrong = dataclasses.replace(first, members=[*first.members,
                                                Member(key, np.int64(axis), Fixed(1))])
    with pytest.raises(fxfuse.SpecError, match=re.escape(f"lists {key}:{axis}[1] but that axis")):
        dataclasses.replace(spec, groups=[wrong, *groups[1:]]).lint()
