"""fuse(): self-recovery on the zoo, N models, activation matching, repair, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfuse
import models
from fxfuse.fuse import fuse
from fxfuse.passes import (
    ActivationMatching,
    FusionReport,
    MergeWeights,
    Pass,
    Repair,
    ResetBatchNorm,
    WeightMatching,
)
from fxfuse.passes.repair import reset_batchnorm
from fxfuse.permute import apply_perms, rel_diff
from fxfuse.testing import randomize_constants


def outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def permuted_copies(name: str, n: int) -> tuple[nn.Module, tuple, list[nn.Module]]:
    entry = models.get(name)
    a = randomize_constants(entry.factory(), seed=3)
    inputs = entry.example_inputs()
    spec = fxfuse.find_groups(a, inputs)
    copies = [fxfuse.permute(a, spec, spec.random_perms(seed=10 + k)) for k in range(n - 1)]
    return a, inputs, copies


@pytest.mark.parametrize("name", models.names())
def test_self_recovery_with_weight_matching(name: str) -> None:
    a, inputs, (b,) = permuted_copies(name, 2)
    assert rel_diff(outputs(a, inputs), outputs(b, inputs)) < 1e-4  # b is a's function...
    sd_a = a.state_dict()
    assert any(not torch.equal(sd_a[k], v) for k, v in b.state_dict().items())  # ...not weights
    naive = fuse([a, b], inputs, align=None, progress=False)
    fused = fuse([a, b], inputs, align=WeightMatching(), progress=False)
    assert rel_diff(outputs(a, inputs), outputs(fused, inputs)) < 1e-5
    assert rel_diff(outputs(a, inputs), outputs(naive, inputs)) > 1e-3  # the test can fail


@pytest.mark.parametrize("name", models.names())
def test_self_recovery_three_copies(name: str) -> None:
    a, inputs, copies = permuted_copies(name, 3)
    fused = fuse([a, *copies], inputs, progress=False)
    assert rel_diff(outputs(a, inputs), outputs(fused, inputs)) < 1e-5


def test_report_holds_the_spec_and_each_models_permutations() -> None:
    """``report.perms[k]`` takes model k into model 0's basis: applied to a permuted copy it gives
    back model 0's weights exactly; model 0's is the identity; no alignment, no permutations."""
    a, inputs, copies = permuted_copies("resnet20", 3)
    report = FusionReport()
    fuse([a, *copies], inputs, progress=False, report=report)
    assert report.spec is not None and report.perms is not None and len(report.perms) == 3
    assert all(torch.equal(p, torch.arange(p.numel())) for p in report.perms[0].values())
    for model, perms in zip(copies, report.perms[1:]):
        back = fxfuse.permute(model, report.spec, perms).state_dict()
        assert all(torch.equal(v, back[k]) for k, v in a.state_dict().items())
    moved = sum(int((p != torch.arange(p.numel())).sum()) for p in report.perms[2].values())
    n = len(report.spec.groups)
    assert (f"alignment: model 2: {n} of {n} groups permuted, {moved} of "
            f"{sum(g.size for g in report.spec.groups)} units moved") in str(report)
    naive = FusionReport()
    fuse([a, *copies], inputs, align=None, progress=False, report=naive)
    assert naive.spec is not None and naive.perms is None
    assert "alignment:" not in str(naive)


def test_activation_matching_recovers_a_permuted_copy() -> None:
    a, inputs, (b,) = permuted_copies("vgg_bn", 2)
    data = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fused = fuse([a, b], inputs, align=ActivationMatching(data=data), progress=False)
    assert rel_diff(outputs(a, inputs), outputs(fused, inputs)) < 1e-5


def test_inputs_are_not_modified_and_result_is_the_users_class() -> None:
    a, inputs, (b,) = permuted_copies("vgg_bn", 2)
    a.train()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    fused = fuse([a, b], inputs, repair=ResetBatchNorm(data=[inputs[0]]), progress=False)
    assert type(fused) is type(a) and fused is not a
    assert a.training and not b.training
    for m, sd in zip((a, b), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    fresh = models.get("vgg_bn").factory()
    fresh.load_state_dict(fused.state_dict())


def test_weights_interpolate() -> None:
    a, inputs, (b,) = permuted_copies("mlp", 2)
    only_a = fuse([a, b], inputs, weights=[1.0, 0.0], align=None, progress=False)
    assert rel_diff(outputs(a, inputs), outputs(only_a, inputs)) < 1e-6
    with pytest.raises(fxfuse.InputError):
        fuse([a, b], inputs, weights=[1.0, -1.0], progress=False)


def test_report_times_every_pass_and_custom_pipeline() -> None:
    a, inputs, (b,) = permuted_copies("mlp", 2)
    report = FusionReport()
    fuse([a, b], inputs, report=report, progress=False)
    assert [n for n, _ in report.timings] == ["discover", "align-weights", "merge", "verify"]

    class Halve(Pass):
        name = "halve-head"

        def call(self, state) -> None:  # type: ignore[no-untyped-def]
            with torch.no_grad():
                state.fused.head.weight.mul_(0.5)

    from fxfuse.fuse import default_passes

    passes = [*default_passes(WeightMatching(), None)[:-1], Halve()]
    fused = fuse([a, b], inputs, passes=passes, progress=False)
    assert torch.allclose(fused.head.weight, a.head.weight * 0.5)


def test_a_failing_pass_is_named() -> None:
    a, inputs, (b,) = permuted_copies("mlp", 2)

    class Boom(Pass):
        name = "boom"

        def call(self, state) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("kaput")

    with pytest.raises(fxfuse.FxFuseError, match=r"\[boom\].*kaput"):
        fuse([a, b], inputs, passes=[MergeWeights(), Boom()], progress=False)


# -- bad input -----------------------------------------------------------------------------------
def test_fewer_than_two_models() -> None:
    a, inputs, _ = permuted_copies("mlp", 1)
    with pytest.raises(fxfuse.InputError, match="at least two"):
        fuse([a], inputs)


def test_different_architectures_name_the_parameter() -> None:
    a = models.get("resnet20").factory()
    b = models.zoo.resnet20(width=2)
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="conv1.weight"):
        fuse([a, b], models.get("resnet20").example_inputs())
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="ResNetCifar"):
        fuse([a, models.get("vgg").factory()], models.get("vgg").example_inputs())


def test_non_finite_weights_are_refused() -> None:
    a, inputs, (b,) = permuted_copies("mlp", 2)
    with torch.no_grad():
        b.head.bias[0] = float("nan")
    with pytest.raises(fxfuse.InputError, match="head.bias"):
        fuse([a, b], inputs)


def test_empty_data_is_a_clear_error() -> None:
    a, inputs, (b,) = permuted_copies("vgg_bn", 2)
    with pytest.raises(fxfuse.InputError, match="empty"):
        fuse([a, b], inputs, repair=ResetBatchNorm(data=[]), progress=False)


# -- repair ----------------------------------------------------------------------------------------
def _teacher_data(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 4, generator=g)
    return x, (x @ w).argmax(1)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _mlp(norm: str | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    dims = [16, 64, 64, 64]
    for i, o in zip(dims, dims[1:]):
        layers.append(nn.Linear(i, o))
        if norm == "bn":
            layers.append(nn.BatchNorm1d(o))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.Linear(64, 4))


def _channel_std(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, y: out.setdefault("y", y))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return out["y"].std(0)


def test_repair_restores_channel_statistics_of_a_no_norm_net() -> None:
    x, y = _teacher_data(512, 16, 0)
    a, b = _train(_mlp(None, 1), x, y, 1), _train(_mlp(None, 2), x, y, 2)
    data = [x[i:i + 128] for i in range(0, 512, 128)]
    fused = fuse([a, b], x[:4], align=WeightMatching(), progress=False)
    repaired = fuse([a, b], x[:4], align=WeightMatching(), repair=Repair(data=data),
                    progress=False)
    # target: the interpolated endpoint std of the last hidden layer, in the common basis
    spec = fxfuse.find_groups(a, x[:4])
    from fxfuse.passes.align import AlignWeights
    from fxfuse.passes.base import FusionState

    st = FusionState([a, b], (x[:4],), [0.5, 0.5], torch.device("cpu"), progress=False, spec=spec,
                     states=[a.state_dict(), b.state_dict()])
    AlignWeights(WeightMatching()).call(st)
    b_aligned = fxfuse.permute(b, spec, st.perms[1])  # type: ignore[index]
    target = (_channel_std(a, "4", x) + _channel_std(b_aligned, "4", x)) / 2
    before = (_channel_std(fused, "4", x) / target).mean().item()
    after = (_channel_std(repaired, "4", x) / target).mean().item()
    assert before < 0.97  # variance collapse after averaging
    assert abs(after - 1.0) < 0.02  # golden: REPAIR restores it
    acc = lambda m: (m.eval()(x).argmax(1) == y).float().mean().item()  # noqa: E731
    with torch.no_grad():
        assert acc(repaired) >= acc(fused) - 0.01


def test_reset_batchnorm_matches_fresh_statistics() -> None:
    x, y = _teacher_data(512, 16, 0)
    a, b = _train(_mlp("bn", 1), x, y, 1), _train(_mlp("bn", 2), x, y, 2)
    data = [x[i:i + 128] for i in range(0, 512, 128)]
    fused = fuse([a, b], x[:4], repair=ResetBatchNorm(data=data), progress=False)
    # golden: the running statistics are the data's per-channel statistics of each BN input
    bn = fused.get_submodule("1")
    inputs = {}
    h = fused.get_submodule("0").register_forward_hook(lambda m, a_, out: inputs.setdefault("y", out))
    with torch.no_grad():
        fused.eval()(x)
    h.remove()
    torch.testing.assert_close(bn.running_mean, inputs["y"].mean(0), rtol=1e-4, atol=1e-5)
    # momentum=None: the cumulative average of the per-batch (unbiased) variances
    per_batch = torch.stack([inputs["y"][i:i + 128].var(0, unbiased=True) for i in (0, 128, 256,
                                                                                    384)])
    torch.testing.assert_close(bn.running_var, per_batch.mean(0), rtol=1e-4, atol=1e-5)
    # and resetting twice changes nothing
    before = copy.deepcopy(fused.state_dict())
    reset_batchnorm(fused, data, torch.device("cpu"))
    assert all(torch.allclose(before[k].float(), v.float()) for k, v in fused.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fuse_on_cuda() -> None:
    a, inputs, (b,) = permuted_copies("resnet20", 2)
    fused = fuse([a, b], inputs, device="cuda", progress=False)
    assert next(fused.parameters()).is_cuda
    ref = outputs(a, inputs)
    got = outputs(fused.cpu(), inputs)
    assert rel_diff(ref, got) < 1e-4


def test_repair_on_a_layernorm_net_folds_the_linear_layers() -> None:
    x, y = _teacher_data(512, 16, 0)

    def ln_mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64),
                             nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4))

    a, b = _train(ln_mlp(1), x, y, 1), _train(ln_mlp(2), x, y, 2)
    data = [x[i:i + 128] for i in range(0, 512, 128)]
    report = FusionReport()
    repaired = fuse([a, b], x[:4], repair=Repair(data=data), progress=False, report=report)
    assert any("repair: 2 layers folded" in n for n in report.notes)
    plain = fuse([a, b], x[:4], progress=False)
    assert not torch.allclose(repaired.get_submodule("0").weight, plain.get_submodule("0").weight)
    fresh = ln_mlp(0)
    fresh.load_state_dict(repaired.state_dict())  # architecture unchanged


def _unrelated(factory, seed: int) -> nn.Module:
    """A model whose every parameter is redrawn (same scale) from ``seed``."""
    model = factory()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * max(float(p.std()), 0.1)
                    if p.numel() > 1 else p)
    return model


def _aligned_perms(models_: list[nn.Module], inputs: tuple, cfg: WeightMatching):
    from fxfuse.passes.align import AlignWeights
    from fxfuse.passes.base import FusionState

    spec = fxfuse.find_groups(models_[0], inputs)
    st = FusionState(models_, inputs, [0.5, 0.5], torch.device("cpu"), progress=False, spec=spec,
                     states=[m.state_dict() for m in models_])
    AlignWeights(cfg).call(st)
    return spec, st.perms[1]  # type: ignore[index]


def _group_cost(spec, sd_a, sd_b, perms, group) -> torch.Tensor:
    """Independent of the matcher's caches: C[i, j] = sum over the group's parameter axes of
    <A row i, B row j>, B with every other group's permutation applied."""
    from fxfuse.coords import as_rows, group_rows

    sizes = {g.name: g.size for g in spec.groups}
    others = {**perms, group.name: torch.arange(group.size)}
    b_perm = apply_perms(sd_b, spec, others)
    cost = torch.zeros(group.size, group.size, dtype=torch.float64)
    for key, axis in group.members:
        if not key.endswith(("weight", "bias")):
            continue  # buffers are permuted, not matched on
        rows = group_rows(spec.axes[(key, axis)].layout, group.name, sizes)
        if rows is not None:
            cost += as_rows(sd_a[key], axis, rows).double() @ as_rows(
                b_perm[key], axis, rows).double().T
    return cost


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name", ["resnet20", "mlp", "vgg_bn"])
def test_weight_matching_reaches_a_fixed_point(name: str, warm: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """tol=0: at the end, no single group's assignment improves the matching (Git Re-Basin's
    stopping rule), checked with a cost computed from scratch, so the matcher's skipping of
    unchanged groups, block caches, threaded and warm-started solves cannot hide an unfinished
    descent.  ``warm``: every group is warm-started, from an auction's prices at first (these
    models' groups are below the sizes where the matcher starts doing so)."""
    from scipy.optimize import linear_sum_assignment

    from fxfuse import assignment

    monkeypatch.setattr(assignment, "WARM_MIN_SIZE", 1 if warm else 10**9)
    monkeypatch.setattr(assignment, "AUCTION_MIN_SIZE", 1 if warm else 10**9)
    entry = models.get(name)
    a, b = _unrelated(entry.factory, 3), _unrelated(entry.factory, 4)
    spec, perms = _aligned_perms([a, b], entry.example_inputs(), WeightMatching(tol=0.0))
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    for g in spec.groups:
        cost = _group_cost(spec, a.state_dict(), b.state_dict(), perms, g)
        _, best = linear_sum_assignment(cost.numpy(), maximize=True)
        current = cost[torch.arange(g.size), perms[g.name]].sum()
        optimum = cost[torch.arange(g.size), torch.as_tensor(best)].sum()
        assert optimum <= current + 1e-9 * max(1.0, abs(float(current))), g.name


def test_weight_matching_tol_stops_earlier_and_close() -> None:
    entry = models.get("resnet20")
    a, b = _unrelated(entry.factory, 3), _unrelated(entry.factory, 4)
    x = entry.example_inputs()

    def distance(perms) -> float:
        sb = apply_perms(b.state_dict(), spec, perms)
        return sum(float((v - sb[k]).double().square().sum())
                   for k, v in a.state_dict().items() if k.endswith(("weight", "bias")))

    spec, exact = _aligned_perms([a, b], x, WeightMatching(tol=0.0))
    _, loose = _aligned_perms([a, b], x, WeightMatching(tol=0.05))
    before = distance({g.name: torch.arange(g.size) for g in spec.groups})
    d_exact, d_loose = distance(exact), distance(loose)
    assert d_exact < d_loose < before  # stopped earlier, yet most of the way
    assert (before - d_loose) > 0.9 * (before - d_exact)


@pytest.mark.parametrize("kwargs", [{"tol": -0.1}, {"tol": 1.0}, {"max_iter": 0},
                                    {"merge_many_rounds": -1}])
def test_weight_matching_config_is_checked(kwargs: dict) -> None:
    with pytest.raises(fxfuse.InputError, match="WeightMatching"):
        WeightMatching(**kwargs)


def test_progress_lines_end_even_when_the_loop_stops_early(capsys) -> None:
    """Logs (no terminal): one closed line per bar, also after ``break`` (weight matching stops
    before max_iter), so the next bar does not run on in the same line."""
    from fxfuse.passes.base import progress

    for i in progress(range(100), "sweeps", True):
        if i == 4:
            break
    list(progress([1, 2], "batches", True))
    list(progress([1, 2], "silent", False))
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["sweeps: 5/100", "batches: 2/2"]
