"""The printed group table never breaks a member (parameter name and layout) across lines."""

from __future__ import annotations

import torch
from torch import nn

import fxfuse
from fxfuse.groups.spec import pack_items


def test_pack_items_keeps_every_item_whole() -> None:
    items = ["a" * 10, "b" * 10, "c" * 30, "d"]
    lines = pack_items(items, 25)
    assert lines == ["aaaaaaaaaa, bbbbbbbbbb,", "c" * 30 + ",", "d"]
    assert " ".join(lines).replace(", ", ",").replace(" ", ",").split(",") == items
    assert pack_items([], 10) == [""]


class Deep(nn.Module):
    """Parameter names longer than the table's width."""

    def __init__(self) -> None:
        super().__init__()
        name = "a_really_long_submodule_name_that_goes_on_and_on_and_on_for_quite_a_while"
        self.add_module(name, nn.Linear(4, 6))
        self.add_module(name + "_second_one_of_the_same_kind", nn.Linear(6, 3))
        self.names = (name, name + "_second_one_of_the_same_kind")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (getattr(self, n) for n in self.names)
        return second(torch.relu(first(x)))


def test_long_parameter_names_are_not_broken() -> None:
    spec = fxfuse.find_groups(Deep(), torch.randn(2, 4))
    text = str(spec)
    lines = text.splitlines()
    for g in spec.groups:
        for m in g.members:
            assert any(str(m) in line for line in lines), str(m)
    for a in spec.fixed_axes:
        assert any(f"{a.key}:{a.axis}" in line for line in lines), (a.key, a.axis)


def test_a_spec_pickles_and_copies() -> None:
    import copy
    import pickle

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = fxfuse.find_groups(model, torch.randn(2, 3))
    for again in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert again.to_json() == spec.to_json()
        assert [m.layout for g in again.groups for m in g.members] == [
            m.layout for g in spec.groups for m in g.members]
