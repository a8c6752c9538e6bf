"""Models of different widths: structural pairing, target and anchor, optimal transport, exact
re-expression, repair across widths, and the typed errors (issue: different widths + OT)."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import fxfuse
import models
from fxfuse.align.ot import squared_distances, unit_features
from fxfuse.maps import GroupMap
from fxfuse.pairing import pair_specs, structure_difference
from models.mlp import MLP

X = torch.randn(16, 784, generator=torch.Generator().manual_seed(0))
IMG = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))


class ConvBN(nn.Module):
    """conv-BN-ReLU x2 -> flatten (width x 4 x 4) -> linear: a plain CNN with BatchNorm."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(2 * width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def trained_stats(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with channel-distinct BatchNorm statistics and affines (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model.eval()


def mlp(hidden: tuple[int, ...], seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(784, hidden, 10).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- pairing --------------------------------------------------------------------------------------
def test_width_only_differences_pair() -> None:
    a = fxfuse.find_groups(mlp((64, 32), 0), X)
    b = fxfuse.find_groups(mlp((16, 48), 1), X)
    assert structure_difference(a, b) is None
    r1 = fxfuse.find_groups(models.zoo.resnet20(width=1), IMG)
    r2 = fxfuse.find_groups(models.zoo.resnet20(width=2), IMG)
    assert structure_difference(r1, r2) is None
    pair_specs(r2, [r1, r2])


def test_a_structural_difference_is_named() -> None:
    a = fxfuse.find_groups(MLP(784, (32, 32), 10), X)
    b = fxfuse.find_groups(MLP(100, (32, 32), 10), torch.randn(4, 100))
    why = structure_difference(a, b)
    assert why is not None and "features.0.weight:1" in why and "784 fixed positions against 100" in why
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="models\\[1\\].*features.0.weight"):
        pair_specs(a, [a, b])


def test_fuse_names_a_structural_difference_not_a_shape() -> None:
    a, b = MLP(784, (32, 32), 10).eval(), MLP(784, (32, 32), 12).eval()
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="head.weight:0.*10 fixed"):
        fxfuse.fuse([a, b], X, align=fxfuse.OptimalTransport(), progress=False)


@pytest.mark.parametrize("align", [fxfuse.WeightMatching(), fxfuse.ActivationMatching(data=[X]),
                                   None])
def test_permutation_methods_refuse_other_widths(align: object) -> None:
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="OptimalTransport"):
        fxfuse.fuse([mlp((32, 16), 0), mlp((16, 16), 1)], X, align=align, progress=False)


# -- OT ---------------------------------------------------------------------------------------------
def test_exact_ot_at_equal_widths_is_the_assignment_solution() -> None:
    """reg=0, equal widths, uniform masses: every group's plan is the permutation the linear
    assignment of the same cost gives (checked group by group, in OT's order)."""
    a, b = mlp((24, 12), 0), mlp((24, 12), 1)
    report = fxfuse.FusionReport()
    fxfuse.fuse([a, b], X, align=fxfuse.OptimalTransport(), progress=False, report=report)
    assert report.maps is not None and report.spec is not None
    spec = report.spec
    solved_b: dict[str, GroupMap] = {}
    solved_a: dict[str, GroupMap] = {}
    for g in ["features.0", "features.2"]:
        cost = squared_distances(unit_features(spec, b.state_dict(), g, solved_b),
                                 unit_features(spec, a.state_dict(), g, solved_a))
        rows, cols = linear_sum_assignment(cost.numpy())
        lap = torch.as_tensor(rows)[torch.argsort(torch.as_tensor(cols))]  # fused i <- unit
        got = report.maps[1][g]
        assert got.is_permutation and torch.equal(got.index, lap), g
        solved_b[g], solved_a[g] = got, GroupMap(index=torch.arange(cost.shape[1]))
    assert all(m.is_permutation and torch.equal(m.index, torch.arange(m.index.numel()))
               for m in report.maps[0].values())


def test_ot_recovers_a_permuted_copy() -> None:
    a = trained_stats(models.zoo.resnet20(width=1), 3)
    spec = fxfuse.find_groups(a, IMG)
    b = fxfuse.permute(a, spec, spec.random_perms(seed=4))
    fused = fxfuse.fuse([a, b], IMG, align=fxfuse.OptimalTransport(), progress=False)
    with torch.no_grad():
        assert rel(fused(IMG), a(IMG)) < 1e-5


