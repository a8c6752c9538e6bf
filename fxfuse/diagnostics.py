"""Neuron disturbance: how far a fused model's units move from each parent's, on the parent's data.

Zhang & Zhang ("Investigating Neuron Disturbing in Fusing Heterogeneous Neural Networks", 2022)
argue that units of models trained on different data disturb each other when fused.  This
measures it per group: for parent ``k`` on its own data ``D_k``, every traced node a group acts on
(``spec.activations``) is read in the fused model (``F``) and in the parent (``A_k``), the parent's
taken into the fused basis by its map (``A_k' = M_k A_k`` along the group's axis,
:func:`fxfuse.maps.map_groups`), and

    disturbance[k][g] = sqrt( sum ||F - A_k'||^2 / sum ||A_k'||^2 )

summed over the group's nodes and ``D_k``'s batches: 0 when the fused model computes exactly the
parent's units there, about 1 when they are unrelated (or ``F`` is 0), above 1 when they are
anti-aligned.  A group's first node carries its units before any later merge, so the figure is
the distance of each unit's *output* from the parent's; it is not a loss on the task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .errors import InputError
from .groups.spec import PermutationSpec, tree_groups
from .ir.capture import ActivationCapture
from .ir.coords import as_rows, group_rows
from .maps import GroupMap, fused_sizes, map_groups
from .passes.base import batch_inputs, limited
from .trace import model_device


def neuron_disturbance(
    fused: nn.Module, models: Sequence[nn.Module], spec: PermutationSpec,
    maps: Sequence[Mapping[str, GroupMap]] | None, data: Sequence[Iterable[Any]],
    max_batches: int | None = None,
) -> list[dict[str, float]]:
    """``out[k][group]``: the disturbance of ``group``'s units in ``fused`` relative to parent
    ``k``, on ``data[k]`` (that parent's own batches, ``x`` or ``(x, y)``); ``maps``: the
    alignment each parent was fused with (``report.maps``; None: no alignment, identity)."""
    if len(data) != len(models):
        raise InputError(f"neuron_disturbance needs one data set per parent model: "
                         f"{len(models)} models, {len(data)} data sets")
    if maps is not None and len(maps) != len(models):
        raise InputError(f"maps hold {len(maps)} models, models are {len(models)}")
    sizes = {g.name: g.size for g in spec.groups}
    nodes = spec.activations
    wanted = set(nodes)
    fused_capture = ActivationCapture(fused, spec.tracer, wanted)
    out = []
    for k, (model, batches) in enumerate(zip(models, data)):
        mk = maps[k] if maps is not None else {}
        fsizes = fused_sizes(spec, mk)
        parent_capture = ActivationCapture(model, spec.tracer, wanted)
        num: dict[str, float] = {g: 0.0 for g in sizes}
        den: dict[str, float] = {g: 0.0 for g in sizes}
        for batch in limited(batches, max_batches):
            xs = batch_inputs(batch, model_device(fused))
            seen_f, seen_p = fused_capture(*xs), parent_capture(*xs)
            for node, trees in nodes.items():
                if node not in seen_f or node not in seen_p:
                    continue
                a, f = seen_p[node].double(), seen_f[node].double()
                for axis, tree in enumerate(trees):  # the parent's node in the fused basis
                    if tree_groups(tree):  # (ungrouped axes, the batch among them, stay as run)
                        a = map_groups(a, axis, tree, mk, sizes)
                for axis, tree in enumerate(trees):
                    for g in dict.fromkeys(tree_groups(tree)):
                        rows = group_rows(tree, g, fsizes)
                        if rows is None:
                            continue
                        a_g, f_g = as_rows(a, axis, rows), as_rows(f, axis, rows)
                        num[g] += float((f_g - a_g).square().sum())
                        den[g] += float(a_g.square().sum())
        out.append({g: (num[g] / den[g]) ** 0.5 for g in sizes if den[g] > 0})
    return out
