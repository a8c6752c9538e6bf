"""The functional core (fxfuse.core), the method registry and recipes (fxfuse.methods)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import fxfuse
import models
from fxfuse.align import ActivationMatching, WeightMatching
from fxfuse.core import (
    align_states,
    apply_fusion,
    load_fusion,
    merge_states,
    repair_states,
    save_fusion,
)
from fxfuse.errors import InputError, SpecError
from fxfuse.methods import config_to_dict, methods, recipe_from_json, recipe_to_json
from fxfuse.passes import FusionReport, Pass
from fxfuse.repair import Repair
from tests.regression.fusion_cases import batches, unrelated


def _pair(name: str = "vgg_bn") -> tuple[list[torch.nn.Module], tuple[torch.Tensor, ...]]:
    return [unrelated(name, 1), unrelated(name, 12)], models.get(name).example_inputs()


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@dataclass(frozen=True)
class HalfWay:
    """A user's own align method: align by weight matching, then keep only the first
    ``groups`` groups' permutations (parameters must reach the pass from a recipe)."""

    groups: int = 1
    data: Any = field(default=(), repr=False, metadata={"data": True})


class AlignHalfWay(Pass):
    name = "align-half-way"
    calls: list[int] = []

    def __init__(self, config: HalfWay) -> None:
        self.config = config

    def call(self, state: Any) -> None:
        from fxfuse.align.weights import AlignWeights

        AlignWeights(WeightMatching()).call(state)
        keep = [g.name for g in state.spec.groups][: self.config.groups]
        state.perms = [{g: p if g in keep else torch.arange(p.numel()) for g, p in ps.items()}
                       for ps in state.perms]
        AlignHalfWay.calls.append(self.config.groups)


def test_a_users_method_registered_once_runs_from_fuse_and_from_a_json_recipe() -> None:
    fxfuse.register_method("half-way", "align", HalfWay, lambda c: [AlignHalfWay(c)])
    try:
        nets, x = _pair()
        AlignHalfWay.calls.clear()
        direct = fxfuse.fuse(nets, x, align=HalfWay(groups=2), progress=False, data=[x[0]])
        recipe = recipe_to_json(align=HalfWay(groups=2), repair=None)
        assert json.loads(recipe) == {"align": {"method": "half-way", "groups": 2}, "repair": None}
        again = fxfuse.fuse(nets, x, progress=False, data=[x[0]], **recipe_from_json(recipe))
        assert AlignHalfWay.calls == [2, 2]
        assert _equal(direct, again)
        full = fxfuse.fuse(nets, x, align=WeightMatching(), progress=False)
        assert not _equal(direct, full)  # the user's pass really ran
        assert "half-way" in [m.name for m in methods("align")]
    finally:
        from fxfuse import methods as registry

        registry._BY_NAME.pop("half-way", None)
        registry._BY_TYPE.pop(HalfWay, None)


def test_recipes_round_trip_the_built_in_methods_and_refuse_bad_ones() -> None:
    text = recipe_to_json(align=WeightMatching(tol=0.0, max_iter=7), repair=Repair(eps=1e-4))
    back = recipe_from_json(text)
    assert back["align"] == WeightMatching(tol=0.0, max_iter=7)
    assert back["repair"].eps == 1e-4 and "data" not in config_to_dict(back["repair"])
    with pytest.raises(InputError, match="unknown method 'no-such-method'"):
        recipe_from_json('{"align": {"method": "no-such-method"}}')
    ot = recipe_from_json(recipe_to_json(align=fxfuse.OptimalTransport(reg=0.1), repair=None))
    assert ot["align"] == fxfuse.OptimalTransport(reg=0.1)
    with pytest.raises(InputError, match="no parameter 'lr'"):
        recipe_from_json('{"align": {"method": "weight", "lr": 1}}')
    with pytest.raises(InputError, match="keys among"):
        recipe_from_json('{"merge": null}')
    with pytest.raises(InputError, match="must be one of"):
        fxfuse.fuse(*_pair(), align="weight", progress=False)  # type: ignore[arg-type]


