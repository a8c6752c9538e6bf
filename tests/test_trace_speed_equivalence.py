"""fxfuse's tracer takes shortcuts through fx (its own autowrap of ``math``, fast paths in
``create_arg`` / ``getattr``; a plain loop instead of ``fx.Interpreter`` for recording): the graphs
and recorded values must be exactly fx's."""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable
from math import floor
from typing import Any, NamedTuple

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxfuse
import fxfuse._patcher
import fxfuse.trace
import models
from fxfuse.errors import InputError
from fxfuse.rules import lookup
from fxfuse.trace import (
    VALUE,
    GraphTrace,
    _module_value,
    _record,
    _Recorder,
    _summarise,
    _Tracer,
    eval_mode,
    record_values,
    trace_graph,
)

# a module whose forward has its own globals (fx patches those when the module is called)
_NS: dict[str, Any] = {}
exec(  # noqa: S102 - a forward defined in a namespace of its own
    "import torch\nfrom math import ceil\n"
    "class Half(torch.nn.Module):\n"
    "    def forward(self, x):\n"
    "        return x[:, :ceil(x.size(1) / 2)]\n",
    _NS,
)


class _Pair(NamedTuple):
    a: Any
    b: Any


class _FxTracer(fx.Tracer):
    """fx's own tracer (its autowrap of ``math``, its create_arg) with fxfuse's leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return lookup(type(m)) is not None


class MathNet(nn.Module):
    """Calls ``math`` functions on proxies: by attribute, by a name imported into the root's
    globals, and (``Half``) by a name imported into another forward's globals."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.top = _NS["Half"]()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) / math.sqrt(x.size(-1))
        y = y * floor(x.size(0) + 0.5) + math.log(2.0)  # the last on a constant: no node
        return self.top(y * self.scale)


def _signature(graph: fx.Graph) -> list[tuple[Any, ...]]:
    def names(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: n.name)

    return [(n.op, n.name, n.target, names(n.args), names(n.kwargs), type(n.kwargs),
             [i.name for i in n.all_input_nodes], [u.name for u in n.users],
             n.meta.get("nn_module_stack"), type(n.meta.get("nn_module_stack")),
             n.meta.get("is_wrapped"),
             [m.name for m in graph.find_nodes(op=n.op, target=n.target)])
            for n in graph.nodes]


def test_math_on_proxies_traces_as_fx_does() -> None:
    model = MathNet()
    ours, theirs = _Tracer(False).trace(model), _FxTracer().trace(model)
    assert _signature(ours) == _signature(theirs)
    targets = [n.target for n in ours.nodes if n.op == "call_function"]
    assert math.sqrt in targets and math.floor in targets and math.ceil in targets
    assert math.log not in targets
    # every patched name is restored
    assert math.sqrt is math.__dict__["sqrt"] and type(math.sqrt).__name__ == (
        "builtin_function_or_method")
    assert floor is math.floor and _NS["ceil"] is math.ceil and globals()["floor"] is math.floor


def test_patches_are_undone_when_the_trace_fails() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * math.sqrt(x.size(1))
            if y.sum() > 0:  # control flow on a proxy: the root's trace fails
                return y
            return -y

    with pytest.raises(fx.proxy.TraceError):
        _Tracer(False).trace(Bad())
    assert type(math.sqrt).__name__ == "builtin_function_or_method"


def test_recorded_math_values_are_the_eager_ones() -> None:
    model, x = MathNet().eval(), torch.randn(3, 8)
    traced = trace_graph(model, stack_traces=False)
    record_values(traced, (x,))
    by_target = {n.target: n.meta[VALUE] for n in traced.graph.nodes if n.op == "call_function"}
    assert by_target[math.sqrt] == math.sqrt(8) and by_target[math.floor] == 3
    assert by_target[math.ceil] == 4


@pytest.mark.parametrize("name", ["mlp", "resnet20", "densenet", "vit_tiny", "shufflenet",
                                  "shufflenetv2_lib", "glu_mlp", "tied_block_net",
                                  "concat_split_net", "se_net"])
