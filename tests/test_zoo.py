"""Discovery on every zoo model: verify passes, full hidden-layer coverage, golden group files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fxfuse
import models
from fxfuse.ir.layout import Sum, Unit
from fxfuse.permute import rel_diff
from fxfuse.testing import randomize_constants, uncovered_layers

GOLDEN = Path(__file__).parent / "golden"

# Zoo models whose hidden layers are knowingly not all covered: name -> (reason, the layers
# exactly); a gap must be listed here with its reason, never hidden.
EXPECTED_UNCOVERED: dict[str, tuple[str, list[str]]] = {}


@pytest.fixture(scope="module", params=models.names())
def zoo_case(request: pytest.FixtureRequest) -> tuple[str, object, tuple, fxfuse.PermutationSpec]:
    entry = models.get(request.param)
    model = randomize_constants(entry.factory(), seed=1)
    inputs = entry.example_inputs()
    return request.param, model, inputs, fxfuse.find_groups(model, inputs)


def test_verify_passes(zoo_case) -> None:
    name, model, inputs, spec = zoo_case
    assert spec.groups, f"{name}: no groups found"
    for seed in (0, 1):
        result = fxfuse.verify(model, spec, inputs, seed=seed)
        assert result.max_rel_diff < 1e-4


def test_hidden_layers_covered(zoo_case) -> None:
    name, model, _, spec = zoo_case
    missing = uncovered_layers(model, spec)
    if name in EXPECTED_UNCOVERED:
        reason, layers = EXPECTED_UNCOVERED[name]
        assert [m.split(":")[0] for m in missing] == layers, f"{name}: the gap changed: {missing}"
        pytest.xfail(reason)
    assert not missing, f"{name}: hidden layers in no group: {missing}"


def test_shuffle_symmetry_is_in_the_spec() -> None:
    """ShuffleNet V2's split / concat / shuffle as an interleaved sum: in unit stage2.2, the
    branch's output channels C_i (12, the second half of cat(x1, C)) land at odd positions
    2i + 1 after the shuffle; the next unit's chunk sends C_6..C_11 (positions 13, 15, ..., 23)
    into its branch only, at its input positions 1, 3, ..., 11.  Permuting those six channels (the
    conv's rows, its BatchNorm) and those six input columns of stage2.3.branch2.0 together is a
    symmetry, independent of everything else: the spec has it as one group, and permuting that
    group moves exactly those rows and columns."""
    entry = models.get("shufflenetv2_lib")
    model = randomize_constants(entry.factory(), seed=1)
    inputs = entry.example_inputs()
    spec = fxfuse.find_groups(model, inputs)
    layout = spec.axes[("stage2.2.branch2.5.weight", 0)].layout
    assert isinstance(layout, Sum) and len(layout.parts) == 2
    second = layout.parts[1]
    assert isinstance(second, Unit)  # C_6..C_11: one group of their own
    sigma = torch.tensor([3, 0, 5, 1, 4, 2])
    state = model.state_dict()
    moved = fxfuse.permute(model, spec, {second.group: sigma}).state_dict()
    rows = torch.arange(12)
    rows[6:] = 6 + sigma
    cols = torch.arange(12)
    cols[1::2] = cols[1::2][sigma]
    want = {k: v[rows] for k, v in state.items() if k.startswith("stage2.2.branch2.") and
            k.split(".")[3] in ("5", "6") and v.dim() > 0}
    want["stage2.3.branch2.0.weight"] = state["stage2.3.branch2.0.weight"][:, cols]
    for key, v in state.items():
        assert torch.equal(moved[key], want.get(key, v)), key

    with torch.no_grad():
        assert rel_diff(model(*inputs), fxfuse.permute(model, spec, {second.group: sigma})(
            *inputs)) < 1e-6


def test_golden_groups(zoo_case, request: pytest.FixtureRequest) -> None:
    name, _, _, spec = zoo_case
    path = GOLDEN / f"{name}.txt"
    text = str(spec) + "\n"
    if request.config.getoption("--regen-golden"):
        path.write_text(text)
    assert path.exists(), f"missing {path}: run pytest --regen-golden"
    assert text == path.read_text(), f"{name}: groups changed; inspect and run pytest --regen-golden"


def test_spec_json_round_trip(zoo_case) -> None:
    _, _, _, spec = zoo_case
    again = fxfuse.PermutationSpec.from_json(spec.to_json())
    assert again == spec
    assert str(again) == str(spec)
    assert [list(g.members) for g in again.groups] == [list(g.members) for g in spec.groups]
