"""The level finder (fxfuse.levels): levels read off the traced graph and the spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
import models
from fxfuse.levels import find_levels, graph_module_of, level_module
from fxfuse.testing import randomize_constants


def _run_levels(model: nn.Module, x: tuple, spec: fxfuse.PermutationSpec) -> torch.Tensor:
    """The model's output computed level by level, each level's module fed earlier outputs."""
    gm, lifted = graph_module_of(model, spec, x)
    levels = find_levels(model, x, spec=spec, graph=(gm, lifted))
    values = {n.name: v for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"), x)}
    with torch.no_grad():
        for lv in levels:
            values[lv.output] = level_module(gm, lv)(*(values[i] for i in lv.inputs))
    return values[levels[-1].output]


def test_mlp_levels_are_its_layers_with_pre_activation_targets() -> None:
    model = models.get("mlp").factory()
    x = models.get("mlp").example_inputs()
    levels = find_levels(model, x)
    assert [(lv.group, lv.output, lv.activation) for lv in levels] == [
        ("features.0", "features_0", "ReLU"), ("features.2", "features_2", "ReLU"),
        (None, "head", None)]
    assert levels[1].inputs == ("features_0",)  # the ReLU is the next level's first node
    assert levels[1].nodes == ("features_1", "features_2")
    assert levels[1].input_groups == ("features.0",)
    assert set(levels[0].params) == {"features.0.weight", "features.0.bias"}
    assert levels[-1].is_last and levels[-1].axis == -1


def test_batchnorm_stays_in_its_producers_level() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    levels = find_levels(model, torch.randn(4, 5))
    assert (levels[0].producer, levels[0].output, levels[0].activation) == ("_0", "_1", "ReLU")
    assert {"1.weight", "1.running_mean"} <= set(levels[0].params)


def test_residual_stream_is_clustered_once_and_every_write_uses_its_basis() -> None:
    entry = models.get("resnet20")
    levels = find_levels(entry.factory(), entry.example_inputs())
    stream = [lv for lv in levels if lv.group == "conv1"]
    assert len(stream) == 4  # the stem and the three blocks of stage 1
    assert stream[0].basis is None and all(lv.basis == stream[0].index for lv in stream[1:])
    # a block's second conv is fitted before the residual add: its output is its BatchNorm
    assert stream[1].producer == "layer1_0_conv2" and stream[1].output == "layer1_0_norm2"
    assert stream[1].activation is None


def test_an_attention_leaf_writing_the_stream_is_a_level() -> None:
    entry = models.get("vit_tiny")
    levels = find_levels(entry.factory(), entry.example_inputs())
    attn = [lv for lv in levels if any("attn" in n for n in lv.nodes) and lv.output.startswith(
        "getitem")]
    assert attn and all(lv.basis is not None for lv in attn)
    assert "blocks.0.attn.in_proj_weight" in attn[0].params


@pytest.mark.parametrize("name", models.names())
def test_levels_on_every_zoo_model_recompute_its_output(name: str) -> None:
    entry = models.get(name)
    model = randomize_constants(entry.factory(), seed=1)
    x = entry.example_inputs()
    spec = fxfuse.find_groups(model, x)
    levels = find_levels(model, x, spec=spec)
    assert levels[-1].is_last and all(not lv.is_last for lv in levels[:-1])
    outputs = [lv.output for lv in levels]
    for lv in levels:  # reads only earlier levels' outputs (or graph inputs)
        assert all(i not in outputs or outputs.index(i) < lv.index for i in lv.inputs)
        assert lv.basis is None or (levels[lv.basis].group == lv.group and lv.basis < lv.index)
    owned = [k for lv in levels for k in lv.params]
    assert len(owned) == len(set(owned))
    if spec.tracer != "torch.fx.symbolic_trace":
        return  # an exported graph's levels are found, not run (parameters lifted to inputs)
    with torch.no_grad():
        want = model(*x)
    want = want if isinstance(want, torch.Tensor) else next(
        v for v in torch.utils._pytree.tree_flatten(want)[0] if isinstance(v, torch.Tensor))
    got = _run_levels(model, x, spec)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_level_module_trains_the_models_own_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    spec = fxfuse.find_groups(model, x)
    gm, _ = graph_module_of(model, spec)
    sub = level_module(gm, find_levels(model, x, spec=spec)[0])
    assert sub.get_submodule("0").weight is model[0].weight
