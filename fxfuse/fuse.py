"""``fuse``: N trained models of one architecture (at any widths) -> one model of the same class.

The default pipeline is: discover groups -> align (weight or activation matching, or none) ->
merge (weighted average) -> repair (ResetBatchNorm or REPAIR, or none) -> verify.  Everything
runs on ``device`` (default: where model 0 is).  The inputs are never modified: the fused model is
a new instance of the target's class (model 0 by default) whose ``state_dict`` loads into a fresh
instance of it.
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
from .groups.spec import PermutationSpec
from .methods import passes_for, with_data
from .pairing import pair_specs, width_table
from .passes.base import FusionReport, FusionState, Pass, Pipeline
from .passes.merge import MergeWeights, VerifyFused
from .permute import with_metadata
from .trace import as_input_tuple, kv_cache_note, model_device, nonfinite_key

Align = Any  # a registered align config (WeightMatching(), ActivationMatching(), ...) or None
RepairConfig = Any  # a registered repair config (ResetBatchNorm(), Repair(), ...) or None


class DiscoverGroups(Pass):
    """Find the permutation groups.  Models with the target's shapes share the target's spec
    (found once); models of other widths get their own spec, paired with the target's by
    structure (:func:`fxfuse.pairing.pair_specs`: a structural difference is an
    ArchitectureMismatchError naming the place)."""

    name = "discover"

    def call(self, state: FusionState) -> None:
        target = state.target_model
        shapes = [shape_signature(m) for m in state.models]
        target_shape = shape_signature(target)
        found: dict[tuple[Any, ...], PermutationSpec] = {}

        def spec_for(model: nn.Module, sig: tuple[Any, ...]) -> PermutationSpec:
            if sig not in found:
                found[sig] = find_groups(model, state.example_inputs)
            return found[sig]

        first = next((m for m, sig in zip(state.models, shapes) if sig == target_shape), target)
        state.spec = spec_for(first, target_shape)
        if any(sig != target_shape for sig in shapes):
            state.specs = [spec_for(m, sig) for m, sig in zip(state.models, shapes)]
            pair_specs(state.spec, state.specs)
            table = width_table(state.spec, state.specs)
            state.report.notes.append(f"discover: widths differ in {len(table)} groups "
                                      f"(models -> target): {'; '.join(table[:4])}"
                                      f"{' ...' if len(table) > 4 else ''}")
        state.report.notes.append(f"discover: {len(state.spec.groups)} groups, "
                                  f"{len(state.spec.cuts)} cuts")
        if state.spec.tracer == "torch.export" and (
                cache_note := kv_cache_note(state.models[0], state.example_inputs)):
            state.report.notes.append(cache_note)


def shape_signature(model: nn.Module) -> tuple[Any, ...]:
    """Every state-dict entry's name and shape: models with equal signatures share a spec."""
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def check_models(models: Sequence[nn.Module], same_shapes: bool = False) -> None:
    """Raise if the models can not be fused: fewer than two, different classes, different
    parameter names, non-finite weights, or (``same_shapes``) different shapes.  Shapes may
    otherwise differ: models of different widths are paired by their specs at discovery."""
    if isinstance(models, nn.Module) or len(models) < 2:
        raise InputError("fuse needs at least two models, e.g. fxfuse.fuse([model_a, model_b], x)")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InputError(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    for i, m in enumerate(models[1:], start=1):
        _check_same_layers(models[0], m, f"models[{i}]", "models[0]", same_shapes)
    for i, m in enumerate(models):
        bad = nonfinite_key(m.state_dict())
        if bad is not None:
            raise InputError(f"models[{i}] parameter {bad!r} has NaN or infinite values; "
                             f"fix or drop that checkpoint")


def _check_same_layers(ref: nn.Module, m: nn.Module, label: str, ref_label: str,
                       same_shapes: bool) -> None:
    if type(m) is not type(ref):
        raise ArchitectureMismatchError(
            f"{label} is a {type(m).__name__} but {ref_label} is a {type(ref).__name__}; fuse "
            f"needs one architecture (one class, at any widths)")
    ref_state, st = ref.state_dict(), m.state_dict()
    for key, t in ref_state.items():
        if key not in st:
            raise ArchitectureMismatchError(f"{label} has no parameter {key!r} ({ref_label} has)")
        if same_shapes and st[key].shape != t.shape:
            raise ArchitectureMismatchError(
                f"parameter {key!r}: {ref_label} has shape {tuple(t.shape)}, {label} has "
                f"{tuple(st[key].shape)}")
    extra = [k for k in st if k not in ref_state]
    if extra:
        raise ArchitectureMismatchError(f"{label} has parameter {extra[0]!r} that {ref_label} "
                                        f"does not")


def resolve_target(models: Sequence[nn.Module], target: int | nn.Module | None
                   ) -> tuple[nn.Module, int | None]:
    """The fused architecture and its index in ``models`` (None for a model of its own)."""
    if target is None:
        return models[0], 0
    if isinstance(target, nn.Module):
        for i, m in enumerate(models):
            if m is target:
                return m, i
        _check_same_layers(models[0], target, "target", "models[0]", False)
        return target, None
    if isinstance(target, bool) or not isinstance(target, int):
        raise InputError(f"target must be an index into models or a model of their class at the "
                         f"widths wanted, got {type(target).__name__}")
    if not -len(models) <= target < len(models):
        raise InputError(f"target={target} is out of range for {len(models)} models (0.."
                         f"{len(models) - 1})")
    return models[target], target % len(models)


def resolve_anchor(models: Sequence[nn.Module], target: nn.Module, target_index: int | None,
                   anchor: int | None) -> int | None:
    """The model whose units are the fused basis: ``anchor``, else the target if it is one of
    ``models``, else the first model with the target's widths (None if there is none)."""
    sig = shape_signature(target)
    if anchor is None:
        if target_index is not None:
            return target_index
        return next((i for i, m in enumerate(models) if shape_signature(m) == sig), None)
    if isinstance(anchor, bool) or not isinstance(anchor, int):
        raise InputError(f"anchor must be an index into models, got {type(anchor).__name__}")
    if not -len(models) <= anchor < len(models):
        raise InputError(f"anchor={anchor} is out of range for {len(models)} models (0.."
                         f"{len(models) - 1})")
    if shape_signature(models[anchor]) != sig:
        raise InputError(f"anchor={anchor}: models[{anchor}] does not have the target's widths; "
                         f"the anchor's units are the fused units, so pick a model with the "
                         f"target's widths (or leave anchor=None)")
    return anchor % len(models)


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
    target: int | nn.Module | None = None,
    anchor: int | None = None,
    depth: Any = None,
) -> nn.Module:
    """Fuse ``models`` (one architecture, at any widths) into one model of the same class.

    ``align``: :class:`WeightMatching` (default), :class:`ActivationMatching` or None (naive
    averaging).  ``repair``: :class:`ResetBatchNorm`, :class:`Repair` or None.  ``weights``:
    interpolation weights (default uniform).  ``device``: where to compute (default: where model 0
    is).  ``progress=False`` silences progress bars.  Pass a :class:`FusionReport` as ``report`` to
    get per-pass timings and notes; pass ``passes`` to run your own pipeline instead of the
    default one (see :func:`default_passes`).  ``data``: batches (``x`` or ``(x, y)``) for the
    methods that need data, given beside their configs (``ActivationMatching()``, ``Repair()``;
    a config's own ``data=`` wins).  Methods are dispatched through :mod:`fxfuse.methods`, so a
    config registered with :func:`fxfuse.register_method` is accepted too.

    **Different widths.**  ``target``: an index into ``models`` (default 0) or a model of their
    class at the widths wanted; it fixes only the fused model's class and shapes (its weights are
    not used) and the result is a new instance of it.  ``anchor``: the model whose units are the
    fused basis (default: the target if it is one of the models, else the first model with the
    target's widths).  Models of other widths are paired with the target by structure
    (:mod:`fxfuse.pairing`) and need a method that maps ``n`` units onto ``m``
    (:class:`OptimalTransport`); weight and activation matching raise a typed error saying so.
    ``weights=[0, 1]`` gives model 1 re-expressed at the target's widths: exactly its function
    where its maps are hard copies (the target a whole multiple wider) and no normalisation
    depends on the width.

    **Different depths** (:mod:`fxfuse.depth`).  When models of one class have different
    parameter names (more blocks or layers), or ``depth=`` (a
    :class:`~fxfuse.depth.DepthAlignment`, also for different classes) is given, every
    model is first re-expressed at the target's depth: shallower ones expanded with exact
    identity blocks, deeper ones collapsed onto the target's blocks by fitting on ``data``
    (refused without it); the report's notes list every insertion and collapse.  ``weights=[0,
    1]`` then gives model 1 at the target's depth, computing its function exactly.
    """
    models, report = _at_target_depth(models, example_inputs, target, depth, data, report)
    check_models(models)
    target_model, target_index = resolve_target(models, target)
    anchor_index = resolve_anchor(models, target_model, target_index, anchor)
    inputs = as_input_tuple(example_inputs)
    dev = torch.device(device) if device is not None else model_device(models[0])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' was asked for but CUDA is not available")
    state = FusionState(
        models=list(models), example_inputs=inputs,
        weights=interpolation_weights(weights, len(models)), device=dev, progress=progress,
        report=report if report is not None else FusionReport(), target=target_model,
        anchor=anchor_index,
    )
    state.states = [with_metadata({k: v.detach().to(dev).clone() for k, v in sd.items()}, sd)
                    for sd in (m.state_dict() for m in models)]  # module versions kept
    Pipeline(passes if passes is not None else default_passes(align, repair, data)).run(state)
    assert state.fused is not None
    return state.fused


