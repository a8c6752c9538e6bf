"""The pass contract and the pipeline that runs passes.

A pass has a ``name`` and three methods (like onnx-ir's passes):

* ``requires(state)``: raise :class:`~fxfuse.errors.PipelineError` if its inputs are missing;
* ``call(state)``: do the work, updating the :class:`FusionState`;
* ``ensures(state)``: check what it promised (e.g. finite weights).

:class:`Pipeline` runs them in order, times each one into the :class:`FusionReport`, and re-raises
any failure as a ``PipelineError`` naming the pass (typed fxfuse errors keep their type and get the
pass name prepended).  Users add their own pass by subclassing :class:`Pass` and building a
``Pipeline`` with it (see :func:`fxfuse.fuse` for the default list).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import FxFuseError, InputError, PipelineError
from ..groups.spec import PermutationSpec
from ..maps import GroupMap, apply_maps, perm_maps
from ..trace import model_device

T = TypeVar("T")


@dataclass
class FusionReport:
    """Per-pass wall time (seconds) and notes, in run order; after the run, the discovered
    ``spec`` and the alignment's ``perms``: ``perms[k]`` maps each group name to the permutation
    that takes model ``k`` into the common basis (model 0's own; the identity for model 0), so
    ``fxfuse.permute(models[k], report.spec, report.perms[k])`` is model ``k`` as it was merged.
    ``perms`` is None when nothing aligned (``align=None``).  Printed, it gives the timings and,
    per aligned model, how many groups and units the alignment moved."""

    timings: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    spec: PermutationSpec | None = None
    perms: list[dict[str, torch.Tensor]] | None = None
    # maps[k][group]: the GroupMap taking model k into the fused basis (fxfuse.maps); for a
    # permutation alignment, perms[k] as maps.  Save with fxfuse.save_fusion(path, spec, maps).
    maps: list[dict[str, GroupMap]] | None = None
    # models of different widths: each model's own spec (``spec`` is the target's); else None.
    # Save with fxfuse.save_fusion(path, spec, maps, specs=specs).
    specs: list[PermutationSpec] | None = None

    def __str__(self) -> str:
        lines = ["pass                      seconds"]
        lines += [f"{name:<24} {sec:8.3f}" for name, sec in self.timings]
        for k, perms in enumerate((self.perms or [])[1:], start=1):
            moved = [int((p != torch.arange(p.numel(), device=p.device)).sum())
                     for p in perms.values()]
            total = sum(p.numel() for p in perms.values())
            lines.append(f"alignment: model {k}: {sum(m > 0 for m in moved)} of {len(moved)} "
                         f"groups permuted, {sum(moved)} of {total} units moved")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class FusionState:
    """What the passes share.  ``states[k]`` are detached copies of model ``k``'s state_dict on
    ``device``; ``perms[k]`` maps group name -> permutation taking model ``k`` into the common
    basis; ``fused`` is the output model (a copy of model 0 with the merged state)."""

    models: Sequence[nn.Module]
    example_inputs: tuple[Any, ...]
    weights: list[float]
    device: torch.device
    progress: bool = True
    spec: PermutationSpec | None = None
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    perms: list[dict[str, torch.Tensor]] | None = None
    maps: list[dict[str, GroupMap]] | None = None  # set by methods whose maps are not permutations
    fused: nn.Module | None = None
    report: FusionReport = field(default_factory=FusionReport)
    # models of different widths (fxfuse.pairing): specs[k] is model k's own spec, ``spec`` the
    # target's; None when every model has the target's widths (``spec`` is everyone's)
    specs: list[PermutationSpec] | None = None
    # the fused architecture: an instance of the class and widths wanted (fuse's ``target``,
    # default model 0; never modified: the fused model is a copy), and ``anchor``, the model
    # whose units are the fused basis (None: no model has the target's widths)
    target: nn.Module | None = None
    anchor: int | None = 0

    def spec_of(self, k: int) -> PermutationSpec:
        """Model ``k``'s own spec."""
        if self.specs is not None:
            return self.specs[k]
        if self.spec is None:
            raise PipelineError("no spec yet: run discovery first")
        return self.spec

    @property
    def target_model(self) -> nn.Module:
        """The model the fused one is a copy of (``target``, else model 0)."""
        return self.target if self.target is not None else self.models[0]

    def alignment(self) -> list[dict[str, GroupMap]] | None:
        """Every model's maps into the common basis (``maps``, else ``perms`` as maps), or None
        when nothing aligned."""
        if self.maps is not None:
            return self.maps
        return None if self.perms is None else [perm_maps(p) for p in self.perms]

    def aligned_states(self) -> list[dict[str, torch.Tensor]]:
        """Every model's state in the common basis (its maps applied)."""
        maps = self.alignment()
        if self.spec is None or maps is None:
            return self.states
        return [apply_maps(s, self.spec_of(k), m)
                for k, (s, m) in enumerate(zip(self.states, maps))]


class Pass:
    """Base class of a pipeline pass (see module doc)."""

    name = "pass"

    def requires(self, state: FusionState) -> None:
        """Raise PipelineError if ``state`` lacks what this pass needs."""

    def call(self, state: FusionState) -> None:
        raise NotImplementedError

    def ensures(self, state: FusionState) -> None:
        """Raise PipelineError if the pass did not deliver what it promises."""


class Pipeline:
    """Runs passes in order with timing; a failure names the pass."""

    def __init__(self, passes: Iterable[Pass]) -> None:
        self.passes = list(passes)

    def run(self, state: FusionState) -> FusionReport:
        for p in self.passes:
            start = time.perf_counter()
            try:
                p.requires(state)
                p.call(state)
                p.ensures(state)
            except FxFuseError as exc:
                if not str(exc).startswith(f"[{p.name}]"):
                    exc.args = (f"[{p.name}] {exc}", *exc.args[1:])
                raise
            except Exception as exc:
                raise PipelineError(f"[{p.name}] failed: {type(exc).__name__}: {exc}") from exc
            state.report.timings.append((p.name, time.perf_counter() - start))
        state.report.spec, state.report.perms = state.spec, state.perms
        state.report.specs = state.specs
        state.report.maps = state.alignment()
        return state.report

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(p.name for p in self.passes)}])"


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself if it already lives on ``device``, else a copy moved there (a user's
    model is never moved)."""
    if model_device(model) == device:
        return model
    import copy

    return copy.deepcopy(model).to(device)


def progress(items: Iterable[T], label: str, enabled: bool, total: int | None = None) -> Iterator[T]:
    """A tqdm progress bar on stderr (``tqdm.auto``: a widget in notebooks); silent when
    ``enabled`` is False.

    On a terminal the bar is redrawn in place as usual; elsewhere (logs, CI) it is plain ASCII,
    80 columns, shown only for loops that take over 15 s and then written at most every 15 s and
    once when the loop ends, so a log gets a few readable lines instead of thousands of carriage
    returns.  The bar is closed also when the
    caller stops early (``break``: weight matching usually ends before ``max_iter`` sweeps)."""
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm  # imported when a bar is shown: `import fxfuse` stays light

    tty = sys.stderr.isatty()
    sized = tty and _columns(sys.stderr) > 0  # a terminal that knows its width
    bar = tqdm(items, desc=label, total=total, file=sys.stderr, leave=True, dynamic_ncols=sized,
               ncols=None if sized else 80, ascii=None if tty else True,
               mininterval=0.1 if tty else 15.0, maxinterval=30.0 if tty else 60.0,
               delay=0.0 if tty else 5.0)
    try:
        yield from bar
    finally:
        bar.close()


def _columns(stream: Any) -> int:
    """The width of the terminal ``stream`` is on (0 when unknown)."""
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def batch_inputs(batch: Any, device: torch.device) -> tuple[Any, ...]:
    """The model inputs of one data batch: ``x`` or the first element of ``(x, y)``."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise InputError(f"a data batch must be a tensor x or a tuple (x, y), got "
                         f"{type(batch).__name__}")
    return (x.to(device),)


def limited(data: Iterable[Any], max_batches: int | None) -> list[Any]:
    out = []
    for i, b in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        out.append(b)
    if not out:
        raise InputError("the data given for this pass is empty: pass an iterable of batches "
                         "(a DataLoader, or a list of x or (x, y) tensors)")
    return out