def test_zoo_graphs_are_fx_graphs(name: str) -> None:
    model = models.get(name).factory()
    ours, theirs = _Tracer(False).trace(model), _FxTracer().trace(model)
    assert _signature(ours) == _signature(theirs)


def test_create_arg_keeps_structures_and_constants() -> None:
    """Arguments of every kind fx lowers: nested tuples / lists / dicts, slices, dtypes, None,
    a tensor constant (a ``_tensor_constant`` attribute), a named tuple."""
    const = torch.arange(4.0)

    class Args(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            a = torch.cat([x, x * 2], dim=1)
            b = a[:, 1:5:2, ...]
            c = a.to(dtype=torch.float64).float()
            d = torch.stack((b, b), 0).sum(dim=(0,), keepdim=True)
            e = x[:, :4] + const
            return {"a": a, "b": [b, (c, None)], "d": d, "e": e, "p": _Pair(a, 3)}

    model = Args()
    ours, theirs = _Tracer(False).trace(model), _FxTracer().trace(model)
    assert _signature(ours) == _signature(theirs)


def _values(traced: GraphTrace) -> list[tuple[str, Any]]:
    return [(n.name, n.meta[VALUE]) for n in traced.graph.nodes]


@pytest.mark.parametrize("name", ["mlp", "resnet20", "densenet", "vit_tiny", "shufflenet",
                                  "tied_block_net", "concat_split_net", "se_net", "llama_lm",
                                  "flatten_net", "sdpa_net", "glu_mlp"])
def test_plain_loop_records_what_fx_interpreter_records(name: str) -> None:
    entry = models.get(name)
    model, inputs = entry.factory(), entry.example_inputs()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    traced = trace_graph(model, stack_traces=False)
    with eval_mode(traced.root):
        _Recorder(traced.root, graph=traced.graph).run(*inputs)
    reference = _values(traced)
    for n in traced.graph.nodes:
        del n.meta[VALUE]
    with eval_mode(traced.root):
        _record(traced, inputs)  # the plain loop itself (record_values falls back on errors)
    assert _values(traced) == reference


def test_a_failing_record_raises_fx_interpreters_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Flatten(0))
    traced = trace_graph(nn.Sequential(model, _Unflat()), stack_traces=False)
    bad = (torch.randn(2, 4),)
    with pytest.raises(Exception) as fx_error, eval_mode(traced.root):
        _Recorder(traced.root, graph=traced.graph).run(*bad)
    with pytest.raises(InputError) as ours:
        record_values(traced, bad)
    assert "While executing" in str(fx_error.value)
    assert str(fx_error.value).splitlines()[0] in str(ours.value)
    assert isinstance(ours.value.__cause__, type(fx_error.value))


class _Unflat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(5, -1)  # 6 elements: fails


def test_eval_mode_restores_flags_and_calls_overridden_train() -> None:
    class Frozen(nn.Module):
        calls: list[bool] = []

        def train(self, mode: bool = True) -> Frozen:
            Frozen.calls.append(mode)
            return super().train(mode)

    plain = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2)))
    plain[1].eval()
    before = [m.training for m in plain.modules()]
    with eval_mode(plain):
        assert not any(m.training for m in plain.modules())
        assert not torch.is_grad_enabled()
    assert [m.training for m in plain.modules()] == before
    custom = nn.Sequential(nn.Linear(2, 2), Frozen())
    with eval_mode(custom):
        assert Frozen.calls == [False] and not any(m.training for m in custom.modules())
    assert all(m.training for m in custom.modules())

    class OwnEval(nn.Sequential):
        def eval(self) -> OwnEval:
            self.evaluated = True
            return super().eval()

    own = OwnEval(nn.Linear(2, 2))
    with eval_mode(own):
        assert own.evaluated and not own[0].training
    assert own.training and own[0].training