# -- heterogeneous depth (issue 18): models re-expressed at the target's depth first -----------
def _at_target_depth(models: Sequence[nn.Module], example_inputs: Any,
                     target: int | nn.Module | None, depth: Any, data: Any,
                     report: FusionReport | None) -> tuple[Sequence[nn.Module], FusionReport]:
    """``models`` as given, or (parameter names differ, or ``depth`` given) at the target's depth
    by :func:`fxfuse.depth.align_depth`, its notes added to the report."""
    report = report if report is not None else FusionReport()
    if isinstance(models, nn.Module) or len(models) < 2 or not all(
            isinstance(m, nn.Module) for m in models):
        return models, report  # check_models says what is wrong
    from .depth import needs_depth_alignment

    group = [*models, *([target] if isinstance(target, nn.Module) else [])]
    if depth is None and not needs_depth_alignment(group):
        return models, report
    import dataclasses

    from .depth import DepthAlignment, align_depth

    config = depth if depth is not None else DepthAlignment()
    if not isinstance(config, DepthAlignment):
        raise InputError(f"depth must be a fxfuse.DepthAlignment(...) or None, got "
                         f"{type(config).__name__}")
    if config.data is None and data is not None:
        config = dataclasses.replace(config, data=data)
    out, depth_report = align_depth(models, example_inputs,
                                    target=0 if target is None else target, config=config)
    report.notes.extend(depth_report.notes())
    return out, report
