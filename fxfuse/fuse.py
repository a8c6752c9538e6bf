"""``fuse``: N trained models of one architecture -> one model of the same class.

The default pipeline is: discover groups -> align (weight or activation matching, or none) ->
merge (weighted average) -> repair (ResetBatchNorm or REPAIR, or none) -> verify.  Everything
runs on ``device`` (default: where model 0 is).  The inputs are never modified: the fused model is
a new instance of model 0's class whose ``state_dict`` loads into a fresh instance of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .align.weights import WeightMatching
from .errors import ArchitectureMismatchError, InputError
from .groups import find_groups
from .methods import passes_for, with_data
from .passes.base import FusionReport, FusionState, Pass, Pipeline
from .passes.merge import MergeWeights, VerifyFused
from .trace import as_input_tuple, kv_cache_note, model_device, nonfinite_key

Align = Any  # a registered align config (WeightMatching(), ActivationMatching(), ...) or None
RepairConfig = Any  # a registered repair config (ResetBatchNorm(), Repair(), ...) or None


class DiscoverGroups(Pass):
    """Find the permutation groups of model 0 (all models share the architecture)."""

    name = "discover"

    def call(self, state: FusionState) -> None:
        state.spec = find_groups(state.models[0], state.example_inputs)
        state.report.notes.append(f"discover: {len(state.spec.groups)} groups, "
                                  f"{len(state.spec.cuts)} cuts")
        if state.spec.tracer == "torch.export" and (
                cache_note := kv_cache_note(state.models[0], state.example_inputs)):
            state.report.notes.append(cache_note)


def check_models(models: Sequence[nn.Module]) -> None:
    """Raise if the models can not be fused: fewer than two, different classes, different
    parameter names or shapes, non-finite weights."""
    if isinstance(models, nn.Module) or len(models) < 2:
        raise InputError("fuse needs at least two models, e.g. fxfuse.fuse([model_a, model_b], x)")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InputError(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    ref = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(models[0]):
            raise ArchitectureMismatchError(
                f"models[{i}] is a {type(m).__name__} but models[0] is a "
                f"{type(models[0]).__name__}; fuse needs one architecture")
        st = m.state_dict()
        for key, t in ref.items():
            if key not in st:
                raise ArchitectureMismatchError(f"models[{i}] has no parameter {key!r} "
                                                f"(models[0] has)")
            if st[key].shape != t.shape:
                raise ArchitectureMismatchError(
                    f"parameter {key!r}: models[0] has shape {tuple(t.shape)}, models[{i}] has "
                    f"{tuple(st[key].shape)}")
        extra = [k for k in st if k not in ref]
        if extra:
            raise ArchitectureMismatchError(f"models[{i}] has parameter {extra[0]!r} that "
                                            f"models[0] does not")
    for i, m in enumerate(models):
        bad = nonfinite_key(m.state_dict())
        if bad is not None:
            raise InputError(f"models[{i}] parameter {bad!r} has NaN or infinite values; "
                             f"fix or drop that checkpoint")


def interpolation_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise InputError(f"weights must be {n} non-negative numbers with a positive sum, got {w}")
    total = sum(w)
    return [x / total for x in w]


def default_passes(align: Align, repair: RepairConfig, data: Any = None) -> list[Pass]:
    """discover -> the align method's passes -> merge -> the repair method's passes -> verify,
    each method's passes from the registry (:mod:`fxfuse.methods`); ``data`` fills the configs'
    data fields where they are empty."""
    passes: list[Pass] = [DiscoverGroups()]
    if align is not None:
        passes += passes_for(with_data(align, data), "align")
    passes.append(MergeWeights())
    if repair is not None:
        passes += passes_for(with_data(repair, data), "repair")
    passes.append(VerifyFused())
    return passes


def fuse(
    models: Sequence[nn.Module],
    example_inputs: Any,
    align: Align = WeightMatching(),  # noqa: B008 - frozen config
    repair: RepairConfig = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    *,
    progress: bool = True,
    report: FusionReport | None = None,
    passes: Sequence[Pass] | None = None,
    data: Any = None,
) -> nn.Module:
    """Fuse ``models`` (one architecture) into one model of the same class.

    ``align``: :class:`WeightMatching` (default), :class:`ActivationMatching` or None (naive
    averaging).  ``repair``: :class:`ResetBatchNorm`, :class:`Repair` or None.  ``weights``:
    interpolation weights (default uniform).  ``device``: where to compute (default: where model 0
    is).  ``progress=False`` silences progress bars.  Pass a :class:`FusionReport` as ``report`` to
    get per-pass timings and notes; pass ``passes`` to run your own pipeline instead of the
    default one (see :func:`default_passes`).  ``data``: batches (``x`` or ``(x, y)``) for the
    methods that need data, given beside their configs (``ActivationMatching()``, ``Repair()``;
    a config's own ``data=`` wins).  Methods are dispatched through :mod:`fxfuse.methods`, so a
    config registered with :func:`fxfuse.register_method` is accepted too.
    """
    check_models(models)
    inputs = as_input_tuple(example_inputs)
    dev = torch.device(device) if device is not None else model_device(models[0])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' was asked for but CUDA is not available")
    state = FusionState(
        models=list(models), example_inputs=inputs,
        weights=interpolation_weights(weights, len(models)), device=dev, progress=progress,
        report=report if report is not None else FusionReport(),
    )
    state.states = [{k: v.detach().to(dev).clone() for k, v in m.state_dict().items()}
                    for m in models]
    Pipeline(passes if passes is not None else default_passes(align, repair, data)).run(state)
    assert state.fused is not None
    return state.fused
