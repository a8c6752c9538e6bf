"""The specs find_groups keeps per form of a traced model (fxfuse.groups.memo): a model discovered
again gets the spec a fresh discovery gives, and anything discovery reads that changed is a miss."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
import models
from fxfuse.groups import clear_spec_cache, memo
from fxfuse.rules import Same, axis_rule, registry


def _text(spec: fxfuse.PermutationSpec) -> str:
    return "\n".join([spec.to_json(), str(spec), repr(spec.axes), repr(spec.activations),
                      repr(spec.groups), repr(spec.cuts), repr(spec.roles)])


def _fresh(model: nn.Module, inputs: Any) -> fxfuse.PermutationSpec:
    clear_spec_cache()
    return fxfuse.find_groups(model, inputs)


def _kept(model: nn.Module, inputs: Any) -> fxfuse.PermutationSpec:
    """Discover ``model`` twice: an outline's first discovery is not kept, its second is."""
    fxfuse.find_groups(model, inputs)
    return fxfuse.find_groups(model, inputs)


@pytest.fixture(autouse=True)
def _empty_memo() -> Any:
    clear_spec_cache()
    yield
    clear_spec_cache()


@pytest.mark.parametrize("name", models.names())
def test_a_model_discovered_again_gets_the_spec_a_fresh_discovery_gives(name: str) -> None:
    entry = models.get(name)
    model, inputs = entry.factory().eval(), entry.example_inputs()
    first = fxfuse.find_groups(model, inputs)
    assert len(memo._SPECS) == 0  # a first discovery is not kept
    second = fxfuse.find_groups(model, inputs)
    kept = len(memo._SPECS)
    again = fxfuse.find_groups(model, inputs)
    assert _text(second) == _text(first)
    assert _text(again) == _text(first) == _text(_fresh(model, inputs))
    if not (first.cuts or first.probed or first.notes):
        assert kept == 1  # the zoo's models have exact keys: each is kept
    assert again is not first and again.groups is not first.groups


def test_a_caller_changing_its_spec_does_not_change_the_next_one() -> None:
    entry = models.get("resnet20")
    model, inputs = entry.factory().eval(), entry.example_inputs()
    want = _text(_fresh(model, inputs))
    spec = _kept(model, inputs)
    spec.groups.pop()
    spec.groups[0].members.clear()
    spec.axes.clear()
    spec.activations.clear()
    spec.roles.clear()
    again = fxfuse.find_groups(model, inputs)
    again.axes.clear()
    assert _text(fxfuse.find_groups(model, inputs)) == want


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tying_weights_between_calls_is_a_miss() -> None:
    model, x = _Two().eval(), torch.randn(2, 8)
    untied = _kept(model, x)
    model.b.weight = model.a.weight  # same shapes, one tensor: a and b now share their groups
    tied = fxfuse.find_groups(model, x)
    assert _text(tied) == _text(_fresh(model, x))
    assert len(tied.groups) < len(untied.groups)


class _Chunked(nn.Module):
    def __init__(self, halves: bool) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(8, 4)
        self.halves = halves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        a, b = (h.chunk(2, dim=-1) if self.halves else (h[..., :8], h[..., 8:]))
        return self.down(a * b)


def test_a_traced_attribute_changing_between_calls_is_a_miss() -> None:
    model, x = _Chunked(halves=True).eval(), torch.randn(2, 8)
    before = _kept(model, x)
    model.halves = False  # another graph: slices instead of chunk
    after = fxfuse.find_groups(model, x)
    assert _text(after) == _text(_fresh(model, x))
    assert _text(after) != _text(before)


