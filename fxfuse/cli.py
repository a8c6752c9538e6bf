"""Command line: ``fxfuse groups MODEL --input-shape 1,3,32,32 [--weights W] [--json F] [--graph F]``.

MODEL is ``package.module:factory``, a callable returning the ``nn.Module`` (the current directory
is importable).  Every input is one ``--input-shape`` (repeat it for several inputs; add
``:int64`` for integer inputs such as token ids).  Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FxFuseError, InputError

DTYPES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64,
          "int64": torch.int64, "long": torch.int64, "int32": torch.int32}


def load_factory(spec: str) -> Callable[..., Any]:
    """``package.module:factory`` -> the callable (the working directory is importable)."""
    if ":" not in spec:
        raise InputError(f"MODEL must look like 'package.module:factory', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"cannot import module {mod_name!r} from MODEL {spec!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"module {mod_name!r} has no attribute {attr!r} (MODEL {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{spec!r} is not callable; it must return an nn.Module")
    return obj  # type: ignore[no-any-return]


def build_model(spec: str, factory_args: str | None) -> nn.Module:
    kwargs = json.loads(factory_args) if factory_args else {}
    if not isinstance(kwargs, dict):
        raise InputError("--factory-args must be a JSON object, e.g. '{\"width\": 2}'")
    model = load_factory(spec)(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_input(text: str, seed: int) -> torch.Tensor:
    """``2,3,32,32`` (float32 normal) or ``2,16:int64`` (integers in [0, 2))."""
    shape_txt, _, dtype_txt = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_txt.split(",") if s.strip())
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected comma-separated integers") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape {text!r}: expected positive sizes like 1,3,32,32")
    dtype = DTYPES.get(dtype_txt or "float32")
    if dtype is None:
        raise InputError(f"--input-shape {text!r}: unknown dtype {dtype_txt!r}; use {list(DTYPES)}")
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randint(0, 2, shape, generator=gen, dtype=dtype)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a ``.pt`` state_dict (``weights_only=True``) or a ``.safetensors`` file, strictly."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--weights {path!r}: no such file")
    try:
        if p.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise InputError("reading .safetensors needs the safetensors package: "
                                 "pip install safetensors") from None
            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(f"--weights {path!r} could not be read ({type(exc).__name__}: {first}); "
                         f"expected a state_dict saved with torch.save or safetensors") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"--weights {path!r} is not a state_dict (a dict of tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise InputError(f"--weights {path!r} does not fit the model: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}, shape mismatches (file vs model) "
                         f"{wrong[:10]}")
    model.load_state_dict(state)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary folder next to ``path``, then rename: no partial files (the
    exporter's staging, :func:`fxfuse.exporter.staged_file`)."""
    from .exporter import publish, staged_file

    target = Path(path)
    with staged_file(target) as staged:
        write(str(staged))
        publish(staged, target)


