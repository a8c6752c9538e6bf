"""ONNX export for :func:`fxfuse.export`: deployable files (dynamic batch axis, named inputs and
outputs, a Hugging Face model's attention mask), checked in ONNX Runtime.

The steps (the behaviour is described in :mod:`fxfuse.exporter`):

1. *Signature.*  Input names are ``forward``'s parameter names; a Hugging Face model that takes
   an ``attention_mask`` not given in the example gets ``attention_mask = ones_like(input_ids)``
   as an extra (keyword) input.  Output names are the key paths of the output pytree.
2. *Dynamic batch.*  ``B`` = dimension 0 of the first input; every input with dimension 0 equal
   to ``B`` gets the dynamic axis ``batch`` (``torch.export.Dim("batch", min=1)``).  The trace
   runs on ``B_t = max(B, 2)`` rows (rows repeated cyclically: ``x[arange(B_t) % B]``), because
   ``torch.export`` specialises size-1 dimensions.  If ``torch.export`` finds that the code fixes
   the batch (a constraint violation) or fails with the dynamic axis, the file is exported with
   the example's static shapes and a note says why.
3. *Check.*  ONNX Runtime runs the file at ``B`` and, with a dynamic batch, at ``B_t + 1``: new
   rows (floats: the example's rows plus noise of 10% of their scale; integers: the rows
   repeated) and, for the attention mask, the last row's last token padded (mask 0).  Every
   output must match PyTorch's within ``tolerance`` (``max|diff| / max|ref|``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ExportError, quote_error
from .exporter import _require, publish, staged_file
from .permute import rel_diff
from .trace import eval_mode, without_kv_cache

__all__ = ["OnnxExport", "export_onnx"]

BATCH = "batch"


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and checked (fields as in :class:`~fxfuse.ExportReport`)."""

    exporter: str
    max_rel_diff: float | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    checked_batches: tuple[int, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Call:
    """One call of the model: positional ``args`` and keyword ``kwargs`` (all tensors), with the
    graph's input names (``args`` first, then ``kwargs``) and which inputs carry the batch."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    names: tuple[str, ...]
    batched: tuple[bool, ...]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.args, *self.kwargs.values())

    def feeds(self) -> dict[str, Any]:
        return {n: t.detach().cpu().numpy() for n, t in zip(self.names, self.tensors)}

    def run(self, model: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensor_leaves(model(*self.args, **self.kwargs))

    def at_batch(self, size: int, *, fresh: bool) -> _Call:
        """The call with ``size`` rows in every batched input: the rows repeated cyclically, and
        with ``fresh`` new values (noise on floats, the attention mask's last token padded)."""
        gen = torch.Generator().manual_seed(size)
        out = []
        for name, t, batched in zip(self.names, self.tensors, self.batched):
            if batched:
                t = t[torch.arange(size, device=t.device) % t.shape[0]].clone()
                if fresh and t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
                    t = t + 0.1 * t.detach().abs().mean().clamp_min(1e-3) * noise
                elif fresh and name == "attention_mask" and t.dim() == 2 and t.shape[1] > 1:
                    t[-1, -1] = 0
            out.append(t)
        n = len(self.args)
        return _Call(tuple(out[:n]), dict(zip(self.kwargs, out[n:])), self.names, self.batched)


# --- signature ---------------------------------------------------------------------------------


def _forward_params(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _input_names(params: list[inspect.Parameter], n: int) -> list[str]:
    """Names for ``n`` positional inputs: forward's parameter names (``input_i`` past them)."""
    names: list[str] = []
    for p in params:
        if len(names) == n:
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            names += [f"{p.name}_{i}" for i in range(n - len(names))]
        else:
            break
    return names + [f"input_{i}" for i in range(len(names), n)]


def _is_hugging_face(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _optional_inputs(model: nn.Module, params: list[inspect.Parameter],
                     args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """A Hugging Face model's ``attention_mask`` (all ones) when it takes one and the example
    gives only token ids."""
    names = [p.name for p in params]
    if not _is_hugging_face(model) or "attention_mask" not in names:
        return {}
    if names.index("attention_mask") < len(args):
        return {}
    ids = args[0]
    if ids.is_floating_point() or ids.dim() != 2:
        return {}
    return {"attention_mask": torch.ones_like(ids)}


def _make_call(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> _Call:
    params = _forward_params(model)
    kwargs = _optional_inputs(model, params, inputs)
    names = (*_input_names(params, len(inputs)), *kwargs)
    batch = inputs[0].shape[0] if inputs[0].dim() else None
    batched = tuple(batch is not None and t.dim() > 0 and t.shape[0] == batch
                    for t in (*inputs, *kwargs.values()))
    return _Call(inputs, kwargs, names, batched)


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _output_names(out: Any) -> tuple[str, ...]:
    """``output`` for one tensor; the key paths of a dict / ModelOutput (``logits``,
    ``hidden_states.0``); ``output_0``, ``output_1``, ... for a tuple."""
    if isinstance(out, torch.Tensor):
        return ("output",)
    leaves = [(p, v) for p, v in pytree.tree_flatten_with_path(out)[0]
              if isinstance(v, torch.Tensor)]
    names = [_path_name(p) for p, _ in leaves]
    if isinstance(out, (tuple, list)):
        names = [f"output_{n}" for n in names]
    return tuple(names)


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a (possibly nested) model output, flattened in order, as CPU copies."""
    return [t.detach().cpu() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


# --- exporters -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision op registration notices, deprecations, the
    optimizer's constant-folding messages)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Switch off the fused ``nn.MultiheadAttention`` fastpath (restored afterwards)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _clear(folder: Path) -> None:
    """Remove everything inside ``folder`` (partial output of a failed exporter)."""
    import shutil

    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _export_dynamic(model: nn.Module, call: _Call, staged: Path, opset: int | None,
                    output_names: tuple[str, ...]) -> None:
    """torch.export with a dynamic batch on >= 2 rows, then the dynamo ONNX converter."""
    traced = call.at_batch(max(2, int(call.args[0].shape[0])), fresh=False)
    dim = torch.export.Dim(BATCH, min=1)
    specs = [{0: dim} if b else None for b in call.batched]
    n = len(call.args)
    dynamic_shapes: Any
    if call.kwargs:  # by parameter name: positional names are forward's own here
        dynamic_shapes = dict(zip(call.names, specs))
    else:
        dynamic_shapes = tuple(specs[:n])
    ep = torch.export.export(model, traced.args, traced.kwargs or None,
                             dynamic_shapes=dynamic_shapes, strict=False)
    torch.onnx.export(ep, traced.args, staged, kwargs=traced.kwargs or None, dynamo=True,
                      external_data=False, opset_version=opset, input_names=list(call.names),
                      output_names=list(output_names), verbose=False)
    _name_batch_axis(staged, call)


def _name_batch_axis(staged: Path, call: _Call) -> None:
    """Rename the batch symbol torch.export chose (``s43``) to ``batch`` throughout the graph."""
    onnx = _require("onnx")
    proto = onnx.load(str(staged), load_external_data=False)
    first = next(i for i, b in zip(proto.graph.input, call.batched) if b)
    symbol = first.type.tensor_type.shape.dim[0].dim_param
    if not symbol or symbol == BATCH:
        return
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = BATCH
    onnx.save(proto, str(staged))


def _static_export(model: nn.Module, call: _Call, staged: Path, opset: int | None,
                   output_names: tuple[str, ...]) -> str:
    """Static shapes: the dynamo exporter, or the legacy one if dynamo raises."""
    names = list(call.names)
    try:
        torch.onnx.export(model, call.args, staged, kwargs=call.kwargs or None, dynamo=True,
                          external_data=False,  # one file; weights over 2 GB still go external
                          opset_version=opset, input_names=names,
                          output_names=list(output_names), verbose=False)
        return "dynamo"
    except Exception as exc:
        dynamo_error = exc
    _clear(staged.parent)
    try:
        with _mha_fastpath_disabled():  # (warnings: silenced by the caller's _quiet_exporter)
            args: tuple[Any, ...] = (*call.args, call.kwargs) if call.kwargs else call.args
            torch.onnx.export(model, args, staged, dynamo=False, opset_version=opset,
                              input_names=names, output_names=list(output_names))
    except Exception as exc:
        raise ExportError(
            f"ONNX export of {type(model).__name__} failed with both exporters: dynamo exporter "
            f"({quote_error(dynamo_error)}); legacy exporter ({quote_error(exc)})"
        ) from exc
    warnings.warn(
        f"ONNX export of {type(model).__name__}: the dynamo exporter failed "
        f"({quote_error(dynamo_error)}); the legacy TorchScript exporter was used instead",
        RuntimeWarning,
        stacklevel=5,
    )
    return "legacy"


def _static_reason(model: nn.Module, exc: BaseException) -> str:
    """Why the batch axis had to stay static, for the report."""
    fixed = re.search(r"specialized it to be a constant \((\d+)\)", str(exc))
    if fixed:
        return (f"the batch axis is static: {type(model).__name__}'s code fixes the batch size "
                f"to {fixed.group(1)} (torch.export found the batch specialised to a constant); "
                "the file takes only that batch size")
    return (f"the batch axis is static: torch.export could not trace {type(model).__name__} "
            f"with a dynamic batch ({quote_error(exc, 240)}); the file takes only the example's "
            "batch size")


def export_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Path, check: bool,
                tolerance: float, opset: int | None, dynamic_batch: bool) -> OnnxExport:
    """Export (dynamic batch, else static), check in ONNX Runtime, publish (atomically)."""
    notes: list[str] = []
    traced = without_kv_cache(model, inputs)
    if traced is not model:
        notes.append(f"exported a copy of {type(model).__name__} with config.use_cache=False "
                     "(no key/value cache outputs); the model keeps use_cache=True")
    call = _make_call(traced, inputs)
    if call.kwargs:
        notes.append(f"added input {', '.join(call.kwargs)} (Hugging Face optional input; all "
                     "ones for unpadded batches)")
    with eval_mode(traced, no_grad=False), staged_file(target) as staged, _quiet_exporter():
        with torch.no_grad():
            output_names = _output_names(traced(*call.args, **call.kwargs))
        dynamic = False
        exporter = "dynamo"
        if dynamic_batch and any(call.batched):
            try:
                _export_dynamic(traced, call, staged, opset, output_names)
                dynamic = True
            except Exception as exc:
                notes.append(_static_reason(model, exc))
                _clear(staged.parent)
        if not dynamic:
            exporter = _static_export(traced, call, staged, opset, output_names)
        max_rel: float | None = None
        batches: tuple[int, ...] = ()
        if check:
            b = int(call.args[0].shape[0]) if call.args[0].dim() else 1
            calls = [call]
            if dynamic:
                calls.append(call.at_batch(max(b, 2) + 1, fresh=True))
            max_rel = _check_onnx(staged, traced, calls, tolerance, exporter)
            batches = tuple(int(c.args[0].shape[0]) if c.args[0].dim() else 1 for c in calls)
        publish(staged, target)
    return OnnxExport(exporter, max_rel, call.names, output_names, dynamic, batches,
                      tuple(notes))


# --- check ---------------------------------------------------------------------------------------


def _check_onnx(staged: Path, model: nn.Module, calls: list[_Call], tolerance: float,
                exporter: str) -> float:
    """``onnx.checker`` + ONNX Runtime (CPU) parity with PyTorch for every call; the worst
    relative difference."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    try:
        onnx.checker.check_model(str(staged))  # a path: works with external data too
    except Exception as exc:
        raise ExportError(
            f"onnx.checker rejected the model written by the {exporter} exporter: "
            f"{quote_error(exc)}"
        ) from exc
    try:
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime could not load the model written by the {exporter} "
                          f"exporter: {quote_error(exc)}") from exc
    graph_inputs = [a.name for a in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for call in calls:
        given = call.feeds()
        unknown = [n for n in graph_inputs if n not in given]
        if unknown:
            raise ExportError(f"the exported graph ({exporter} exporter) has inputs {unknown} "
                              f"that are not among the model's inputs {list(call.names)}")
        batch = int(call.args[0].shape[0]) if call.args[0].dim() else 1
        try:
            results = session.run(None, {n: given[n] for n in graph_inputs})
        except Exception as exc:
            raise ExportError(f"ONNX Runtime could not run the model written by the {exporter} "
                              f"exporter at batch size {batch}: {quote_error(exc)}") from exc
        reference = call.run(model)
        worst = max(worst, _compare(output_names, reference, results, tolerance, exporter, batch))
    del session
    return worst


def _compare(names: list[str], reference: list[torch.Tensor], results: list[Any],
             tolerance: float, exporter: str, batch: int) -> float:
    if len(results) != len(reference):
        raise ExportError(
            f"the exported model ({exporter} exporter) has {len(results)} outputs, the PyTorch "
            f"model {len(reference)} tensor outputs"
        )
    worst = 0.0
    failures = []
    for i, (name, ref, got) in enumerate(zip(names, reference, results)):
        got_t = torch.as_tensor(got)
        if tuple(got_t.shape) != tuple(ref.shape):
            raise ExportError(
                f"output {i} ({name!r}) of the exported model ({exporter} exporter) has shape "
                f"{tuple(got_t.shape)} at batch size {batch}, PyTorch's has {tuple(ref.shape)}"
            )
        diff = rel_diff([ref], [got_t])
        worst = max(worst, diff)
        if not diff <= tolerance:
            failures.append(f"output {i} ({name!r}): max|diff|/max|ref| = {diff:.3g}")
    if failures:
        raise ExportError(
            f"the exported model ({exporter} exporter) does not match PyTorch in ONNX Runtime "
            f"at batch size {batch} within relative tolerance {tolerance:g}: "
            + "; ".join(failures)
        )
    return worst