def test_data_is_passed_beside_the_configs() -> None:
    nets, x = _pair()
    data = batches("vgg_bn")
    beside = fxfuse.fuse(nets, x, align=ActivationMatching(), repair=Repair(), data=data,
                         progress=False)
    inside = fxfuse.fuse(nets, x, align=ActivationMatching(data=data), repair=Repair(data=data),
                         progress=False)
    assert _equal(beside, inside)
    with pytest.raises(InputError, match=r"needs data .* fuse\(\.\.\., data=batches\)"):
        fxfuse.fuse(nets, x, align=ActivationMatching(), progress=False)


def test_align_and_merge_on_state_dicts_equal_fuse() -> None:
    nets, x = _pair("resnet20")
    spec = fxfuse.find_groups(nets[0], x)
    states = [n.state_dict() for n in nets]
    maps = align_states(spec, states, WeightMatching())
    merged = merge_states(spec, states, maps, [0.5, 0.5])
    fused = fxfuse.fuse(nets, x, progress=False)
    assert all(torch.equal(merged[k], v) for k, v in fused.state_dict().items())
    # activation matching needs the models: a factory builds them from the states
    data = batches("resnet20")
    amaps = align_states(spec, states, ActivationMatching(), data=data,
                         factory=models.get("resnet20").factory)
    afused = fxfuse.fuse(nets, x, align=ActivationMatching(data=data), progress=False)
    amerged = merge_states(spec, states, amaps, [0.5, 0.5])
    assert all(torch.equal(amerged[k], v) for k, v in afused.state_dict().items())


def test_repair_on_state_dicts_equals_fuse() -> None:
    nets, x = _pair("vgg_bn")
    spec = fxfuse.find_groups(nets[0], x)
    states = [n.state_dict() for n in nets]
    data = batches("vgg_bn")
    factory = models.get("vgg_bn").factory
    maps = align_states(spec, states, WeightMatching())
    merged = merge_states(spec, states, maps, [0.5, 0.5])
    for config in (Repair(), fxfuse.ResetBatchNorm()):
        repaired = repair_states(spec, states, maps, merged, config, factory, data=data)
        fused = fxfuse.fuse(nets, x, repair=config, data=data, progress=False)
        assert any(not torch.equal(repaired[k], merged[k]) for k in merged)  # it repaired
        for k, v in fused.state_dict().items():
            torch.testing.assert_close(repaired[k], v, rtol=1e-6, atol=1e-7)


def test_a_saved_fusion_re_applies_to_the_same_models(tmp_path: Path) -> None:
    nets, x = _pair("flatten_net")
    report = FusionReport()
    fused = fxfuse.fuse(nets + [unrelated("flatten_net", 23)], x, progress=False, report=report)
    assert report.maps is not None and report.perms is not None
    for mk, pk in zip(report.maps, report.perms):
        assert all(torch.equal(mk[g].index, p) for g, p in pk.items())
    path = save_fusion(tmp_path / "fusion.json", report.spec, report.maps)  # type: ignore[arg-type]
    record = load_fusion(path)
    assert record.spec == report.spec
    again = apply_fusion(nets + [unrelated("flatten_net", 23)], record)
    assert _equal(fused, again)
    with pytest.raises(InputError, match="3 models"):
        apply_fusion(nets, record)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(SpecError, match="not an fxfuse fusion record"):
        load_fusion(tmp_path / "bad.json")
    with pytest.raises(InputError, match="does not exist"):
        save_fusion(tmp_path / "nodir" / "f.json", record.spec, record.maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "fusion.json"]


def test_dense_maps_round_trip_through_both_record_formats(tmp_path: Path) -> None:
    from fxfuse.maps import GroupMap

    nets, x = _pair("mlp")
    spec = fxfuse.find_groups(nets[0], x)
    g = spec.groups[0]
    dense = {g.name: GroupMap.clusters(torch.arange(g.size) % (g.size - 1), g.size - 1)}
    maps = [{}, dense]
    for suffix in (".json", ".pt"):
        record = load_fusion(save_fusion(tmp_path / f"f{suffix}", spec, maps))
        assert record.spec == spec and record.maps is not None
        m_back, u_back = record.maps[1][g.name].dense()
        m, u = dense[g.name].dense()
        assert torch.equal(m_back, m) and torch.equal(u_back, u)
    with pytest.raises(InputError, match=".json or .pt"):
        save_fusion(tmp_path / "f.txt", spec, maps)
