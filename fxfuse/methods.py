"""Method registry: a config type -> the passes that run it, and recipes (configs as JSON).

Every alignment or repair method is a frozen config dataclass registered once with
:func:`register_method`; :func:`fxfuse.fuse`, the command line and JSON recipes dispatch through
this table, never through an ``isinstance`` chain, so a user's own method registered here is
reachable from all three::

    @dataclass(frozen=True)
    class MyAlign:
        strength: float = 1.0

    fxfuse.register_method("my-align", "align", MyAlign, lambda cfg: [MyAlignPass(cfg)])
    fxfuse.fuse(models, x, align=MyAlign(0.5))
    fxfuse.fuse(models, x, **fxfuse.recipe_from_json('{"align": {"method": "my-align"}}'))

Configs carry parameters; data is passed beside them (``fuse(..., data=batches)``): fields marked
``field(metadata={"data": True})`` are filled from it and never written to a recipe (with
``"optional": True`` as well, a method runs without data too: OT's weight cost).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InputError

STAGES = ("align", "repair")


@dataclass(frozen=True)
class Method:
    """One registered method: its recipe ``name``, pipeline ``stage``, config type, and
    ``passes(config) -> list[Pass]``."""

    name: str
    stage: str
    config: type
    passes: Callable[[Any], list[Any]]
    needs_data: bool = False
    summary: str = ""  # one line for help texts (the config's docstring's first line)


_BY_TYPE: dict[type, Method] = {}
_BY_NAME: dict[str, Method] = {}
# the modules that register the built-in methods, in the order they are listed; ``import fxfuse``
# loads them only when used, so a lookup by name loads them first (:func:`_builtins`)
BUILTIN_MODULES = ("fxfuse.align", "fxfuse.repair")
_builtins_loaded = False


def _builtins() -> None:
    """Register the built-in methods (import their modules) if that has not happened yet."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in BUILTIN_MODULES:
            importlib.import_module(name)


# name -> (rank of the module that first registered it, registration number): a name keeps its
# place when it is registered again (a user's method replacing a built-in one is listed where the
# built-in one was, as before the built-in modules were loaded lazily)
_ORDER: dict[str, tuple[int, int]] = {}


def _rank(config: type) -> int:
    """Built-in modules in :data:`BUILTIN_MODULES` order, whichever was imported first; then the
    user's own."""
    module = getattr(config, "__module__", "")
    return next((i for i, m in enumerate(BUILTIN_MODULES)
                 if module == m or module.startswith(m + ".")), len(BUILTIN_MODULES))


def register_method(name: str, stage: str, config: type, passes: Callable[[Any], list[Any]],
                    summary: str | None = None) -> Method:
    """Register ``config`` (a dataclass type) as method ``name`` of ``stage`` ("align" or
    "repair"); ``passes(config)`` builds the passes that run it; ``summary``: one line for help
    texts (default: the config's docstring's first line).  Registering the same name again
    replaces it (so a module can be reloaded)."""
    if stage not in STAGES:
        raise InputError(f"register_method: stage must be one of {STAGES}, got {stage!r}")
    if not getattr(config, "__module__", "").startswith("fxfuse."):
        _builtins()  # a user's method may replace a built-in one: the built-in goes first
    if not dataclasses.is_dataclass(config) or not isinstance(config, type):
        raise InputError(f"register_method: {config!r} must be a dataclass type (a config)")
    old = _BY_NAME.get(name)
    if old is not None and old.config is not config:
        _BY_TYPE.pop(old.config, None)
    needs = any(f.metadata.get("data") and not f.metadata.get("optional")
                for f in dataclasses.fields(config))
    if summary is None:
        doc = (config.__doc__ or name).strip().splitlines()[0].rstrip(".").replace("``", "")
        summary = doc.removeprefix("Config: ")
    method = Method(name, stage, config, passes, needs,
                    summary + (" (needs --data)" if needs else ""))
    _BY_TYPE[config] = method
    _BY_NAME[name] = method
    _ORDER.setdefault(name, (_rank(config), len(_ORDER)))
    return method


