"""Heterogeneous depth (fxfuse.depth) and the Neural-ODE zoo model at different iteration counts."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.depth import (
    DepthAlignment,
    DepthError,
    NoExactIdentityError,
    align_depth,
    block_sequence,
    expand,
    match_levels,
)
from models._utils import build
from models.mlp import MLP
from models.node import NODENet, node_net
from models.resnet import ResNetCifar
from models.transformer import SDPABlockNet
from models.vit import vit


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).abs().max() / ref.abs().max())


def states(*models: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def unchanged(models: tuple[nn.Module, ...], before: list[dict[str, torch.Tensor]]) -> bool:
    return all(all(torch.equal(v, s[k]) for k, v in m.state_dict().items())
               for m, s in zip(models, before))


MLP_X = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
IMG_X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TOK_X = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))

EXPANSIONS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], torch.Tensor, int]] = {
    # name: (deep factory, shallow factory, inputs, inserted blocks)
    "mlp-2-to-3": (lambda: build(lambda: MLP(784, (64, 64, 64)), 0),
                   lambda: build(lambda: MLP(784, (64, 64)), 1), MLP_X, 1),
    "mlp-2-to-4": (lambda: build(lambda: MLP(784, (64, 64, 64, 64)), 0),
                   lambda: build(lambda: MLP(784, (64, 64)), 1), MLP_X, 2),
    "resnet-2-to-3-per-stage": (lambda: build(lambda: ResNetCifar(depth=20), 0),
                                lambda: build(lambda: ResNetCifar(depth=14), 1), IMG_X, 3),
    "transformer-2-to-4": (lambda: build(lambda: SDPABlockNet(depth=4), 0),
                           lambda: build(lambda: SDPABlockNet(depth=2), 1), TOK_X, 2),
    "vit-mha-2-to-4": (lambda: vit(depth=4, seed=0), lambda: vit(depth=2, seed=1), IMG_X, 2),
}


# -- expansion is exact -----------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(EXPANSIONS))
def test_expansion_computes_the_shallow_function_exactly(case: str) -> None:
    deep_f, shallow_f, x, inserted = EXPANSIONS[case]
    deep, shallow = deep_f(), shallow_f()
    with torch.no_grad():  # make the shallow model's outputs far from the deep one's
        for p in shallow.parameters():
            p.mul_(1.5)
    before = states(deep, shallow)
    out, report = align_depth([deep, shallow], x, target=0)
    assert unchanged((deep, shallow), before)
    assert out[0] is deep
    expanded = out[1]
    assert type(expanded) is type(deep)
    assert [(k, v.shape) for k, v in expanded.state_dict().items()] == \
        [(k, v.shape) for k, v in deep.state_dict().items()]
    with torch.no_grad():
        y_s, y_e, y_d = shallow(x), expanded(x), deep(x)
    assert rel(y_s, y_e) <= 1e-5
    assert rel(y_s, y_d) > 1e-2  # the check above is not trivially met
    info = report.models[1]
    assert info.action == "expanded"
    assert len([line for line in info.lines if line.startswith("inserted")]) == inserted
    assert sum("inserted" in n for n in report.notes()) == inserted


def test_fusing_with_weights_0_1_gives_the_shallow_model_at_the_deep_depth() -> None:
    deep_f, shallow_f, x, _ = EXPANSIONS["resnet-2-to-3-per-stage"]
    deep, shallow = deep_f(), shallow_f()
    models, _ = align_depth([deep, shallow], x, target=0)
    fused = fxfuse.fuse(models, x, weights=[0, 1], progress=False)
    assert type(fused) is ResNetCifar and len(fused.layer1) == 3
    with torch.no_grad():
        assert rel(shallow(x), fused(x)) <= 1e-5


def test_half_way_fusion_runs_on_the_equal_depth_core() -> None:
    deep_f, shallow_f, x, _ = EXPANSIONS["mlp-2-to-3"]
    deep, shallow = deep_f(), shallow_f()
    models, _ = align_depth([deep, shallow], x, target=0)
    fused = fxfuse.fuse(models, x, align=fxfuse.WeightMatching(), progress=False)
    assert len(fused.features) == 6
    assert torch.isfinite(fused(x)).all()


# -- the level correspondence ------------------------------------------------------------------
def test_dp_prefers_the_best_monotone_map_and_respects_constraints() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.7, 0.95]])
    free = torch.tensor([True, True, True])
    allowed = torch.ones(2, 3, dtype=torch.bool)
    assert match_levels(sim, allowed, free) == [0, 2]
    allowed[1, 2] = False
    assert match_levels(sim, allowed, free) == [0, 1]
    assert match_levels(sim, allowed, torch.tensor([True, True, False])) is None


def _near_identity_deep(phi: list[int]) -> tuple[nn.Module, nn.Module]:
    """A shallow transformer and a deeper one built from it: its blocks at ``phi``, near-identity
    blocks elsewhere, then every group randomly permuted."""
    shallow = build(lambda: SDPABlockNet(depth=3), 3)
    template = build(lambda: SDPABlockNet(depth=5), 4)
    s_seq, t_seq = block_sequence(shallow, TOK_X), block_sequence(template, TOK_X)
    deep, _ = expand(s_seq, t_seq, phi, (TOK_X,))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for j, b in enumerate(t_seq.blocks):
            if j not in phi:
                for name in ("proj", "fc2"):
                    lin = deep.blocks[int(b.name.split(".")[1])].__getattr__(name)
                    lin.weight.add_(0.05 * torch.randn(lin.weight.shape, generator=gen))
    spec = fxfuse.find_groups(deep, TOK_X)
    perms = {g.name: torch.randperm(g.size, generator=gen) for g in spec.groups}
    return shallow, fxfuse.permute(deep, spec, perms)


@pytest.mark.parametrize("similarity", ["cka", "weights"])
def test_dp_recovers_a_known_correspondence(similarity: str) -> None:
    phi = [0, 2, 3, 5, 6]  # blocks: embed, 3 transformer blocks, head -> inserted at 1 and 4
    shallow, deep = _near_identity_deep(phi)
    data = [torch.randn(32, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = DepthAlignment(data=data if similarity == "cka" else None, similarity=similarity)
    _, report = align_depth([deep, shallow], TOK_X, target=0, config=config)
    assert report.models[1].similarity == similarity
    assert list(report.models[1].map) == phi


def test_a_given_map_overrides_the_dp() -> None:
    deep_f, shallow_f, x, _ = EXPANSIONS["mlp-2-to-4"]
    deep, shallow = deep_f(), shallow_f()
    out, report = align_depth([deep, shallow], x, config=DepthAlignment(map=(None, (0, 3, 4))))
    assert report.models[1].map == (0, 3, 4) and report.models[1].similarity == "given"
    with torch.no_grad():
        assert rel(shallow(x), out[1](x)) <= 1e-5
    with pytest.raises(fxfuse.InputError, match="increasing"):
        align_depth([deep, shallow], x, config=DepthAlignment(map=(None, (0, 3, 3))))
    with pytest.raises(DepthError, match="differ in layers or shapes"):
        align_depth([deep, shallow], x, config=DepthAlignment(map=(None, (0, 1, 2))))


# -- no exact identity: typed errors naming the level -------------------------------------------
class PostNormBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), \
            nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class PostNormNet(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 24)
        self.blocks = nn.Sequential(*[PostNormBlock(24) for _ in range(depth)])
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def test_post_layernorm_block_has_no_exact_identity() -> None:
    deep, shallow = build(lambda: PostNormNet(3), 0), build(lambda: PostNormNet(2), 1)
    with pytest.raises(NoExactIdentityError, match=r"blocks\.\d.*post-norm"):
        align_depth([deep, shallow], TOK_X)


def test_layernorm_mlp_layer_has_no_exact_identity() -> None:
    deep = build(lambda: MLP(784, (64, 64, 64), norm="ln"), 0)
    shallow = build(lambda: MLP(784, (64, 64), norm="ln"), 1)
    with pytest.raises(NoExactIdentityError, match="LayerNorm.*no identity rule"):
        align_depth([deep, shallow], MLP_X)


def test_batchnorm_mlp_layer_is_expanded_exactly() -> None:
    deep = build(lambda: MLP(784, (64, 64, 64), norm="bn"), 0)
    shallow = build(lambda: MLP(784, (64, 64), norm="bn"), 1)
    out, _ = align_depth([deep, shallow], MLP_X)
    with torch.no_grad():
        assert rel(shallow(MLP_X), out[1](MLP_X)) <= 1e-5


def test_streams_of_other_widths_name_the_stage() -> None:
    deep = build(lambda: MLP(784, (64, 64, 64)), 0)
    shallow = build(lambda: MLP(784, (64, 32)), 1)
    before = states(deep, shallow)
    with pytest.raises(DepthError, match=r"stage \d.*\(32,\)"):
        align_depth([deep, shallow], MLP_X)
    assert unchanged((deep, shallow), before)


def test_equal_block_counts_with_other_widths_are_not_a_depth_problem() -> None:
    with pytest.raises(DepthError, match="not a depth difference"):
        align_depth([build(lambda: MLP(784, (64, 64)), 0), build(lambda: MLP(784, (64, 32)), 1)],
                    MLP_X)


# -- collapse to a shallower target ------------------------------------------------------------
def test_shallower_target_without_data_is_refused() -> None:
    deep_f, shallow_f, x, _ = EXPANSIONS["mlp-2-to-3"]
    deep, shallow = deep_f(), shallow_f()
    with pytest.raises(fxfuse.InputError, match="needs data"):
        align_depth([deep, shallow], x, target=1)


def test_a_shallower_target_the_deep_model_can_not_collapse_onto_is_refused() -> None:
    deep = build(lambda: MLP(784, (64, 64, 32)), 0)  # its last hidden width is 32
    target = build(lambda: MLP(784, (64,)), 1)
    data = [torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))]
    before = states(deep, target)
    with pytest.raises(DepthError, match=r"stage \d"):
        align_depth([deep, target], MLP_X, target=1, config=DepthAlignment(data=data))
    assert unchanged((deep, target), before)


def test_shallower_target_collapses_by_fitting_on_data() -> None:
    deep = build(lambda: MLP(64, (32, 32, 32), num_classes=10), 0)
    shallow = build(lambda: MLP(64, (32, 32), num_classes=10), 1)
    gen = torch.Generator().manual_seed(0)
    data = [torch.rand(128, 64, generator=gen) for _ in range(2)]
    before = states(deep, shallow)
    out, report = align_depth([deep, shallow], data[0][:4], target=1,
                              config=DepthAlignment(data=data, fit_steps=300, fit_lr=1e-2))
    assert unchanged((deep, shallow), before)
    assert out[1] is shallow and type(out[0]) is MLP and len(out[0].features) == 4
    info = report.models[0]
    assert info.action == "collapsed" and len(info.map) == 3
    (line,) = info.lines
    import re

    found = re.search(r"relative loss ([\d.e+-]+) -> ([\d.e+-]+) \(into the (previous|next)", line)
    assert found, line
    assert float(found[2]) < 0.5 * float(found[1])
    held_out = torch.rand(256, 64, generator=gen)
    with torch.no_grad():
        y = deep(held_out)
        assert rel(y, out[0](held_out)) < rel(y, shallow(held_out))


# -- Neural-ODE: iteration count -----------------------------------------------------------------
def test_node_step_count_is_read_at_forward_time() -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m3, m6 = node_net(steps=3), node_net(steps=6)
    assert m3.dt == pytest.approx(1 / 3)
    m3.steps = 6
    assert m3.dt == pytest.approx(1 / 6) and "steps" not in str(list(m3.state_dict()))
    with torch.no_grad():
        assert torch.equal(m3(x), m6(x))
        copy6 = node_net(steps=3).at_steps(6)
        assert torch.equal(copy6(x), m6(x)) and not torch.equal(node_net(steps=3)(x), m6(x))
    with pytest.raises(ValueError, match="steps"):
        m3.steps = 0


def test_node_exports_to_onnx_at_three_steps(tmp_path: object) -> None:
    pytest.importorskip("onnxruntime")
    from pathlib import Path

    model = node_net(steps=6).at_steps(3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    path = Path(str(tmp_path)) / "node3.onnx"
    report = fxfuse.export(model, x, path)
    assert report.max_rel_diff is not None and report.max_rel_diff <= 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path))
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert rel(model(x), got) <= 1e-4
        assert rel(model.at_steps(1)(x), got) > 1e-3


def _train_node(steps: int, seed: int, x: torch.Tensor, y: torch.Tensor) -> NODENet:
    model = node_net(steps=steps, channels=16, in_channels=1, norm="gn", seed=seed).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def test_node_clients_at_1_and_6_steps_fuse_about_as_well_as_averaging() -> None:
    """Clients trained at k = 1 and k = 6 (different inits, digits); fused by weight matching
    and evaluated at each k, about as accurate as their naive average at that k (within 5
    points): both are far below the client trained at that k, and which is ahead depends on
    the CPU's float kernels (AVX2: fused 0.30 / 0.14 against averaged 0.31 / 0.15 at k = 1 / 6;
    the recording machine had fused ahead)."""
    pytest.importorskip("sklearn")
    from fxfuse.data import load_digits_data

    with torch.random.fork_rng():
        torch.set_num_threads(1)
        x, y = load_digits_data("train")
        xt, yt = load_digits_data("test")
        clients = [_train_node(1, 0, x, y), _train_node(6, 1, x, y)]

        def acc(m: nn.Module) -> float:
            with torch.no_grad():
                return float((m(xt).argmax(1) == yt).float().mean())

        assert acc(clients[0]) > 0.9 and acc(clients[1]) > 0.8
        for k in (1, 6):
            at_k = [c.at_steps(k) for c in clients]
            repair = fxfuse.ResetBatchNorm([x[i:i + 256] for i in range(0, len(x), 256)])
            fused = fxfuse.fuse(at_k, x[:8], align=fxfuse.WeightMatching(), repair=repair,
                                progress=False)
            naive = fxfuse.fuse(at_k, x[:8], align=None, repair=repair, progress=False)
            assert isinstance(fused, NODENet) and fused.steps == k
            assert acc(fused) >= acc(naive) - 0.05, (k, acc(fused), acc(naive))


def test_node_batchnorm_in_the_tied_block_is_repaired_at_the_deployment_count() -> None:
    """ResetBatchNorm measures the tied block's statistics over the k calls of the count the
    fused model runs at (model 0's): statistics are per count."""
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = node_net(steps=1, seed=0), node_net(steps=1, seed=1)
    stats = {}
    for k in (1, 4):
        fused = fxfuse.fuse([a.at_steps(k), b.at_steps(k)], x[:2],
                            repair=fxfuse.ResetBatchNorm([x]), progress=False)
        assert fused.steps == k
        seen: list[torch.Tensor] = []
        probe = copy.deepcopy(fused).train()  # batch statistics, as while repairing
        probe.f.norm.register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(i[0].mean((0, 2, 3))))
        with torch.no_grad():
            probe(x)
        assert len(seen) == k
        assert torch.allclose(fused.f.norm.running_mean, torch.stack(seen).mean(0), atol=1e-5)
        stats[k] = fused.f.norm.running_mean.clone()
    assert not torch.allclose(stats[1], stats[4])


