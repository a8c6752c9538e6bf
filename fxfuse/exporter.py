"""Export a trained model to ONNX, a ``.pt`` state_dict or a ``.safetensors`` file, checked and
written atomically.

>>> from fxfuse import export
>>> report = export(model, torch.randn(1, 3, 32, 32), "model.onnx")   # doctest: +SKIP
>>> report.exporter, report.max_rel_diff                              # doctest: +SKIP
('dynamo', 3.1e-07)

The format follows the suffix of the path:

* ``.onnx``: :func:`torch.onnx.export` with the default (dynamo, ``torch.export``-based) exporter;
  only if that raises, the legacy TorchScript exporter (``dynamo=False``) is tried, with the
  fused ``nn.MultiheadAttention`` fastpath switched off around it (the legacy exporter cannot
  export ``aten::_native_multi_head_attention``).  The report names the exporter that was used.
  With ``check=True`` the file must pass ``onnx.checker.check_model`` and, run in ONNX Runtime
  (``CPUExecutionProvider``) on the example inputs, reproduce every output of the PyTorch model
  (eval mode, no grad) within ``tolerance``, measured as ``max|diff| / max|ref|`` per output.
* ``.pt``: ``torch.save(model.state_dict())`` (tensors keep their device and tied parameters
  stay shared, as with a plain ``torch.save``).
* ``.safetensors``: :func:`safetensors.torch.save_file` of the state_dict as contiguous CPU
  tensors.  Tensors sharing storage (tied weights) are cloned per key, because safetensors refuses
  shared storage; ``model.load_state_dict(safetensors.torch.load_file(path))`` restores the model
  exactly (copying into a tied parameter twice writes the same values).
  With ``check=True`` a ``.pt`` / ``.safetensors`` file is loaded back and every entry compared
  with the state_dict (``max_rel_diff`` is then 0.0 unless something went wrong).

Writes are atomic: the file is written into a fresh temporary folder inside the target folder,
checked there, and moved into place with :func:`os.replace`.  On any failure (export error,
failed check, ``KeyboardInterrupt``) the temporary folder is removed, nothing is left at the
target path, and a file already there is left untouched.  The model is not modified: its
parameters and buffers are untouched and every submodule's training flag is restored.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ExportError, InputError
from .permute import rel_diff
from .trace import as_input_tuple, eval_mode, model_device

__all__ = ["SUPPORTED_SUFFIXES", "ExportReport", "export"]

#: Suffix -> format name.
SUPPORTED_SUFFIXES: dict[str, str] = {".onnx": "onnx", ".pt": "pt", ".safetensors": "safetensors"}

# Optional dependency -> the pip command that installs it.
_PIP: dict[str, str] = {
    "onnx": "pip install onnx  (or pip install 'fxfuse[onnx]' for everything ONNX export needs)",
    "onnxruntime": "pip install onnxruntime  (or pip install 'fxfuse[onnx]')",
    "onnxscript": "pip install onnxscript  (or pip install 'fxfuse[onnx]')",
    "safetensors": "pip install safetensors  (or pip install 'fxfuse[safetensors]')",
}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote.

    ``path``: the target path as given; ``format``: ``"onnx"``, ``"pt"`` or ``"safetensors"``;
    ``exporter``: ``"dynamo"`` or ``"legacy"`` for ONNX, ``"torch.save"`` or
    ``"safetensors"`` otherwise; ``max_rel_diff``: the worst ``max|diff| / max|ref|`` the check
    measured over all outputs (ONNX) or state_dict entries (``.pt`` / ``.safetensors``), ``None``
    with ``check=False``; ``seconds``: wall-clock time of the whole call.
    """

    path: Path
    format: str
    exporter: str
    max_rel_diff: float | None
    seconds: float