def methods(stage: str | None = None) -> list[Method]:
    """The registered methods (of ``stage``): the built-in ones, then the user's own in
    registration order."""
    _builtins()
    return sorted((m for m in _BY_NAME.values() if stage is None or m.stage == stage),
                  key=lambda m: _ORDER[m.name])


def method_of(config: Any, stage: str) -> Method:
    """The registered method of ``config`` for ``stage``; InputError naming the choices."""
    m = _BY_TYPE.get(type(config))
    if m is None or m.stage != stage:
        names = ", ".join(f"{x.config.__name__}()" for x in methods(stage))
        raise InputError(f"{stage} must be one of {names} or None, got {config!r} (register your "
                         f"own with fxfuse.register_method)")
    return m


def passes_for(config: Any, stage: str) -> list[Any]:
    return list(method_of(config, stage).passes(config))


def data_fields(config: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("data")]


def with_data(config: Any, data: Any) -> Any:
    """``config`` with its data fields filled from ``data`` where they are empty; InputError if
    the method needs data and neither gives any."""
    method = _BY_TYPE.get(type(config)) or method_of(config, "align")  # raises if unregistered
    names = data_fields(config)
    empty = [n for n in names if _empty(getattr(config, n))]
    if empty and data is not None:
        return dataclasses.replace(config, **{n: data for n in empty})
    optional = {f.name for f in dataclasses.fields(config) if f.metadata.get("optional")}
    empty = [n for n in empty if n not in optional]
    if empty:
        raise InputError(f"{type(config).__name__} ({method.name}) needs data and none was given "
                         f"(or it is empty): pass fuse(..., data=batches) or "
                         f"{type(config).__name__}({empty[0]}=batches) (an iterable of x or "
                         f"(x, y) batches)")
    return config


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (tuple, list)) and len(value) == 0)


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"method": name, parameter: value, ...}`` (data fields left out)."""
    m = _BY_TYPE.get(type(config))
    if m is None:
        raise InputError(f"{type(config).__name__} is not a registered method")
    out: dict[str, Any] = {"method": m.name}
    for f in dataclasses.fields(config):
        if not f.metadata.get("data"):
            out[f.name] = getattr(config, f.name)
    return out


def config_from_dict(d: dict[str, Any]) -> Any:
    if not isinstance(d, dict) or "method" not in d:
        raise InputError(f"a recipe entry must be an object with a 'method' key, got {d!r}")
    name = d["method"]
    _builtins()
    m = _BY_NAME.get(name)
    if m is None:
        raise InputError(f"unknown method {name!r} in recipe; registered: "
                         f"{', '.join(m.name for m in methods())}")
    params = {k: v for k, v in d.items() if k != "method"}
    allowed = {f.name for f in dataclasses.fields(m.config) if not f.metadata.get("data")}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InputError(f"method {name!r} has no parameter {unknown[0]!r}; its parameters: "
                         f"{', '.join(sorted(allowed)) or 'none'}")
    return m.config(**params)


def recipe_to_json(**stages: Any) -> str:
    """A JSON recipe of stage configs, e.g. ``recipe_to_json(align=WeightMatching(),
    repair=Repair())``; a None stage is written as null."""
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        raise InputError(f"recipe stages are {STAGES}, got {bad[0]!r}")
    return json.dumps({k: None if v is None else config_to_dict(v) for k, v in stages.items()},
                      indent=1)


def recipe_from_json(text: str) -> dict[str, Any]:
    """The stage configs of a JSON recipe, as keyword arguments for :func:`fxfuse.fuse`."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"a recipe must be JSON: {exc}") from exc
    if not isinstance(d, dict) or set(d) - set(STAGES):
        raise InputError(f"a recipe is an object with keys among {STAGES}, got {text[:80]!r}")
    return {k: None if v is None else config_from_dict(v) for k, v in d.items()}