def write_graph(graph: Any, path: str) -> None:
    import networkx as nx

    if path.endswith(".graphml"):
        atomic_write(path, lambda tmp: nx.write_graphml(graph, tmp))
    elif path.endswith(".dot") or path.endswith(".gv"):
        def dot(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write("graph groups {\n  node [shape=box];\n")
                for n, d in graph.nodes(data=True):
                    shape = "ellipse" if d["kind"] == "group" else "box"
                    label = f"{d['label']} ({d['size']})" if d["kind"] == "group" else d["label"]
                    f.write(f"  {json.dumps(n)} [label={json.dumps(label)}, shape={shape}];\n")
                for a, b, d in graph.edges(data=True):
                    f.write(f"  {json.dumps(a)} -- {json.dumps(b)} "
                            f"[tooltip={json.dumps(d['axes'])}];\n")
                f.write("}\n")

        atomic_write(path, dot)
    else:
        raise InputError(f"--graph {path!r}: use a .graphml or .dot file name")


def cmd_groups(args: argparse.Namespace) -> int:
    from . import find_groups, verify

    model = build_model(args.model, args.factory_args)
    if args.weights:
        load_weights(model, args.weights)
    if not args.input_shape:
        raise InputError("give the model's input shape, e.g. --input-shape 1,3,32,32 "
                         "(repeat --input-shape for several inputs)")
    inputs = tuple(parse_input(s, seed=i) for i, s in enumerate(args.input_shape))
    spec = find_groups(model, inputs, strict=args.strict)
    print(spec)
    if args.verify:
        result = verify(model, spec, inputs)
        print(f"verify: ok, {result.n_groups} groups permuted at random, outputs unchanged "
              f"(relative max difference {result.max_rel_diff:.2g})")
    if args.json:
        text = spec.to_json()

        def write_json(tmp: str) -> None:
            Path(tmp).write_text(text)

        atomic_write(args.json, write_json)
    if args.graph:
        write_graph(spec.to_graph(), args.graph)
    return 0


def load_data(spec: str, max_samples: int = 2048) -> list[Any]:
    """``mnist`` (its train split) or a user file (``.pt``/``.npz``), as a list of batches."""
    from .data import batches, load_mnist, load_tensors

    y: torch.Tensor | None
    if spec == "mnist":
        x, y = load_mnist("train")
    else:
        x, y = load_tensors(spec)
    x = x[:max_samples]
    return list(batches(x, None if y is None else y[:max_samples], batch_size=256))


def cmd_fuse(args: argparse.Namespace) -> int:
    from . import ActivationMatching, Repair, ResetBatchNorm, WeightMatching, export, fuse
    from .passes import FusionReport

    if len(args.checkpoints) < 2:
        raise InputError("give at least two checkpoints to fuse, e.g. A.pt B.pt")
    if not args.input_shape:
        raise InputError("give the model's input shape, e.g. --input-shape 1,1,28,28")
    suffix = Path(args.out).suffix
    if suffix not in (".onnx", ".pt", ".safetensors"):
        raise InputError(f"--out {args.out!r}: use a .onnx, .pt or .safetensors file name")
    inputs = tuple(parse_input(s, seed=i) for i, s in enumerate(args.input_shape))
    models = []
    for path in args.checkpoints:
        model = build_model(args.model, args.factory_args)
        load_weights(model, path)
        models.append(model)
    needs_data = args.align == "activation" or args.repair != "none"
    data = load_data(args.data) if needs_data else []
    if needs_data and not args.data:
        raise InputError("--align activation and --repair need --data mnist or --data FILE")
    align: WeightMatching | ActivationMatching | None = None
    if args.align == "weight":
        align = WeightMatching() if args.tol is None else WeightMatching(tol=args.tol)
    elif args.align == "activation":
        align = ActivationMatching(data=data)
    repair: ResetBatchNorm | Repair | None = None
    if args.repair == "reset-bn":
        repair = ResetBatchNorm(data=data)
    elif args.repair == "repair":
        repair = Repair(data=data)
    report = FusionReport()
    fused = fuse(models, inputs, align=align, repair=repair, progress=not args.quiet,
                 report=report)
    print(report)
    result = export(fused, inputs, args.out)
    extra = f", onnxruntime max relative difference {result.max_rel_diff:.2g}" \
        if result.max_rel_diff is not None else ""
    print(f"wrote {args.out} ({result.format}{extra})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, epochs=args.epochs, width=args.width, quiet=args.quiet)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("groups", help="discover and print a model's permutation groups")
    g.add_argument("model", help="package.module:factory returning the nn.Module")
    g.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="one per model input, e.g. 1,3,32,32 or 2,16:int64")
    g.add_argument("--factory-args", help="JSON object of keyword arguments for the factory")
    g.add_argument("--weights", help="state_dict to load: .pt (weights_only) or .safetensors")
    g.add_argument("--json", help="write the spec as JSON to this file")
    g.add_argument("--graph", help="write the group graph (.graphml or .dot)")
    g.add_argument("--strict", action="store_true", help="fail on ops without an axis rule")
    g.add_argument("--verify", action="store_true",
                   help="also permute every group at random and check the outputs are unchanged")
    g.set_defaults(func=cmd_groups)

    f = sub.add_parser("fuse", help="fuse checkpoints of one architecture into one model")
    f.add_argument("model", help="package.module:factory returning the nn.Module")
    f.add_argument("checkpoints", nargs="+", help="state_dicts to fuse (.pt or .safetensors)")
    f.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]")
    f.add_argument("--factory-args", help="JSON object of keyword arguments for the factory")
    f.add_argument("--align", choices=["weight", "activation", "none"], default="weight")
    f.add_argument("--tol", type=float, default=None,
                   help="weight matching stops at the first sweep shortening the squared "
                        "distance by less than this fraction; 0: until no group changes "
                        "(default: fxfuse.WeightMatching's, 1e-3)")
    f.add_argument("--repair", choices=["reset-bn", "repair", "none"], default="none")
    f.add_argument("--data", help="'mnist' or a .pt/.npz file of inputs (for activation "
                                  "matching and repair)")
    f.add_argument("--out", required=True, help="fused.onnx, fused.pt or fused.safetensors")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fuse)

    d = sub.add_parser("demo", help="train two MNIST MLPs from different seeds and fuse them")
    d.add_argument("--out", default="fused.onnx", help="where to write the fused ONNX model")
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--width", type=int, default=512)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FxFuseError as exc:
        print(f"fxfuse: error: {exc}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"fxfuse: error: --factory-args is not valid JSON: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
