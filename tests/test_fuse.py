"""fuse(): self-recovery on the zoo, N models, activation matching, repair, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfuse
import models
from fxfuse.align import ActivationMatching, WeightMatching
from fxfuse.fuse import fuse
from fxfuse.passes import FusionReport, MergeWeights, Pass
from fxfuse.permute import apply_perms, rel_diff
from fxfuse.repair import Repair, ResetBatchNorm, reset_batchnorm
from fxfuse.testing import randomize_constants

from .conftest import NEEDS_GPU


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


@pytest.mark.parametrize("name", models.names())
def test_weight_matching_finds_the_permutation_of_a_noisy_copy(name: str) -> None:
    """A permuted copy with noise of 1% of each tensor's spread added to every weight and buffer:
    the copy is no longer A's function exactly, so fusing cannot recover A by a shortcut; weight
    matching must still find the very permutation that made the copy (applied to the noiseless
    copy, its permutations give back A's state dict exactly)."""
    a, inputs, (b,) = permuted_copies(name, 2)
    gen = torch.Generator().manual_seed(5)
    noisy = copy.deepcopy(b)
    with torch.no_grad():
        for t in noisy.state_dict().values():
            if t.is_floating_point() and t.numel() > 1:
                t.add_(0.01 * float(t.std()) * torch.randn(t.shape, generator=gen))
    report = FusionReport()
    fuse([a, noisy], inputs, align=WeightMatching(), progress=False, report=report)
    assert report.spec is not None and report.perms is not None
    back = fxfuse.permute(b, report.spec, report.perms[1]).state_dict()
    wrong = [k for k, v in a.state_dict().items() if not torch.equal(v, back[k])]
    assert not wrong, f"{name}: permutation not recovered on {wrong[:5]}"


@pytest.mark.parametrize("name", ["squeezenet", "mobilenetv2_lib"])
def test_descent_from_the_identity_alone_stalls(name: str) -> None:
    """Why the forward start exists: from the identity alone (Git Re-Basin's start) coordinate
    descent reaches a fixed point far from the known permutation on fire modules and depthwise
    inverted residuals, also run to the exact fixed point (tol=0); the default recovers A."""
    a, inputs, (b,) = permuted_copies(name, 2)
    for tol in (1e-3, 0.0):
        stalled = fuse([a, b], inputs, align=WeightMatching(start="init", tol=tol),
                       progress=False)
        assert rel_diff(outputs(a, inputs), outputs(stalled, inputs)) > 1e-2
    for start in ("forward", "both"):
        fused = fuse([a, b], inputs, align=WeightMatching(start=start), progress=False)
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


# zoo models activation matching can not recover from a permuted copy on random inputs, and why
ACTIVATION_GAPS = {
    "mobilenetv2": "ReLU6 units that never leave 0 or 6 on random inputs are indistinguishable",
    "shufflenet": "units that are constant on random inputs are indistinguishable",
    "squeezenet": "ReLU units that stay at 0 on random inputs (library init, no normalisation: "
                  "up to 28 of 64 per fire expand) are indistinguishable",
}


@pytest.mark.parametrize("name", models.names())
def test_activation_matching_recovers_every_zoo_model(name: str) -> None:
    a, inputs, (b,) = permuted_copies(name, 2)
    x = inputs[0]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn((4, *x.shape[1:]), generator=gen) if x.is_floating_point()
            else torch.randint(0, 64, (3, *x.shape[1:]), generator=gen) for _ in range(2)]
    fused = fuse([a, b], inputs, align=ActivationMatching(data=data), progress=False)
    diff = rel_diff(outputs(a, inputs), outputs(fused, inputs))
    if name in ACTIVATION_GAPS:
        assert diff > 1e-5, f"{name} is recovered now: drop it from ACTIVATION_GAPS"
        pytest.xfail(ACTIVATION_GAPS[name])
    assert diff < 1e-5


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


def test_different_widths_or_classes_are_named() -> None:
    a = models.get("resnet20").factory()
    b = models.zoo.resnet20(width=2)
    with pytest.raises(fxfuse.ArchitectureMismatchError, match="conv1 16 vs 8.*OptimalTransport"):
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


def _layer_stats(model: nn.Module, layers: list[str], x: torch.Tensor
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (population) std of each named layer's output on ``x``, float64."""
    out: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a_, y, n=n: out.__setitem__(n, y.double())) for n in layers]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return {n: (out[n].mean(0), out[n].std(0, unbiased=False)) for n in layers}