# -- exact re-expression ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp", "cnn-bn", "residual"])
def test_weights_0_1_re_expresses_the_narrow_model_exactly(case: str) -> None:
    """Target twice as wide: model 1's units are copied into whole fused units (outgoing weights
    split), so the fused model computes model 1's function."""
    if case == "mlp":
        wide, narrow, x = mlp((64, 32), 0), mlp((32, 16), 1), X
    elif case == "cnn-bn":
        torch.manual_seed(2)
        wide, narrow, x = trained_stats(ConvBN(8), 5), trained_stats(ConvBN(4), 6), IMG
    else:
        wide = trained_stats(models.zoo.resnet20(width=2), 7)
        narrow, x = trained_stats(models.zoo.resnet20(width=1, seed=3), 8), IMG
    before = copy.deepcopy(narrow.state_dict())
    report = fxfuse.FusionReport()
    fused = fxfuse.fuse([wide, narrow], x, align=fxfuse.OptimalTransport(), weights=[0, 1],
                        progress=False, report=report)
    assert type(fused) is type(wide) and fused is not wide
    assert {k: v.shape for k, v in fused.state_dict().items()} == {
        k: v.shape for k, v in wide.state_dict().items()}
    with torch.no_grad():
        assert rel(fused(x), narrow(x)) < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in narrow.state_dict().items())
    assert any("widths differ" in n for n in report.notes)


def test_three_models_of_three_widths_into_each_target() -> None:
    ms = [mlp((16, 8), 0), mlp((32, 16), 1), mlp((48, 24), 2)]
    for t in range(3):
        fused = fxfuse.fuse(ms, X, align=fxfuse.OptimalTransport(), target=t, progress=False)
        assert fused.features[0].weight.shape == ms[t].features[0].weight.shape
        assert fused.features[2].weight.shape == ms[t].features[2].weight.shape
        out = fused(X)
        assert out.shape == (16, 10) and bool(torch.isfinite(out).all())
    soft = fxfuse.fuse(ms, X, align=fxfuse.OptimalTransport(reg=0.05), target=1, progress=False)
    assert bool(torch.isfinite(soft(X)).all())
    act = fxfuse.fuse(ms, X, align=fxfuse.OptimalTransport(cost="activations"), data=[X],
                      target=2, progress=False)
    assert bool(torch.isfinite(act(X)).all())


def test_target_model_and_anchor() -> None:
    """A target of the user's own (new instance, untouched); an anchor other than model 0 is the
    basis: weights=[1, 0] then gives model 0 in model 1's basis, the same function."""
    a, b = mlp((32, 16), 0), mlp((32, 16), 1)
    target = mlp((32, 16), 9)
    before = copy.deepcopy(target.state_dict())
    fused = fxfuse.fuse([a, b], X, align=fxfuse.OptimalTransport(), target=target, anchor=1,
                        weights=[1, 0], progress=False)
    assert fused is not target and all(torch.equal(v, before[k])
                                       for k, v in target.state_dict().items())
    with torch.no_grad():
        assert rel(fused(X), a(X)) < 1e-5
        assert not torch.equal(fused.features[0].weight, a.features[0].weight)


def test_repair_across_widths() -> None:
    """REPAIR's targets for the fused units are the endpoints' statistics mapped through M: on
    the re-expression (weights=[0, 1]) the targets are model 1's own statistics, so repair keeps
    its function."""
    wide, narrow = mlp((64, 32), 0), mlp((32, 16), 1)
    fused = fxfuse.fuse([wide, narrow], X, align=fxfuse.OptimalTransport(), weights=[0, 1],
                        repair=fxfuse.Repair(), data=[X], progress=False)
    with torch.no_grad():
        assert rel(fused(X), narrow(X)) < 1e-4
    a = trained_stats(models.zoo.resnet20(width=2), 1)
    b = trained_stats(models.zoo.resnet20(width=1, seed=2), 2)
    for repair in (fxfuse.Repair(), fxfuse.ResetBatchNorm()):
        out = fxfuse.fuse([a, b], IMG, align=fxfuse.OptimalTransport(), repair=repair,
                          data=[IMG], progress=False)(IMG)
        assert bool(torch.isfinite(out).all())


