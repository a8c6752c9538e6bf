"""fxfuse's tracer makes fx's two trace-time patches of ``nn.Module`` (``__call__`` and
``__getattr__``) per instance (:mod:`fxfuse._patcher`): the graphs, opaque calls, errors and
the model's state after a trace must be those of fx's own class patches, and ``nn.Module``'s
slots must never be assigned."""

from __future__ import annotations

import collections
import copy
import pickle
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxfuse
import fxfuse._patcher as patcher
import models
from fxfuse.trace import _Tracer, trace_graph

from .test_trace_speed_equivalence import _FxTracer, _signature

_CALL = nn.Module.__dict__["__call__"]
_GETATTR = nn.Module.__dict__["__getattr__"]
_CALL_IMPL = nn.Module.__dict__["_call_impl"]


def _class_patched(model: nn.Module, buffers: bool = False) -> tuple[Any, ...]:
    """The trace with fx's own class patches (the oracle)."""
    saved = patcher._SUPPORTED
    patcher._SUPPORTED = False
    try:
        return _outcome(model, buffers)
    finally:
        patcher._SUPPORTED = saved


def _outcome(model: nn.Module, buffers: bool = False) -> tuple[Any, ...]:
    tracer = _Tracer(False)
    tracer.proxy_buffer_attributes = buffers
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # the same error, word for word
        return ("error", type(exc), str(exc))
    return ("graph", _signature(graph), dict(tracer.opaque))


