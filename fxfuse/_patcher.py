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
  tracing into), which goes on to the original ``_call_impl``.
* **parameter reads**: ``nn.Module.__getattr__`` reads ``self.__dict__["_parameters"][name]``
  (and ``_buffers`` where the tracer proxies buffers); every module of the traced tree gets,
  for the trace, a copy of that dict whose item lookup returns the tracer's ``getattr`` of the
  value, as fx's wrapper does.  Parameters registered or removed during the trace are copied
  back to the module's own dict.  An empty dict is left as it is: a parameter first registered
  during the trace on a module that had none is read as itself, and fx's ``create_arg`` makes
  the same ``get_attr`` node of it where it is used (at its use, not at its read).

Where this can not be the same as fx's (a module with a compiled call or its own
``_call_impl``, a patch already in place, another torch without these internals) the trace
runs with fx's own patcher: :func:`instance_patching` returns None.
"""

from __future__ import annotations

import contextlib
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


class _Lookup(dict):  # type: ignore[type-arg]
    """A module's ``_parameters`` / ``_buffers`` during a trace: item lookup (what
    ``nn.Module.__getattr__`` does) passes the value through the tracer's ``getattr``."""

    __slots__ = ("_get",)
    _get: Callable[[str, Any], Any]

    def __getitem__(self, name: str) -> Any:
        return self._get(name, dict.__getitem__(self, name))


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return len(a) == len(b) and all(
        ka == kb and va is vb for (ka, va), (kb, vb) in zip(dict.items(a), b.items()))


class _StatePatch:
    """fx's ``__getattr__`` patch as per-instance dict swaps (``patch`` / ``revert``, as fx's
    own patch records, which ``_maybe_revert_all_patches`` may call mid-trace)."""

    def __init__(self, modules: list[nn.Module], keys: tuple[str, ...],
                 get: Callable[[str, Any], Any]) -> None:
        self.modules, self.keys, self.get = modules, keys, get
        self.swapped: list[tuple[dict[str, Any], str, dict[str, Any], _Lookup]] = []

    def patch(self) -> None:
        for m in self.modules:
            d = m.__dict__
            for key in self.keys:
                orig = d.get(key)
                if type(orig) is dict and orig:
                    lookup = _Lookup(orig)
                    lookup._get = self.get
                    d[key] = lookup
                    self.swapped.append((d, key, orig, lookup))

    def revert(self) -> None:
        for d, key, orig, lookup in reversed(self.swapped):
            if d.get(key) is lookup:
                if not _same(lookup, orig):  # registered / removed during the trace
                    orig.clear()
                    orig.update(dict.items(lookup))
                d[key] = orig
        self.swapped = []


class _CallPatch:
    """fx's ``__call__`` patch as a replaced ``nn.Module._call_impl`` (not a slot)."""

    def __init__(self, wrapper: Callable[..., Any], inner: list[nn.Module]) -> None:
        orig = _ORIG_CALL_IMPL
        assert orig is not None

        def _call_impl(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if inner and inner[-1] is mod:  # fx's wrapper running the module it traces into
                inner.pop()
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
                 buffers: bool, autowrap: bool = True) -> None:
        self.modules, self.get, self.autowrap = modules, get, autowrap
        self.keys = ("_parameters", "_buffers") if buffers else ("_parameters",)
        self.inner: list[nn.Module] = []

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
    def _new_patcher(self) -> Iterator[Any]:
        """fx's ``_new_patcher``, making a :class:`_Patcher` of this trace."""
        prior = _FX.CURRENT_PATCHER
        patcher = _Patcher(self)
        _FX.CURRENT_PATCHER = patcher
        try:
            yield patcher
        finally:
            patcher.revert_all_patches()
            _FX.CURRENT_PATCHER = prior
            # fx's call wrapper closes over the patcher that holds it: without its patches the
            # patcher (and the proxies the wrappers' caches hold) is freed by reference counting
            patcher.patches_made.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """fx's ``_new_patcher`` replaced by this one for the ``with`` block."""
        saved = _FX._new_patcher
        _FX._new_patcher = self._new_patcher
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
            made = _StatePatch(p.modules, p.keys, p.get)
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


def instance_patching(root: nn.Module, get: Callable[[str, Any], Any], buffers: bool,
                      autowrap: bool = True) -> InstancePatching | None:
    """Per-instance patching for a trace of ``root`` (``get(name, value)``: the tracer's
    ``getattr`` with its proxy cache; ``autowrap``: whether fx's autowrap has functions to
    wrap), or None where fx's own class patches must run."""
    if not _SUPPORTED or nn.Module.__call__ is not _ORIG_CALL \
            or vars(nn.Module).get("_call_impl") is not _ORIG_CALL_IMPL \
            or _FX.CURRENT_PATCHER is not None:  # a trace in progress: fx's own nesting
        return None
    modules = list(root.modules())
    for m in modules:
        if m.__dict__.get("_compiled_call_impl") is not None or "_call_impl" in m.__dict__ \
                or type(m)._call_impl is not _ORIG_CALL_IMPL:
            return None
    return InstancePatching(modules, get, buffers, autowrap)
