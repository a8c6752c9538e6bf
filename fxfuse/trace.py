"""Tracing: a model -> a ``torch.fx.GraphModule`` whose nodes carry the values seen on the example
inputs (``node.meta["fxfuse.value"]``: a :class:`TensorMeta` for tensors, the concrete value for
Python scalars/shapes, tuples of those for multi-output ops).

Modules with a registered axis rule (all standard ``torch.nn`` layers, plus user-registered
classes) are kept as leaves; everything else is traced through, so a weight-tied block called
``k`` times appears as ``k`` ``call_module`` nodes with the same target.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import InputError, TraceError, quote_error
from .rules import lookup

VALUE = "fxfuse.value"
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Tracer(fx.Tracer):
    def __init__(self, stack_traces: bool) -> None:
        super().__init__()
        self.record_stack_traces = stack_traces

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if lookup(type(m)) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
        f"{type(example_inputs).__name__}"
    )


def symbolic_trace(model: nn.Module, stack_traces: bool = True) -> fx.GraphModule:
    """``torch.fx`` symbolic tracing with fxfuse's leaf modules (and the user's source line of
    every node with ``stack_traces``: a quarter of the tracing time, so discovery asks for them
    only when it has something to report)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tracer = _Tracer(stack_traces)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise TraceError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
            f"{quote_error(exc)}. Data-dependent control flow, iteration over tensors "
            f"or item assignment stop symbolic tracing; make that code a leaf module with a "
            f"registered rule (@fxfuse.axis_rule(MyModule)), or rewrite it without Python "
            f"control flow on tensor values."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: nn.Module, no_grad: bool = True) -> Iterator[None]:
    """Eval mode (and no grad unless ``no_grad=False``) for the duration; every module's
    training flag is restored."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


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


def export_trace(model: nn.Module, inputs: Sequence[Any]) -> tuple[fx.GraphModule, dict[str, str]]:
    """``torch.export`` (ATen-level graph, shapes from its fake tensors) for models symbolic
    tracing can not handle (Hugging Face causal LMs are traced as :func:`without_kv_cache`
    copies).  Returns the graph module and, for every placeholder that is a
    parameter/buffer/constant, the name it has in the model (``state_dict`` key)."""
    traced = without_kv_cache(model, inputs)
    try:
        with eval_mode(traced):
            ep = torch.export.export(traced, tuple(inputs), strict=False)
    except Exception as exc:
        raise TraceError(
            f"torch.export could not trace {type(model).__name__} either: {quote_error(exc)}. "
            f"Make the forward free of data-dependent Python control flow, or register a rule "
            f"for the module that is not traceable (@fxfuse.axis_rule(MyModule)) so it stays a "
            f"leaf."
        ) from exc
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


def _meta(v: Any) -> Any:
    return v.to("meta") if isinstance(v, torch.Tensor) else v


# Ops whose arithmetic dominates a forward pass: their output shapes are computed on the meta
# device and stand in as zeros, so recording costs about as much as the cheap ops around them.
HEAVY_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules whose output has the input's shape and dtype: the input stands in for the output.
SHAPE_PRESERVING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                    nn.RMSNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                    nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Identity, nn.Dropout)
HEAVY_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, operator.matmul,
                   torch.bmm, "matmul", "bmm"}


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta[VALUE] = _summarise(result)
        return result

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.module.get_submodule(target)
        if (type(mod) in SHAPE_PRESERVING and not kwargs and len(args) == 1
                and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
            return args[0]
        if type(mod) in HEAVY_MODULES and not kwargs and len(args) == 1:  # exact: no subclasses
            w, b = _meta(mod.weight), _meta(mod.bias)
            run = ((lambda a, k: F.linear(a[0], w, b)) if isinstance(mod, nn.Linear)
                   else (lambda a, k: mod._conv_forward(a[0], w, b)))  # type: ignore[operator]
            return self._shape_only(
                run, args, kwargs, lambda: super(_Recorder, self).call_module(target, args, kwargs))
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in HEAVY_FUNCTIONS:
            return self._shape_only(lambda a, k: target(*a, **k), args, kwargs,
                                    lambda: super(_Recorder, self).call_function(target, args,
                                                                                 kwargs))
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in HEAVY_FUNCTIONS:
            return self._shape_only(lambda a, k: getattr(a[0], target)(*a[1:], **k), args,
                                    kwargs, lambda: super(_Recorder, self).call_method(
                                        target, args, kwargs))
        return super().call_method(target, args, kwargs)

    @staticmethod
    def _shape_only(run: Callable[[Any, Any], Any], args: Any, kwargs: Any,
                    fallback: Callable[[], Any]) -> Any:
        real = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if real is None:
            return fallback()
        try:
            out = run(tuple(_meta(a) for a in args), {k: _meta(v) for k, v in kwargs.items()})
        except Exception:
            return fallback()
        if not isinstance(out, torch.Tensor):
            return fallback()
        return torch.zeros(out.shape, dtype=out.dtype, device=real.device)


def record_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Annotate every node of ``gm`` with the values seen on ``inputs`` (eval mode, no grad;
    modes restored).

    Values are real except the outputs of arithmetic-heavy ops (``HEAVY_MODULES``,
    ``HEAVY_FUNCTIONS``), whose shapes come from the meta device and whose values are zeros, and
    of ``SHAPE_PRESERVING`` modules, which pass their input on: discovery needs shapes, not
    values.
    """
    try:
        with eval_mode(gm):
            _Recorder(gm).run(*inputs)
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
