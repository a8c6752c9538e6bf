"""Tracing: a model -> a ``torch.fx`` graph whose nodes carry the values seen on the example
inputs (``node.meta["fxfuse.value"]``: a :class:`TensorMeta` for tensors, the concrete value for
Python scalars/shapes, tuples of those for multi-output ops).

Modules with a registered axis rule (all standard ``torch.nn`` layers, plus user-registered
classes) are kept as leaves; everything else is traced through, so a weight-tied block called
``k`` times appears as ``k`` ``call_module`` nodes with the same target.

Opaque calls are seen through where they are plain Python over torch ops: a module without a
rule (a ``torch.nn`` one too) is traced into, and a function a library marked with
``torch.fx.wrap`` is traced on its own and inlined.  What can not be traced (Python control flow
on tensor values, iteration over a tensor) stays one opaque node, a ``call_module`` of that
module or a ``call_function`` of that function, for discovery to probe
(:mod:`fxfuse.rules.probe`); only a failure in the root module's own ``forward`` stops symbolic
tracing.  ``gm.meta["fxfuse.opaque"]`` names each opaque call's node and why it is opaque.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import dis
import functools
import hashlib
import inspect
import itertools
import math
import operator
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import FrameType, FunctionType
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from . import _patcher
from ._patcher import InstancePatching, instance_patching
from .errors import InputError, TraceError, quote_error
from .rules import lookup

VALUE = "fxfuse.value"
OPAQUE = "fxfuse.opaque"  # gm.meta: node name -> why the call could not be traced into
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_FILES = frozenset((__file__, _patcher.__file__))  # the tracer's frames: never the user's


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class GraphTrace:
    """A traced graph as discovery reads it: ``graph``, whose ``get_attr`` / ``call_module``
    targets name attributes of ``root`` (the model itself, or a GraphModule), and ``meta``
    (``fxfuse.opaque``).  Unlike a ``GraphModule`` it has no generated Python code: fx's codegen
    and ``compile`` (and a new class per module) cost as much as the trace itself, and discovery
    never runs the graph's code (shapes are recorded by an interpreter over the graph).
    :func:`symbolic_trace` compiles one for the callers that run it."""

    root: nn.Module
    graph: fx.Graph
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> GraphTrace:
        return cls(gm, gm.graph, gm.meta)


# fx's wrapper for a leaf function (an fx internal): where it is missing, fx's own autowrap runs
_create_wrapped_func: Callable[..., Any] | None = getattr(
    fx._symbolic_trace, "_create_wrapped_func", None)

# math function -> its fx wrapper, made once per process (see _Tracer)
_MATH_WRAPPERS: dict[Callable[..., Any], Callable[..., Any]] = {}


def _math_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    wrapped = _MATH_WRAPPERS.get(fn)
    if wrapped is None:
        assert _create_wrapped_func is not None
        wrapped = _create_wrapped_func(fn)
        wrapped.__fx_already_patched = True  # type: ignore[attr-defined]  # as fx marks its own
        _MATH_WRAPPERS[fn] = wrapped
    return wrapped


# (math's names and values, the ids of its public callables, name -> wrapper, name -> function)
_MATH_TABLE: list[tuple[Any, set[int], dict[str, Any], dict[str, Any]]] = []


def _math_table() -> tuple[set[int], dict[str, Any], dict[str, Any]]:
    """What fx's ``Tracer(autowrap_modules=(math,))`` patches in ``math``: the ids of its public
    callables (fx's ``_autowrap_function_ids``) and, for those not patched already (a trace
    inside a trace), the wrapper and the original by name.  Recomputed only when ``math``'s
    names or values differ from the last call's (two tuples compared by identity)."""
    d = math.__dict__
    key = (tuple(d), tuple(d.values()))
    if _MATH_TABLE and _MATH_TABLE[0][0] == key:
        return _MATH_TABLE[0][1:]
    ids = {id(v) for k, v in d.items() if not k.startswith("_") and callable(v)}
    wrappers: dict[str, Any] = {}
    originals: dict[str, Any] = {}
    for k, v in d.items():
        if id(v) in ids and not k.startswith("_") and not getattr(v, "__fx_already_patched",
                                                                   False):
            wrappers[k], originals[k] = _math_wrapper(v), v
    _MATH_TABLE[:] = [(key, ids, wrappers, originals)]
    return ids, wrappers, originals


# argument types fx's create_arg returns as they are (its ``_create_arg_bypass``), exact types
_LEAF_ARGS = frozenset((int, float, bool, str, type(None)))


_IS_TENSOR_METHOD = torch.overrides.is_tensor_method_or_property
_TENSOR_METHODS: dict[Any, bool] = {}  # torch function -> is it a Tensor method or property


@functools.cache
def _tensor_attrs() -> frozenset[Any]:
    """The values of ``torch.Tensor``'s attributes (the hashable ones), made once."""
    values = set()
    for name in dir(torch.Tensor):
        try:
            value = getattr(torch.Tensor, name)
            hash(value)
        except Exception:  # noqa: BLE001 - an attribute that can not be read or hashed
            continue
        values.add(value)
    return frozenset(values)


def _is_tensor_method(func: Any) -> bool:
    """``torch.overrides.is_tensor_method_or_property``, remembered per function: fx's
    ``Proxy.__torch_function__`` asks it for every torch function called on a proxy
    (``torch.cat``, ``F.gelu``, ...), and torch's answer enters and leaves a
    ``warnings.catch_warnings`` block each time (30 microseconds a call here).  The answer
    depends on the function alone (torch's set of Tensor methods is fixed per process), so the
    table holds torch's own answers; it stands in for torch's during a trace only.

    Torch's first answer in a process builds its table of every overridable function (18 ms
    here, most of a first discovery's time).  Every function in its set of Tensor methods is
    the value of an attribute of ``torch.Tensor`` (or a property's ``__get__``; a test checks
    this of the installed torch), so a function that is neither is answered "no" from the set
    of those values (under a millisecond, once) without it."""
    try:
        hit = _TENSOR_METHODS.get(func)
    except TypeError:  # unhashable: ask torch
        return bool(_IS_TENSOR_METHOD(func))
    if hit is None:
        if len(_TENSOR_METHODS) >= 4096:
            _TENSOR_METHODS.clear()
        if getattr(func, "__name__", None) != "__get__" and func not in _tensor_attrs():
            hit = False
        else:
            hit = bool(_IS_TENSOR_METHOD(func))
        _TENSOR_METHODS[func] = hit
    return hit


class _ModuleStack(collections.OrderedDict[str, Any]):
    """fx's ``module_stack``, copied into every node's ``meta["nn_module_stack"]`` with
    ``copy.copy``: here the copy is the same plain ``OrderedDict`` made directly, not through
    ``copy``'s ``__reduce_ex__`` protocol (a few microseconds a node)."""

    def __copy__(self) -> collections.OrderedDict[str, Any]:
        return collections.OrderedDict(self)


_CALLS = frozenset(("call_function", "call_method", "call_module"))
_FX_PROXY_LOG = fx.proxy.log  # fx's create_node logs each node at debug level
_FX = fx._symbolic_trace
_CONSTANT_TYPES: tuple[type, ...] = getattr(_FX, "_constant_attribute_types", ())


def _names_of(code: Any) -> tuple[Any, ...]:
    """The names a code object and the functions defined in it use (a fingerprint that does
    not depend on Python's bytecode)."""
    nested = tuple(_names_of(c) for c in code.co_consts if hasattr(c, "co_names"))
    return (code.co_name, code.co_names, code.co_varnames, code.co_freevars, nested)


# fx.Tracer.trace of torch 2.13 (the names it and its nested functions use, hashed), as
# _Tracer._trace_module ports it; another fx's trace runs as it is
_FX_TRACE_NAMES = "b39454fa9cc9a9ede15f299f3ffc5bd02e220beb"


