"""find_groups pauses Python's cyclic garbage collector while it runs and leaves it as it was."""

from __future__ import annotations

import gc

import pytest
import torch

import fxfuse
import models


@pytest.fixture(autouse=True)
def _no_kept_specs() -> None:
    """Every call here discovers (none finds its spec kept: fxfuse.groups.memo)."""
    fxfuse.groups.clear_spec_cache()


def _mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    entry = models.get("mlp")
    return entry.factory(), entry.example_inputs()


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_state_is_restored(enabled: bool) -> None:
    model, inputs = _mlp()
    seen: list[bool] = []
    real = fxfuse.groups.discover

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        fxfuse.groups.discover = spy  # type: ignore[assignment]
        fxfuse.find_groups(model, inputs)
        assert seen == [False]  # paused while discovery ran
        assert gc.isenabled() is enabled
    finally:
        fxfuse.groups.discover = real  # type: ignore[assignment]
        (gc.enable if was else gc.disable)()


def test_collector_is_restored_after_an_error() -> None:
    model, _ = _mlp()
    assert gc.isenabled()
    with pytest.raises(fxfuse.InputError):
        fxfuse.find_groups(model, torch.randn(2, 3))  # the wrong input shape
    assert gc.isenabled()


def test_discovery_state_is_freed_before_the_collector_resumes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The collection the resumed collector makes first must not find discovery's working
    state (graph, atom table: thousands of objects) alive: it would promote all of it to the
    older generations, whose later passes then scan it again, and a full pass over the whole
    heap follows every few hundred calls."""
    import weakref

    model, inputs = _mlp()
    refs: list[weakref.ref[object]] = []
    real = fxfuse.groups.discover

    def spy(*args: object, **kwargs: object) -> object:
        disc = real(*args, **kwargs)  # type: ignore[arg-type]
        refs.append(weakref.ref(disc))
        return disc

    alive_at_resume: list[bool] = []
    enable = gc.enable

    def resume() -> None:
        alive_at_resume.append(refs[0]() is not None)
        enable()

    monkeypatch.setattr(fxfuse.groups, "discover", spy)
    monkeypatch.setattr(gc, "enable", resume)
    assert gc.isenabled()
    spec = fxfuse.find_groups(model, inputs)
    assert alive_at_resume == [False]
    assert spec.groups  # the spec itself lives on


def _second_call_garbage(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
                         ) -> tuple[fxfuse.PermutationSpec, list[str]]:
    """A warm find_groups' spec, and the type names of what it left for the collector (objects
    in reference cycles, unreachable once it returned)."""
    fxfuse.find_groups(model, inputs)
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        spec = fxfuse.find_groups(model, inputs)
        gc.collect()
        return spec, [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vit_tiny"])
def test_discovery_leaves_no_graph_for_the_collector(name: str) -> None:
    """Discovery's graph (and all its nodes' values and layouts) is freed by reference counting
    when find_groups returns; before, fx's tracer (held by a cycle fx's trace leaves) and the
    graph's own cycles waited for a collector pass over every object the call made."""
    entry = models.get(name)
    model, inputs = entry.factory(), entry.example_inputs()
    spec, garbage = _second_call_garbage(model, inputs)
    assert not {"Node", "Graph"} & set(garbage)
    assert len(garbage) < 100, sorted(set(garbage))
    assert spec.groups and spec.to_json() == fxfuse.find_groups(model, inputs).to_json()


class _ShapeBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # unpacks fx's Attribute proxy (x.shape): fx's own iteration kept
        return x + self.fc(x).reshape(b, t, c)  # its frame, and so the trace, in a cycle


def test_unpacking_a_shape_leaves_no_graph_for_the_collector() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), *(_ShapeBlock() for _ in range(4)),
                                torch.nn.Linear(8, 2))
    spec, garbage = _second_call_garbage(model, (torch.randn(2, 3, 4),))
    assert not {"Node", "Graph", "Instruction", "frame"} & set(garbage), sorted(set(garbage))
    assert len(garbage) < 100, sorted(set(garbage))
    assert spec.axes[("1.fc.weight", 0)].groups == spec.axes[("0.weight", 0)].groups != []
