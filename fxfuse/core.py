"""The functional core: align, merge and re-apply fusions on state dicts.

A caller that holds only state dicts and a model factory (a federated server) uses these
directly; :func:`fxfuse.fuse` runs the same steps as passes.

* :func:`align_states`: ``(spec, states, config) -> maps``, with ``maps[k][group]`` the
  :class:`~fxfuse.maps.GroupMap` taking model ``k`` into the fused basis (identity for model 0);
* :func:`merge_states`: ``theta = sum_k w_k * A_k(theta_k)`` for every floating tensor, ``A_k``
  model ``k``'s maps applied by member role (:func:`fxfuse.maps.apply_maps`); integer buffers
  (``num_batches_tracked``) keep model 0's value;
* :func:`repair_states`: the merged state repaired (ResetBatchNorm, REPAIR) on data, the models
  built by a factory;
* :func:`save_fusion` / :func:`load_fusion`: a spec and its maps as one file (``.json``:
  permutations as index lists, dense maps as matrices; ``.pt``: the spec's JSON beside the maps'
  tensors), so a fusion can be re-applied to the same models with :func:`apply_fusion`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArchitectureMismatchError, InputError, SpecError, quote_error
from .groups.spec import PermutationSpec
from .maps import GroupMap, apply_maps, perm_maps, rebase
from .permute import with_metadata

State = dict[str, torch.Tensor]
Maps = dict[str, GroupMap]
FORMAT = "fxfuse.Fusion"
VERSION = 1


def align_states(
    spec: PermutationSpec | Sequence[PermutationSpec], states: Sequence[Mapping[str, torch.Tensor]],
    config: Any, *, data: Any = None,
    factory: Callable[[], nn.Module] | Sequence[Callable[[], nn.Module]] | None = None,
    example_inputs: Any = None, device: str | torch.device = "cpu", progress: bool = False,
    anchor: int = 0,
) -> list[Maps]:
    """Each state's maps into the basis of ``states[anchor]`` (default 0), by the registered
    align ``config``.  Methods that run the model (activation matching, OT's activation cost)
    need ``factory`` (a model of the architecture; the states are loaded into fresh instances)
    and ``data``.  Models of different widths: ``spec`` is one spec per state (each model's own,
    paired by structure, :mod:`fxfuse.pairing`), ``factory`` one per state too, and the maps go
    to ``states[anchor]``'s widths (a width-changing method such as ``OptimalTransport``)."""
    from .methods import passes_for, with_data
    from .pairing import pair_specs, same_widths
    from .passes.base import FusionState
    from .trace import as_input_tuple

    dev = torch.device(device)
    specs = [spec] * len(states) if isinstance(spec, PermutationSpec) else list(spec)
    if len(specs) != len(states):
        raise InputError(f"align_states: {len(specs)} specs for {len(states)} states")
    if not 0 <= anchor < len(states):
        raise InputError(f"align_states: anchor={anchor} is out of range for {len(states)} states")
    target = specs[anchor]
    per_model = None
    if any(not same_widths(s, target) for s in specs):
        pair_specs(target, specs, [f"states[{k}]" for k in range(len(specs))])
        per_model = specs
    factories = None if factory is None else (
        [factory] * len(states) if callable(factory) else list(factory))
    models = [] if factories is None else [
        _models_from(f, [s])[0] for f, s in zip(factories, states)]
    state = FusionState(models=models, example_inputs=as_input_tuple(example_inputs)
                        if example_inputs is not None else (), weights=[1.0 / len(states)] *
                        len(states), device=dev, progress=progress, spec=target, specs=per_model,
                        anchor=anchor,
                        states=[{k: v.detach().to(dev) for k, v in s.items()} for s in states])
    for p in passes_for(with_data(config, data), "align"):
        p.requires(state)
        p.call(state)
        p.ensures(state)
    if state.maps is None and state.perms is None:
        raise InputError(f"{type(config).__name__} produced no alignment")
    maps = state.maps if state.maps is not None else [perm_maps(p) for p in state.perms or []]
    return rebase(maps, anchor) if anchor != 0 else maps


def _models_from(factory: Callable[[], nn.Module], states: Sequence[Mapping[str, torch.Tensor]]
                 ) -> list[nn.Module]:
    """Fresh instances of the architecture, one per state."""
    models = []
    for s in states:
        m = factory()
        try:
            m.load_state_dict(with_metadata(dict(s), s))
        except RuntimeError as exc:  # torch's strict load: missing / unexpected keys, shapes
            raise ArchitectureMismatchError(
                f"a state does not load into the factory's model ({quote_error(exc, 300)}); "
                f"states of other widths need one factory per state") from exc
        models.append(m)
    return models


def merge_states(spec: PermutationSpec | Sequence[PermutationSpec] | None,
                 states: Sequence[Mapping[str, torch.Tensor]],
                 maps: Sequence[Mapping[str, GroupMap]] | None, weights: Sequence[float]
                 ) -> State:
    """The weighted average of the states, each taken into the fused basis by its maps first
    (module doc); ``maps=None`` averages the states as they are.  ``spec``: the spec the maps
    were found on, or one spec per state for models of different widths (each model's own,
    :mod:`fxfuse.pairing`; its maps are then ``(m, n)``: target units by its units)."""
    if maps is None:
        aligned = [dict(s) for s in states]
    elif spec is None:
        raise InputError("merge_states: maps need the spec they were found on")
    else:
        specs = [spec] * len(states) if isinstance(spec, PermutationSpec) else list(spec)
        if len(specs) != len(states):
            raise InputError(f"merge_states: {len(specs)} specs for {len(states)} states")
        aligned = [apply_maps(s, sp, m) for s, sp, m in zip(states, specs, maps)]
    for key, ref in aligned[0].items():
        for k, s in enumerate(aligned[1:], start=1):
            if key not in s or s[key].shape != ref.shape:
                raise InputError(
                    f"merge_states: {key!r} is {tuple(ref.shape)} in state 0 but "
                    f"{tuple(s[key].shape) if key in s else 'missing'} in state {k} after the "
                    f"maps: models of different widths need maps to the target's widths "
                    f"(align=fxfuse.OptimalTransport())")
    merged: State = with_metadata({}, states[0])  # module versions, as state_dict() has them
    for key, ref in aligned[0].items():
        if ref.is_floating_point() or ref.is_complex():
            merged[key] = torch.stack([w * s[key] for w, s in zip(weights, aligned)]).sum(0)
        else:
            merged[key] = ref.clone()
    return merged


def repair_states(
    spec: PermutationSpec | Sequence[PermutationSpec],
    states: Sequence[Mapping[str, torch.Tensor]],
    maps: Sequence[Mapping[str, GroupMap]] | None, merged: Mapping[str, torch.Tensor],
    config: Any, factory: Callable[[], nn.Module] | Sequence[Callable[[], nn.Module]], *,
    data: Any = None, weights: Sequence[float] | None = None, device: str | torch.device = "cpu",
    progress: bool = False,
) -> State:
    """The merged state repaired by the registered repair ``config`` (ResetBatchNorm, Repair, ...)
    on ``data``: the models run, so ``factory`` builds them (the endpoints from ``states``, the
    fused model from ``merged``); ``maps`` and ``weights`` are the ones the merge used (REPAIR's
    targets are the endpoints' statistics in the fused basis, interpolated by ``weights``).
    Models of different widths (as for :func:`merge_states`): ``spec`` is one spec per state
    and ``factory`` one per state; the fused model is built by the first factory whose state has
    the merged state's widths."""
    from .fuse import interpolation_weights
    from .methods import passes_for, with_data
    from .pairing import resized, same_widths
    from .passes.base import FusionState

    dev = torch.device(device)
    factories = [factory] * len(states) if callable(factory) else list(factory)
    specs = None if isinstance(spec, PermutationSpec) else list(spec)
    for what, n in (("factories", len(factories)),
                    ("specs", len(states) if specs is None else len(specs))):
        if n != len(states):
            raise InputError(f"repair_states: {n} {what} for {len(states)} states")
    models = [_models_from(f, [s])[0] for f, s in zip(factories, states)]
    target = spec if isinstance(spec, PermutationSpec) else resized(
        specs[0], merged, "the merged state")  # type: ignore[index]
    make = factories[0] if specs is None else next(
        (f for f, sp in zip(factories, specs) if same_widths(sp, target)), None)
    if make is None:
        raise InputError("repair_states: no state has the merged state's widths, so no factory "
                         "builds the fused model; give one factory per state, one of them at "
                         "the fused widths")
    fused = make().to(dev)
    fused.load_state_dict(with_metadata(dict(merged), merged))
    state = FusionState(models=models, example_inputs=(),
                        weights=interpolation_weights(weights, len(states)), device=dev,
                        progress=progress, spec=target, specs=specs, target=fused,
                        states=[{k: v.detach().to(dev) for k, v in s.items()} for s in states],
                        maps=None if maps is None else [dict(m) for m in maps], fused=fused)
    for p in passes_for(with_data(config, data), "repair"):
        p.requires(state)
        p.call(state)
        p.ensures(state)
    return {k: v.detach().clone() for k, v in fused.state_dict().items()}


@dataclass(frozen=True)
class FusionRecord:
    """What :func:`load_fusion` reads back: the spec (the fused model's), every model's maps
    (None: unaligned) and, for models of different widths, every model's own spec (else None)."""

    spec: PermutationSpec
    maps: list[Maps] | None
    specs: list[PermutationSpec] | None = None


def fusion_to_dict(spec: PermutationSpec, maps: Sequence[Mapping[str, GroupMap]] | None,
                   specs: Sequence[PermutationSpec] | None = None, *, tensors: bool = False
                   ) -> dict[str, Any]:
    """A fusion record as plain data: for JSON, or with ``tensors`` for ``torch.save`` (specs as
    JSON text, dense maps as tensors)."""
    def one(s: PermutationSpec) -> Any:
        return s.to_json(None) if tensors else s.to_dict()

    out: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "spec": one(spec),
        "maps": None if maps is None else [{g: m.to_dict(lists=not tensors)
                                            for g, m in mk.items()} for mk in maps]}
    if specs is not None:
        out["specs"] = [one(s) for s in specs]
    return out