def _fx_trace_ported() -> bool:
    try:
        names = _names_of(fx.Tracer.trace.__code__)
    except AttributeError:  # pragma: no cover - another torch
        return False
    return (hashlib.sha1(repr(names).encode()).hexdigest() == _FX_TRACE_NAMES
            and len(_CONSTANT_TYPES) > 0
            and all(hasattr(_FX, n) for n in ("_is_fx_tracing_flag", "_orig_module_call",
                                              "_patch_wrapped_functions", "_autowrap_check",
                                              "_new_patcher")))


_FX_TRACE_PORTED = _fx_trace_ported()


def _holds_constants(modules: list[nn.Module]) -> bool:
    """Whether some module's ``__dict__`` may hold a value fx's ``tensor_attrs`` collects
    (``isinstance(value, _CONSTANT_TYPES)``), decided per type of value, once per process:
    ``isinstance`` is ``issubclass`` of the value's type where neither the types' metaclasses
    (checked at import: :data:`_PLAIN_ISINSTANCE`) nor the value's class (a ``__class__`` or
    ``__getattribute__`` of its own) say otherwise; a class that does counts as holding one
    (fx's walk then decides).  fx's ``isinstance`` of every attribute: about 10 microseconds a
    module; this, about 2."""
    if not _PLAIN_ISINSTANCE:  # pragma: no cover - another torch
        return True
    known = _CONSTANT_BY_TYPE
    for m in modules:
        for t in set(map(type, m.__dict__.values())):
            hit = known.get(t)
            if hit is None:
                if len(known) >= 4096:
                    known.clear()
                hit = known[t] = issubclass(t, _CONSTANT_TYPES) or any(
                    c.__flags__ & _HEAP_TYPE and ("__class__" in vars(c)
                                                  or "__getattribute__" in vars(c))
                    for c in t.__mro__[:-1])
            if hit:
                return True
    return False


_CONSTANT_BY_TYPE: dict[type, bool] = {}
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement (builtins: not)
_PLAIN_ISINSTANCE = all(
    type(t).__instancecheck__ is type.__instancecheck__  # type: ignore[comparison-overlap]
    and type(t).__subclasscheck__ is type.__subclasscheck__  # type: ignore[comparison-overlap]
    for t in _CONSTANT_TYPES)
# node target -> fx's candidate name for its node (Graph._target_to_str: a pure function of the
# target), kept across traces; cleared when it reaches _CANDIDATES_KEPT entries
_CANDIDATES: dict[Any, str] = {}
_CANDIDATES_KEPT = 8192


def _setter(name: str) -> Callable[[fx.Node, Any], None]:
    """fx's ``Node.args`` / ``Node.kwargs`` property setter (the accounting of uses), called
    without ``Node.__setattr__``, which around any assignment takes the node out of the graph's
    (op, target) lookup table and puts it back at the end of its bucket: a new node is there
    already.  Plain assignment where fx has no such property."""
    prop = vars(fx.Node).get(name)
    if isinstance(prop, property) and prop.fset is not None:
        return prop.fset
    return lambda node, value: setattr(node, name, value)  # pragma: no cover - other torch


_set_args, _set_kwargs = _setter("args"), _setter("kwargs")


