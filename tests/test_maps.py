"""Alignment maps (fxfuse.maps): permutation fast path, one-to-many copies, many-to-one merges.

A narrow model re-expressed in a wider one by copying units (``U = pinv(M)`` splits outgoing
weights over the copies) must compute the same function; merging two identical units into one
must too; a permutation map must equal ``apply_perms`` exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
import models
from fxfuse.errors import PermutationError
from fxfuse.maps import GroupMap, apply_maps, fused_sizes, perm_maps
from fxfuse.permute import apply_perms, rel_diff
from fxfuse.testing import randomize_constants


class WideMLP(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                                 nn.Linear(w, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WideCNN(nn.Module):
    """conv-BN-ReLU twice, then flatten into a Linear (block axis ``g x 16``)."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, w, 3, padding=1, stride=2), nn.BatchNorm2d(w)
        self.fc = nn.Linear(w * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.flatten(1))


class WideResidual(nn.Module):
    """A residual stream of width ``w`` with two blocks (optionally LayerNorm pre-norm)."""

    def __init__(self, w: int, norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(6, w)
        self.norms = nn.ModuleList([nn.LayerNorm(w) if norm else nn.Identity() for _ in range(2)])
        self.up = nn.ModuleList([nn.Linear(w, 2 * w) for _ in range(2)])
        self.down = nn.ModuleList([nn.Linear(2 * w, w) for _ in range(2)])
        self.head = nn.Linear(w, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for norm, up, down in zip(self.norms, self.up, self.down):
            h = h + down(F.relu(up(norm(h))))
        return self.head(h)


class WideAttention(nn.Module):
    """Hand-written multi-head attention with ``heads`` heads of size 4 over a width-8 stream."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(8, 4 * heads) for _ in range(3))
        self.o = nn.Linear(4 * heads, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, 4).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return x + self.o(a.transpose(1, 2).reshape(b, t, 4 * self.heads))


def _wider(narrow: nn.Module, wide: nn.Module, x: torch.Tensor, uniform: bool
           ) -> tuple[float, dict[str, GroupMap]]:
    """Copy ``narrow`` into ``wide``'s widths; the largest relative output difference."""
    spec = fxfuse.find_groups(narrow, x)
    wide_sizes = {g.name: g.size for g in fxfuse.find_groups(wide, x).groups}
    gen = torch.Generator().manual_seed(0)
    maps = {}
    for g in spec.groups:
        m = wide_sizes[g.name]
        if m == g.size:
            continue
        extra = (torch.arange(m - g.size) % g.size if uniform
                 else torch.randint(0, g.size, (m - g.size,), generator=gen))
        maps[g.name] = GroupMap.copies(torch.cat([torch.arange(g.size), extra])[
            torch.randperm(m, generator=gen)], g.size)
    assert maps, "the test must widen at least one group"
    assert fused_sizes(spec, maps) == wide_sizes
    wide.load_state_dict(apply_maps(narrow.state_dict(), spec, maps))
    with torch.no_grad():
        return rel_diff([narrow.eval()(x)], [wide.eval()(x)]), maps


CASES = {
    "mlp": (lambda: WideMLP(4), lambda: WideMLP(9), (5, 6), False),
    "cnn-batchnorm": (lambda: WideCNN(3), lambda: WideCNN(7), (4, 3, 8, 8), False),
    "residual": (lambda: WideResidual(4), lambda: WideResidual(10), (5, 6), False),
    "residual-layernorm": (lambda: WideResidual(4, True), lambda: WideResidual(8, True), (5, 6),
                           True),
    "attention-more-heads": (lambda: WideAttention(2), lambda: WideAttention(4), (2, 5, 8), False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_narrow_model_copied_into_a_wider_one_computes_the_same_function(case: str) -> None:
    make_narrow, make_wide, shape, uniform = CASES[case]
    torch.manual_seed(1)
    narrow = randomize_constants(make_narrow(), seed=2)
    with torch.no_grad():  # BatchNorm statistics far from 0/1, so a wrong moment shows
        for mod in narrow.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 1)
                mod.running_var.uniform_(0.3, 3.0)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    diff, maps = _wider(narrow, make_wide(), x, uniform)
    assert diff < 1e-5, f"{case}: the wider copy computes another function (rel. diff {diff})"
    assert any(not m.is_permutation for m in maps.values())


def test_merging_two_identical_units_keeps_the_function() -> None:
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():  # hidden unit 4 of the first layer duplicates unit 1
        wide[0].weight[4] = wide[0].weight[1]
        wide[0].bias[4] = wide[0].bias[1]
    x = torch.randn(7, 6)
    spec = fxfuse.find_groups(wide, x)
    group = spec.groups_of("0.weight", 0)[0]
    narrow_state = apply_maps(wide.state_dict(), spec, {group: GroupMap.clusters([0, 1, 2, 3, 1], 4)})
    narrow = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    narrow.load_state_dict(narrow_state)
    with torch.no_grad():
        assert rel_diff([wide(x)], [narrow(x)]) < 1e-6
    # the merged input columns are the sum of the two identical units' columns
    torch.testing.assert_close(narrow[2].weight[:, 1], wide[2].weight[:, 1] + wide[2].weight[:, 4])
    # merging two *different* units changes the function: the test can fail
    other = apply_maps(wide.state_dict(), spec, {group: GroupMap.clusters([0, 1, 2, 3, 0], 4)})
    narrow.load_state_dict(other)
    with torch.no_grad():
        assert rel_diff([wide(x)], [narrow(x)]) > 1e-3


@pytest.mark.parametrize("name", ["resnet20", "vgg_bn", "flatten_net", "vit_tiny", "llama_lm",
                                  "shufflenetv2_lib"])
def test_a_permutation_map_is_apply_perms_exactly(name: str) -> None:
    entry = models.get(name)
    model = randomize_constants(entry.factory(), seed=4)
    spec = fxfuse.find_groups(model, entry.example_inputs())
    perms = spec.random_perms(seed=5)
    state = model.state_dict()
    want = apply_perms(state, spec, perms)
    got = apply_maps(state, spec, perm_maps(perms))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the same permutation as a dense coupling takes the same fast path
    coupled = {g: GroupMap.from_coupling(GroupMap.permutation(p).dense()[0].T)
               for g, p in perms.items()}
    assert all(m.is_permutation and torch.equal(m.index, perms[g]) for g, m in coupled.items())


@pytest.mark.parametrize("name", ["resnet20", "shufflenetv2_lib"])
def test_dense_permutation_equals_the_index_path(name: str) -> None:
    """A permutation written as a dense (non-index) pair gives the index path's tensors: the
    dense path's roles (out rows, in columns, running_var as a second moment) are right, and so
    are its rows of a group inside an interleaved axis (ShuffleNet V2's shuffled concats)."""
    entry = models.get(name)
    model = randomize_constants(entry.factory(), seed=6)
    spec = fxfuse.find_groups(model, entry.example_inputs())
    perms = spec.random_perms(seed=7)
    dense = {}
    for g, p in perms.items():
        merge, unmerge = GroupMap.permutation(p).dense()
        dense[g] = GroupMap(merge=merge, unmerge=unmerge)
    want = apply_perms(model.state_dict(), spec, perms)
    got = apply_maps(model.state_dict(), spec, dense)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_dense_maps_on_an_interleaved_axis() -> None:
    """interleave(a, b) (a shuffled concat): both blocks copied into a wider model keep the
    function; a map that narrows ``a`` alone has no layout, and says so (a typed error, not a
    wrong tensor)."""
    from tests.test_discovery import _CatShuffle

    model, x = randomize_constants(_CatShuffle(), seed=0), torch.randn(2, 3, 4, 4)
    spec = fxfuse.find_groups(model, x)
    wide = _CatShuffle(width=6)
    wide.load_state_dict(apply_maps(model.state_dict(), spec, {
        "a": GroupMap.copies([0, 1, 2, 3, 1, 0], 4), "b": GroupMap.copies([3, 0, 1, 2, 2, 3], 4)}))
    with torch.no_grad():
        assert rel_diff([model(x)], [wide(x)]) < 1e-6
    with pytest.raises(fxfuse.FxFuseError, match="interleaved"):
        apply_maps(model.state_dict(), spec, {"a": GroupMap.clusters([0, 1, 2, 2], 3)})
    soft = GroupMap.from_coupling(torch.eye(4) + 0.1)  # a dense map at the same width works
    same = apply_maps(model.state_dict(), spec, {"a": soft})
    want = model.state_dict()["c.weight"][:, 0::2, 0, 0].double() @ soft.dense()[1]
    torch.testing.assert_close(same["c.weight"][:, 0::2, 0, 0].double(), want, rtol=1e-5, atol=1e-6)


def test_second_moments_merge_as_a_mixture() -> None:
    bn = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 1))
    with torch.no_grad():
        bn[1].running_mean.copy_(torch.tensor([1.0, 3.0]))
        bn[1].running_var.copy_(torch.tensor([1.0, 2.0]))
    spec = fxfuse.find_groups(bn, torch.randn(2, 3, 1, 1))
    assert spec.roles[("1.running_var", 0)] == "second:1.running_mean"
    g = spec.groups_of("0.weight", 0)[0]
    out = apply_maps(bn.state_dict(), spec, {g: GroupMap.clusters([0, 0], 1)})
    # mixture of N(1, 1) and N(3, 2): mean 2, variance (1 + 1 + 2 + 9) / 2 - 4 = 2.5
    torch.testing.assert_close(out["1.running_mean"], torch.tensor([2.0]))
    torch.testing.assert_close(out["1.running_var"], torch.tensor([2.5]))


def test_maps_are_checked_and_tied_or_roleless_axes_refuse_dense_maps() -> None:
    with pytest.raises(PermutationError, match="permutation"):
        GroupMap.permutation([0, 0, 1])
    with pytest.raises(PermutationError, match="unmerge"):
        GroupMap(merge=torch.ones(2, 3), unmerge=torch.ones(2, 3))
    with pytest.raises(PermutationError, match="positive mass"):
        GroupMap.from_coupling(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    model = WideMLP(4)
    spec = fxfuse.find_groups(model, torch.randn(2, 6))
    g = spec.groups_of("net.0.weight", 0)[0]
    stripped = type(spec)(spec.groups, spec.axes, spec.cuts, spec.model, spec.tracer,
                          spec.activations, {})
    with pytest.raises(PermutationError, match="no role"):
        apply_maps(model.state_dict(), stripped, {g: GroupMap.copies([0, 1, 2, 3, 0], 4)})
    # a permutation needs no role
    apply_maps(model.state_dict(), stripped, {g: GroupMap.permutation([1, 0, 3, 2])})


def test_maps_round_trip_through_json() -> None:
    m = GroupMap.clusters([0, 1, 1], 2)
    back = GroupMap.from_dict(m.to_dict())
    assert torch.equal(back.dense()[0], m.dense()[0])
    p = GroupMap.permutation([2, 0, 1])
    assert torch.equal(GroupMap.from_dict(p.to_dict()).index, p.index)


def test_roles_are_derived_for_every_zoo_member() -> None:
    for name in models.names():
        entry = models.get(name)
        spec = fxfuse.find_groups(entry.factory(), entry.example_inputs())
        missing = [k for k, a in spec.axes.items() if a.groups and k not in spec.roles]
        assert not missing, f"{name}: no role for {missing[:3]}"
        roles = {r.split(":")[0] for r in spec.roles.values()}
        assert roles <= {"out", "in", "second"}, (name, roles)
