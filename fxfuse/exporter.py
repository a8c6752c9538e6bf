"""Export a trained model to ONNX, a ``.pt`` state_dict or a ``.safetensors`` file, checked and
written atomically.

>>> from fxfuse import export
>>> report = export(model, torch.randn(1, 3, 32, 32), "model.onnx")   # doctest: +SKIP
>>> report.exporter, report.max_rel_diff                              # doctest: +SKIP
('dynamo', 3.1e-07)

The format follows the suffix of the path:

* ``.onnx``: the model is traced with :func:`torch.export.export` and converted by
  :func:`torch.onnx.export` (the dynamo exporter); only if that raises, the legacy TorchScript
  exporter (``dynamo=False``) is tried, with the fused ``nn.MultiheadAttention`` fastpath switched
  off around it (the legacy exporter cannot export ``aten::_native_multi_head_attention``).  The
  report names the exporter that was used.

  *Shapes.*  By default (``dynamic_batch=True``) dimension 0 of every input whose dimension 0 is
  the first input's (the batch) is a dynamic axis named ``batch``; the other dimensions are the
  example's.  ``torch.export`` specialises dimensions of size 1, so the model is traced on a batch
  of at least 2 (the example's rows repeated) whatever the example's batch is.  A model whose code
  fixes the batch size (``x.view(2, -1)``) cannot have a dynamic batch: it is then exported with
  the example's static shapes and the report's ``notes`` say why (also ``dynamic_batch=False``,
  and the legacy exporter, give static shapes).

  *Names.*  Inputs are named after the parameters of ``model.forward`` (``input_ids``, ``x``),
  outputs after the keys of the output (``logits``, ``last_hidden_state``; ``output`` for a single
  tensor, ``output_0``, ``output_1``, ... for a tuple).  A Hugging Face model whose ``forward``
  takes an ``attention_mask`` the example does not give gets one as a second input (all ones in
  the example), so the file serves padded batches.  A Hugging Face causal LM with
  ``config.use_cache=True`` is exported as a copy with ``use_cache=False``
  (:func:`fxfuse.trace.without_kv_cache`; a key/value cache output stops ``torch.export``): the
  file has no cache outputs, and the model given keeps its setting.

  *Check.*  With ``check=True`` the file must pass ``onnx.checker.check_model`` and, run in ONNX
  Runtime (``CPUExecutionProvider``), reproduce every output of the PyTorch model (eval mode, no
  grad) within ``tolerance``, measured as ``max|diff| / max|ref|`` per output: on the example
  inputs and, with a dynamic batch, also at a larger batch size (new rows; the attention mask
  there pads the last row's last token).
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
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError, InputError, listing, quote_error
from .permute import rel_diff
from .trace import as_input_tuple, model_device

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
    with ``check=False``; ``seconds``: wall-clock time of the whole call.  ONNX only:
    ``input_names`` / ``output_names`` of the graph, ``dynamic_batch`` (whether dimension 0 of the
    batched inputs is the dynamic axis ``batch``), ``checked_batches`` (the batch sizes run in
    ONNX Runtime) and ``notes`` (what was done differently from the default, and why).
    """

    path: Path
    format: str
    exporter: str
    max_rel_diff: float | None
    seconds: float
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    dynamic_batch: bool = False
    checked_batches: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for a user: the format and what was checked (no ONNX Runtime for a
        state_dict), then the notes."""
        if self.format == "onnx":
            shapes = "dynamic batch axis" if self.dynamic_batch else "static shapes"
            text = (f"ONNX ({self.exporter} exporter, {shapes}; inputs {', '.join(self.input_names)}"
                    f"; outputs {', '.join(self.output_names)})")
            if self.max_rel_diff is not None:
                sizes = " and ".join(map(str, self.checked_batches))
                text += (f", checked in onnxruntime at batch size{'s' if len(self.checked_batches) > 1 else ''} "
                         f"{sizes}: max relative difference {self.max_rel_diff:.2g}")
        else:
            what = "PyTorch state_dict" if self.format == "pt" else "safetensors state_dict"
            text = what + (", reloaded and compared entry by entry" if self.max_rel_diff is not None
                           else "")
        return "; ".join([text, *self.notes])


def export(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    tolerance: float = 1e-4,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> ExportReport:
    """Write ``model`` to ``path`` in the format its suffix names, check it, and report.

    ``example_inputs`` (a tensor or a tuple of tensors, moved to the model's device) drive the
    ONNX export and check; ``.pt`` / ``.safetensors`` exports do not use them.  ``opset`` is the
    ONNX opset (``None``: the exporter's default) and ``dynamic_batch=False`` fixes every input
    shape to the example's (default: a dynamic batch axis, see the module docstring); both are
    ignored for other formats.  With
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
    fmt = _check_target(model, target)
    if fmt == "onnx":
        for name in ("onnx", "onnxscript", *(("onnxruntime",) if check else ())):
            _require(name)
        from .export_onnx import export_onnx  # lazy: onnx is an optional dependency

        inputs = _input_tuple(example_inputs, model_device(model))
        onnx = export_onnx(model, inputs, target, check, tolerance, opset, dynamic_batch)
        return ExportReport(
            path=target, format=fmt, exporter=onnx.exporter, max_rel_diff=onnx.max_rel_diff,
            seconds=time.perf_counter() - start, input_names=onnx.input_names,
            output_names=onnx.output_names, dynamic_batch=onnx.dynamic_batch,
            checked_batches=onnx.checked_batches, notes=onnx.notes)
    if fmt == "pt":
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


def _check_target(model: nn.Module, target: Path) -> str:
    """The format ``target``'s suffix names, after checking the model and the target folder."""
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
    return fmt


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
    mode = _new_file_mode(staged.parent)
    for extra in sorted(staged.parent.iterdir()):
        if extra != staged:
            os.chmod(extra, mode)
            os.replace(extra, target.parent / extra.name)
    os.chmod(staged, mode)
    os.replace(staged, target)


def _new_file_mode(folder: Path) -> int:
    """The mode a new file gets here (0o666 less the umask), measured on a probe file in
    ``folder`` (reading the umask with :func:`os.umask` would change it for every thread).
    Writers differ (safetensors creates 0o600 files, torch.save follows the umask): every
    published file gets this one."""
    probe = folder / ".mode-probe"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


# --- state_dict formats -----------------------------------------------------------------


def _compare_state(
    expected: Mapping[str, Any], loaded: Mapping[str, Any], fmt: str, tolerance: float
) -> float:
    """Every tensor entry of ``expected`` must come back with its dtype, shape and values."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra:
        raise ExportError(
            f"the written {fmt} file does not reload the state_dict: missing keys "
            f"{listing(missing)}; unexpected keys {listing(extra)}"
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
            raise ExportError(f"torch.save of the state_dict failed: {quote_error(exc)}") from exc
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
            raise ExportError(f"safetensors could not save the state_dict: {quote_error(exc)}") from exc
        max_rel: float | None = None
        if check:
            loaded = st.load_file(str(staged), device="cpu")
            max_rel = _compare_state(tensors, loaded, "safetensors", tolerance)
        publish(staged, target)
    return max_rel