class _Proxy(fx.Proxy):
    """fx's Proxy (what ``_Tracer.proxy`` makes), whose iteration looks up its caller's
    instructions in a table made once per code object and trace: fx's ``Proxy.__iter__``
    disassembles the calling function's whole code on every iteration (``a, b =
    x.chunk(2)``: a quarter of a channel-shuffle network's trace).  The same instruction
    decides, as in fx: ``UNPACK_SEQUENCE`` unpacks by index, anything else is the tracer's
    ``iter``."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = sys._getframe(1)
        tracer = self.tracer
        instructions = getattr(tracer, "_instructions", None)
        if instructions is None:  # pragma: no cover - not made by _Tracer
            return fx.Proxy.__iter__(self)
        table = instructions.get(frame.f_code)
        if table is None:
            insts = list(dis.get_instructions(frame.f_code))
            table = instructions[frame.f_code] = (insts, [i.offset for i in insts])
        insts, offsets = table
        if sys.version_info >= (3, 11):
            inst = insts[bisect.bisect_left(offsets, frame.f_lasti)]
        else:  # pragma: no cover - fx's rule before 3.11
            inst = insts[frame.f_lasti // 2]
        if inst.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(inst.argval))  # type: ignore[index]
        return tracer.iter(self)

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _Attribute(self, k)  # fx's Proxy.__getattr__, with this iteration


class _Attribute(fx.proxy.Attribute):
    """fx's ``Attribute`` (``x.shape``, ``x.size``: a proxy's attribute, its node made when
    first used) with :class:`_Proxy`'s iteration.  fx's ``Proxy.__iter__`` keeps its own frame
    in a local (``inspect.currentframe()``): a reference cycle through that frame, the caller's
    and the disassembled instructions, so every ``b, t, c = x.shape`` left the whole trace (its
    nodes, the caller's proxies) as garbage for the cyclic collector, about a quarter of a deep
    transformer's discovery, growing faster than the graph."""

    __iter__ = _Proxy.__iter__
    __getattr__ = _Proxy.__getattr__


_Proxy.__name__ = _Proxy.__qualname__ = "Proxy"  # as fx's in messages: "'Proxy' object ..."
_Attribute.__name__ = _Attribute.__qualname__ = "Attribute"


class _Tracer(fx.Tracer):
    """fx tracing with fxfuse's leaves: modules with a rule.  Every other module is traced
    into; one that can not be (its ``forward`` raised on proxies) is rolled back and kept as an
    opaque ``call_module`` node (``self.opaque``: node name -> why).

    fx's *autowrap* (a ``math`` function called with a Proxy becomes a ``call_function`` node of
    it) wraps every public function of ``math`` anew on each trace (``functools.wraps`` of ~60
    functions: a third of a small model's trace).  This tracer turns fx's off
    (``autowrap_modules=()``) and patches the same names (``math``'s own, those of the root's
    ``forward`` globals and of each called module's ``forward`` globals, each looked up when fx
    would) with fx's wrappers made once per process, so the graph is fx's.  On a torch without
    ``_create_wrapped_func`` fx's own autowrap runs."""

    def __init__(self, stack_traces: bool) -> None:
        own_wrap = _create_wrapped_func is not None
        if own_wrap:
            super().__init__(autowrap_modules=())  # type: ignore[arg-type]  # fx: tuple[Module]
        else:  # pragma: no cover - another torch version
            super().__init__()
        self._own_wrap = own_wrap
        # fx's module stack with a cheaper copy (every node's meta gets one: _new_node)
        self.module_stack = _ModuleStack(self.module_stack)
        self.stack_traces = stack_traces
        self.opaque: dict[str, str] = {}
        self._proxy_cache: dict[str, Any] | None = None
        self._math_ids: set[int] = set()
        self._patched: list[tuple[dict[str, Any], str, Any]] = []
        self._visited: set[int] = set()
        self._instructions: dict[Any, tuple[list[dis.Instruction], list[int]]] = {}
        self._patching: InstancePatching | None = None
        self._param_names: dict[int, str] | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        if not self._own_wrap:
            return super().trace(root, concrete_args)
        self._patched, self._visited = [], set()
        self._math_ids, wrappers, originals = _math_table()
        patched_math = False
        self._param_names = None
        self._patching = None
        tensor_method = torch.overrides.is_tensor_method_or_property
        if isinstance(root, nn.Module):
            cache: dict[str, Any] = {}
            self._patching = instance_patching(
                root, lambda name, value: self.getattr(name, value, cache),
                self._forget_param_names, self.proxy_buffer_attributes,
                bool(self._autowrap_function_ids))
        try:
            fn = getattr(type(root), self.traced_func_name, None) if isinstance(
                root, nn.Module) else root
            self._autowrap(getattr(fn, "__globals__", None))  # fx: the root's globals first,
            if id(math.__dict__) not in self._visited:        # then math's
                self._visited.add(id(math.__dict__))
                math.__dict__.update(wrappers)
                patched_math = True
            torch.overrides.is_tensor_method_or_property = _is_tensor_method  # see there
            if self._patching is None:
                return super().trace(root, concrete_args)
            with self._patching.installed():
                if _FX_TRACE_PORTED and concrete_args is None:
                    return self._trace_module(root)
                return super().trace(root, concrete_args)
        finally:
            torch.overrides.is_tensor_method_or_property = tensor_method
            self._patching = None
            if patched_math:
                math.__dict__.update(originals)
            for frame, name, orig in reversed(self._patched):
                frame[name] = orig
            self._patched = []

    def _trace_module(self, root: nn.Module) -> fx.Graph:
        """``fx.Tracer.trace`` of a module without ``concrete_args`` (torch 2.13's, step for
        step: :data:`_FX_TRACE_PORTED` says the installed one is that one), under
        :class:`~fxfuse._patcher.InstancePatching`, except for what costs time and changes
        nothing:

        * the module paths (``submodule_paths``) come from the walk the instance patching
          made (the same ``root.named_modules()``);
        * the tensor attributes (``tensor_attrs``: the plain tensors, script objects and tree
          specs held in a module's ``__dict__``, which ``create_arg`` names instead of making
          constants of them) are collected by fx's own recursive walk only where some module
          holds one: where none does, fx's walk finds nothing (a pass over every attribute
          of every module, in Python);
        * the root's arguments are made by :meth:`create_args_for_root`'s shortcut.

        The patches fx makes are the instance patcher's (fx's call wrapper, the same
        closure); with nothing to autowrap (``_autowrap_function_ids`` empty: this tracer
        wraps ``math`` itself) fx's autowrap scans are skipped, as the patcher answers them."""
        patching = self._patching
        assert patching is not None
        flag = _FX._is_fx_tracing_flag
        _FX._is_fx_tracing_flag = True
        try:
            _LazyGraphModule.force_recompile(root)  # type: ignore[arg-type]  # as fx calls it
            self.root = root
            if not hasattr(type(root), self.traced_func_name):
                raise AssertionError(f"traced_func_name={self.traced_func_name} doesn't exist "
                                     f"in {type(root).__name__}")
            fn = getattr(type(root), self.traced_func_name)
            self.root_module_name = root._get_name()
            self.submodule_paths = (patching.paths if patching.paths is not None else
                                    {mod: name for name, mod in root.named_modules()})
            self.graph = fx.Graph(tracer_cls=type(self))
            if hasattr(fn, "__code__"):
                code = fn.__code__
                self.graph._co_fields = {"co_name": code.co_name,
                                         "co_filename": code.co_filename,
                                         "co_firstlineno": code.co_firstlineno}
            self.tensor_attrs = {}
            if _holds_constants(patching.modules):
                self._collect_tensor_attrs(self.root, [])
            if not isinstance(fn, FunctionType):
                raise AssertionError(f"Expected FunctionType, got {type(fn)}")
            fn_globals = fn.__globals__
            fn, args = self.create_args_for_root(fn, True, None)
            ids = self._autowrap_function_ids
            orig_call = _FX._orig_module_call

            def module_getattr_wrapper(mod: nn.Module, attr: str) -> Any:  # pragma: no cover
                raise AssertionError("instance patching answers parameter reads")

            def module_call_wrapper(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
                def forward(*args: Any, **kwargs: Any) -> Any:
                    return orig_call(mod, *args, **kwargs)

                if ids:
                    _FX._autowrap_check(patcher, getattr(getattr(mod, "forward", mod),
                                                         "__globals__", {}), ids)
                return self.call_module(mod, forward, args, kwargs)

            with _FX._new_patcher() as patcher:
                patcher.patch_method(nn.Module, "__getattr__", module_getattr_wrapper,
                                     deduplicate=False)
                patcher.patch_method(nn.Module, "__call__", module_call_wrapper,
                                     deduplicate=False)
                _FX._patch_wrapped_functions(patcher)
                if ids:
                    _FX._autowrap_check(patcher, fn_globals, ids)
                    for module in self._autowrap_search:
                        _FX._autowrap_check(patcher, module.__dict__, ids)
                ann = inspect.get_annotations(inspect.unwrap(fn))
                self.create_node("output", "output", (self.create_arg(fn(*args)),), {},
                                 type_expr=ann.get("return", None))
            self.submodule_paths = None
        except RuntimeError as e:
            if e.args and isinstance(e.args[0], str) and "data-dependent" in e.args[0]:
                e.partial_fx_graph = self.graph.python_code(  # type: ignore[attr-defined]
                    root_module="self", verbose=True).src
            raise
        finally:
            _FX._is_fx_tracing_flag = flag
        return self.graph

    def _collect_tensor_attrs(self, m: nn.Module, prefix: list[str]) -> None:
        """fx's ``collect_tensor_attrs`` (a nested function of its ``trace``): every path to
        the module, the last one found naming a value held under several."""
        for k, v in m.__dict__.items():
            if isinstance(v, _CONSTANT_TYPES):
                self.tensor_attrs[v] = ".".join(prefix + [k])  # type: ignore[index]
        for k, v in m.named_children():
            self._collect_tensor_attrs(v, prefix + [k])

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:
        """fx's, for a module's plain ``forward(self, a, b=..., ...)`` (a function without
        ``*args``, ``**kwargs``, keyword-only parameters, a wrapper or a ``__signature__``,
        and no ``concrete_args``): one placeholder per parameter, a default as its argument,
        its annotation as its type, as fx makes them from ``inspect.signature``, without the
        signature object or the pytree flattening of the arguments (the module and proxies
        are pytree leaves: fx's flattening changes nothing).  Everything else: fx's."""
        co = getattr(root_fn, "__code__", None)
        if (not is_module or concrete_args is not None or co is None
                or type(root_fn) is not FunctionType or hasattr(root_fn, "__wrapped__")
                or hasattr(root_fn, "__signature__") or co.co_kwonlyargcount
                or co.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
                or co.co_argcount == 0):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        names = co.co_varnames[1:co.co_argcount]
        defaults = root_fn.__defaults__ or ()
        first_default = len(names) - len(defaults)
        annotations = root_fn.__annotations__
        args: list[Any] = [self.root]
        for i, name in enumerate(names):
            default = (defaults[i - first_default],) if i >= first_default else ()
            args.append(self.create_proxy("placeholder", name, default, {},
                                          type_expr=annotations.get(name, None)))
        return root_fn, args

    def _autowrap(self, frame: dict[str, Any] | None) -> None:
        """fx's ``_autowrap_check``: the math functions among ``frame``'s public names, each
        replaced by its wrapper until the trace ends (each frame once per trace)."""
        if frame is None or id(frame) in self._visited:
            return
        self._visited.add(id(frame))
        ids = self._math_ids
        if ids.isdisjoint(map(id, frame.values())):  # the usual case, without a Python loop
            return
        for name, value in list(frame.items()):
            if (id(value) in ids and not name.startswith("_") and callable(value)
                    and not getattr(value, "__fx_already_patched", False)):
                self._patched.append((frame, name, value))
                frame[name] = _math_wrapper(value)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_arg(self, a: Any) -> Any:
        """fx's ``create_arg``, without its chain of type checks for the common exact types
        (a plain Proxy, Python scalars and strings, tuples / lists / str-keyed dicts of them):
        fx returns the same for those.  Everything else is fx's."""
        t = type(a)
        if t is _Proxy or t is fx.Proxy:
            return a.node
        if t in _LEAF_ARGS:
            return a
        if t is tuple:
            return tuple([self.create_arg(e) for e in a])
        if t is list:
            return [self.create_arg(e) for e in a]
        if t is dict and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return lookup(type(m)) is not None

    def create_node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any | None = None) -> fx.Node:
        """fx's node, with the user's stack (from the first ``forward`` on, torch's and this
        module's frames left out) as its ``stack_trace`` when asked for.  fx's own
        ``record_stack_traces`` symbolises tracebacks and imports torch's symbolic-shapes
        machinery (about a thousand modules, seconds, on the first call of a process);
        Python's ``traceback`` gives the same ``File ..., line ...`` text for a fraction.

        A call's node is made without arguments and given them after (``node.args = ...``,
        fx's public setter, the same accounting of uses): ``Graph.create_node`` walks a
        call's arguments with pytree for symbolic ints (a warning about values symbolic
        tracing never makes), a sixth of the trace.  Not where fx would run hooks on the new
        node or check mutable operations.

        Without a ``name``, the graph's own candidate for one (``Graph._target_to_str``: a
        target's ``__name__`` or dotted path in snake case, a regular expression each node) is
        looked up in a table per process, filled by that same function."""
        if name is None and type(self.graph) is fx.Graph:
            try:
                name = _CANDIDATES.get(target)
                if name is None:
                    if len(_CANDIDATES) >= _CANDIDATES_KEPT:
                        _CANDIDATES.clear()
                    name = _CANDIDATES[target] = self.graph._target_to_str(target)
            except TypeError:  # an unhashable target: fx's own
                name = None
        if (args or kwargs) and kind in _CALLS and not self.check_mutable_operations \
                and self.graph.owning_module is None:
            node = self._new_node(kind, target, (), {}, name, type_expr)
            if kwargs:
                _set_kwargs(node, kwargs)
            _set_args(node, args)
        else:
            node = self._new_node(kind, target, args, kwargs, name, type_expr)
        if self.stack_traces and not node.stack_trace:
            stack = _user_stack()
            if stack is not None:
                node.stack_trace = stack
        return node

    def _new_node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  name: str | None, type_expr: Any | None) -> fx.Node:
        """``fx.proxy.TracerBase.create_node`` where it does no more than: make the graph's
        node, note the node's scope (``node_name_to_scope``) and copy the module stack into
        its ``meta["nn_module_stack"]`` (here with the stack's own ``__copy__``, not through
        ``copy.copy``'s dispatch).  fx's own where anything else may happen: mutable-op
        checks, preserved node meta, fx's stack traces, fx's debug log."""
        if (self.check_mutable_operations or self.record_stack_traces
                or fx.traceback.has_preserved_node_meta() or _FX_PROXY_LOG.isEnabledFor(10)):
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        scope = self.scope
        self.node_name_to_scope[node.name] = (scope.module_path, scope.module_type)
        stack = self.module_stack
        if stack:
            node.meta["nn_module_stack"] = (stack.__copy__() if type(stack) is _ModuleStack
                                            else copy.copy(stack))
        return node

    def _module_call(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        """``fx.Tracer.call_module``'s bookkeeping, the same steps without its scope context
        manager (two ``Scope`` objects and a ``copy.copy`` a module call): the tracer's scope
        is the module's for the call and restored after it (also when it raises); the module
        stack gets the call's key (``path@n`` for the n-th further call of one module) and
        loses it after a call that returns; a leaf (``is_leaf_module``) is one
        ``call_module`` node, any other module is traced into."""
        path = self.path_of_module(m)
        scope = self.scope
        before = scope.module_path, scope.module_type
        scope.module_path, scope.module_type = path, type(m)
        try:
            num_calls = self.num_calls.get(path, 0)
            module_key = f"{path}@{num_calls}" if num_calls > 0 else path
            self.module_stack[module_key] = (path, type(m))
            self.num_calls[path] = num_calls + 1
            if not self.is_leaf_module(m, path):
                ret_val = forward(*args, **kwargs)
            else:
                ret_val = self.create_proxy("call_module", path, args, kwargs)
            key, _ = self.module_stack.popitem(last=True)
            if key != module_key:
                raise AssertionError(f"Unexpected key {key}, expected {module_key}")
        finally:
            scope.module_path, scope.module_type = before
        return ret_val

    def _forget_param_names(self) -> None:  # a parameter was registered, replaced or removed
        self._param_names = None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's: a parameter of the root's tree is its ``get_attr`` proxy (one per name and
        trace), found in a table of the tree's parameters made once per trace (and again after
        the tree's parameters change: the instance patches say so) instead of by fx's walk of
        ``named_parameters()`` (and ``inspect.signature``) on every read; a parameter the table
        does not hold, a buffer, anything else, or a trace under fx's class patches: fx's."""
        self._proxy_cache = parameter_proxy_cache  # to forget proxies of rolled-back nodes
        if not isinstance(attr_val, torch.Tensor):  # fx proxies only parameters and buffers
            return attr_val
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant \
                and self._patching is not None:  # told when the tree's parameters change
            names = self._param_names
            if names is None:
                names = self._param_names = {
                    id(p): n for n, p in self.root.named_parameters()}
            name = names.get(id(attr_val))
            if name is not None:
                proxy = parameter_proxy_cache.get(name)
                if proxy is None:
                    proxy = parameter_proxy_cache[name] = self.create_proxy(
                        "get_attr", name, (), {})
                return proxy
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._own_wrap:  # fx checks each called module's forward globals (see trace)
            self._autowrap(getattr(getattr(m, "forward", m), "__globals__", None))
        if lookup(type(m)) is not None:
            return self._module_call(m, forward, args, kwargs)
        if self._patching is not None:  # the one call the patched _call_impl lets through
            forward = self._patching.run_inner(m, forward)
        before = len(self.graph.nodes)
        stack, calls = dict(self.module_stack), dict(self.num_calls)
        try:
            return self._module_call(m, forward, args, kwargs)
        except Exception as exc:  # not traceable: roll back, keep the call as one node
            made = list(self.graph.nodes)[before:]
            for n in reversed(made):
                self.graph.erase_node(n)
            gone = set(made)
            if self._proxy_cache is not None:
                for k in [k for k, p in self._proxy_cache.items() if p.node in gone]:
                    del self._proxy_cache[k]
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            proxy = self.create_proxy("call_module", self.path_of_module(m), args, kwargs)
            self.opaque[proxy.node.name] = (f"{type(m).__name__}.forward can not be traced "
                                            f"symbolically ({quote_error(exc, 160)})")
            return proxy


def _user_stack() -> str | None:
    """The caller's stack from its first ``forward`` frame on, torch's frames and the tracer's
    own (this module's, :mod:`fxfuse._patcher`'s) left out, as ``traceback.format_list``
    writes it; None without a ``forward``.

    The frames left out are dropped before they become ``FrameSummary`` objects (their source
    lines looked up, their files stat-ed by ``linecache.checkcache``): the same text as
    filtering ``traceback.extract_stack()``, for a fraction (it was three quarters of a trace
    with stack traces).  With ``sys.tracebacklimit`` set (which cuts the stack before the
    filter) that is what runs."""
    if getattr(sys, "tracebacklimit", None) is not None:
        frames = [f for f in traceback.extract_stack()
                  if not f.filename.startswith(_TORCH_DIR) and f.filename not in _OWN_FILES]
        first = next((i for i, f in enumerate(frames) if f.name == "forward"), None)
        return None if first is None else "".join(traceback.format_list(frames[first:])).strip()
    kept: list[tuple[Any, int]] = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name not in _OWN_FILES:
            kept.append((frame, frame.f_lineno))
        frame = frame.f_back
    kept.reverse()  # outermost first, as extract_stack lists them
    first = next((i for i, (f, _) in enumerate(kept) if f.f_code.co_name == "forward"), None)
    if first is None:
        return None
    summary = traceback.StackSummary.extract(iter(kept[first:]))
    return "".join(summary.format()).strip()


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
        f"{type(example_inputs).__name__}"
    )


def trace_graph(model: nn.Module, stack_traces: bool = True) -> GraphTrace:
    """``torch.fx`` symbolic tracing with fxfuse's leaf modules (and the user's source line of
    every node with ``stack_traces``: a quarter of the tracing time, so discovery asks for them
    only when it has something to report), not compiled to Python code.  Calls of functions
    marked with ``torch.fx.wrap`` are inlined into a GraphModule (it holds the constants they
    make); otherwise the graph's targets name the model's own attributes."""
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    try:
        tracer, graph = _trace_root(model, stack_traces)
        root, opaque = tracer.root, dict(tracer.opaque)
        _forget(tracer)
        gm = (fx.GraphModule(root, graph, type(model).__name__)
              if any(_is_wrapped_call(n) for n in graph.nodes) else None)
    except Exception as exc:
        raise _trace_error(model, exc) from exc
    if gm is None:
        return GraphTrace(root, graph, {OPAQUE: opaque})
    opaque.update(inline_wrapped_functions(gm, stack_traces))
    gm.meta[OPAQUE] = opaque
    return GraphTrace.of(gm)


def _trace_root(model: nn.Module, stack_traces: bool) -> tuple[_Tracer, fx.Graph]:
    """fx's trace of ``model``; where it fails, once more with buffers as graph nodes (fx
    otherwise hands ``forward`` a buffer's tensor, so ``self.cos[:x.size(1)]`` slices a tensor
    by a proxy and fails: rotary tables, position ids).  Buffers stay constants when the plain
    trace works, so those graphs are as before; the first failure is the one raised."""
    tracer = _Tracer(stack_traces)
    try:
        return tracer, tracer.trace(model)
    except Exception as first:
        _forget(tracer)
        if next(model.buffers(), None) is None:
            raise
        tracer = _Tracer(stack_traces)
        tracer.proxy_buffer_attributes = True
        try:
            return tracer, tracer.trace(model)
        except Exception:
            raise first from None


def _forget(tracer: fx.Tracer) -> None:
    """Drop a finished tracer's state.  fx's ``trace`` leaves a reference cycle behind (its
    nested, self-recursive ``collect_tensor_attrs`` closes over the tracer), so the tracer
    lives until the cyclic collector runs, and with it everything it holds: the graph, the
    proxy cache, the per-code instruction tables.  Emptied, it holds nothing, and the graph is
    freed by reference counting when its last user lets it go."""
    tracer.__dict__.clear()


_node_member = object.__setattr__  # fx's Node links are members of its C base (_NodeBase)


def release_graph(graph: fx.Graph) -> None:
    """Break the reference cycles of a graph that nothing will use again (every node is
    linked to its neighbours, its users and its graph, and back), so reference counting frees
    it, and everything its nodes' ``meta`` holds, at once, instead of the cyclic collector
    finding it all later in a pass over every object the call made.  The graph is unusable
    after this."""
    try:
        nodes = [*graph.nodes, graph._root]
        for n in nodes:
            n.users.clear()
            n._input_nodes.clear()
            _node_member(n, "_prev", None)
            _node_member(n, "_next", None)
            _node_member(n, "graph", None)
    except (AttributeError, TypeError):  # pragma: no cover - another fx: the collector's job
        return


def symbolic_trace(model: nn.Module, stack_traces: bool = True) -> fx.GraphModule:
    """:func:`trace_graph` compiled to a runnable ``GraphModule`` (``gm.meta["fxfuse.opaque"]``
    names the opaque calls)."""
    traced = trace_graph(model, stack_traces)
    if traced.root is not model:  # inlined: already a GraphModule
        assert isinstance(traced.root, fx.GraphModule)
        return traced.root
    try:
        gm = fx.GraphModule(traced.root, traced.graph, type(model).__name__)
    except Exception as exc:
        raise _trace_error(model, exc) from exc
    gm.meta.update(traced.meta)
    return gm


def _trace_error(model: nn.Module, exc: Exception) -> TraceError:
    return TraceError(
        f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
        f"{quote_error(exc)}. Data-dependent control flow, iteration over tensors "
        f"or item assignment stop symbolic tracing; make that code a leaf module with a "
        f"registered rule (@fxfuse.axis_rule(MyModule)), or rewrite it without Python "
        f"control flow on tensor values."
    )


def _is_wrapped_function(target: Any) -> bool:
    """A plain Python function outside torch called as one node (``torch.fx.wrap``)."""
    return (inspect.isfunction(target) and lookup(target) is None
            and not (getattr(target, "__module__", None) or "torch").startswith("torch"))


def _is_wrapped_call(node: fx.Node) -> bool:
    return node.op == "call_function" and _is_wrapped_function(node.target)


def _function_module(fn: Callable[..., Any], args: Any, kwargs: Any, nodes: list[fx.Node]
                     ) -> nn.Module:
    """A module whose ``forward(a0, .., ak)`` calls ``fn`` with the call's arguments, ``ai``
    standing for the call's i-th argument node (fx traces a root's positional parameters)."""
    names = [f"a{i}" for i in range(len(nodes))]
    index = {n: i for i, n in enumerate(nodes)}

    class _Call(nn.Module):
        def call(self, *xs: Any) -> Any:
            def sub(v: Any) -> Any:
                return xs[index[v]] if isinstance(v, fx.Node) else v
            a = fx.node.map_aggregate(args, sub)
            kw = fx.node.map_aggregate(kwargs, sub)
            return fn(*a, **kw)  # type: ignore[arg-type]

    scope: dict[str, Any] = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return self.call({', '.join(names)})\n",
         scope)
    _Call.forward = scope["forward"]  # type: ignore[method-assign]
    return _Call()


def _inline_one(gm: fx.GraphModule, node: fx.Node, stack_traces: bool, k: int) -> str | None:
    """Trace ``node``'s function on its own and put its graph in place of ``node``; the reason
    it stays opaque, or None once inlined."""
    nodes: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), nodes.append)
    nodes = list(dict.fromkeys(nodes))
    wrapper = _function_module(node.target, node.args, node.kwargs, nodes)  # type: ignore[arg-type]
    tracer = _Tracer(stack_traces)
    try:
        sub = tracer.trace(wrapper)
    except Exception as exc:
        name = getattr(node.target, "__qualname__", str(node.target))
        return f"{name} can not be traced symbolically ({quote_error(exc, 160)})"
    if tracer.opaque or any(n.op == "call_module" for n in sub.nodes):
        return f"{getattr(node.target, '__qualname__', node.target)} calls modules"
    out = next(n for n in sub.nodes if n.op == "output").args[0]
    users = list(node.users)
    if not isinstance(out, fx.Node) and not (
            isinstance(out, (tuple, list)) and all(isinstance(o, fx.Node) for o in out)
            and all(u.target is operator.getitem and isinstance(u.args[1], int) for u in users)):
        return f"{getattr(node.target, '__qualname__', node.target)} returns a structure"
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    val_map: dict[fx.Node, Any] = dict(zip(placeholders, nodes))
    for n in sub.nodes:
        if n.op == "get_attr":  # constants the function made (torch.tensor(...))
            value = attribute(tracer.root, str(n.target))
            name = f"_fxfuse_inlined_{k}_{str(n.target).replace('.', '_')}"
            setattr(gm, name, value)
            n.target = name
    with gm.graph.inserting_before(node):
        copied = gm.graph.graph_copy(sub, val_map)
    if isinstance(copied, fx.Node):
        node.replace_all_uses_with(copied)
    else:
        for u in users:
            u.replace_all_uses_with(copied[u.args[1]])  # type: ignore[index, arg-type]
            gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    return None


def inline_wrapped_functions(gm: fx.GraphModule, stack_traces: bool, depth: int = 8
                             ) -> dict[str, str]:
    """See through functions marked with ``torch.fx.wrap``: each call is traced on its own and
    inlined (nested ones too, ``depth`` levels).  Returns the calls that stay opaque (node name
    -> why)."""
    opaque: dict[str, str] = {}
    k = 0
    for _ in range(depth):
        todo = [n for n in gm.graph.nodes if _is_wrapped_call(n) and n.name not in opaque]
        if not todo:
            break
        for node in todo:
            why = _inline_one(gm, node, stack_traces, k)
            k += 1
            if why is not None:
                opaque[node.name] = why
    if k:
        gm.graph.lint()
        gm.recompile()
    return opaque


def nonfinite_key(state: Any) -> str | None:
    """The first floating tensor of ``state`` (a state_dict) holding NaN or inf, or None."""
    return next((key for key, t in state.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: nn.Module, no_grad: bool = True) -> Iterator[None]:
    """Eval mode (and no grad unless ``no_grad=False``) for the duration; every module's
    training flag is restored.  Where no module overrides ``nn.Module``'s ``train``, ``eval``,
    ``__setattr__`` or its walks over submodules (:func:`_plain_type`), ``eval()`` only sets
    each module's ``training`` to False: the modules are then found by a walk over their
    ``_modules`` tables (:func:`_plain_modules`, the modules ``modules()`` yields) and the flags
    set directly (``nn.Module.__setattr__`` and ``train`` cost about a microsecond a module),
    and only those that change."""
    found = [_plain_modules(model) for model in models]
    plain = None not in found
    modes = [(m, m.training) for model, mods in zip(models, found)
             for m in (mods if mods is not None else model.modules())]
    if plain:
        for m, mode in modes:
            if mode is not False:
                object.__setattr__(m, "training", False)
    else:
        for model in models:
            model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield
    finally:
        for m, mode in modes:
            if not plain:
                m.training = mode
            elif m.training is not mode:
                object.__setattr__(m, "training", mode)


_PLAIN = [(k, getattr(nn.Module, k)) for k in ("train", "eval", "__setattr__", "children",
                                                 "named_children", "modules", "named_modules")]
_PLAIN_TYPES: dict[type, bool] = {}  # module class -> whether it overrides none of _PLAIN


def _plain_type(t: type) -> bool:
    hit = _PLAIN_TYPES.get(t)
    if hit is None:
        if len(_PLAIN_TYPES) >= 4096:
            _PLAIN_TYPES.clear()
        hit = _PLAIN_TYPES[t] = all(getattr(t, k) is v for k, v in _PLAIN)
    return hit


def _plain_modules(model: nn.Module) -> list[nn.Module] | None:
    """``list(model.modules())`` (each module once, in its order) by a walk over the
    ``_modules`` tables, where every module found is of a :func:`_plain_type` class (whose
    ``modules()`` is that walk); None where one is not (its own walk must answer)."""
    out: list[nn.Module] = []
    seen: set[nn.Module] = set()
    todo = [model]
    plain = _plain_type
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        if not plain(type(m)):
            return None
        seen.add(m)
        out.append(m)
        subs = m._modules
        if subs:
            todo += [s for s in reversed(subs.values()) if s is not None]
    return out


def _cache_configs(model: nn.Module) -> list[Any]:
    """The configs (Hugging Face ``module.config``) of ``model`` that have ``use_cache=True``."""
    found: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None) is True:
            found[id(cfg)] = cfg
    return list(found.values())


def _returns_cache(model: nn.Module, inputs: Sequence[Any]) -> bool:
    """Whether ``model(*inputs)`` returns a key/value cache object (``DynamicCache``, under the
    key ``past_key_values`` or, in transformers 5, ``cache``)."""
    from collections.abc import Mapping

    try:
        with eval_mode(model):
            out = model(*inputs)
    except Exception:  # tracing will say what is wrong
        return False
    return isinstance(out, Mapping) and any("Cache" in type(v).__name__ for v in out.values())


def without_kv_cache(model: nn.Module, inputs: Sequence[Any]) -> nn.Module:
    """``model`` itself, or for a Hugging Face model that returns a key/value cache on
    ``inputs`` (``config.use_cache=True``: causal LMs) a copy of it with ``use_cache=False``: the
    cache (a ``DynamicCache``) stops ``torch.export``.  The copy shares every parameter and
    buffer with ``model`` (only modules and configs are copied, so it costs no memory for the
    weights); ``model`` and its config are not touched."""
    if not _cache_configs(model) or not _returns_cache(model, inputs):
        return model
    shared: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(),
                                                                 model.buffers())}
    clone = copy.deepcopy(model, shared)
    for cfg in _cache_configs(clone):
        cfg.use_cache = False
    return clone


def kv_cache_note(model: nn.Module, inputs: Sequence[Any]) -> str | None:
    """What :func:`export_trace` did about the key/value cache of ``model``, for a report."""
    if not _cache_configs(model) or not _returns_cache(model, inputs):
        return None
    return (f"trace: {type(model).__name__} has config.use_cache=True; it was traced as a copy "
            "with use_cache=False (a key/value cache output stops torch.export); the models "
            "given and the fused model keep use_cache=True")


def export_program(model: nn.Module, inputs: Sequence[Any], where: str = "") -> Any:
    """``torch.export.export`` of ``model`` in eval mode (a Hugging Face causal LM as its
    :func:`without_kv_cache` copy); a failure is a TraceError saying what to change.  ``where``
    completes the message ("either" after symbolic tracing failed, "on a data batch")."""
    traced = without_kv_cache(model, inputs)
    try:
        with eval_mode(traced):
            return torch.export.export(traced, tuple(inputs), strict=False)
    except Exception as exc:
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}{' ' + where if where else ''}: "
            f"{quote_error(exc)}. Make the forward free of data-dependent Python control flow, "
            f"or register a rule for the module that is not traceable "
            f"(@fxfuse.axis_rule(MyModule)) so it stays a leaf."
        ) from exc


def export_trace(model: nn.Module, inputs: Sequence[Any]) -> tuple[fx.GraphModule, dict[str, str]]:
    """``torch.export`` (ATen-level graph, shapes from its fake tensors) for models symbolic
    tracing can not handle (Hugging Face causal LMs are traced as :func:`without_kv_cache`
    copies).  Returns the graph module and, for every placeholder that is a
    parameter/buffer/constant, the name it has in the model (``state_dict`` key)."""
    ep = export_program(model, inputs, "either")
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    gm = ep.graph_module
    for node in gm.graph.nodes:
        node.meta[VALUE] = _summarise(node.meta.get("val"))
    return gm, dict(names)


def _summarise(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorMeta(tuple(v.shape), v.dtype)
    if isinstance(v, torch.Size):
        return tuple(int(s) for s in v)
    if isinstance(v, torch.SymInt):
        return int(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_summarise(u) for u in v) if not hasattr(v, "_fields") else tuple(
            _summarise(u) for u in v
        )
    return v


# Ops whose arithmetic dominates a forward pass: their output shapes come from the shape formulas
# below and stand in as zeros, so recording costs about as much as the cheap ops around them.
# (Formulas, not meta tensors: the first meta-device dispatch of a process imports torch's
# decomposition tables, ~850 modules and about a second, which was most of a cold discovery.)
HEAVY_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules whose output has the input's shape and dtype: the input stands in for the output.
SHAPE_PRESERVING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                    nn.RMSNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                    nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Identity, nn.Dropout)
_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
HEAVY_FUNCTIONS = {F.linear, *_CONV_DIMS, torch.matmul, operator.matmul, torch.bmm, "matmul",
                   "bmm"}

Shape = tuple[int, ...]


def _tuple(v: Any, n: int) -> tuple[int, ...] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(type(u) is int for u in v):
        return tuple(v)
    return None


def conv_shape(x: Shape, w: Shape, n: int, stride: Any, padding: Any, dilation: Any,
               groups: Any) -> Shape | None:
    """Output shape of an ``n``-d convolution (zero padding) of input ``x`` (``(N, C, *L)`` or
    unbatched ``(C, *L)``) with weight ``w`` ``(C_out, C/groups, *k)``:
    ``L_out = floor((L + 2 p - d (k - 1) - 1) / s) + 1``, ``L_out = L`` for ``padding="same"``,
    ``p = 0`` for ``"valid"``.  ``None`` where the call is not valid (the real op then says why)."""
    if len(x) not in (n + 1, n + 2) or len(w) != n + 2 or type(groups) is not int or groups < 1:
        return None
    s, d = _tuple(stride, n), _tuple(dilation, n)
    if s is None or d is None or min(s) < 1 or min(d) < 1:
        return None
    c, spatial, k = x[-n - 1], x[-n:], w[2:]
    if c != w[1] * groups or w[0] % groups or min(x) < 1 or min(w) < 1:
        return None
    if padding == "same":
        if max(s) != 1:
            return None
        out = spatial
    else:
        p = (0,) * n if padding == "valid" else _tuple(padding, n)
        if p is None or min(p) < 0:
            return None
        out = tuple((li + 2 * pi - di * (ki - 1) - 1) // si + 1
                    for li, pi, di, ki, si in zip(spatial, p, d, k, s))
        if min(out) < 1:
            return None
    return (*x[:-n - 1], w[0], *out)


def _broadcast(a: Shape, b: Shape) -> Shape | None:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        u = a[-i] if i <= len(a) else 1
        v = b[-i] if i <= len(b) else 1
        if u != v and 1 not in (u, v):
            return None
        out.append(v if u == 1 else u)
    return tuple(reversed(out))


def matmul_shape(a: Shape, b: Shape) -> Shape | None:
    """Output shape of ``torch.matmul(a, b)``: 1-d operands get a unit dimension prepended
    (``a``) or appended (``b``) that is removed from the result, batch dimensions broadcast,
    ``(..., n, k) @ (..., k, m) -> (..., n, m)``."""
    if not a or not b:
        return None
    if len(a) == 1 and len(b) == 1:
        return () if a == b else None
    a2, b2 = ((1, *a) if len(a) == 1 else a), ((*b, 1) if len(b) == 1 else b)
    if a2[-1] != b2[-2]:
        return None
    batch = _broadcast(a2[:-2], b2[:-2])
    if batch is None:
        return None
    rows = () if len(a) == 1 else (a2[-2],)
    cols = () if len(b) == 1 else (b2[-1],)
    return (*batch, *rows, *cols)


def _same_float(*ts: Any) -> torch.dtype | None:
    """The common floating dtype of the tensors ``ts`` (``None`` entries skipped), or ``None``."""
    first = None
    for t in ts:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or (first is not None and t.dtype != first.dtype):
            return None
        first = first if first is not None else t
    if first is None or not first.is_floating_point():
        return None
    return first.dtype


def _linear(x: Any, w: Any, b: Any = None) -> tuple[Shape, torch.dtype] | None:
    dtype = _same_float(x, w, b)
    if dtype is None or x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        return None
    if b is not None and tuple(b.shape) not in ((w.shape[0],), ()):
        return None
    return (*x.shape[:-1], w.shape[0]), dtype


def _conv(n: int, x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0,
          dilation: Any = 1, groups: Any = 1) -> tuple[Shape, torch.dtype] | None:
    dtype = _same_float(x, w, b)
    if dtype is None or (b is not None and tuple(b.shape) != (w.shape[0],)):
        return None
    out = conv_shape(tuple(x.shape), tuple(w.shape), n, stride, padding, dilation, groups)
    return None if out is None else (out, dtype)


def _matmul(a: Any, b: Any, batched: bool) -> tuple[Shape, torch.dtype] | None:
    dtype = _same_float(a, b)
    if dtype is None or (batched and (a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0])):
        return None
    out = matmul_shape(tuple(a.shape), tuple(b.shape))
    return None if out is None else (out, dtype)


def _attr(mod: nn.Module, name: str) -> Any:
    """``getattr(mod, name)`` for a parameter of a module of an exact ``torch.nn`` type (no
    class attribute of that name): the instance's own attribute, else its parameter, without
    ``nn.Module.__getattr__``'s failed lookup first; anything else through ``getattr``."""
    d = mod.__dict__
    if name in d:
        return d[name]
    params = d.get("_parameters")
    if params is not None and name in params:
        return params[name]
    return getattr(mod, name)