class ParamReads(nn.Module):
    """Parameters read in forward: in a call, through a method, by shape, twice, a None."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))
        self.bias = None
        self.inner = nn.Linear(6, 6)
        self.register_buffer("scale", torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        y = y + self.weight.t().sum(0)[: self.weight.shape[0]]
        y = self.inner(y) * self.scale
        return F.linear(y, self.inner.weight) + self.weight.sum()


class Shared(nn.Module):
    """A module called twice, a tied parameter under two names, a forward pre-hook on a
    module traced into, a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.seq = nn.Sequential(nn.ReLU(), ParamFree())
        self.seq.register_forward_pre_hook(lambda m, args: (args[0] * 2,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(self.a(self.a(x)) + F.linear(x, self.b.weight))


class ParamFree(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.relu() + 1


class Opaque(nn.Module):
    """A submodule that can not be traced (control flow on a value): rolled back, opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.w
        if y.sum() > 0:
            return y
        return -y


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.odd = Opaque()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(self.fc(x)) * self.odd.w


class Rotary(nn.Module):
    """Slices a buffer by a traced size: fails unless buffers are proxied."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cos", torch.randn(16, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.cos[: x.size(1)]


class Stranger(nn.Module):
    """Calls a module that is not in its tree."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        object.__setattr__(self, "other", nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.fc(x))


class Registers(nn.Module):
    """Registers a parameter during forward the first time it runs, beside another."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.child = ParamFree()
        self.child.first = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.child, "late"):
            self.child.register_parameter("late", nn.Parameter(torch.ones(4)))
        return self.child(self.fc(x)) * self.child.late


class OwnCallImpl(nn.Linear):
    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return super()._call_impl(*args, **kwargs)


class WithOwnCallImpl(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = OwnCallImpl(4, 4)
        self.inner = ParamFree()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.fc(x))


class SlotSpy(nn.Module):
    """Records ``nn.Module``'s own ``__call__`` / ``__getattr__`` while it is traced."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen: list[tuple[Any, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((nn.Module.__dict__["__call__"], nn.Module.__dict__["__getattr__"]))
        return self.fc(x) * self.fc.weight.sum()


class Reverts(nn.Module):
    """Code that runs with fx's patches reverted mid-trace (``torch._dynamo`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = ParamFree()
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fx._symbolic_trace._maybe_revert_all_patches():
            self.seen.append((nn.Module.__dict__["_call_impl"] is _CALL_IMPL,
                              type(self.fc.__dict__["_parameters"]) is dict,
                              type(self.fc(torch.ones(1, 4)))))
        return self.inner(self.fc(x)) * self.fc.weight.sum()


CASES: dict[str, Any] = {
    "param_reads": ParamReads, "shared": Shared, "with_opaque": WithOpaque, "rotary": Rotary,
    "stranger": Stranger, "own_call_impl": WithOwnCallImpl, "reverts": Reverts,
}


def _state(model: nn.Module) -> list[tuple[str, int, type, list[tuple[str, int]]]]:
    return [(name, id(d), type(d), [(k, id(v)) for k, v in d.items()])
            for m_name, m in model.named_modules()
            for name, d in ((f"{m_name}._parameters", m._parameters),
                            (f"{m_name}._buffers", m._buffers))]


def _untouched() -> None:
    assert nn.Module.__dict__["__call__"] is _CALL
    assert nn.Module.__dict__["__getattr__"] is _GETATTR
    assert nn.Module.__dict__["_call_impl"] is _CALL_IMPL
    assert fx._symbolic_trace.CURRENT_PATCHER is None
    assert fx._symbolic_trace._new_patcher.__module__ == "torch.fx._symbolic_trace"
    assert torch.overrides.is_tensor_method_or_property.__module__ == "torch.overrides"


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_instance_patches_trace_as_fxs_class_patches(name: str, buffers: bool) -> None:
    model = CASES[name]()
    before = _state(model)
    ours = _outcome(model, buffers)
    _untouched()
    assert _state(model) == before  # the same dicts, holding the same tensors
    oracle = CASES[name]()
    assert ours == _class_patched(oracle, buffers)
    if name == "reverts":  # fx's patches are off inside the block, as with fx's own
        assert ours[0] == "graph"
        assert model.seen == oracle.seen == [(True, True, torch.Tensor)]


@pytest.mark.parametrize("name", ["mlp", "resnet20", "densenet", "vit_tiny", "shufflenetv2_lib",
                                  "tied_block_net", "node_net", "llama_lm", "leaf_mlp"])
def test_zoo_traces_as_with_class_patches(name: str) -> None:
    model = models.get(name).factory()
    assert _outcome(model) == _class_patched(model)
    _untouched()


def test_no_slot_of_nn_module_is_assigned_during_a_trace() -> None:
    model = SlotSpy()
    graph = _Tracer(False).trace(model)
    assert model.seen == [(_CALL, _GETATTR)]
    assert [n.op for n in graph.nodes].count("get_attr") == 1  # fc.weight, a proxy as in fx


def test_a_parameter_registered_during_the_trace_stays() -> None:
    model = Registers()
    ours = _outcome(model)
    assert ours[0] == "graph"
    assert list(model.child._parameters) == ["first", "late"]
    assert isinstance(model.child.late, nn.Parameter)
    assert type(model.child._parameters) is dict
    assert ours == _class_patched(Registers())


def test_state_is_restored_when_the_root_trace_fails() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x) * self.fc.weight.sum()
            if y.sum() > 0:
                return y
            return -y

    model = Fails()
    before = _state(model)
    with pytest.raises(fx.proxy.TraceError):
        _Tracer(False).trace(model)
    _untouched()
    assert _state(model) == before


def test_compiled_submodules_use_fxs_class_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Shared()
    model.a._compiled_call_impl = lambda *a, **k: None  # what Module.compile() sets
    def get(n: str, v: Any) -> Any:
        return v

    def on_change() -> None:
        pass

    assert patcher.instance_patching(model, get, on_change, False) is None
    assert patcher.instance_patching(WithOwnCallImpl(), get, on_change, False) is None
    assert patcher.instance_patching(Shared(), get, on_change, False) is not None
    old_pickle = Shared()
    old_pickle.a._parameters = collections.OrderedDict(old_pickle.a._parameters)
    assert patcher.instance_patching(old_pickle, get, on_change, False) is None


def test_discovery_is_unchanged_on_models_reading_parameters() -> None:
    """End to end: find_groups with instance patches equals find_groups with fx's."""
    model, x = ParamReads(), torch.randn(2, 4)
    ours = fxfuse.find_groups(model, (x,)).to_json()
    saved = patcher._SUPPORTED
    patcher._SUPPORTED = False
    try:
        theirs = fxfuse.find_groups(model, (x,)).to_json()
    finally:
        patcher._SUPPORTED = saved
    assert ours == theirs
    assert trace_graph(model, stack_traces=False).root is model


@pytest.mark.parametrize("name", ["param_reads", "shared", "rotary", "registers"])
def test_graphs_are_fxs_own_tracers(name: str) -> None:
    """Against torch's own ``fx.Tracer`` (class patches, its ``getattr`` walking
    ``named_parameters``), with fxfuse's leaves."""
    make = {**CASES, "registers": Registers}[name]
    ours, theirs = _Tracer(False), _FxTracer()
    ours.proxy_buffer_attributes = theirs.proxy_buffer_attributes = name == "rotary"
    assert _signature(ours.trace(make())) == _signature(theirs.trace(make()))


def leaf_fn(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class CallsLeafFn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leaf_fn(self.fc(x))


@pytest.mark.parametrize("wrapped", [False, True])
def test_fxs_autowrap_scan_runs_only_with_functions_to_wrap(wrapped: bool) -> None:
    """The patcher skips fx's scan of ``forward`` globals when the tracer has no function for
    fx to autowrap; a tracer that has some still gets them wrapped."""
    tracer = _Tracer(False)
    if wrapped:
        tracer._autowrap_function_ids = {id(leaf_fn)}
    graph = tracer.trace(CallsLeafFn())
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert (leaf_fn in targets) is wrapped
    assert globals()["leaf_fn"].__name__ == "leaf_fn" and not hasattr(
        globals()["leaf_fn"], "__fx_already_patched")
    _untouched()


# -- found in review: each fails on the first version of the instance patches ----------------
class Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.ones(4))
        self.lstm = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm((self.fc(x) * self.w).unsqueeze(1))
        return y.squeeze(1)


@pytest.mark.filterwarnings("ignore:The tensor attributes")  # torch.export on the LSTM's cut
def test_source_lines_are_the_users_not_the_patchers() -> None:
    from fxfuse.trace import source_line

    graph = trace_graph(Lstm()).graph
    lines = {n.name: source_line(n) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    here = "test_trace_patching.py:"
    assert lines and all(line and here in line for line in lines.values()), lines
    spec = fxfuse.find_groups(Lstm(), torch.randn(2, 4))
    assert spec.cuts and all(c.source and here in c.source for c in spec.cuts)


class FunctionalCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sub = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.sub, {"weight": torch.zeros(4, 4)}, (x,))


class NestedFx(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sub = ParamReads()
        self.post = nn.Linear(6, 6)
        self.inner: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner.append(_signature(fx.symbolic_trace(self.sub).graph))
        self.inner.append(_signature(trace_graph(self.sub.inner, stack_traces=False).graph))
        return self.post(self.sub(x))


class TiedReassigned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.a.weight)
        self.a.weight = nn.Parameter(torch.zeros(4, 4))
        return y + F.linear(x, self.b.weight)


class SharedDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ParamFree()
        self.a.w = nn.Parameter(torch.ones(4))
        self.b = copy.copy(self.a)  # shares a's _parameters dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "late" not in self.b._parameters:
            self.b.register_parameter("late", nn.Parameter(torch.ones(4)))
        return self.a(x) * self.a.w + self.b.late


class DirectReads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.c = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self._parameters["weight"].t())
        return self.c._call_impl(y)  # not a call fx's patch sees


class CopiesInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.kept: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept.append(copy.copy(self.fc))
        return self.fc(x) * self.fc.weight.sum()


REVIEW = {"functional_call": FunctionalCall, "nested_fx": NestedFx,
          "tied_reassigned": TiedReassigned, "shared_dict": SharedDict,
          "direct_reads": DirectReads, "copies": CopiesInForward}


@pytest.mark.parametrize("name", sorted(REVIEW))
def test_review_cases_trace_as_with_class_patches(name: str) -> None:
    model, oracle = REVIEW[name](), REVIEW[name]()
    ours = _outcome(model)
    _untouched()
    assert ours[0] == "graph", ours
    assert ours == _class_patched(oracle)
    assert [type(p) for p in model.parameters()] == [type(p) for p in oracle.parameters()]
    assert _state(model) != [] and [k for k, *_ in _state(model)] == [k for k, *_ in _state(oracle)]
    if name == "nested_fx":
        assert model.inner == oracle.inner and len(model.inner) == 2
    if name == "shared_dict":  # the late parameter is on both (one dict), as with fx's
        assert model.b._parameters is model.a._parameters and "late" in model.a._parameters
    if name == "copies":  # the copy made during the trace is a plain module again
        c = model.kept[0]
        assert isinstance(c.weight, nn.Parameter)
        assert type(pickle.loads(pickle.dumps(c.__dict__["_parameters"]))) is dict
        pickle.dumps(c)


def test_functional_call_leaves_the_parameter() -> None:
    model = FunctionalCall()
    weight = model.sub.weight
    _outcome(model)
    assert model.sub.weight is weight and isinstance(weight, nn.Parameter)
    fxfuse.find_groups(model, torch.randn(2, 4))


def test_a_reassigned_tied_parameter_is_read_under_its_new_name() -> None:
    ours, theirs = _Tracer(False), _FxTracer()
    assert _signature(ours.trace(TiedReassigned())) == _signature(theirs.trace(TiedReassigned()))


def test_tensor_method_answers_are_torchs() -> None:
    """The tracer's stand-in for ``torch.overrides.is_tensor_method_or_property`` answers as
    torch does, and its shortcut (a function that is no attribute value of ``torch.Tensor``
    is no Tensor method) holds for every function torch lists."""
    from torch.overrides import _get_tensor_methods

    import fxfuse.trace as trace

    listed = _get_tensor_methods()
    attrs = trace._tensor_attrs()
    assert all(f in attrs or f.__name__ == "__get__" for f in listed)
    probes = [*listed, torch.cat, torch.flatten, torch.relu, F.relu, F.gelu, F.softmax, F.linear,
              torch.matmul, torch.add, F.scaled_dot_product_attention, F.layer_norm,
              torch.Tensor.add, torch.Tensor.shape.__get__, torch.Tensor.__add__, torch.stack]
    trace._TENSOR_METHODS.clear()
    assert [trace._is_tensor_method(f) for f in probes] == [
        bool(torch.overrides.is_tensor_method_or_property(f)) for f in probes]
    assert [trace._is_tensor_method(f) for f in probes] == [  # remembered
        bool(torch.overrides.is_tensor_method_or_property(f)) for f in probes]