def _hidden_linears(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[:-1]  # the last one produces the output: never repaired


def _assert_every_layer_repaired(make, eps: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    """Golden for REPAIR on two trained nets: every hidden layer's per-channel mean and std on the
    data equal the average of the endpoints' (b aligned to a with the permutations fuse found).

    The fold is exact up to its ``eps`` (``sigma_f = sqrt(var_f + eps)`` scales each std by
    ``sqrt(var_f / (var_f + eps)) ~ 1 - eps / (2 var)``) and float32 rounding.  Measured on these
    nets: mean error up to 1.4e-7 std, std error up to 1.7e-4 relative (a channel of variance
    0.023).  Asserted per channel: mean error < 1e-6 std; std error < 1e-5 + eps / var (twice the
    eps bias; the worst channel reaches 0.39 of it).  Before repair the same layers are off by
    20-33% (variance collapse); the planted REPAIR bugs of tests/mutations by 0.04-0.47."""
    x, y = _teacher_data(512, 16, 0)
    a, b = _train(make(1), x, y, 1), _train(make(2), x, y, 2)
    data = [x[i:i + 128] for i in range(0, 512, 128)]
    layers = _hidden_linears(a)
    report = FusionReport()
    repaired = fuse([a, b], x[:4], align=WeightMatching(), repair=Repair(data=data, eps=eps),
                    progress=False, report=report)
    fused = fuse([a, b], x[:4], align=WeightMatching(), progress=False)
    assert any(f"repair: {len(layers)} layers folded" in n for n in report.notes), report.notes
    assert report.spec is not None and report.perms is not None
    b_aligned = fxfuse.permute(b, report.spec, report.perms[1])
    st_a, st_b = _layer_stats(a, layers, x), _layer_stats(b_aligned, layers, x)
    got, plain = _layer_stats(repaired, layers, x), _layer_stats(fused, layers, x)
    worst_before = 0.0
    for n in layers:
        mean_t = (st_a[n][0] + st_b[n][0]) / 2
        std_t = (st_a[n][1] + st_b[n][1]) / 2
        mean_err = ((got[n][0] - mean_t).abs() / std_t).max().item()
        std_err = (got[n][1] / std_t - 1).abs()
        bound = 1e-5 + eps / std_t**2
        assert mean_err < 1e-6, f"layer {n}: mean off by {mean_err:.3g} std"
        assert bool((std_err < bound).all()), (
            f"layer {n}: std off by {std_err.max().item():.3g} (bound {bound.min().item():.3g})")
        worst_before = max(worst_before, (plain[n][1] / std_t - 1).abs().max().item())
    assert worst_before > 0.1  # without repair the statistics are far off: the test can fail
    acc = lambda m: (m.eval()(x).argmax(1) == y).float().mean().item()  # noqa: E731
    with torch.no_grad():
        assert acc(repaired) >= acc(fused) - 0.01


def test_repair_restores_every_layers_statistics() -> None:
    _assert_every_layer_repaired(lambda seed: _mlp(None, seed))


def _ln_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64),
                         nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4))


def test_repair_on_a_layernorm_net_restores_every_layer() -> None:
    """LayerNorm does not renormalise per channel: both Linear layers are folded and matched."""
    _assert_every_layer_repaired(_ln_mlp)


def test_repair_keeps_the_architecture_of_a_layernorm_net() -> None:
    x, _ = _teacher_data(64, 16, 0)
    a, b = _ln_mlp(1), _ln_mlp(2)
    repaired = fuse([a, b], x[:4], repair=Repair(data=[x]), progress=False)
    fresh = _ln_mlp(0)
    fresh.load_state_dict(repaired.state_dict())  # strict: architecture unchanged
    assert [type(m) for m in repaired.modules()] == [type(m) for m in fresh.modules()]


def _expected_batchnorm_stats(model: nn.Module, data: list[torch.Tensor]
                              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Oracle, from the definition: with every BatchNorm normalising by its batch's statistics
    (train mode, the rest in eval), a fresh BatchNorm with ``momentum=None`` ends with the average
    over the batches of each batch's per-channel mean and unbiased variance of its input."""
    model = copy.deepcopy(model).eval()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in bns}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().movedim(1, 0).flatten(1)
            seen[name].append((x.mean(1), x.var(1, unbiased=True)))
        return hook

    for n, m in bns.items():
        m.train()
        m.register_forward_pre_hook(record(n))
    with torch.no_grad():
        for batch in data:
            model(batch)
    return {n: (torch.stack([s[0] for s in v]).mean(0), torch.stack([s[1] for s in v]).mean(0))
            for n, v in seen.items()}


