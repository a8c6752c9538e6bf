"""Neuron-interpolation fusion (fxfuse.align.interp): self-fusion, a leaf level fitted by
gradient, different widths and 3 parents on a non-IID digits split, importance, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfuse
import fxfuse.testing
import models
from fxfuse.align.interp import (
    NeuronInterpolation,
    group_units,
    importance_scores,
    neuron_interpolation,
    ridge_solve,
)
from fxfuse.levels import find_levels, graph_module_of


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.BatchNorm1d(16),
                      nn.ReLU(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        bn = m[3]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return m


class _Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


def _permuted(model: nn.Module, x: torch.Tensor) -> nn.Module:
    spec = fxfuse.find_groups(model, x[:2])
    return fxfuse.permute(model, spec, spec.random_perms(3))


def _states(ms: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in ms]


@pytest.mark.parametrize("grouping", ["hungarian", "kmeans"])
@pytest.mark.parametrize("build,shape", [(_mlp, (200, 12)), (_Cnn, (40, 3, 8, 8))])
def test_two_permuted_copies_fuse_back_to_the_model(build, shape, grouping) -> None:
    model = build().eval()
    if isinstance(model, _Cnn):
        torch.manual_seed(1)
        with torch.no_grad():
            model.bn.running_mean.normal_()
            model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    other = _permuted(model, x)
    before = _states([model, other])
    fused, rep = neuron_interpolation(
        [model, other], model, [x[: len(x) // 2], x[len(x) // 2:]],
        NeuronInterpolation(grouping=grouping, ridge=1e-9))
    assert all(r.method == "least squares" for r in rep.levels)
    with torch.no_grad():  # exact on the fusion samples (least squares precision)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    fused_first = next(m for m in fused.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    # both groupings keep model 0's units in order: its first layer comes back as it was
    torch.testing.assert_close(fused_first.weight, first.weight, rtol=1e-5, atol=1e-5)
    for m, s in zip([model, other], before):  # nothing mutated
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())
    assert fused is not model and type(fused) is type(model)


def test_the_leaf_level_is_fitted_by_gradient_and_the_linear_variant_says_so() -> None:
    entry = models.get("leaf_mlp")
    parent = entry.factory()
    x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    other = _permuted(parent, x)
    target = models.zoo.leaf_mlp(seed=7)
    _, rep = neuron_interpolation([parent, other], target, [x],
                                  NeuronInterpolation(variant="linear", epochs=1))
    assert [r.method for r in rep.levels] == ["least squares", "gradient", "least squares"]
    assert "no linear form" in rep.levels[1].note and any("no linear form" in n for n in rep.notes)
    report = fxfuse.FusionReport()
    fused = fxfuse.fuse([parent, other], x[:2], align=NeuronInterpolation(
        variant="gradient", epochs=150, patience=30, lr=3e-3), target=target, data=[x],
        report=report, progress=False)
    # the mixer (no weight rule inside) learnt its level: far better than the target's own start
    sub_err = _mixer_error(fused, parent, x)
    start_err = _mixer_error(_first_level_from(fused, target), parent, x)
    assert sub_err < 0.2 * start_err, (sub_err, start_err)
    assert not torch.equal(fused.mixer.w_o, target.mixer.w_o)
    assert any("neuron-interpolation" in n for n in report.notes)


def _first_level_from(fused: nn.Module, target: nn.Module) -> nn.Module:
    """The fused model with the target's own mixer (the start of the mixer's training)."""
    out = copy.deepcopy(fused)
    out.mixer.load_state_dict(target.mixer.state_dict())
    return out


def _mixer_error(model: nn.Module, parent: nn.Module, x: torch.Tensor) -> float:
    """How far the model is from the parent's function after the mixer (a basis-free measure:
    the best linear read-out of the parent's mixer output from the model's)."""
    with torch.no_grad():
        a = model.mixer(model.relu1(model.fc1(model.flatten(x))))
        b = parent.mixer(parent.relu1(parent.fc1(parent.flatten(x))))
    w, bias = ridge_solve(a, b, 1e-6, True)
    assert bias is not None
    return float((a.double() @ w.T + bias - b.double()).square().mean() / b.double().var())


def test_three_parents_of_different_widths_beat_every_parent_on_non_iid_digits() -> None:
    from fxfuse.bench import Budget, ModelSpec, datasets, fusion_set, split, train_clients
    from fxfuse.bench.scoreboard import evaluate

    data = datasets.load("digits")
    s = split(data.train_y, 3, scheme="dirichlet-per-class", seed=0)
    widths = [(32,), (64,), (48,)]
    clients = train_clients(data.train_x, data.train_y, s, [
        ModelSpec("models.zoo:mlp_classifier", {"in_dim": 64, "widths": w}) for w in widths],
        Budget(epochs=60), seed=0, cache=False)
    parents = [c.model for c in clients]
    idx = torch.as_tensor(fusion_set(s, data.train_y, 400, seed=0))
    batches = [(data.train_x[idx], data.train_y[idx])]
    target = models.zoo.mlp_classifier(widths=(64,), in_dim=64, seed=11)
    best = max(evaluate(p, data.test_x, data.test_y)[0] for p in parents)
    for variant in ("linear", "gradient"):
        fused = fxfuse.fuse(parents, data.train_x[:2], align=NeuronInterpolation(
            variant=variant, epochs=30, last_epochs=30), target=target, data=batches,
            progress=False)
        acc = evaluate(fused, data.test_x, data.test_y)[0]
        assert acc > best + 0.02, (variant, acc, best)
        assert {k: v.shape for k, v in fused.state_dict().items()} == {
            k: v.shape for k, v in target.state_dict().items()}


def test_importance_by_attribution_sees_a_dead_unit() -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].weight[:, 3] = 0.0  # hidden unit 3 of the first level feeds nothing
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    spec = fxfuse.find_groups(model, x[:2])
    gm, _ = graph_module_of(model, spec)
    level = find_levels(model, x[:2], spec=spec, graph=(gm, {}))[0]
    sizes = {g.name: g.size for g in spec.groups}
    for method in ("conductance", "deeplift"):
        s = importance_scores(gm, level, sizes, x, None, method, steps=8)
        assert s.shape == (24,) and bool((s > 0).all())
        assert float(s[3]) < 1e-6 < float(s.median()), (method, s)
    assert torch.equal(importance_scores(gm, level, sizes, x, None, "uniform"), torch.ones(24))


def test_kmeans_grouping_weighs_units_by_their_mass() -> None:
    # two parents, one unit each near 0 and near 10; the heavy one pulls its cluster's centre
    a = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    b = torch.tensor([[0.2, 0.0], [10.0, 10.4]])
    assign = group_units([a, b], [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])], 2, "kmeans")
    assert assign[0][0] == assign[1][0] and assign[0][1] == assign[1][1]
    hung = group_units([a, b.flip(0)], [torch.ones(2), torch.ones(2)], 2, "hungarian")
    assert hung[1].tolist() == [1, 0]


def test_bad_input_is_a_typed_error_and_nothing_is_written() -> None:
    model = _mlp()
    x = torch.randn(40, 12)
    other = _permuted(model, x)
    before = _states([model, other])
    with pytest.raises(fxfuse.InputError, match="at least 10"):
        neuron_interpolation([model, other], model, [x[:5]])
    with pytest.raises(fxfuse.InputError, match="do not accept"):
        neuron_interpolation([model, other], model, [torch.randn(20, 7)])
    with pytest.raises(fxfuse.InputError, match="kmeans"):
        neuron_interpolation([model, other, model], model, [x],
                             NeuronInterpolation(grouping="hungarian"))
    with pytest.raises(fxfuse.InputError, match="fewer than the target's 24 units"):
        neuron_interpolation([model, other], model, [x[:12]])
    wide = nn.Sequential(nn.Linear(12, 80), nn.ReLU(), nn.Linear(80, 16), nn.BatchNorm1d(16),
                         nn.ReLU(), nn.Linear(16, 5)).eval()
    with pytest.raises(fxfuse.InputError, match="more groups than there are neurons"):
        neuron_interpolation([model, other], wide, [x])
    other_arch = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="can not be paired"):
        neuron_interpolation([model, other], other_arch, [x])
    with pytest.raises(fxfuse.InputError, match="variant"):
        NeuronInterpolation(variant="exact")
    with pytest.raises(fxfuse.InputError, match="class_shares"):
        neuron_interpolation([model, other], model, [x],
                             NeuronInterpolation(class_shares=((1.0, 0.0),)))
    for m, s in zip([model, other], before):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())


def test_registered_for_recipes_and_the_command_line() -> None:
    from fxfuse.methods import method_of

    assert method_of(NeuronInterpolation(), "align").name == "neuron-interpolation"
    recipe = fxfuse.recipe_to_json(align=NeuronInterpolation(variant="gradient"))
    assert fxfuse.recipe_from_json(recipe)["align"] == NeuronInterpolation(variant="gradient")


def test_a_pre_norm_residual_mlp_is_linear_at_every_level_and_fuses_back() -> None:
    # LayerNorm -> Linear levels lose the norm's affine into the least squares; the residual
    # stream is grouped once at the embedding and every block's write is fitted in its basis
    entry = models.get("layernorm_mlp")
    model = fxfuse.testing.randomize_constants(entry.factory(), seed=2)
    x = torch.randn(300, *entry.example_inputs()[0].shape[1:],
                    generator=torch.Generator().manual_seed(0))
    other = _permuted(model, x)
    fused, rep = neuron_interpolation([model, other], model, [x], NeuronInterpolation(ridge=1e-9))
    assert all(r.method == "least squares" for r in rep.levels)
    assert sum("grouped at level 0" in r.note for r in rep.levels) == 2
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