class _ExtractStackTracer(_Tracer):
    """Stack traces as fxfuse took them before: ``traceback.extract_stack()`` filtered."""

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        torch_dir = os.path.dirname(torch.__file__)
        frames = [f for f in traceback.extract_stack()
                  if not f.filename.startswith(torch_dir)
                  and f.filename not in (fxfuse.trace.__file__, fxfuse._patcher.__file__)
                  and not (f.filename == __file__ and f.name == "create_node")]
        first = next((i for i, f in enumerate(frames) if f.name == "forward"), None)
        if first is not None:
            node.stack_trace = "".join(traceback.format_list(frames[first:])).strip()
        return node


def _nested(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2


class _Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nested(self.fc(x)) + (
            x.sum(dim=-1, keepdim=True))


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny", "tied_block_net", "_deep"])
def test_stack_traces_are_the_filtered_extract_stack(name: str) -> None:
    model = _Deep() if name == "_deep" else models.get(name).factory()
    ours = _Tracer(True).trace(model)
    reference = _ExtractStackTracer(False).trace(model)
    stacks = [n.stack_trace for n in ours.nodes]
    assert stacks == [n.stack_trace for n in reference.nodes]
    assert sum(s is not None and "forward" in s for s in stacks) >= 3


class _FxProxyTracer(_Tracer):
    """fxfuse's tracer with fx's own Proxy (its iteration disassembles the caller each time)."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, self)


class _Unpacks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        (c, d), e = x.split(2, dim=1)[:2], x[:, :1]
        n, k = x.shape  # an attribute proxy unpacked (fx's Attribute)
        return torch.cat([b, a, c * d + e], dim=1).reshape(n, k)


class _Loops(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(row for row in x)  # iterates a proxy: not traceable, kept opaque


class _ShapeLoop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * len([s for s in x.shape])  # iterates an attribute proxy: opaque too


class _IterNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unpacks, self.loops, self.fc = _Unpacks(), _Loops(), nn.Linear(6, 6)
        self.shape_loop = _ShapeLoop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shape_loop(self.unpacks(self.fc(x)))
        first, *rest = y.unbind(0)  # UNPACK_EX: fx's tracer.iter, which fails: root is opaque
        return self.loops(y) + first


def test_proxy_iteration_is_fxs() -> None:
    model = _IterNet()
    with pytest.raises(fx.proxy.TraceError) as ours:
        _Tracer(False).trace(model)
    with pytest.raises(fx.proxy.TraceError) as theirs:
        _FxProxyTracer(False).trace(model)
    assert str(ours.value) == str(theirs.value)
    tracer, reference = _Tracer(False), _FxProxyTracer(False)
    assert _signature(tracer.trace(_Wrap(model))) == _signature(reference.trace(_Wrap(model)))
    assert tracer.opaque == reference.opaque and len(tracer.opaque) == 2


class _Wrap(nn.Module):
    def __init__(self, inner: _IterNet) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.loops(self.inner.shape_loop(self.inner.unpacks(self.inner.fc(x))))


def _attention_cases() -> list[tuple[dict[str, Any], tuple[tuple[int, ...], ...], dict[str, Any]]]:
    """(module kwargs, query / key / value shapes, call kwargs): valid calls and calls the
    real module refuses, for E=8 with 2 heads."""
    cases = []
    for batch_first in (True, False):
        for dims in ({}, {"kdim": 5, "vdim": 3}):
            for bias in (True, False):
                m = {"batch_first": batch_first, "bias": bias, **dims}
                kd, vd = dims.get("kdim", 8), dims.get("vdim", 8)
                n_first = batch_first
                def s(n: int, length: int, d: int, nf: bool = n_first) -> tuple[int, ...]:
                    return (n, length, d) if nf else (length, n, d)
                cases += [
                    (m, (s(2, 4, 8), s(2, 6, kd), s(2, 6, vd)), {"need_weights": False}),
                    (m, ((4, 8), (6, kd), (6, vd)), {"need_weights": False}),  # unbatched
                    (m, (s(2, 4, 8), s(3, 6, kd), s(3, 6, vd)), {"need_weights": False}),
                    (m, (s(2, 4, 7), s(2, 6, kd), s(2, 6, vd)), {"need_weights": False}),
                    (m, (s(2, 4, 8), s(2, 6, kd), s(2, 5, vd)), {"need_weights": False}),
                    (m, (s(2, 4, 8), (6, kd), (6, vd)), {"need_weights": False}),
                    (m, (s(2, 4, 8), s(2, 6, kd), s(2, 6, vd)), {}),  # weights asked for
                    (m, (s(2, 4, 8), s(2, 6, kd), s(2, 6, vd)), {"need_weights": True,
                                                                 "average_attn_weights": False}),
                    (m, ((1, 2, 4, 8), (1, 2, 6, kd), (1, 2, 6, vd)), {"need_weights": False}),
                ]
    return cases


@pytest.mark.parametrize("case", range(len(_attention_cases())))
def test_attention_formula_is_the_real_modules_output(case: int) -> None:
    kwargs, shapes, call_kwargs = _attention_cases()[case]
    torch.manual_seed(0)
    mod = nn.MultiheadAttention(8, 2, **kwargs).eval()
    q, k, v = (torch.randn(s) for s in shapes)
    if kwargs.get("kdim") is None and shapes[1] == shapes[0]:
        k = v = q  # self-attention, as models call it
    with torch.no_grad():
        try:
            real: Any = _summarise(mod(q, k, v, **call_kwargs))
        except Exception as exc:  # the formula must not hide the error
            real = type(exc)
        try:
            ours: Any = _summarise(_module_value(mod, (q, k, v), call_kwargs,
                                                 lambda: mod(q, k, v, **call_kwargs)))
        except Exception as exc:
            ours = type(exc)
    assert ours == real


def test_attention_formula_is_used_for_vit_blocks() -> None:
    mod, x = nn.MultiheadAttention(8, 2, batch_first=True).eval(), torch.randn(2, 4, 8)
    out = _module_value(mod, (x, x, x), {"need_weights": False}, lambda: pytest.fail("ran"))
    assert out[1] is None and not out[0].any() and out[0].shape == x.shape
    mod.register_forward_hook(lambda *a: None)  # hooks: the real module runs
    ran = _module_value(mod, (x, x, x), {"need_weights": False}, lambda: "ran")
    assert ran == "ran"


class _CountsThenFails(nn.Module):
    """A forward with a side effect before a node that fails (a shape error)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x) @ torch.ones(5, 2)


