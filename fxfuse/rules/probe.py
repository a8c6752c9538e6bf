"""Probed rules: the axis relations of an op without a rule, *measured* on the op itself.

An op the rule table does not know (a library function wrapped with ``torch.fx.wrap`` that can
not be traced into, a module that can not be traced, an ATen op without a rule) is not cut at
once.  The probe runs it on the shapes recorded while tracing (a deep copy of a module, in eval
mode, its state-dict tensors replaced by random values) and tests, for each relation the rule
table can express, whether

    f(P . inputs) == P . f(inputs)        (relative 1e-5, on every output)

holds for ``trials`` random inputs, each with a random non-identity permutation ``P``:

* **equivariant**: an output axis and the input/parameter axes aligned with it (right-aligned as
  in broadcasting, else left-aligned, else the one axis of that size) carry one permutation:
  elementwise ops, per-channel parameters with broadcasting, axes an op passes through;
* **invariant**: an input axis the outputs do not depend on the order of (a reduced axis), or
  input axes of one size in different tensors that are contracted together (``x @ w``);
* **constant**: an output axis along which every slice is the same (broadcast copies).

Each relation is tested on its own (they compose: permutations of different axes commute), then
all of them together once more.  The op must be deterministic (two runs on the same input give
the same output).  A relation is used only where the measurement holds; every other axis is
cut with the probe's reason.  This is a rule measured on the op, not a guess from its name:
discovery marks it ``probed`` (node, op, source line), ``strict=True`` refuses it, and
``fxfuse.verify`` checks the whole model afterwards.  Integer tensor arguments (ids, indices)
are not probed: their values were not recorded, and random ones would not be valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .registry import AxisRef, Cut, Free, Relation, TensorHandle, same

TOLERANCE = 1e-5
TRIALS = 3

Axis = tuple[int, int]  # (tensor handle index, axis)
Call = Callable[[dict[int, torch.Tensor]], Any]


@dataclass
class ProbeResult:
    """``relations`` over the op's handles; ``holds`` / ``fails``: what was measured, for the
    record; ``reason``: why nothing could be probed (empty when something was)."""

    relations: list[Relation] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)
    fails: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def found(self) -> bool:
        return bool(self.holds)


def flatten_tensors(v: Any) -> list[Any]:
    """The tensors of an op's output, in the order the driver numbers output handles."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for u in v for t in flatten_tensors(u)]
    return []


