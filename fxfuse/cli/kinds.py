"""Option value kinds (parse one value, or say what is wrong with it) and the rules for
contradictory options: what the tests enumerate bad inputs from."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    import torch



#: ``--input-shape`` dtypes.
DTYPES = ("float32", "float", "float64", "int64", "long", "int32")
#: Example inputs are small: a shape with more elements than this is refused.
MAX_INPUT_ELEMENTS = 2**27
#: Suffixes read as a state_dict (``torch.load(weights_only=True)``, or safetensors).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
#: What ``fxfuse fuse --out`` / ``demo --out`` can write (:func:`fxfuse.export`).
MODEL_SUFFIXES = (".onnx", ".pt", ".safetensors")


# --- value kinds: parse one option value, or say what is wrong with it ------------------------


class ValueKind:
    """An argparse ``type=``: ``kind(text)`` returns the parsed value or raises
    :class:`argparse.ArgumentTypeError` with a message that says what to give instead."""

    name = "value"

    def __call__(self, text: str) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:  # argparse names the kind in some messages
        return self.name


@dataclass(frozen=True, repr=False)
class Integer(ValueKind):
    """An integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    lo: int
    hi: int | None = None
    name = "integer"

    def __call__(self, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise argparse.ArgumentTypeError(f"expected an integer in {self.range()}, got {value}")
        return value

    def range(self) -> str:
        return f"[{self.lo}, {self.hi}]" if self.hi is not None else f">= {self.lo}"


@dataclass(frozen=True, repr=False)
class Number(ValueKind):
    """A finite number in ``[lo, hi)``."""

    lo: float
    hi: float
    name = "number"

    def __call__(self, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not self.lo <= value < self.hi:
            raise argparse.ArgumentTypeError(
                f"expected a number in [{self.lo:g}, {self.hi:g}), got {text.strip()}")
        return value


@dataclass(frozen=True)
class InputSpec:
    """One example input: its shape and dtype name."""

    shape: tuple[int, ...]
    dtype: str

    def tensor(self, seed: int) -> torch.Tensor:
        """Floats: standard normal; integers: values in [0, 2) (valid token ids for any vocab)."""
        import torch

        dtype = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64,
                 "int64": torch.int64, "long": torch.int64, "int32": torch.int32}[self.dtype]
        gen = torch.Generator().manual_seed(seed)
        if dtype.is_floating_point:
            return torch.randn(self.shape, generator=gen, dtype=dtype)
        return torch.randint(0, 2, self.shape, generator=gen, dtype=dtype)

    def __str__(self) -> str:
        return ",".join(map(str, self.shape)) + ("" if self.dtype == "float32" else f":{self.dtype}")


class Shape(ValueKind):
    """``2,3,32,32`` (float32) or ``2,16:int64``: positive sizes, a known dtype, a small tensor."""

    name = "shape"

    def __call__(self, text: str) -> InputSpec:
        shape_txt, _, dtype = text.partition(":")
        parts = [s.strip() for s in shape_txt.split(",")]
        try:
            shape = tuple(int(s) for s in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers like 2,3,32,32 (or 2,16:int64), got {text!r}"
            ) from None
        if any(s <= 0 for s in shape):
            raise argparse.ArgumentTypeError(f"expected positive sizes like 2,3,32,32, got {text!r}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise argparse.ArgumentTypeError(
                f"{text!r} has {math.prod(shape)} elements, more than {MAX_INPUT_ELEMENTS}: an "
                "example input needs only a small batch (2 is enough)")
        dtype = dtype.strip() or "float32"
        if dtype not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {dtype!r} in {text!r}; use one of {', '.join(DTYPES)}")
        return InputSpec(shape, dtype)


class JsonObject(ValueKind):
    """A JSON object, e.g. ``'{"width": 2}'``."""

    name = "JSON object"

    def __call__(self, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(
                f"not valid JSON ({exc.msg} at column {exc.colno}); give an object such as "
                "'{\"width\": 2}'") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(
                f"expected a JSON object such as '{{\"width\": 2}}', got {type(value).__name__} "
                f"{text!r}")
        return value


class ModelRef(ValueKind):
    """``package.module:factory`` (imported only when the command runs)."""

    name = "MODEL"

    def __call__(self, text: str) -> str:
        mod, sep, attr = text.partition(":")
        names = [*mod.split("."), *attr.split(".")]
        if not sep or not all(n.isidentifier() for n in names):
            raise argparse.ArgumentTypeError(
                f"expected package.module:factory (a callable returning the nn.Module, e.g. "
                f"models.zoo:mlp), got {text!r}")
        return text


def _folder_problem(path: Path) -> str | None:
    folder = path.parent
    if not folder.exists():
        return f"folder {str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"{str(folder)!r} is not a folder"
    return None


@dataclass(frozen=True, repr=False)
class InputFile(ValueKind):
    """An existing, readable file with one of ``suffixes``."""

    suffixes: tuple[str, ...]
    name = "file"

    def __call__(self, text: str) -> Path:
        path = Path(text)
        problem = _folder_problem(path)
        if problem is None:
            if not path.exists():
                problem = "no such file"
            elif path.is_dir():
                problem = "it is a folder, not a file"
            elif path.suffix.lower() not in self.suffixes:
                problem = f"unsupported file type {path.suffix or '(no suffix)'!r}"
            elif not os.access(path, os.R_OK):
                problem = "permission denied (not readable)"
        if problem:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {problem}; expected an existing {' or '.join(self.suffixes)} file")
        return path


@dataclass(frozen=True, repr=False)
class DataSource(ValueKind):
    """``mnist`` or a data file (``.pt`` / ``.pth`` / ``.npz``, format in
    :func:`fxfuse.data.load_tensors` and the README's "Data files")."""

    name = "data"

    def __call__(self, text: str) -> str | Path:
        if text == "mnist":
            return text
        try:
            return InputFile((".pt", ".pth", ".npz"))(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, or 'mnist'") from None


@dataclass(frozen=True, repr=False)
class OutputFile(ValueKind):
    """A file to write: its folder exists and is writable, its suffix is one of ``suffixes``, it
    is not a folder.  (That it is none of the inputs is checked once all options are parsed.)"""

    suffixes: tuple[str, ...]
    name = "output file"

    def __call__(self, text: str) -> Path:
        path = Path(text)
        problem = _folder_problem(path)
        if problem:
            problem += "; create it first"
        elif path.is_dir():
            problem = "it is a folder; give a file name"
        elif path.suffix.lower() not in self.suffixes:
            problem = (f"unsupported file type {path.suffix or '(no suffix)'!r}; give a "
                       f"{' or '.join(self.suffixes)} file name")
        elif not os.access(path.parent, os.W_OK | os.X_OK):
            problem = f"folder {str(path.parent)!r} is not writable"
        elif path.exists() and not os.access(path, os.W_OK):
            problem = "the existing file is read-only"
        if problem:
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {problem}")
        return path


# --- contradictory options ---------------------------------------------------------------------


@dataclass(frozen=True)
class Conflict:
    """Options that contradict each other: ``when(args)`` true -> refuse with ``message``.
    ``example`` is a set of arguments that triggers it (the tests add it to a valid command)."""

    options: tuple[str, ...]
    when: Callable[[argparse.Namespace], bool]
    message: str
    example: tuple[str, ...]


def _io_conflicts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """No output path is an input path or another output's path (same file, also via links)."""
    inputs: list[tuple[str, Path]] = []
    outputs: list[tuple[str, Path]] = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        label = action.option_strings[0] if action.option_strings else str(action.metavar)
        for v in values:
            if isinstance(v, Path):
                kind = action.type
                (outputs if isinstance(kind, OutputFile) else inputs).append((label, v))
    for i, (label, out) in enumerate(outputs):
        for other_label, other in inputs + outputs[:i]:
            if not _same_file(out, other):
                continue
            if (other_label, other) in inputs:
                raise InputError(
                    f"{label} {str(out)!r} is an input ({other_label} {str(other)!r}); an input "
                    f"is never overwritten: give {label} a new file name")
            raise InputError(f"{label} and {other_label} name the same file {str(out)!r}; give "
                             "each output its own file name")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