def test_a_failing_forward_runs_once() -> None:
    # the failure is the model's own (InputError saying so), after one run of the nodes before it
    m = _CountsThenFails()
    with pytest.raises(InputError, match="example inputs failed"):
        fxfuse.find_groups(m, torch.randn(2, 3))
    assert float(m.calls) == 1.0


class _SetsItem(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[0] = 0
        return x


def test_trace_errors_name_fx_proxy() -> None:
    with pytest.raises(fxfuse.TraceError, match="'Proxy' object does not support item"):
        fxfuse.find_groups(_SetsItem(), torch.randn(2, 3), tracer="symbolic")


# -- the port of fx's Tracer.trace (fxfuse.trace._Tracer._trace_module) -----------------------
def _scopes(tracer: fx.Tracer) -> list[tuple[str, str, Any]]:
    return [(k, v[0], v[1]) for k, v in tracer.node_name_to_scope.items()]


def test_the_port_of_fxs_trace_runs_on_this_torch() -> None:
    """Without it every test below compares fx with fx: the port runs where the installed
    ``fx.Tracer.trace`` is the one it was ported from (torch 2.13)."""
    if torch.__version__.split("+")[0] == "2.13.0":
        assert fxfuse.trace._FX_TRACE_PORTED


@pytest.mark.parametrize("name", ["mlp", "resnet20", "densenet", "tied_block_net", "llama_lm",
                                  "se_net", "vit_tiny"])
def test_port_keeps_fxs_scopes_and_module_stacks(name: str) -> None:
    model = models.get(name).factory()
    ours_t, theirs_t = _Tracer(False), _FxTracer()
    ours_t.proxy_buffer_attributes = theirs_t.proxy_buffer_attributes = name == "llama_lm"
    ours, theirs = ours_t.trace(model), theirs_t.trace(model)
    assert _signature(ours) == _signature(theirs)
    assert _scopes(ours_t) == _scopes(theirs_t)
    assert dict(ours_t.num_calls) == dict(theirs_t.num_calls)
    assert not ours_t.module_stack and ours_t.scope.module_path == theirs_t.scope.module_path
    assert ours._co_fields == theirs._co_fields and ours_t.submodule_paths is None


class _Held(nn.Module):
    """Plain tensors in module ``__dict__``s (not parameters or buffers): fx names them by
    their attribute path (a module held twice by one parent: its first name); one set during
    ``forward`` is not in fx's table (made at the start of the trace): a ``_tensor_constant``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = nn.Module()
        self.inner.scale = torch.full((4,), 2.0)  # a plain attribute: Module.__setattr__ keeps it
        self.again = self.inner  # the same module under a second path

    def forward(self, x: torch.Tensor, bias: float = 0.5, *, _unused: Any = None) -> Any:
        self.fc.late = torch.ones(4)
        return self.fc(x) * self.inner.scale + self.fc.late + bias


class _Defaults(nn.Module):
    def forward(self, x: torch.Tensor, y: int = 3, z: Any = None) -> torch.Tensor:
        return x * y if z is None else x


class _VarArgs(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] + xs[1]


@pytest.mark.parametrize("make", [_Held, _Defaults, _VarArgs, MathNet],
                         ids=["held_tensors", "defaults", "varargs", "math"])
def test_port_traces_attributes_and_arguments_as_fx(make: Callable[[], nn.Module]) -> None:
    ours_t, theirs_t = _Tracer(False), _FxTracer()
    ours, theirs = ours_t.trace(make()), theirs_t.trace(make())
    assert _signature(ours) == _signature(theirs)
    assert [(n.name, n.args, n.type) for n in ours.nodes if n.op == "placeholder"] == [
        (n.name, n.args, n.type) for n in theirs.nodes if n.op == "placeholder"]
    assert sorted(ours_t.tensor_attrs.values()) == sorted(theirs_t.tensor_attrs.values())
    if make is _Held:
        targets = [n.target for n in ours.nodes if n.op == "get_attr"]
        assert "inner.scale" in targets and "_tensor_constant0" in targets


def test_port_says_fx_is_tracing_and_restores_the_flag() -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(fx._symbolic_trace.is_fx_tracing())
            return x + 1

    _Tracer(False).trace(Probe())
    assert seen == [True] and not fx._symbolic_trace.is_fx_tracing()
    with pytest.raises(fx.proxy.TraceError):
        _Tracer(False).trace(_DataDependent())
    assert not fx._symbolic_trace.is_fx_tracing()


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class _ClaimsTensor:
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        return torch.Tensor


class _OwnLookup:
    def __getattribute__(self, name: str) -> Any:
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("held", [None, torch.ones(2), _ClaimsTensor(), _OwnLookup(), 3.0,
                                  (torch.ones(1),)],
                         ids=["none", "tensor", "claims_tensor", "own_lookup", "float", "tuple"])
def test_constant_check_is_never_false_where_fx_finds_one(held: Any) -> None:
    """``_holds_constants`` decides whether fx's tensor-attribute walk runs: it may say yes
    where the walk finds nothing (a class that could lie to ``isinstance``), never no where it
    finds something."""
    from fxfuse.trace import _CONSTANT_TYPES, _holds_constants

    for name in ["mlp", "resnet20", "llama_lm", "vit_tiny"]:
        model = models.get(name).factory()
        if held is not None:
            model.held = held
        mods = list(model.modules())
        found = any(isinstance(v, _CONSTANT_TYPES) for m in mods for v in vars(m).values())
        assert found == (isinstance(held, torch.Tensor))
        assert _holds_constants(mods) == (found or isinstance(held, (_ClaimsTensor, _OwnLookup)))