def _module_shape(mod: nn.Module, x: Any) -> tuple[Shape, torch.dtype] | None:
    if isinstance(mod, nn.Linear):
        return _linear(x, _attr(mod, "weight"), _attr(mod, "bias"))
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if mod.padding_mode != "zeros":  # padded by F.pad first: let the real op run
        return None
    return _conv(len(mod.kernel_size), x, _attr(mod, "weight"), _attr(mod, "bias"), mod.stride,
                 mod.padding, mod.dilation, mod.groups)


def _function_shape(target: Any, args: Any, kwargs: Any) -> tuple[Shape, torch.dtype] | None:
    try:
        if target is F.linear:
            return _linear(*args, **kwargs)
        if target in _CONV_DIMS:
            return _conv(_CONV_DIMS[target], *args, **kwargs)
    except TypeError:  # unexpected arguments: the real op says what is wrong
        return None
    if kwargs or len(args) != 2:
        return None
    return _matmul(args[0], args[1], batched=target in (torch.bmm, "bmm"))


def _module_value(mod: nn.Module, args: Any, kwargs: Any, call: Callable[[], Any]) -> Any:
    """The value recorded for a call of ``mod`` (``call()`` runs it): the input itself for a
    ``SHAPE_PRESERVING`` module, zeros of the formula's shape for a ``HEAVY_MODULES`` one (exact
    types: no subclasses), else the real output."""
    if (type(mod) in _SHAPE_PRESERVING and not kwargs and len(args) == 1
            and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
        return args[0]
    if type(mod) in _HEAVY_MODULES and not kwargs and len(args) == 1:
        return _shape_only(_module_shape(mod, args[0]), args, call)
    if type(mod) is nn.MultiheadAttention:
        shape = _attention_shape(mod, args, kwargs)
        if shape is not None:
            return torch.zeros(shape[0], dtype=shape[1], device=args[0].device), None
    return call()


def _attention_shape(mod: nn.MultiheadAttention, args: Any, kwargs: Any
                     ) -> tuple[Shape, torch.dtype] | None:
    """The output shape and dtype of ``mod(query, key, value, need_weights=False)`` (the
    output is ``(attn_output, None)``; ``attn_output`` has the query's shape): only for that
    call (no masks, no weights asked for), a module without hooks, ``bias_k`` / ``bias_v`` or
    ``add_zero_attn``, and inputs ``F.multi_head_attention_forward`` accepts (its shape checks:
    2-D or 3-D, embedding sizes, key / value / batch sizes; parameters of the built shapes, one
    float dtype and device).  ``None`` otherwise: the real module runs."""
    if len(args) != 3 or set(kwargs) != {"need_weights"} or kwargs["need_weights"] is not False:
        return None
    if (mod._forward_hooks or mod._forward_pre_hooks or mod.bias_k is not None
            or mod.bias_v is not None or mod.add_zero_attn):
        return None
    q, k, v = args
    e = mod.embed_dim
    weights: list[tuple[Any, Shape]]
    if mod._qkv_same_embed_dim:
        weights = [(mod.in_proj_weight, (3 * e, e))]
    else:
        weights = [(mod.q_proj_weight, (e, e)), (mod.k_proj_weight, (e, mod.kdim)),
                   (mod.v_proj_weight, (e, mod.vdim))]
    weights.append((mod.out_proj.weight, (e, e)))
    biases = [(mod.in_proj_bias, (3 * e,)), (mod.out_proj.bias, (e,))]
    params = weights + biases
    tensors = [q, k, v] + [t for t, _ in params if t is not None]
    dtype = _same_float(*tensors)
    if dtype is None or any(t is not None and tuple(t.shape) != shape for t, shape in params):
        return None
    if any(t is None for t, _ in weights) or len({t.device for t in tensors}) != 1:
        return None
    if q.dim() not in (2, 3) or k.dim() != q.dim() or v.dim() != q.dim():
        return None
    if q.shape[-1] != e or k.shape[-1] != mod.kdim or v.shape[-1] != mod.vdim:
        return None
    if k.shape[:-1] != v.shape[:-1] or min(q.shape) < 1 or min(k.shape) < 1:
        return None
    if q.dim() == 3 and q.shape[0 if mod.batch_first else 1] != k.shape[0 if mod.batch_first
                                                                         else 1]:
        return None
    return tuple(q.shape), dtype


def _shape_only(shape: tuple[Shape, torch.dtype] | None, args: Any,
                fallback: Callable[[], Any]) -> Any:
    """Zeros of the formula's shape and dtype, on the input's device; the real op where the
    formula has no answer (an invalid call, whose error the real op gives)."""
    real = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if real is None or shape is None:
        return fallback()
    return torch.zeros(shape[0], dtype=shape[1], device=real.device)


_SHAPE_PRESERVING = frozenset(SHAPE_PRESERVING)
_HEAVY_MODULES = frozenset(HEAVY_MODULES)


class _Recorder(fx.Interpreter):
    """``fx.Interpreter`` with the recorded values of :func:`_module_value` and the heavy
    functions' shape formulas; the reference that :func:`_record` runs as a plain loop."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta[VALUE] = _summarise(result)
        return result

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return _module_value(self.module.get_submodule(target), args, kwargs,
                             lambda: super(_Recorder, self).call_module(target, args, kwargs))

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in HEAVY_FUNCTIONS:
            return _shape_only(
                _function_shape(target, args, kwargs), args,
                lambda: super(_Recorder, self).call_function(target, args, kwargs))
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in HEAVY_FUNCTIONS:
            return _shape_only(
                _function_shape(target, args, kwargs), args,
                lambda: super(_Recorder, self).call_method(target, args, kwargs))
        return super().call_method(target, args, kwargs)


def attribute(root: nn.Module, target: str) -> Any:
    """``root``'s attribute at the dotted path ``target`` (a get_attr / call_module node's)."""
    value: Any = root
    for atom in target.split("."):
        value = member(value, atom)
    return value


def attribute_reader(root: nn.Module) -> Callable[[str], Any]:
    """:func:`attribute` of ``root`` for many targets: each owner ``a.b`` of a target ``a.b.c``
    looked up once (fx walks the whole path for every node), its attribute ``c`` each time."""
    owners: dict[str, Any] = {"": root}

    def fetch(target: str) -> Any:
        head, _, atom = target.rpartition(".")
        owner = owners.get(head)
        if owner is None:
            owner = owners[head] = attribute(root, head)
        return member(owner, atom)

    return fetch


_MODULE_TABLES = ("_parameters", "_buffers", "_modules")  # where Module.__getattr__ looks
_GETATTR, _GETATTRIBUTE = nn.Module.__getattr__, nn.Module.__getattribute__


def member(obj: Any, name: str) -> Any:
    """``getattr(obj, name)``; of a module whose instance and class have no attribute ``name``,
    read from its parameter, buffer or submodule table, in the order ``nn.Module.__getattr__``
    reads them, without the failed attribute lookup that comes before it (where the class does
    not override attribute access)."""
    if isinstance(obj, nn.Module):
        d, cls = obj.__dict__, type(obj)
        if (name not in d and cls.__getattr__ is _GETATTR and cls.__getattribute__ is _GETATTRIBUTE
                and not hasattr(cls, name)):
            for table in _MODULE_TABLES:
                entries = d.get(table)
                if entries is not None and name in entries:
                    return entries[name]
    return getattr(obj, name)


def _record(traced: GraphTrace, inputs: Sequence[Any]) -> None:
    """:class:`_Recorder`'s run as a plain loop over the nodes: the same calls in the same
    order on the same values, each value dropped after its last use as ``fx.Interpreter`` does,
    without its per-node dispatch, context managers and argument checks (2-3x less overhead a
    node).  An error is raised as it comes (the graph is run once).

    A target ``a.b.c`` is ``getattr(owner, "c")`` of its owner ``a.b``, looked up once a run
    (fx walks the whole path for every node: a few microseconds a node on deep models), so a
    forward that rebinds a submodule of the model while it runs is not seen by later nodes."""
    root, graph = traced.root, traced.graph
    fetch = attribute_reader(root)
    drop: dict[fx.Node, list[fx.Node]] = {}  # node -> the values whose last use it is
    used: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        for n in node.all_input_nodes:
            if n not in used:
                used.add(n)
                drop.setdefault(node, []).append(n)
    env: dict[fx.Node, Any] = {}
    load = env.__getitem__
    map_arg = fx.node.map_arg
    heavy = HEAVY_FUNCTIONS
    args_iter = iter(graph.process_inputs(*inputs))
    for node in graph.nodes:
        op, target = node.op, node.target
        args = map_arg(node.args, load)
        kwargs = map_arg(node.kwargs, load)
        if op == "call_module":
            mod = fetch(target)  # type: ignore[arg-type]
            value = _module_value(mod, args, kwargs, partial(mod, *args, **kwargs))
        elif op == "call_function":
            if target in heavy:
                value = _shape_only(_function_shape(target, args, kwargs), args,
                                    partial(target, *args, **kwargs))  # type: ignore[arg-type]
            else:
                value = target(*args, **kwargs)  # type: ignore[operator]
        elif op == "call_method":
            if target in heavy:
                value = _shape_only(
                    _function_shape(target, args, kwargs), args,
                    partial(getattr(args[0], target), *args[1:], **kwargs))  # type: ignore[arg-type]
            else:
                value = getattr(args[0], target)(*args[1:], **kwargs)  # type: ignore[arg-type]
        elif op == "get_attr":
            value = fetch(target)  # type: ignore[arg-type]
        elif op == "placeholder":
            if target.startswith("*"):  # type: ignore[union-attr]
                value = list(args_iter)
            else:
                value = next(args_iter, _MISSING)
                if value is _MISSING:
                    if not args:
                        raise RuntimeError(f"no input for parameter {target}")
                    value = args[0]
        elif op == "output":
            value = args[0]
        else:
            raise RuntimeError(f"unknown node op {op!r}")
        env[node] = value
        node.meta[VALUE] = _summarise(value)
        for n in drop.get(node, ()):
            del env[n]
        if op == "output":
            graph.process_outputs(value)
            return


_MISSING = object()


def record_values(gm: fx.GraphModule | GraphTrace, inputs: Sequence[Any]) -> None:
    """Annotate every node of ``gm`` (a GraphModule or a :class:`GraphTrace`) with the values
    seen on ``inputs`` (eval mode, no grad; modes restored).

    Values are real except the outputs of arithmetic-heavy ops (``HEAVY_MODULES``,
    ``HEAVY_FUNCTIONS``, ``nn.MultiheadAttention`` called with ``need_weights=False``), whose
    shapes come from shape formulas and whose values are zeros, and of ``SHAPE_PRESERVING``
    modules, which pass their input on: discovery needs shapes, not values.  Run as a plain
    loop (:func:`_record`), or where fx is asked to preserve node meta during interpretation
    (``fx.traceback.preserve_node_meta``) as ``fx.Interpreter``; either runs the graph once,
    so a forward's side effects before a failing node happen once, as in the model's own call.
    """
    traced = gm if isinstance(gm, GraphTrace) else GraphTrace.of(gm)
    try:
        with eval_mode(traced.root):
            if fx.traceback.has_preserved_node_meta():
                _Recorder(traced.root, graph=traced.graph).run(*inputs)
            else:
                _record(traced, inputs)
    except Exception as exc:
        raise InputError(
            f"running the traced model on the example inputs failed: {quote_error(exc)}. "
            f"Check the number, shapes and dtypes of example_inputs."
        ) from exc


def source_line(node: fx.Node) -> str | None:
    """``file:line: code`` of the user's line that created ``node`` (from its stack trace)."""
    st = node.stack_trace
    if not st:
        return None
    lines = [ln for ln in st.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        if ln.startswith("File ") and _TORCH_DIR not in ln:
            parts = ln.split(",")
            path = parts[0][len("File "):].strip().strip('"')
            try:
                rel = os.path.relpath(path)
                path = rel if not rel.startswith("..") else path
            except ValueError:  # another drive on Windows
                pass
            lineno = parts[1].strip().removeprefix("line ").strip() if len(parts) > 1 else "?"
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{path}:{lineno}: {code}"
    return None