class _Scale(nn.Module):
    """A leaf with a user rule that reads an attribute (``shared``) no form lists."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.shared = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class _ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.s = _Scale()
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.s(self.a(x)))


def _cut_rule(op: Any) -> list[Any]:
    x, y, w = op.args[0], op.out, op.param("weight")
    return [Same(x[0], y[0]), Same(w[0], y[1])]  # x's channels left unrelated: fixed


def _shared_rule(op: Any) -> list[Any]:
    x, y = op.args[0], op.out
    if op.module.shared:  # y = x * w: channels stay channels
        return [*_cut_rule(op), Same(x[1], y[1])]
    return _cut_rule(op)


@pytest.fixture
def scale_rule() -> Any:
    axis_rule(_Scale)(_shared_rule)  # a module with a rule is a leaf of the trace
    yield
    registry._RULES.pop(_Scale, None)


def test_a_rule_reading_a_module_attribute_sees_it_change(scale_rule: Any) -> None:
    model, x = _ScaleNet().eval(), torch.randn(2, 8)
    joined = _kept(model, x)
    model.s.shared = False  # the rule now leaves x[1] and y[1] unrelated: fixed
    apart = fxfuse.find_groups(model, x)
    assert _text(apart) == _text(_fresh(model, x))
    assert _text(apart) != _text(joined)


def test_another_rule_registered_between_calls_is_a_miss(scale_rule: Any) -> None:
    model, x = _ScaleNet().eval(), torch.randn(2, 8)
    before = _kept(model, x)
    axis_rule(_Scale)(_cut_rule)
    after = fxfuse.find_groups(model, x)
    assert _text(after) == _text(_fresh(model, x))
    assert _text(after) != _text(before)


def test_inputs_of_other_shapes_make_other_keys() -> None:
    model = models.get("resnet20").factory().eval()
    seen = []
    for shape in [(2, 3, 32, 32), (2, 3, 16, 16), (1, 3, 32, 32)]:
        _kept(model, torch.randn(*shape))
        seen.append(len(memo._SPECS))
    assert seen == [1, 2, 3]


def test_the_spec_names_the_class_of_each_model() -> None:
    class Other(_Two):
        pass

    x = torch.randn(2, 8)
    assert fxfuse.find_groups(_Two().eval(), x).model == "_Two"
    assert fxfuse.find_groups(Other().eval(), x).model == "Other"


def test_values_a_key_can_not_hold_exactly_keep_nothing(scale_rule: Any) -> None:
    model, x = _ScaleNet().eval(), torch.randn(2, 8)
    model.a.extra = np.int64(3)  # an attribute of a type the key does not know (nn.Linear:
    # a form rule reads none, so it is keyed as its listed attributes only) -> still kept
    _kept(model, x)
    assert len(memo._SPECS) == 1
    clear_spec_cache()
    model.s.extra = np.int64(3)  # _Scale has no form rule: all its attributes are read
    spec = _kept(model, x)
    assert len(memo._SPECS) == 0
    assert _text(fxfuse.find_groups(model, x)) == _text(spec)


@pytest.mark.parametrize("a, b", [(1, True), (1, 1.0), (0.0, -0.0), ((1, 2), [1, 2]),
                                  ("x", ("x",))])
def test_the_key_tells_apart_values_python_calls_equal(a: Any, b: Any) -> None:
    assert memo._canon(a) != memo._canon(b)
    assert memo._canon(a) == memo._canon(a) and hash(memo._canon(a)) == hash(memo._canon(a))


class _Cut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.fft.fft(self.a(x)).real, torch.eye(8))


def test_discoveries_with_cuts_or_probes_are_not_kept() -> None:
    spec = _kept(_Cut().eval(), torch.randn(2, 8))
    assert spec.cuts or spec.probed
    assert len(memo._SPECS) == 0


def test_a_new_outline_is_not_keyed_and_its_second_discovery_is_kept() -> None:
    from fxfuse.groups.discover import _state_tensors, symbolic_graph

    model, x = _Two().eval(), (torch.randn(2, 8),)
    graph, tensors = symbolic_graph(model, x), _state_tensors(model)
    assert memo.form_key(model, graph, tensors, ("auto",)) is None  # first sight: no key made
    key = memo.form_key(model, graph, tensors, ("auto",))
    assert key is not None and key == memo.form_key(model, graph, tensors, ("auto",))
    clear_spec_cache()  # forgets the outlines too
    assert memo.form_key(model, graph, tensors, ("auto",)) is None


def test_the_memo_keeps_a_bounded_number_of_specs() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    for n in range(1, memo._KEPT + 6):
        fxfuse.find_groups(model, torch.randn(n, 4))
    assert len(memo._SPECS) == memo._KEPT
    clear_spec_cache()
    assert len(memo._SPECS) == 0


# -- keys from the trace alone (memo.shape_key) -------------------------------------------------
def _kinds() -> list[str]:
    """How each kept spec is keyed: "shapes" (before the recording) or "values" (after it)."""
    return ["shapes" if k.rows[1] is memo._SHAPES else "values" for k in memo._SPECS]


def _recordings(monkeypatch: Any) -> list[int]:
    """Count the recordings (the model's runs) find_groups makes."""
    import fxfuse.groups as groups

    runs: list[int] = []
    record = groups.record_values

    def counted(*args: Any, **kwargs: Any) -> None:
        runs.append(1)
        record(*args, **kwargs)

    monkeypatch.setattr(groups, "record_values", counted)
    return runs


def test_a_repeat_whose_shapes_say_it_all_does_not_run_the_model(monkeypatch: Any) -> None:
    model, x = _Two().eval(), torch.randn(2, 8)
    runs = _recordings(monkeypatch)
    spec = _kept(model, x)
    assert (len(runs), _kinds()) == (2, ["shapes"])
    again = fxfuse.find_groups(model, x)
    assert len(runs) == 2  # a hit before the recording
    assert _text(again) == _text(spec) == _text(_fresh(model, x))
    fxfuse.find_groups(model, torch.randn(5, 8))  # another batch size: another key, recorded
    assert len(runs) == 4


class _Clamped(_Two):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).clamp(min=0)))  # clamp: not in the shape tables