def export(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    tolerance: float = 1e-4,
    opset: int | None = None,
) -> ExportReport:
    """Write ``model`` to ``path`` in the format its suffix names, check it, and report.

    ``example_inputs`` (a tensor or a tuple of tensors, moved to the model's device) drive the
    ONNX export and check; ``.pt`` / ``.safetensors`` exports do not use them.  ``opset`` is the
    ONNX opset (``None``: the exporter's default); it is ignored for other formats.  With
    ``check=True`` the written file must reproduce the model within ``tolerance`` (relative, see
    the module docstring), otherwise :class:`~fxfuse.errors.ExportError` names the worst output
    and its difference and no file is written.

    Raises :class:`~fxfuse.errors.InputError` for an unsupported suffix, a missing target folder,
    bad arguments or a missing optional dependency (the message gives the pip command), and
    :class:`~fxfuse.errors.ExportError` when exporting or checking fails.  The write is atomic and
    the model is left unmodified (see the module docstring).
    """
    start = time.perf_counter()
    target = Path(path)
    fmt = SUPPORTED_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        raise InputError(
            f"cannot export to {str(target)!r}: unsupported suffix {target.suffix!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if target.is_dir():
        raise InputError(f"cannot export to {str(target)!r}: it is a directory")
    folder = target.parent
    if not folder.is_dir():
        raise InputError(
            f"cannot export to {str(target)!r}: folder {str(folder)!r} does not exist; create it first"
        )

    if fmt == "onnx":
        for name in ("onnx", "onnxscript", *(("onnxruntime",) if check else ())):
            _require(name)
        inputs = _input_tuple(example_inputs, model_device(model))
        exporter, max_rel = _export_onnx(model, inputs, target, check, tolerance, opset)
    elif fmt == "pt":
        exporter, max_rel = "torch.save", _export_pt(model, target, check, tolerance)
    else:
        _require("safetensors")
        exporter, max_rel = "safetensors", _export_safetensors(model, target, check, tolerance)
    return ExportReport(
        path=target,
        format=fmt,
        exporter=exporter,
        max_rel_diff=max_rel,
        seconds=time.perf_counter() - start,
    )


# --- helpers ----------------------------------------------------------------------------------


def _require(module: str) -> Any:
    """Import an optional dependency, or raise InputError with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(
            f"exporting needs the optional package {module!r}, which is not installed "
            f"({exc}); install it with: {_PIP[module.partition('.')[0]]}"
        ) from exc


def _input_tuple(example_inputs: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A tensor or a non-empty tuple/list of tensors -> a tuple of tensors on ``device``."""
    items = as_input_tuple(example_inputs)
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise InputError(
                f"example_inputs[{i}] is a {type(item).__name__}; every example input must be "
                "a tensor"
            )
    return tuple(t.detach().to(device) for t in items)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Switch off the fused ``nn.MultiheadAttention`` fastpath (restored afterwards)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a path named like ``target`` inside a fresh temporary folder next to it.

    The temporary folder (and whatever is still in it) is removed on exit, whatever happens;
    :func:`publish` moves the finished file into place first.
    """
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmpdir / target.name
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def publish(staged: Path, target: Path) -> None:
    """Move ``staged`` to ``target`` with :func:`os.replace`.

    Companion files the exporter wrote next to it (ONNX external data, only for models over the
    2 GB protobuf limit) are moved into the target folder first, under the same names, so the
    references inside the model file stay valid; the model file itself is moved last.
    """
    for extra in sorted(staged.parent.iterdir()):
        if extra != staged:
            os.replace(extra, target.parent / extra.name)
    os.replace(staged, target)


def _clear(folder: Path) -> None:
    """Remove everything inside ``folder`` (partial output of a failed exporter)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _short(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` (exporter errors can be pages long)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[:limit] + "..."
    return f"{type(exc).__name__}: {first}"


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a (possibly nested) model output, flattened in order, as CPU copies."""
    return [t.detach().cpu() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


# --- ONNX ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision op registration notices, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    target: Path,
    check: bool,
    tolerance: float,
    opset: int | None,
) -> tuple[str, float | None]:
    """Export (dynamo, else legacy) into a staged file, check it, publish it."""
    input_names = [f"input_{i}" for i in range(len(inputs))]
    with eval_mode(model, no_grad=False), staged_file(target) as staged, _quiet_exporter():
        exporter = _run_onnx_exporters(model, inputs, staged, opset, input_names)
        max_rel: float | None = None
        if check:
            with torch.no_grad():
                reference = _tensor_leaves(model(*inputs))
            max_rel = _check_onnx(staged, inputs, input_names, reference, tolerance, exporter)
        publish(staged, target)
    return exporter, max_rel


def _run_onnx_exporters(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    staged: Path,
    opset: int | None,
    input_names: list[str],
) -> str:
    """Write ``staged`` with the dynamo exporter, or the legacy one if dynamo raises."""
    try:
        torch.onnx.export(
            model,
            inputs,
            staged,
            dynamo=True,
            external_data=False,  # one file; weights over 2 GB still go to external data
            opset_version=opset,
            input_names=input_names,
            verbose=False,
        )
        return "dynamo"
    except Exception as exc:
        dynamo_error = exc
    _clear(staged.parent)
    try:
        with _mha_fastpath_disabled(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                inputs,
                staged,
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
            )
    except Exception as exc:
        raise ExportError(
            f"ONNX export of {type(model).__name__} failed with both exporters: dynamo exporter "
            f"({_short(dynamo_error)}); legacy exporter ({_short(exc)})"
        ) from exc
    warnings.warn(
        f"ONNX export of {type(model).__name__}: the dynamo exporter failed "
        f"({_short(dynamo_error)}); the legacy TorchScript exporter was used instead",
        RuntimeWarning,
        stacklevel=4,
    )
    return "legacy"


def _check_onnx(
    staged: Path,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    reference: list[torch.Tensor],
    tolerance: float,
    exporter: str,
) -> float:
    """``onnx.checker`` + ONNX Runtime (CPU) parity with ``reference``; the worst relative diff."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    try:
        onnx.checker.check_model(str(staged))  # a path: works with external data too
    except Exception as exc:
        raise ExportError(
            f"onnx.checker rejected the model written by the {exporter} exporter: {_short(exc)}"
        ) from exc
    try:
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        given = dict(zip(input_names, inputs))
        feeds = {}
        for arg in session.get_inputs():
            if arg.name not in given:
                raise ExportError(
                    f"the exported graph ({exporter} exporter) has an input {arg.name!r} that is "
                    f"not one of the example inputs {input_names}"
                )
            feeds[arg.name] = given[arg.name].detach().cpu().numpy()
        output_names = [o.name for o in session.get_outputs()]
        results = session.run(None, feeds)
        del session
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime could not run the model written by the {exporter} exporter: "
            f"{_short(exc)}"
        ) from exc
    if len(results) != len(reference):
        raise ExportError(
            f"the exported model ({exporter} exporter) has {len(results)} outputs, the PyTorch "
            f"model {len(reference)} tensor outputs"
        )
    worst = 0.0
    failures = []
    for i, (name, ref, got) in enumerate(zip(output_names, reference, results)):
        got_t = torch.as_tensor(got)
        if tuple(got_t.shape) != tuple(ref.shape):
            raise ExportError(
                f"output {i} ({name!r}) of the exported model ({exporter} exporter) has shape "
                f"{tuple(got_t.shape)}, PyTorch's has {tuple(ref.shape)}"
            )
        diff = rel_diff([ref], [got_t])
        worst = max(worst, diff)
        if not diff <= tolerance:
            failures.append(f"output {i} ({name!r}): max|diff|/max|ref| = {diff:.3g}")
    if failures:
        raise ExportError(
            f"the exported model ({exporter} exporter) does not match PyTorch in ONNX Runtime "
            f"within relative tolerance {tolerance:g}: " + "; ".join(failures)
        )
    return worst


# --- state_dict formats -----------------------------------------------------------------


def _compare_state(
    expected: Mapping[str, Any], loaded: Mapping[str, Any], fmt: str, tolerance: float
) -> float:
    """Every tensor entry of ``expected`` must come back with its dtype, shape and values."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra:
        raise ExportError(
            f"the written {fmt} file does not reload the state_dict: missing keys {missing[:5]}, "
            f"unexpected keys {extra[:5]}"
        )
    worst = 0.0
    for key, want in expected.items():
        if not isinstance(want, torch.Tensor):
            continue
        got = loaded[key]
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
            raise ExportError(
                f"the written {fmt} file reloads {key!r} as "
                f"{getattr(got, 'dtype', type(got).__name__)} {tuple(getattr(got, 'shape', ()))}, "
                f"expected {want.dtype} {tuple(want.shape)}"
            )
        diff = rel_diff([want.detach().cpu()], [got.detach().cpu()])
        worst = max(worst, diff)
        if not diff <= tolerance:
            raise ExportError(
                f"the written {fmt} file reloads {key!r} with max|diff|/max|ref| = {diff:.3g} > "
                f"tolerance {tolerance:g}"
            )
    return worst


def _export_pt(model: nn.Module, target: Path, check: bool, tolerance: float) -> float | None:
    """``torch.save(model.state_dict())`` into a staged file, reload-check, publish."""
    state = model.state_dict()
    with staged_file(target) as staged:
        try:
            torch.save(state, staged)
        except Exception as exc:
            raise ExportError(f"torch.save of the state_dict failed: {_short(exc)}") from exc
        max_rel: float | None = None
        if check:
            # The file was written just now by this process, so a full unpickle is safe.
            loaded = torch.load(staged, map_location="cpu", weights_only=False)
            max_rel = _compare_state(state, loaded, "pt", tolerance)
        publish(staged, target)
    return max_rel


def _safetensors_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as contiguous CPU tensors, each owning its whole storage.

    safetensors refuses tensors that share storage (tied weights) or view part of one, so such
    entries are cloned (per key); CPU tensors that already own their storage are used as they
    are, and tensors on other devices are copied to the CPU.
    """
    state = model.state_dict()
    users: dict[int, int] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"state_dict entry {key!r} is a {type(value).__name__}; safetensors stores only "
                "tensors (export to .pt instead)"
            )
        if value.device.type == "cpu" and value.numel():
            ptr = value.untyped_storage().data_ptr()
            users[ptr] = users.get(ptr, 0) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        t = value.detach()
        if t.device.type != "cpu":
            t = t.to("cpu").contiguous()  # a fresh copy per key
        elif t.numel():
            storage = t.untyped_storage()
            owns = (
                users[storage.data_ptr()] == 1
                and t.is_contiguous()
                and t.storage_offset() == 0
                and t.numel() * t.element_size() == storage.nbytes()
            )
            if not owns:
                t = t.clone(memory_format=torch.contiguous_format)
        else:
            t = t.contiguous()
        out[key] = t
    return out


def _export_safetensors(
    model: nn.Module, target: Path, check: bool, tolerance: float
) -> float | None:
    """``safetensors.torch.save_file`` into a staged file, reload-check, publish."""
    st = _require("safetensors.torch")
    tensors = _safetensors_state(model)
    with staged_file(target) as staged:
        try:
            st.save_file(tensors, str(staged), metadata={"format": "pt"})
        except Exception as exc:
            raise ExportError(f"safetensors could not save the state_dict: {_short(exc)}") from exc
        max_rel: float | None = None
        if check:
            loaded = st.load_file(str(staged), device="cpu")
            max_rel = _compare_state(tensors, loaded, "safetensors", tolerance)
        publish(staged, target)
    return max_rel