def _check_record(maps: Sequence[Mapping[str, GroupMap]] | None,
                  specs: Sequence[PermutationSpec] | None, what: str) -> None:
    if specs is not None and maps is not None and len(specs) != len(maps):
        raise InputError(f"{what}: {len(specs)} specs for {len(maps)} models' maps; pass "
                         f"report.spec, report.maps, specs=report.specs of one fusion")


def save_fusion(path: str | Path, spec: PermutationSpec,
                maps: Sequence[Mapping[str, GroupMap]] | None,
                specs: Sequence[PermutationSpec] | None = None) -> Path:
    """Write ``spec`` and ``maps`` (e.g. ``report.spec, report.maps``) to ``path``, atomically (a
    half-written file never replaces an old one): ``.json`` (readable; dense maps as nested
    lists) or ``.pt`` (the spec as JSON text beside the maps' tensors, read back with
    ``torch.load(weights_only=True)``: for large dense maps).  Models of different widths:
    also ``specs=report.specs`` (each model's own spec; ``spec`` is then the fused model's)."""
    from .exporter import publish, staged_file

    target = Path(path)
    if target.suffix not in (".json", ".pt"):
        raise InputError(f"a fusion record is a .json or .pt file, got {target.name!r}")
    if not target.parent.is_dir():
        raise InputError(f"folder {str(target.parent)!r} does not exist; create it first")
    _check_record(maps, specs, "save_fusion")
    with staged_file(target) as staged:
        if target.suffix == ".json":
            staged.write_text(json.dumps(fusion_to_dict(spec, maps, specs)))
        else:
            torch.save(fusion_to_dict(spec, maps, specs, tensors=True), staged)
        publish(staged, target)
    return target


