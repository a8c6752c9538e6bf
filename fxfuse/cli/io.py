"""Loading models, weights and data for the commands, and writing their outputs atomically."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, listing, quote_error
from .kinds import InputSpec

if TYPE_CHECKING:
    import torch
    from torch import nn


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
    from ..trace import nonfinite_key

    key = nonfinite_key(model.state_dict())
    if key is not None:
        raise InputError(f"{label} {str(path)!r}: parameter {key!r} has NaN or infinite "
                         f"values; {why}")


def check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...],
               specs: Sequence[InputSpec]) -> None:
    """MODEL must run on the ``--input-shape`` inputs (one forward, eval mode, no grad)."""
    from ..trace import eval_mode

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
    from ..data import batches, load_mnist, load_tensors

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
    from ..exporter import publish, staged_file

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