def test_an_op_outside_the_shape_tables_is_keyed_after_the_recording(monkeypatch: Any) -> None:
    model, x = _Clamped().eval(), torch.randn(2, 8)
    runs = _recordings(monkeypatch)
    spec = _kept(model, x)
    assert _kinds() == ["values"]
    assert _text(fxfuse.find_groups(model, x)) == _text(spec)
    assert len(runs) == 3  # every call records


def test_a_hook_on_a_called_module_is_keyed_after_the_recording() -> None:
    model, x = _Two().eval(), torch.randn(2, 8)
    before = _kept(model, x)
    handle = model.b.register_forward_hook(lambda m, i, o: o.unsqueeze(1))  # another shape
    try:
        clear_spec_cache()
        hooked = _kept(model, x)
        assert _kinds() == ["values"]  # a hook's output is seen only by the recording
        assert _text(fxfuse.find_groups(model, x)) == _text(hooked)
    finally:
        handle.remove()
    assert _text(fxfuse.find_groups(model, x)) == _text(before)


def _shape_key(model: nn.Module, *inputs: Any, graph: Any = None) -> Any:
    from fxfuse.groups.discover import _state_tensors
    from fxfuse.trace import trace_graph

    graph = graph or trace_graph(model, stack_traces=False)
    return memo.shape_key(model, graph, _state_tensors(model), inputs, ("auto",))


def test_a_shape_key_holds_the_inputs_dtypes_and_shapes_and_the_default_dtype() -> None:
    model = _Two().eval()
    key = _shape_key(model, torch.randn(2, 8))
    assert key is not None and key == _shape_key(model, torch.randn(2, 8))
    assert key != _shape_key(model, torch.randn(3, 8))
    assert key != _shape_key(model, torch.randn(2, 8, dtype=torch.float64))
    assert key != _shape_key(model, torch.randn(8, 2).t())  # not contiguous: a view may fail
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert _shape_key(model, torch.randn(2, 8, dtype=torch.float32)) != key
    finally:
        torch.set_default_dtype(old)