def test_the_functional_core_repairs_across_widths_as_fuse_does() -> None:
    """align_states / merge_states / repair_states on state dicts of two widths (one spec and
    one factory per state) give fuse's repaired model, for REPAIR and ResetBatchNorm."""
    from fxfuse.core import align_states, merge_states, repair_states

    a = trained_stats(ConvBN(8), 1)
    b = trained_stats(ConvBN(4), 2)
    states = [a.state_dict(), b.state_dict()]
    specs = [fxfuse.find_groups(m, IMG) for m in (a, b)]
    factories = [lambda: ConvBN(8), lambda: ConvBN(4)]
    ot = fxfuse.OptimalTransport()
    maps = align_states(specs, states, ot, anchor=1)
    merged = merge_states(specs, states, maps, [0.5, 0.5])
    for repair in (fxfuse.Repair(), fxfuse.ResetBatchNorm()):
        fused = fxfuse.fuse([a, b], IMG, align=ot, target=1, repair=repair, data=[IMG],
                            progress=False)
        repaired = repair_states(specs, states, maps, merged, repair, factories, data=[IMG])
        assert any(not torch.equal(repaired[k], merged[k]) for k in merged)  # it repaired
        for k, v in fused.state_dict().items():
            torch.testing.assert_close(repaired[k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(fxfuse.InputError, match="1 factories for 2 states"):
        repair_states(specs, states, maps, merged, fxfuse.Repair(), factories[:1], data=[IMG])
    with pytest.raises(fxfuse.InputError, match="0 specs for 2 states"):
        repair_states([], states, maps, merged, fxfuse.Repair(), factories, data=[IMG])
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="one factory per state"):
        repair_states(specs, states, maps, merged, fxfuse.Repair(), factories[0], data=[IMG])
    with pytest.raises(fxfuse.InputError, match="no state has the merged state's widths"):
        # both states wide, the merged state narrow: no factory builds the fused model
        repair_states([specs[0]] * 2, [states[0]] * 2, [maps[0]] * 2, merged, fxfuse.Repair(),
                      [factories[0]] * 2, data=[IMG])


# -- bad input --------------------------------------------------------------------------------------
def test_bad_target_anchor_and_importance() -> None:
    a, b = mlp((32, 16), 0), mlp((16, 8), 1)
    ot = fxfuse.OptimalTransport()
    with pytest.raises(fxfuse.InputError, match="target=2 is out of range"):
        fxfuse.fuse([a, b], X, align=ot, target=2, progress=False)
    with pytest.raises(fxfuse.InputError, match="anchor=5 is out of range"):
        fxfuse.fuse([a, b], X, align=ot, anchor=5, progress=False)
    with pytest.raises(fxfuse.InputError, match="does not have the target's widths"):
        fxfuse.fuse([a, b], X, align=ot, anchor=1, progress=False)
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="target is a VGG"):
        fxfuse.fuse([a, b], X, align=ot, target=models.zoo.vgg(), progress=False)
    with pytest.raises(fxfuse.InputError, match="no model has the target's widths"):
        fxfuse.fuse([a, b], X, align=ot, target=mlp((24, 8), 2), progress=False)
    wrong_len = fxfuse.OptimalTransport(importance=[{}, {"features.0": torch.ones(3)}])
    with pytest.raises(fxfuse.InputError, match="has 3 values but the group has 16"):
        fxfuse.fuse([a, b], X, align=wrong_len, progress=False)
    negative = fxfuse.OptimalTransport(importance=[{"features.0": -torch.ones(32)}, {}])
    with pytest.raises(fxfuse.InputError, match="positive"):
        fxfuse.fuse([a, b], X, align=negative, progress=False)
    with pytest.raises(fxfuse.InputError, match="one mapping per model"):
        fxfuse.fuse([a, b], X, align=fxfuse.OptimalTransport(importance=[{}]), progress=False)
    for bad in ({"cost": "euclid"}, {"reg": -1.0}):
        with pytest.raises(fxfuse.InputError, match="OptimalTransport"):
            fxfuse.OptimalTransport(**bad)  # type: ignore[arg-type]
    with pytest.raises(fxfuse.InputError, match="needs data"):
        fxfuse.fuse([a, b], X, align=fxfuse.OptimalTransport(cost="activations"), progress=False)


def test_importance_moves_mass() -> None:
    """Given masses are the plan's marginals: a unit with most of the mass is copied into more
    fused units."""
    wide, narrow = mlp((32, 16), 0), mlp((8, 16), 1)
    heavy = torch.ones(8)
    heavy[3] = 9.0
    imp = fxfuse.OptimalTransport(importance=[{}, {"features.0": heavy}])
    report = fxfuse.FusionReport()
    fxfuse.fuse([wide, narrow], X, align=imp, progress=False, report=report)
    assert report.maps is not None
    merge, _ = report.maps[1]["features.0"].dense()
    assert int((merge[:, 3] > 0).sum()) >= 12  # 9/16 of 32 fused units draw on unit 3