def _spec_from(d: Any) -> PermutationSpec:
    return PermutationSpec.from_json(d if isinstance(d, str) else json.dumps(d))


def load_fusion(path: str | Path) -> FusionRecord:
    """Read a file written by :func:`save_fusion` (SpecError if it is not one)."""
    p = Path(path)
    try:
        if p.suffix == ".pt":
            d = torch.load(p, weights_only=True)
        else:
            d = json.loads(p.read_text())
    except Exception as exc:  # unreadable, not JSON, not a torch file
        raise SpecError(f"can not read fusion record {str(path)!r}: {exc}") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise SpecError(f"{str(path)!r} is not an fxfuse fusion record of version {VERSION}")
    spec = _spec_from(d["spec"])
    try:
        maps = None if d["maps"] is None else [
            {g: GroupMap.from_dict(m) for g, m in mk.items()} for mk in d["maps"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"malformed maps in {str(path)!r}: {exc}") from exc
    try:
        specs = None if d.get("specs") is None else [_spec_from(s) for s in d["specs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"malformed per-model specs in {str(path)!r}: {exc}") from exc
    if specs is not None and maps is not None and len(specs) != len(maps):
        raise SpecError(f"{str(path)!r} holds {len(specs)} specs for {len(maps)} models' maps")
    return FusionRecord(spec, maps, specs)


def apply_fusion(models: Sequence[nn.Module], record: FusionRecord,
                 weights: Sequence[float] | None = None,
                 target: int | nn.Module | None = None) -> nn.Module:
    """Re-apply a recorded fusion to the same models (no search): a new model with the merged
    state (the inputs are untouched; no repair is re-run), of model 0's class, or for models of
    different widths (``record.specs``) a copy of ``target``: a model of the fused widths, or
    the index of one among ``models`` (default: the first model at the fused widths)."""
    from .fuse import check_models, interpolation_weights
    from .pairing import resized, same_widths, sizes_of

    n = len(record.specs) if record.specs is not None else (
        len(record.maps) if record.maps is not None else None)
    check_models(models, same_shapes=record.specs is None)
    if n is not None and n != len(models):
        raise InputError(f"the record holds maps for {n} models, got {len(models)}")
    w = interpolation_weights(weights, len(models))
    if record.specs is None:
        if target is not None:
            raise InputError("apply_fusion(target=...) is for records of models of different "
                             "widths; this record's models share one spec")
        merged = merge_states(record.spec, [m.state_dict() for m in models], record.maps, w)
        fused = copy.deepcopy(models[0])
        fused.load_state_dict(merged)
        return fused
    states = [m.state_dict() for m in models]
    for k, (spec, state) in enumerate(zip(record.specs, states)):
        found = resized(spec, state, f"models[{k}]")
        if not same_widths(found, spec):
            raise ArchitectureMismatchError(
                f"models[{k}] has group sizes {sizes_of(found)}, the record was made for "
                f"{sizes_of(spec)}: pass the models of the recorded fusion, in its order")
    merged = merge_states(record.specs, states, record.maps, w)
    if target is None:
        at = [k for k, spec in enumerate(record.specs) if same_widths(spec, record.spec)]
        if not at:
            raise InputError("no model is at the fused widths: pass target=, a model of the "
                             "fused architecture (e.g. the one given to fuse(target=...))")
        target = at[0]
    if isinstance(target, int):
        if not 0 <= target < len(models):
            raise InputError(f"target={target} is not an index into the {len(models)} models")
        target = models[target]
    if not isinstance(target, nn.Module):
        raise InputError(f"target is a {type(target).__name__}: pass a model or an index")
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if set(shapes) != set(merged):
        odd = sorted(set(shapes) ^ set(merged))[0]
        raise ArchitectureMismatchError(
            f"target {'has' if odd in shapes else 'lacks'} {odd!r}, which the fused model "
            f"{'lacks' if odd in shapes else 'has'}: target must be of the models' architecture")
    wrong = [k for k, v in merged.items() if shapes[k] != tuple(v.shape)]
    if wrong:
        raise ArchitectureMismatchError(
            f"target's {wrong[0]!r} is {shapes[wrong[0]]}, the fused model's is "
            f"{tuple(merged[wrong[0]].shape)}: target must be a model at the fused widths")
    fused = copy.deepcopy(target)
    fused.load_state_dict(merged)
    return fused