def _bn_pair(name: str) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    if name == "mlp_bn":  # trained: the merged statistics are those of neither network
        x, y = _teacher_data(512, 16, 0)
        a, b = _train(_mlp("bn", 1), x, y, 1), _train(_mlp("bn", 2), x, y, 2)
        return a, b, [x[i:i + 128] for i in range(0, 512, 128)]
    a, inputs, (b,) = permuted_copies(name, 2)  # conv + residual BatchNorms, random statistics
    gen = torch.Generator().manual_seed(5)
    return a, b, [torch.randn(8, *inputs[0].shape[1:], generator=gen) for _ in range(3)]


@pytest.mark.parametrize("name", ["mlp_bn", "resnet20"])
def test_reset_batchnorm_matches_fresh_statistics(name: str) -> None:
    """Every BatchNorm's running statistics (checked per layer, per channel) are the data's,
    computed by the oracle above; without the reset they are not (the test can fail)."""
    a, b, data = _bn_pair(name)
    fused = fuse([a, b], data[0][:4], repair=ResetBatchNorm(data=data), progress=False)
    merged = fuse([a, b], data[0][:4], progress=False)
    expected = _expected_batchnorm_stats(fused, data)
    bns = {n: m for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)}
    assert len(bns) >= 3 and set(bns) == set(expected)
    for n, bn in bns.items():
        mean, var = expected[n]
        assert bn.running_mean is not None and bn.running_var is not None
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}.running_mean: {m}")
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}.running_var: {m}")
        old = merged.get_submodule(n)
        assert not torch.allclose(old.running_var.double(), var, rtol=1e-2), n  # it did change
        assert bn.momentum == old.momentum and not bn.training  # settings restored
    # and resetting twice changes nothing
    before = copy.deepcopy(fused.state_dict())
    reset_batchnorm(fused, data, torch.device("cpu"))
    assert all(torch.allclose(before[k].float(), v.float()) for k, v in fused.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_GPU)
def test_fuse_on_cuda() -> None:
    a, inputs, (b,) = permuted_copies("resnet20", 2)
    fused = fuse([a, b], inputs, device="cuda", progress=False)
    assert next(fused.parameters()).is_cuda
    ref = outputs(a, inputs)
    got = outputs(fused.cpu(), inputs)
    assert rel_diff(ref, got) < 1e-4


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
    from fxfuse.align.weights import AlignWeights
    from fxfuse.passes.base import FusionState

    spec = fxfuse.find_groups(models_[0], inputs)
    st = FusionState(models_, inputs, [0.5, 0.5], torch.device("cpu"), progress=False, spec=spec,
                     states=[m.state_dict() for m in models_])
    AlignWeights(cfg).call(st)
    return spec, st.perms[1]  # type: ignore[index]


def _group_cost(spec, sd_a, sd_b, perms, group) -> torch.Tensor:
    """Independent of the matcher's caches: C[i, j] = sum over the group's parameter axes of
    <A row i, B row j>, B with every other group's permutation applied."""
    from fxfuse.ir.coords import as_rows, group_rows

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

    from fxfuse.solvers import assignment

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

    # one start: from the forward start these two models' descent is short under both rules
    spec, exact = _aligned_perms([a, b], x, WeightMatching(tol=0.0, start="init"))
    _, loose = _aligned_perms([a, b], x, WeightMatching(tol=0.05, start="init"))
    before = distance({g.name: torch.arange(g.size) for g in spec.groups})
    d_exact, d_loose = distance(exact), distance(loose)
    assert d_exact < d_loose < before  # stopped earlier, yet most of the way
    assert (before - d_loose) > 0.9 * (before - d_exact)


@pytest.mark.parametrize("kwargs", [{"tol": -0.1}, {"tol": 1.0}, {"max_iter": 0},
                                    {"merge_many_rounds": -1}, {"start": "identity"}])
def test_weight_matching_config_is_checked(kwargs: dict) -> None:
    with pytest.raises(fxfuse.InputError, match="WeightMatching"):
        WeightMatching(**kwargs)


def test_weight_matching_stopping_rule() -> None:
    from fxfuse.align.weights import _StoppingRule

    rule = _StoppingRule(0.1, 100.0)
    assert not rule.done([10.0])  # D 100 -> 80: a 20% step
    assert rule.done([3.0])  # 6 <= 0.1 * 80
    assert rule.done([])  # no accepted step
    exact = _StoppingRule(0.0, 0.0)
    assert not exact.done([1e-9]) and exact.done([])