def test_weight_matching_into_an_anchor_other_than_model_0() -> None:
    """Permutation methods are found in model 0's basis and taken into the anchor's: with
    target=1 (anchor 1), weights=[0, 1] gives model 1 itself, not a permuted copy."""
    a, b = mlp((24, 12), 0), mlp((24, 12), 1)
    report = fxfuse.FusionReport()
    fused = fxfuse.fuse([a, b], X, target=1, weights=[0, 1], progress=False, report=report)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in fused.state_dict().items())
    assert report.perms is not None and all(
        torch.equal(p, torch.arange(p.numel())) for p in report.perms[1].values())
    assert any("anchor" in n for n in report.notes)


def test_functional_core_on_states_of_different_widths() -> None:
    """align_states / merge_states with one spec per state (a server holding state dicts):
    the same fused state as fxfuse.fuse."""
    wide, narrow = mlp((32, 16), 0), mlp((16, 8), 1)
    specs = [fxfuse.find_groups(m, X) for m in (wide, narrow)]
    states = [m.state_dict() for m in (wide, narrow)]
    maps = fxfuse.align_states(specs, states, fxfuse.OptimalTransport())
    merged = fxfuse.merge_states(specs, states, maps, [0.5, 0.5])
    want = fxfuse.fuse([wide, narrow], X, align=fxfuse.OptimalTransport(), progress=False)
    assert all(torch.equal(v, merged[k]) for k, v in want.state_dict().items())
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="OptimalTransport"):
        fxfuse.align_states(specs, states, fxfuse.WeightMatching())
    into_narrow = fxfuse.align_states(specs, states, fxfuse.OptimalTransport(), anchor=1)
    assert into_narrow[0]["features.0"].shape == (16, 32)


def test_a_spec_resized_to_a_state_of_other_widths() -> None:
    """A server with one factory reads a client's widths off its state: the resized spec is the
    spec discovery finds on a model at those widths, and OT fuses with it as with that one."""
    from fxfuse.pairing import resized

    for wide, narrow, x in ((mlp((32, 16), 0), mlp((16, 8), 1), X),
                            (models.zoo.resnet20(width=2), models.zoo.resnet20(width=1), IMG),
                            (ConvBN(8), ConvBN(4), IMG)):
        spec_w, spec_n = fxfuse.find_groups(wide, x), fxfuse.find_groups(narrow, x)
        got = resized(spec_w, narrow.state_dict())
        assert [(g.name, g.size) for g in got.groups] == [(g.name, g.size) for g in spec_n.groups]
        assert {k: (a.size, a.layout) for k, a in got.axes.items()} == {
            k: (a.size, a.layout) for k, a in spec_n.axes.items()}
        assert structure_difference(spec_w, got) is None
    bad = mlp((16, 8), 1).state_dict()
    bad["head.weight"] = torch.zeros(12, 8)
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="head.weight:0 has length 12"):
        resized(fxfuse.find_groups(mlp((32, 16), 0), X), bad, "client 3")


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_a_saved_fusion_of_other_widths_re_applies(tmp_path, suffix: str) -> None:
    """save_fusion(..., specs=report.specs) keeps every model's own spec: apply_fusion rebuilds
    the fused model from the same models (no search) at the target's widths, refuses them in
    another order, and writes nothing on bad input."""
    from fxfuse.core import apply_fusion, load_fusion, save_fusion
    from fxfuse.passes import FusionReport

    wide, narrow = mlp((48, 24), 0), mlp((32, 16), 1)
    report = FusionReport()
    fused = fxfuse.fuse([wide, narrow], X[:4], align=fxfuse.OptimalTransport(), target=1,
                        progress=False, report=report)
    assert report.specs is not None and report.maps is not None
    path = save_fusion(tmp_path / f"f{suffix}", report.spec, report.maps, specs=report.specs)  # type: ignore[arg-type]
    record = load_fusion(path)
    assert record.specs == report.specs and record.spec == report.spec
    for target in (None, 1, mlp((32, 16), 7)):  # default: the model at the fused widths
        again = apply_fusion([wide, narrow], record, target=target)
        assert isinstance(again, MLP) and again is not narrow
        for k, v in fused.state_dict().items():
            torch.testing.assert_close(again.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="models\\[0\\].*recorded fusion"):
        apply_fusion([narrow, wide], record)
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="fused widths"):
        apply_fusion([wide, narrow], record, target=0)
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="lacks"):
        apply_fusion([wide, narrow], record, target=nn.Sequential(nn.Linear(784, 32)))
    with pytest.raises(fxfuse.InputError, match="2 specs for 1"):
        save_fusion(tmp_path / "g.json", report.spec, report.maps[:1], specs=report.specs)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{suffix}"]