def test_iteration_counts_share_one_architecture_no_depth_handling() -> None:
    models = [node_net(steps=1, seed=0), node_net(steps=6, seed=1)]
    out, report = align_depth(models, torch.randn(2, 3, 16, 16))
    assert out[0] is models[0] and out[1] is models[1]
    assert [m.action for m in report.models] == ["kept", "kept"]
    seq = block_sequence(copy.deepcopy(models[1]), torch.randn(2, 3, 16, 16))
    assert len(seq) == 8 and seq.depth == 3  # stem, 6 tied Euler steps, head


# -- through fxfuse.fuse ---------------------------------------------------------------------------
def test_fuse_handles_depth_automatically_and_reports_insertions() -> None:
    deep_f, shallow_f, x, _ = EXPANSIONS["mlp-2-to-4"]
    deep, shallow = deep_f(), shallow_f()
    report = fxfuse.FusionReport()
    exact = fxfuse.fuse([deep, shallow], x, weights=[0, 1], target=0, report=report,
                        progress=False)
    assert len(exact.features) == 8
    with torch.no_grad():
        assert rel(shallow(x), exact(x)) <= 1e-5
    assert sum("inserted block" in n for n in report.notes) == 2
    fused = fxfuse.fuse([deep, shallow], x, depth=DepthAlignment(similarity="weights"),
                        progress=False)
    assert type(fused) is MLP and len(fused.features) == 8
    with pytest.raises(fxfuse.InputError, match="needs data"):
        fxfuse.fuse([deep, shallow], x, target=1, progress=False)
    data = [torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))]
    short = fxfuse.fuse([deep, shallow], x, target=1, data=data, depth=DepthAlignment(fit_steps=20),
                        progress=False)
    assert len(short.features) == 4