def test_weight_matching_cost_cache_follows_every_change() -> None:
    """The cached block costs equal a cost computed from scratch, also after a neighbour's
    permutation changed (its blocks must be recomputed, the others reused)."""
    from fxfuse.align.weights import _CostCache, _WeightMatcher

    entry = models.get("resnet20")
    a, b = _unrelated(entry.factory, 1), _unrelated(entry.factory, 2)
    inputs = entry.example_inputs()
    spec = fxfuse.find_groups(a, inputs)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    params = {k for k, _ in a.named_parameters()}
    perms = spec.random_perms(seed=3)
    costs = _CostCache(_WeightMatcher(spec, torch.device("cpu"), params), sd_a, sd_b, perms,
                       pooled=False)
    for g in spec.groups:
        torch.testing.assert_close(costs.group(g.name).double(),
                                   _group_cost(spec, sd_a, sd_b, perms, g), rtol=1e-4, atol=1e-3)
    moved = spec.groups[0].name
    costs.accept(moved, torch.roll(costs.perms[moved], 1))
    for g in spec.groups:
        torch.testing.assert_close(costs.group(g.name).double(),
                                   _group_cost(spec, sd_a, sd_b, costs.perms, g),
                                   rtol=1e-4, atol=1e-3)


class _VersionedBlock(nn.Module):
    """Linear -> BatchNorm1d -> ReLU whose ``_load_from_state_dict`` reads its state-dict version,
    as torch's BatchNorm and third-party modules do to upgrade old layouts, and refuses a state
    dict without one."""

    _version = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:  # type: ignore[no-untyped-def]
        if local_metadata.get("version") != self._version:
            raise ValueError(f"version should be set to {self._version}, got "
                             f"{local_metadata.get('version')!r}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def _versioned_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_constants(nn.Sequential(_VersionedBlock(), nn.Linear(12, 3)).eval(), seed)


def test_state_dicts_keep_their_version_metadata() -> None:
    """permute, fuse (every align and repair setting), apply_maps and merge_states build state
    dicts that keep ``_metadata``: a module reading its version loads them."""
    from fxfuse.core import merge_states
    from fxfuse.maps import apply_maps, perm_maps

    a, b = _versioned_net(0), _versioned_net(1)
    x = (torch.randn(5, 6, generator=torch.Generator().manual_seed(0)),)
    data = [torch.randn(8, 6, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    spec = fxfuse.find_groups(a, x)
    assert spec.groups
    moved = fxfuse.permute(a, spec, spec.random_perms(seed=1))
    assert rel_diff(outputs(a, x), outputs(moved, x)) < 1e-5
    for kwargs in ({"align": None}, {"align": WeightMatching()},
                   {"align": ActivationMatching(data=data)},
                   {"align": WeightMatching(), "repair": Repair(data=data)},
                   {"align": WeightMatching(), "repair": ResetBatchNorm(data=data)}):
        fused = fuse([a, b], x, progress=False, **kwargs)
        fused.load_state_dict(fused.state_dict())
    perms = spec.random_perms(seed=2)
    sd = a.state_dict()
    for built in (apply_perms(sd, spec, perms), apply_maps(sd, spec, perm_maps(perms)),
                  merge_states(spec, [sd, b.state_dict()], [perm_maps(perms)] * 2, [0.5, 0.5])):
        assert built._metadata["0"] == {"version": 3}  # type: ignore[attr-defined]
        copy.deepcopy(a).load_state_dict(built)
    stripped = dict(sd)  # a plain dict: the module refuses it, so the test can fail
    with pytest.raises(ValueError, match="version should be set"):
        copy.deepcopy(a).load_state_dict(stripped)


def test_pooled_descent_ends_where_the_exact_distance_stops_shortening() -> None:
    """The pooled phase's groups each descend their own pooled objective, so its sweeps need not
    settle (on this VGG pair they ran all 100 before): it keeps the state with the shortest exact
    distance and ends at the first sweep that does not shorten it, never farther than its start."""
    from fxfuse.align.weights import _WeightMatcher

    entry = models.get("vgg")
    a, b = _unrelated(entry.factory, 1), _unrelated(entry.factory, 2)
    spec = fxfuse.find_groups(a, entry.example_inputs())
    sd_a, sd_b = a.state_dict(), b.state_dict()
    matcher = _WeightMatcher(spec, torch.device("cpu"), {k for k, _ in a.named_parameters()})
    start = {g.name: torch.arange(g.size) for g in spec.groups}
    distances: list[float] = []
    measure = matcher._distance2

    def counted(*args: object) -> float:
        distances.append(measure(*args))  # type: ignore[arg-type]
        return distances[-1]

    matcher._distance2 = counted  # type: ignore[method-assign]
    out = matcher.descend(sd_a, sd_b, start, 100, 0, False, pooled=True)
    assert len(distances) < 20, f"{len(distances) - 1} pooled sweeps"
    assert measure(sd_a, sd_b, out) == min(distances) <= distances[0]
    assert distances[-1] >= min(distances)  # it stopped at a sweep that did not shorten it
