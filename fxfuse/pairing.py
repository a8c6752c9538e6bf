"""Pairing the specs of models that differ only in their widths.

Models of one class built at different widths (a small client and a large one, a pruned model and
its parent) have specs with the same *structure*: discovery names a group by the layer that
produces it, so two such specs have

* the same groups (by name), each with the same members ``(state_dict key, axis)``;
* every parameter / buffer axis with the same layout tree over those groups (``g x 16`` after a
  flatten, ``(g + h)`` after a concat), ``Fixed`` parts of equal length;
* every axis no group touches (a fixed input or output axis, a kernel's spatial axes) of the same
  length.

Only the group sizes may differ.  :func:`pair_specs` checks that, model by model against the
target's spec, and raises :class:`~fxfuse.errors.ArchitectureMismatchError` naming the first
structural difference (a group one model has and the other lacks, a member that differs, an axis
whose layout or fixed length differs), never just the first tensor whose shape differs.  The
group named ``g`` in every model is then one group of the fused model: a model's map of ``g`` is
``(m, n)`` with ``m`` the target's size and ``n`` the model's (:mod:`fxfuse.maps`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ArchitectureMismatchError, SpecError
from .groups.spec import PermutationSpec, tree_str
from .ir.layout import NODES, Fixed, Tree, Unit


def sizes_of(spec: PermutationSpec) -> dict[str, int]:
    """Group name -> number of units."""
    return {g.name: g.size for g in spec.groups}


def same_widths(a: PermutationSpec, b: PermutationSpec) -> bool:
    """Whether two paired specs have every group at the same size."""
    return sizes_of(a) == sizes_of(b)


def structure_difference(ref: PermutationSpec, other: PermutationSpec) -> str | None:
    """The first structural difference between two specs (module doc), as a sentence naming the
    place, or None when they differ in group sizes at most."""
    ref_groups, other_groups = sizes_of(ref), sizes_of(other)
    for name in ref_groups:
        if name not in other_groups:
            return f"group {name!r} (produced by {name}) has no counterpart"
    for name in other_groups:
        if name not in ref_groups:
            return f"it has a group {name!r} that the target does not have"
    for g in ref.groups:
        mine = [tuple(m) for m in g.members]
        theirs = [tuple(m) for m in other.group(g.name).members]
        if mine != theirs:
            extra = [f"{k}:{a}" for k, a in theirs if (k, a) not in mine]
            missing = [f"{k}:{a}" for k, a in mine if (k, a) not in theirs]
            what = (f"also acts on {extra[0]}" if extra else f"does not act on {missing[0]}"
                    if missing else "acts on its members in another order")
            return f"group {g.name!r} {what}"
    for (key, axis), spec in ref.axes.items():
        theirs_axis = other.axes.get((key, axis))
        if theirs_axis is None:
            return f"{key} has no axis {axis}"
        why = _tree_difference(spec.layout, theirs_axis.layout)
        if why is not None:
            return (f"{key}:{axis} is laid out as {tree_str(spec.layout)} in the target but "
                    f"{tree_str(theirs_axis.layout)} here ({why})")
    for key_axis in other.axes:
        if key_axis not in ref.axes:
            return f"{key_axis[0]} has an axis {key_axis[1]} the target does not have"
    return None


def _tree_difference(a: Tree, b: Tree) -> str | None:
    if isinstance(a, Unit) and isinstance(b, Unit):
        return None if a.group == b.group else f"group {a.group!r} against {b.group!r}"
    if isinstance(a, Fixed) and isinstance(b, Fixed):
        return None if a.n == b.n else (f"{a.n} fixed positions against {b.n}: the length of an "
                                        f"axis no group permutes differs")
    if isinstance(a, NODES) and type(a) is type(b):
        assert isinstance(b, NODES)
        if len(a.parts) != len(b.parts):
            return "a different number of blocks"
        for x, y in zip(a.parts, b.parts):
            why = _tree_difference(x, y)
            if why is not None:
                return why
        return None
    return "a different structure"


def pair_specs(target: PermutationSpec, specs: Sequence[PermutationSpec],
               labels: Sequence[str] | None = None) -> None:
    """Check that every spec pairs with the target's (module doc); raise
    :class:`ArchitectureMismatchError` naming the model and the first structural difference."""
    for k, spec in enumerate(specs):
        why = structure_difference(target, spec)
        if why is not None:
            label = labels[k] if labels is not None else f"models[{k}]"
            raise ArchitectureMismatchError(
                f"{label} can not be paired with the target: {why}. Models of different widths "
                f"must have the same layers in the same arrangement; different depths are not "
                f"paired by width alignment")


def resized(spec: PermutationSpec, state: Mapping[str, Any], label: str = "the state"
            ) -> PermutationSpec:
    """The spec of a model of ``spec``'s architecture at the widths of ``state`` (a state dict),
    without building that model: each group's size is read off a member axis that is the group
    alone, then every axis's length is checked against its layout at those sizes.  For a server
    that holds one model factory and receives state dicts of other widths; a state that does not
    fit raises :class:`ArchitectureMismatchError` naming the tensor and axis."""
    import dataclasses

    from .groups.spec import AxisSpec, Group, tree_size

    sizes: dict[str, int] = {}
    for key, axis in spec.axes:
        if key not in state:
            raise ArchitectureMismatchError(f"{label} has no tensor {key!r}")
        layout = spec.axes[(key, axis)].layout
        if isinstance(layout, Unit) and layout.group not in sizes:
            sizes[layout.group] = int(state[key].shape[axis])
    missing = [g.name for g in spec.groups if g.name not in sizes]
    if missing:
        raise ArchitectureMismatchError(
            f"the size of group {missing[0]!r} in {label} can not be read off its tensors (no "
            f"axis is that group alone); build the model at those widths and discover its spec")
    axes: dict[tuple[str, int], AxisSpec] = {}
    for (key, axis), a in spec.axes.items():
        try:
            want = tree_size(a.layout, sizes)
        except SpecError as exc:  # interleaved blocks read off at different widths
            raise ArchitectureMismatchError(f"{label}: {key}:{axis}: {exc}") from exc
        got = int(state[key].shape[axis]) if axis < state[key].dim() else -1
        if got != want:
            raise ArchitectureMismatchError(
                f"{label}: {key}:{axis} has length {got}, but its layout {tree_str(a.layout)} at "
                f"the widths read off the other tensors gives {want}")
        axes[(key, axis)] = dataclasses.replace(a, size=want)
    groups = [Group(g.name, sizes[g.name], g.members, g.joined_by) for g in spec.groups]
    return dataclasses.replace(spec, groups=groups, axes=axes)


def width_table(target: PermutationSpec, specs: Sequence[PermutationSpec]) -> list[str]:
    """One line per group whose size differs between the models: ``name: n0, n1, ... -> m``."""
    lines = []
    for g in target.groups:
        sizes = [s.group(g.name).size for s in specs]
        if any(n != g.size for n in sizes):
            lines.append(f"{g.name}: {', '.join(map(str, sizes))} -> {g.size}")
    return lines


def in_order_maps(specs: Sequence[PermutationSpec], target: int) -> list[dict[str, Any]]:
    """What averaging models of different widths "as they are" means (the baseline an
    alignment across widths is measured against): per model and group, unit ``j`` of ``n`` goes
    to fused unit ``j mod m`` of the target's ``m`` (clusters) where ``n > m``, fused unit ``i``
    copies unit ``i mod n`` where ``n < m``, the identity where equal.  ``GroupMap`` values."""
    import torch

    from .maps import GroupMap

    out = []
    for spec in specs:
        maps: dict[str, Any] = {}
        for g in spec.groups:
            n, m = g.size, specs[target].group(g.name).size
            maps[g.name] = (GroupMap(index=torch.arange(n)) if n == m else
                            GroupMap.copies(torch.arange(m) % n, n) if m > n else
                            GroupMap.clusters(torch.arange(n) % m, m))
        out.append(maps)
    return out


__all__ = ["in_order_maps", "pair_specs", "resized", "same_widths", "sizes_of",
           "structure_difference", "width_table"]
