"""fx's trace-time patches of ``nn.Module``, made per instance instead of on the class.

``torch.fx.Tracer.trace`` sets two attributes of ``nn.Module`` for the length of a trace and
sets them back after: ``__call__`` (so every module call becomes the tracer's ``call_module``)
and ``__getattr__`` (so a parameter read becomes a ``get_attr`` proxy).  Both are *slots*:
assigning one makes CPython re-derive the slot on every subclass of ``nn.Module`` (over 400
with torch alone, more with every model library loaded), 50-170 microseconds each, four times a
trace: a third of a small model's whole discovery.

The same two effects, without touching a slot:

* **calls**: ``nn.Module.__call__`` (``_wrapped_call_impl``) calls ``self._call_impl``, an
  ordinary attribute; it is replaced by a function that hands the call to fx's wrapper, except
  the one call fx's wrapper makes itself (the original ``__call__`` of the module it is
  tracing into) and any call not made by ``nn.Module.__call__`` (``module._call_impl(x)``,
  which fx's patch does not see either): those go on to the original ``_call_impl``.
* **parameter reads**: ``nn.Module.__getattr__`` reads ``self.__dict__["_parameters"][name]``
  (and ``_buffers`` where the tracer proxies buffers); every module of the traced tree gets,
  for the trace, a stand-in for that dict (one per dict: modules sharing one share it) whose
  item lookup *from ``nn.Module.__getattr__``* returns the tracer's ``getattr`` of the value,
  as fx's wrapper does; any other read of the dict gets the value.  Parameters registered,
  replaced or removed during the trace are copied back to the module's own dict, and the
  tracer is told (its name table is stale).
* **traces inside the trace** (a ``forward`` that calls ``fx.symbolic_trace``) get fx's own
  patcher, with this trace's patches off meanwhile, as fx's nested class patches shadow the
  outer ones.

Where this can not be the same as fx's (a module with a compiled call, its own
``_call_impl``, a ``_parameters`` that is not a plain dict, a patch already in place, another
torch without these internals) the trace runs with fx's own patcher: :func:`instance_patching`
returns None.  What it still sees differently, all outside the module tree fx traces:

* a parameter read from a module that is not in the tree (kept with ``object.__setattr__``, or
  made during ``forward``) is the tensor itself, as fx's ``create_arg`` then records it (a
  ``get_attr`` where it is an argument, a constant where it went through a method first);
* ``module.compile()`` called during the trace, and a call through a reference to
  ``nn.Module.__call__`` taken before it (fx's patch misses that one; this one sees it).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch.fx as fx
from torch import nn

_FX = fx._symbolic_trace
_ORIG_CALL = nn.Module.__call__
_ORIG_CALL_IMPL: Callable[..., Any] | None = vars(nn.Module).get("_call_impl")
_SUPPORTED = (
    _ORIG_CALL_IMPL is not None
    and getattr(_ORIG_CALL, "__name__", "") == "_wrapped_call_impl"
    and isinstance(getattr(_FX, "_Patcher", None), type)
    and callable(getattr(_FX, "_new_patcher", None))
    and hasattr(_FX, "CURRENT_PATCHER")
)


_GETATTR_CODE = nn.Module.__getattr__.__code__
_WRAPPED_CALL_CODE = getattr(_ORIG_CALL, "__code__", None)


class _Lookup(dict):  # type: ignore[type-arg]
    """A module's ``_parameters`` / ``_buffers`` during a trace.  Read by
    ``nn.Module.__getattr__`` (a parameter read ``self.weight``: what fx's patched
    ``__getattr__`` sees), an item passes through the tracer's ``getattr``; read by anything
    else (``self._parameters["weight"]``, ``torch.func``'s tensor swaps) it is the value, as in
    fx.  Changed (a parameter registered, replaced or removed), it tells the tracer.  After the
    trace it is a plain mapping again (a copy of the module made during the trace keeps it),
    and it pickles as a dict."""

    __slots__ = ("_get", "_changed")
    _get: Callable[[str, Any], Any] | None
    _changed: Callable[[], None]

    def __getitem__(self, name: str) -> Any:
        value = dict.__getitem__(self, name)
        get = self._get
        if get is not None and sys._getframe(1).f_code is _GETATTR_CODE:
            return get(name, value)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        dict.__setitem__(self, name, value)
        self._changed()

    def __delitem__(self, name: str) -> None:
        dict.__delitem__(self, name)
        self._changed()

    def __reduce__(self) -> Any:
        return dict, (dict(self),)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return len(a) == len(b) and all(
        ka == kb and va is vb for (ka, va), (kb, vb) in zip(dict.items(a), b.items()))


class _StatePatch:
    """fx's ``__getattr__`` patch as per-instance dict swaps (``patch`` / ``revert``, as fx's
    own patch records, which ``_maybe_revert_all_patches`` may call mid-trace).  Modules that
    share one dict (a shallow copy) share its stand-in."""

    def __init__(self, modules: list[nn.Module], keys: tuple[str, ...],
                 get: Callable[[str, Any], Any], changed: Callable[[], None]) -> None:
        self.modules, self.keys, self.get, self.changed = modules, keys, get, changed
        self.swapped: list[tuple[dict[str, Any], str, dict[str, Any], _Lookup]] = []

    def patch(self) -> None:
        made: dict[int, _Lookup] = {}
        for m in self.modules:
            d = m.__dict__
            for key in self.keys:
                orig = d[key]
                lookup = made.get(id(orig))
                if lookup is None:
                    lookup = made[id(orig)] = _Lookup(orig)
                    lookup._get, lookup._changed = self.get, self.changed
                d[key] = lookup
                self.swapped.append((d, key, orig, lookup))

    def revert(self) -> None:
        copied: set[int] = set()
        for d, key, orig, lookup in reversed(self.swapped):
            if id(lookup) not in copied:
                copied.add(id(lookup))
                lookup._get = None  # a plain mapping from now on
                if not _same(lookup, orig):  # registered / removed during the trace
                    orig.clear()
                    orig.update(dict.items(lookup))
            if d.get(key) is lookup:
                d[key] = orig
        self.swapped = []


class _CallPatch:
    """fx's ``__call__`` patch as a replaced ``nn.Module._call_impl`` (not a slot), taking
    only the calls ``nn.Module.__call__`` makes (a direct ``module._call_impl(x)`` is not a
    call fx's patch sees)."""

    def __init__(self, wrapper: Callable[..., Any], inner: list[nn.Module]) -> None:
        orig = _ORIG_CALL_IMPL
        assert orig is not None

        def _call_impl(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if inner and inner[-1] is mod:  # fx's wrapper running the module it traces into
                inner.pop()
                return orig(mod, *args, **kwargs)
            if sys._getframe(1).f_code is not _WRAPPED_CALL_CODE:
                return orig(mod, *args, **kwargs)
            return wrapper(mod, *args, **kwargs)

        self._fn = _call_impl

    def patch(self) -> None:
        setattr(nn.Module, "_call_impl", self._fn)  # noqa: B010 - not a slot: cheap

    def revert(self) -> None:
        setattr(nn.Module, "_call_impl", _ORIG_CALL_IMPL)  # noqa: B010


class InstancePatching:
    """What one trace needs: ``inner`` (the modules fx's wrapper is about to run: pushed by
    the tracer's ``call_module``) and the patcher factory that stands in for fx's
    ``_new_patcher`` while the trace runs."""

    def __init__(self, modules: list[nn.Module], get: Callable[[str, Any], Any],
                 changed: Callable[[], None], buffers: bool, autowrap: bool = True,
                 paths: dict[nn.Module, str] | None = None) -> None:
        self.modules, self.get, self.changed, self.autowrap = modules, get, changed, autowrap
        self.paths = paths  # module -> its path, as root.named_modules() names it (or None)
        self.keys = ("_parameters", "_buffers") if buffers else ("_parameters",)
        self.inner: list[nn.Module] = []
        self._made: _Patcher | None = None

    def run_inner(self, mod: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` (fx's closure calling the module's original ``__call__``), marked so
        the patched ``_call_impl`` lets that one call through."""
        inner = self.inner

        def run(*args: Any, **kwargs: Any) -> Any:
            inner.append(mod)
            depth = len(inner)
            try:
                return forward(*args, **kwargs)
            finally:
                if len(inner) >= depth and inner[depth - 1] is mod:  # not reached
                    del inner[depth - 1:]
        return run

    @contextlib.contextmanager
    def _new_patcher(self, fx_new_patcher: Callable[[], Any]) -> Iterator[Any]:
        """fx's ``_new_patcher``: for this trace a :class:`_Patcher`; for a trace inside it
        (a ``forward`` that traces), fx's own, with this trace's patches off meanwhile (as
        fx's nested class patches shadow the outer ones)."""
        outer = self._made
        if outer is not None:
            outer.revert_all_patches()
            try:
                with fx_new_patcher() as patcher:
                    yield patcher
            finally:
                outer.reapply_all_patches()
            return
        prior = _FX.CURRENT_PATCHER
        patcher = self._made = _Patcher(self)
        _FX.CURRENT_PATCHER = patcher
        try:
            yield patcher
        finally:
            patcher.revert_all_patches()
            _FX.CURRENT_PATCHER = prior
            # fx's call wrapper closes over the patcher that holds it: without its patches the
            # patcher (and the proxies the wrappers' caches hold) is freed by reference counting
            patcher.patches_made.clear()
            self._made = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """fx's ``_new_patcher`` replaced by this one for the ``with`` block."""
        saved = _FX._new_patcher
        _FX._new_patcher = lambda: self._new_patcher(saved)
        try:
            yield
        finally:
            _FX._new_patcher = saved


class _Patcher(_FX._Patcher if _SUPPORTED else object):  # type: ignore[misc]
    """fx's patcher, with its two patches of ``nn.Module`` made as :class:`_CallPatch` and
    :class:`_StatePatch`; every other patch (fx's wrapped functions, autowrap) is fx's."""

    def __init__(self, patching: InstancePatching) -> None:
        super().__init__()
        self._patching = patching

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any],
                     deduplicate: bool = True) -> None:
        p = self._patching
        if cls is nn.Module and name == "__call__":
            made: Any = _CallPatch(new_fn, p.inner)
        elif cls is nn.Module and name == "__getattr__":
            made = _StatePatch(p.modules, p.keys, p.get, p.changed)
        else:
            return super().patch_method(cls, name, new_fn, deduplicate)  # type: ignore[misc]
        self.patches_made.append(made)
        made.patch()
        return None

    def visit_once(self, thing: object) -> bool:
        """fx's, asked only by its autowrap check before it scans a ``forward``'s globals for
        the functions to wrap: with none to wrap (``autowrap`` off: the tracer wraps ``math``
        itself) the scan can patch nothing, so it is skipped."""
        return self._patching.autowrap and super().visit_once(thing)  # type: ignore[misc]


def instance_patching(root: nn.Module, get: Callable[[str, Any], Any],
                      changed: Callable[[], None], buffers: bool, autowrap: bool = True
                      ) -> InstancePatching | None:
    """Per-instance patching for a trace of ``root`` (``get(name, value)``: the tracer's
    ``getattr`` with its proxy cache; ``changed()``: a parameter dict of the tree changed;
    ``autowrap``: whether fx's autowrap has functions to wrap), or None where fx's own class
    patches must run (also where a module's ``_parameters`` / ``_buffers`` is not a plain dict:
    an ``OrderedDict`` from an old pickle)."""
    if not _SUPPORTED or nn.Module.__call__ is not _ORIG_CALL \
            or vars(nn.Module).get("_call_impl") is not _ORIG_CALL_IMPL \
            or _FX.CURRENT_PATCHER is not None:  # a trace in progress: fx's own nesting
        return None
    paths: dict[nn.Module, str] | None = None
    if type(root).modules is nn.Module.modules:  # modules() is named_modules() without names
        named = list(root.named_modules())
        modules = [m for _, m in named]
        paths = {m: name for name, m in named}
    else:
        modules = list(root.modules())
    for m in modules:
        d = m.__dict__
        if d.get("_compiled_call_impl") is not None or "_call_impl" in d \
                or type(m)._call_impl is not _ORIG_CALL_IMPL \
                or type(d.get("_parameters")) is not dict or type(d.get("_buffers")) is not dict:
            return None
    return InstancePatching(modules, get, changed, buffers, autowrap, paths)