class _Sub(torch.Tensor):
    pass


def test_no_shape_key_where_something_outside_it_may_change_the_shapes() -> None:
    model, x = _Two().eval(), torch.randn(2, 8)
    assert _shape_key(model, x) is not None
    with torch.autocast("cpu"):
        assert _shape_key(model, x) is None
    from torch.overrides import TorchFunctionMode

    from fxfuse.trace import trace_graph

    graph = trace_graph(model, stack_traces=False)  # fx does not trace under a mode
    with TorchFunctionMode():
        assert _shape_key(model, x, graph=graph) is None
    assert _shape_key(model, x.as_subclass(_Sub)) is None
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert _shape_key(model, x) is None
    finally:
        handle.remove()
    with torch.no_grad():
        weight = model.a.weight
        model.a.weight = nn.Parameter(weight.as_subclass(_Sub))  # a subclass in the state
        assert _shape_key(model, x) is None
        model.a.weight = weight
    assert _shape_key(model, x) is not None
    model.b.forward = lambda t: t[:, :3]  # type: ignore[method-assign]
    assert _shape_key(model, x) is None


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x)
        return h[:, 1:5], h[h[:, 0] > 0], h[:, torch.tensor([0, 2])]


def test_an_index_by_a_tensor_is_found_after_the_recording() -> None:
    from fxfuse.trace import record_values, trace_graph

    model, x = _Masked().eval(), torch.randn(4, 8)
    graph = trace_graph(model, stack_traces=False)
    record_values(graph, (x,))
    assert not memo.shapes_suffice(graph)
    index = [n for n in graph.graph.nodes if n.target is operator.getitem]
    for n in index[1:]:  # only the slice stays: shapes suffice
        n.replace_all_uses_with(n.args[0])
        graph.graph.erase_node(n)
    assert memo.shapes_suffice(graph)


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 12), nn.Linear(12, 3)
        self.register_buffer("heads", torch.tensor(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # a 0-dim integer buffer's *value* is a size
        return self.b(h.view(h.size(0), self.heads, -1).transpose(1, 2).reshape(h.size(0), -1))


def test_an_integer_tensor_as_an_argument_is_keyed_after_the_recording() -> None:
    model, x = _Heads().eval(), torch.randn(2, 4)
    _kept(model, x)
    assert _kinds() == ["values"]
    model.heads.fill_(3)  # same shape and dtype, other shapes downstream
    hit = fxfuse.find_groups(model, x)
    assert _text(hit) == _text(_fresh(model, x))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_shape_key_holds_strides_and_devices_and_only_plain_strided_tensors() -> None:
    model, x = _Two().eval(), torch.randn(2, 8)
    key = _shape_key(model, x)
    assert key != _shape_key(model, torch.randn(8, 4)[::4])  # (2, 8), other strides
    assert _shape_key(model, x.to_sparse_csr()) is None
    model.a.register_buffer("extra", torch.zeros(8).as_subclass(_Sub), persistent=False)
    assert _shape_key(model, x) is None  # not in the state_dict, still a subclass
    del model.a.extra
    assert _shape_key(model, x) == key
    assert _shape_key(model.to("meta"), x) != key  # the model on another device than before


class _Viewed(_Two):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.view(x.size(0), -1) + self.shift)


def test_a_model_that_no_longer_runs_on_its_inputs_raises_as_a_fresh_discovery_does() -> None:
    model, x = _Viewed().eval(), torch.randn(2, 2, 4)
    _kept(model, x)
    assert _kinds() == ["shapes"]
    with pytest.raises(fxfuse.errors.InputError):  # strides a view can not take: recorded
        fxfuse.find_groups(model, torch.randn(2, 4, 2).transpose(1, 2))
    with pytest.raises(fxfuse.errors.InputError):  # the model on another device
        fxfuse.find_groups(model.to("meta"), x)
