"""Discovery keeps a form rule's relations per op form (``fxfuse.groups.discover._RELATIONS``):
a kept application gives what calling the rule gives, forms that a rule could tell apart get
different keys, and a rule that is not marked as a function of the form runs every time."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from torch import nn

import fxfuse
import models
from fxfuse.groups import clear_spec_cache
from fxfuse.rules import RuleError, Same, TensorHandle, axis_rule, lookup
from fxfuse.rules.registry import _RULES, form_attrs

# the module (fxfuse.groups.discover, the attribute, is the function of that name)
disc = importlib.import_module("fxfuse.groups.discover")


def _spec(name: str) -> str:
    e = models.get(name)
    return fxfuse.find_groups(e.factory(), e.example_inputs()).to_json()


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "densenet", "grouped_conv",
                                  "channel_shuffle_net", "se_net", "resnet20_ln", "groupnorm_net",
                                  "rmsnorm_mlp"])
def test_kept_relations_give_the_rules_spec(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    disc._RELATIONS.clear()
    cold = _spec(name)  # first use of each form (later nodes of a form already hit)
    warm = _spec(name)  # every form kept
    monkeypatch.setattr(disc, "form_attrs", lambda rule: None)  # nothing kept: every rule runs
    fresh = _spec(name)
    assert cold == warm == fresh


def test_forms_that_differ_to_a_rule_get_different_keys() -> None:
    rule = lookup(nn.ReLU)
    assert rule is not None and form_attrs(rule) == ()
    x, y = TensorHandle(0, (2, 3), torch.float32), TensorHandle(1, (2, 3), torch.float32)

    def key(*args: Any, out: Any = y, kwargs: dict[str, Any] | None = None) -> Any:
        return disc._form_key(rule, torch.add, None, args, kwargs or {}, out, {})

    assert key(x, 1) == key(x, 1)
    assert len({key(x, 1), key(x, True), key(x, 1.0), key(x, "1"), key(x, None), key(x),
                key(x, (1,)), key(x, [1]), key(x, kwargs={"alpha": 1}),
                key(x, TensorHandle(1, (2, 3), torch.float32), out=TensorHandle(
                    2, (2, 3), torch.float32)),
                key(TensorHandle(0, (2, 3), torch.float64), 1),
                key(TensorHandle(0, (2, 1), torch.float32), 1)}) == 12
    assert key(x, object()) is None  # a value a form does not hold: the rule runs

    conv = lookup(nn.Conv2d)
    assert conv is not None and form_attrs(conv) == ("groups",)
    a, b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    params = {"weight": TensorHandle(2, (4, 4, 1, 1), torch.float32)}
    x4, y4 = TensorHandle(0, (1, 4, 2, 2), torch.float32), TensorHandle(1, (1, 4, 2, 2),
                                                                           torch.float32)

    def conv_key(m: nn.Module) -> Any:
        return disc._form_key(conv, "c", m, (x4,), {}, y4, params)

    assert conv_key(a) == conv_key(b)
    b.groups = 2  # the rule reads it: another form
    assert conv_key(a) != conv_key(b)
    assert disc._form_key(conv, "c", a, (x4,), {}, y4, {}) != conv_key(a)  # no weight

    norm = lookup(nn.LayerNorm)
    assert norm is not None and form_attrs(norm) == ("normalized_shape",)
    x3 = TensorHandle(0, (2, 3, 4), torch.float32)
    y3 = TensorHandle(1, (2, 3, 4), torch.float32)
    one, two = nn.LayerNorm(4, elementwise_affine=False), nn.LayerNorm((3, 4),
                                                                      elementwise_affine=False)
    assert (disc._form_key(norm, "n", one, (x3,), {}, y3, {})
            != disc._form_key(norm, "n", two, (x3,), {}, y3, {}))


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_a_rule_not_marked_runs_every_time() -> None:
    calls: list[str] = []

    def scale_rule(op: Any) -> list[Any]:
        calls.append(op.target)
        x, y, w = op.args[0], op.out, op.param("w")
        return [Same(x[0], y[0]), Same(x[1], y[1]), Same(w[0], y[1])]

    model = nn.Sequential(nn.Linear(2, 3), _Scale(), _Scale(), nn.ReLU(), nn.Linear(3, 2))
    axis_rule(_Scale)(scale_rule)
    try:
        for _ in range(2):
            clear_spec_cache()  # the whole spec is kept per model form (tests/test_spec_memo.py)
            fxfuse.find_groups(model, torch.randn(4, 2))
    finally:
        _RULES.pop(_Scale, None)
    assert calls == ["1", "2", "1", "2"]


def test_a_rule_returning_a_tuple_is_a_rule_error() -> None:
    def bad_rule(op: Any) -> list[Any]:
        return [((0, 1), (1, 1))]  # not a relation (the driver's own compiled form looks alike)

    axis_rule(_Scale)(bad_rule)
    try:
        with pytest.raises(RuleError, match="not a relation"):
            fxfuse.find_groups(nn.Sequential(nn.Linear(2, 3), _Scale()), torch.randn(4, 2))
    finally:
        _RULES.pop(_Scale, None)


def _grouped(groups: Any) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=groups),
                         nn.Conv2d(8, 4, 1), nn.GroupNorm(2, 4)).eval()


def test_a_numpy_group_count_gives_the_same_spec_cold_and_warm() -> None:
    """Found in review: a module attribute entered the form key as a raw value, so a numpy
    ``groups`` matched an int's key (equal and of equal hash) and got the kept relations an
    int's rule made, while a fresh process declined it: the spec depended on what the process
    had seen.  Module attributes take the typed form now, and the rules read a numpy integer
    count as its int."""
    import numpy as np

    x = torch.randn(1, 3, 6, 6)
    disc._RELATIONS.clear()
    model = _grouped(np.int64(2))
    model[3].num_groups = np.int64(2)
    cold = fxfuse.find_groups(model, x).to_json()
    fxfuse.find_groups(_grouped(2), x)
    assert fxfuse.find_groups(model, x).to_json() == cold
    spec = fxfuse.find_groups(model, x)
    assert any(g.size == 2 for g in spec.groups)  # the conv's (and the norm's) groups
    assert fxfuse.find_groups(_grouped(2), x).to_json() == cold
    fxfuse.verify(model, spec, x)