def _mismatch(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """``max |ref - got| / max |ref|`` over the outputs (NaN where both are NaN counts as equal;
    non-floating outputs must be equal)."""
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return float("inf")
            continue
        a64, b64 = a.double(), b.double()
        both_nan = a64.isnan() & b64.isnan()
        if bool((a64.isnan() != b64.isnan()).any()):
            return float("inf")
        finite = a64.where(~both_nan, 0.0)
        scale = max(float(finite.abs().max()) if a.numel() else 0.0, 1e-12)
        diff = (finite - b64.where(~both_nan, 0.0)).abs()
        worst = max(worst, float(diff.max()) / scale if a.numel() else 0.0)
    return worst


def _perm(n: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.randperm(n, generator=gen)
    return p if not torch.equal(p, torch.arange(n)) else torch.roll(p, 1)


def _sample(h: TensorHandle, gen: torch.Generator) -> torch.Tensor:
    if h.dtype.is_floating_point:
        return torch.randn(h.shape, generator=gen).to(h.dtype)
    if h.dtype == torch.bool:
        return torch.rand(h.shape, generator=gen) > 0.5
    raise TypeError(h.dtype)


def _partner(t: TensorHandle, o: TensorHandle, j: int, taken: set[Axis]) -> int | None:
    """The axis of input ``t`` aligned with output axis ``j``: right-aligned (broadcasting),
    else left-aligned (an axis passed through by a reduction), else the one axis of that size."""
    n = o.shape[j]
    candidates = [j - (o.ndim - t.ndim), j]
    sized = [d for d in range(t.ndim) if t.shape[d] == n]
    if len(sized) == 1:
        candidates.append(sized[0])
    for a in candidates:
        if 0 <= a < t.ndim and t.shape[a] == n and (t.index, a) not in taken:
            return a
    return None


class _Probe:
    def __init__(self, call: Call, inputs: list[TensorHandle], outs: list[TensorHandle],
                 fixed: dict[int, torch.Tensor], trials: int, tolerance: float, seed: int) -> None:
        self.call, self.inputs, self.outs = call, inputs, outs
        self.tolerance = tolerance
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = {h.index: h.shape for h in [*inputs, *outs]}
        self.samples = [{**{h.index: _sample(h, self.gen) for h in inputs
                            if h.index not in fixed}, **fixed} for _ in range(trials)]
        self.refs = [self.run(x) for x in self.samples]

    def run(self, values: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        values = {k: v.clone() for k, v in values.items()}  # in-place ops must not leak
        with torch.no_grad():
            got = [t.clone() for t in flatten_tensors(self.call(values))]
        if [tuple(t.shape) for t in got] != [o.shape for o in self.outs]:
            raise ValueError(f"output shapes {[tuple(t.shape) for t in got]} differ from the "
                             f"recorded {[o.shape for o in self.outs]}")
        return got

    def holds(self, groups: list[list[Axis]]) -> float:
        """Worst mismatch over the trials when each group of axes gets its own permutation
        (input axes permuted, output axes expected permuted, everything else unchanged)."""
        worst = 0.0
        out_ids = {o.index: i for i, o in enumerate(self.outs)}
        for x, ref in zip(self.samples, self.refs):
            xs, expected = dict(x), list(ref)
            for group in groups:
                p = _perm(self.shape[group[0][0]][group[0][1]], self.gen)
                for t, a in group:
                    if t in out_ids:
                        expected[out_ids[t]] = expected[out_ids[t]].index_select(a, p)
                    else:
                        xs[t] = xs[t].index_select(a, p)
            worst = max(worst, _mismatch(expected, self.run(xs)))
            if worst > self.tolerance:
                break
        return worst


def _describe(axis: Axis, labels: dict[int, str]) -> str:
    t, a = axis
    return f"{labels.get(t, f'tensor #{t}')}[{a}]"


def probe(call: Call, inputs: list[TensorHandle], outs: list[TensorHandle], *,
          fixed: dict[int, torch.Tensor] | None = None, labels: dict[int, str] | None = None,
          trials: int = TRIALS, tolerance: float = TOLERANCE, seed: int = 0) -> ProbeResult:
    """Measure the axis relations of ``call`` (see the module doc).

    ``call(values)`` runs the op with ``values[h.index]`` for every input handle (activations and
    a module's parameters); ``fixed`` are inputs kept at their real values (buffers outside the
    state dict), never permuted; ``labels`` name the handles in the record (``x``, ``weight``,
    ``out``)."""
    fixed = fixed or {}
    labels = labels or {}
    bad = [h for h in inputs if h.index not in fixed and not (
        h.dtype.is_floating_point or h.dtype == torch.bool)]
    if bad:
        return ProbeResult(reason=f"not probed: tensor #{bad[0].index} is {bad[0].dtype} (ids or "
                                  "indices: their values are not recorded)")
    if not outs:
        return ProbeResult(reason="not probed: the op returns no tensor")
    try:
        pr = _Probe(call, inputs, outs, fixed, trials, tolerance, seed)
        again = pr.run(pr.samples[0])
    except Exception as exc:  # the op itself failing on random inputs is a probe result
        text = " ".join(str(exc).split())[:200]
        return ProbeResult(reason=f"not probed: the op failed on random inputs "
                                  f"({type(exc).__name__}: {text})")
    if _mismatch(pr.refs[0], again) != 0.0:
        return ProbeResult(reason="not probed: two runs on the same input differ (the op is "
                                  "not deterministic)")
    movable = [h for h in inputs if h.index not in fixed]
    # candidate classes: each output axis with its aligned input axes (one per input tensor);
    # outputs aligned with the same input axis share a class
    parent: dict[Axis, Axis] = {}

    def find(a: Axis) -> Axis:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for o in outs:
        taken: set[Axis] = set()
        for j in range(o.ndim):
            if o.shape[j] <= 1:
                continue
            find((o.index, j))
            for t in movable:
                d = _partner(t, o, j, taken)
                if d is not None:
                    taken.add((t.index, d))
                    parent[find((t.index, d))] = find((o.index, j))
    classes: dict[Axis, list[Axis]] = {}
    for ax in list(parent):
        classes.setdefault(find(ax), []).append(ax)
    result = ProbeResult()
    accepted: list[list[Axis]] = []
    claimed: set[Axis] = set()
    why: dict[Axis, str] = {}
    for members in classes.values():
        members.sort()
        worst = pr.holds([members])
        text = " = ".join(_describe(a, labels) for a in members)
        if worst <= tolerance:
            accepted.append(members)
            claimed.update(members)
            result.holds.append(text if len(members) > 1 else f"{text} is constant")
        else:
            result.fails.append(f"{text} (differs by {worst:.2g})")
            for ax in members:
                why[ax] = f"probed: {text} does not hold (differs by {worst:.2g})"
    # input axes in no accepted class: the outputs may ignore their order (reduced), or they may
    # be contracted with same-sized axes of other inputs
    free: list[Axis] = []
    rest: list[Axis] = []
    for h in movable:
        for a in range(h.ndim):
            if h.shape[a] > 1 and (h.index, a) not in claimed:
                if pr.holds([[(h.index, a)]]) <= tolerance:
                    free.append((h.index, a))
                    result.holds.append(f"{_describe((h.index, a), labels)} is reduced")
                else:
                    rest.append((h.index, a))
    contracted: list[list[Axis]] = []
    by_size: dict[int, list[Axis]] = {}
    for ax in rest:
        by_size.setdefault(pr.shape[ax[0]][ax[1]], []).append(ax)
    for group in by_size.values():
        if len({t for t, _ in group}) == len(group) > 1 and pr.holds([group]) <= tolerance:
            contracted.append(group)
            result.holds.append(" = ".join(_describe(a, labels) for a in group) + " (contracted)")
    if not result.holds:
        result.reason = "probe found no relation: " + "; ".join(result.fails or ["nothing to test"])
        return result
    together = [*accepted, *([a] for a in free), *contracted]
    worst = pr.holds(together)
    if worst > tolerance:
        return ProbeResult(fails=result.fails, reason=f"probe: the relations measured one by one "
                                                       f"do not hold together (differs by {worst:.2g})")
    for group in [*accepted, *contracted]:
        refs = [AxisRef(t, a) for t, a in group]
        result.relations += same(*refs) if len(refs) > 1 else [Free(refs[0])]
    result.relations += [Free(AxisRef(t, a)) for t, a in free]
    done = {a for g in together for a in g}
    other = "probed: no relation holds for this axis (the outputs depend on its order)"
    for h in [*movable, *outs]:
        for a in range(h.ndim):
            if h.shape[a] > 1 and (h.index, a) not in done:
                result.relations.append(Cut(AxisRef(h.index, a), why.get((h.index, a), other)))
    return result
