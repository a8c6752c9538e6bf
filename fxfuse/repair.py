"""Repair the statistics of a fused model (REPAIR, Jordan et al. 2023).

Averaging aligned networks shrinks the variance of hidden units ("variance collapse").

* **ResetBatchNorm**: recompute every BatchNorm's running mean/variance on data (cumulative
  average over the batches, ``momentum=None``), so each BatchNorm normalises the fused network's
  own activations.
* **Repair**: for every hidden Linear/Conv layer ``y = W x + b`` (not producing a model output),
  make each output channel's mean and standard deviation on data equal the interpolation of the
  endpoints' (aligned) statistics, ``mu_t = sum_k w_k mu_k``, ``sigma_t = sum_k w_k sigma_k``, and
  fold the correction into the layer:

      W' = W * sigma_t / sigma_f,      b' = (b - mu_f) * sigma_t / sigma_f + mu_t

  with ``mu_f, sigma_f`` the fused layer's statistics measured after the earlier layers were
  repaired (layers are repaired in the order they run, one data pass each).  A layer that feeds a
  BatchNorm directly gets that BatchNorm reset instead (the BatchNorm renormalises it anyway), so
  nets with BatchNorm, LayerNorm or no norm are all covered; the architecture never changes.  A
  layer without a bias can not take the shift and is reported, not repaired.

  The endpoints' statistics are measured on each endpoint as it is and taken into the fused
  basis through its maps' merge ``M`` (:mod:`fxfuse.maps`): ``mu_k -> M mu_k``, ``sigma_k ->
  M sigma_k`` (a permutation permutes them; for models of other widths a fused unit's target is
  the average of the endpoint units it merges, copies get their unit's statistics).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PipelineError, TraceError
from .maps import OUT, GroupMap, map_groups
from .methods import register_method
from .pairing import sizes_of
from .passes.base import FusionState, Pass, batch_inputs, limited, progress
from .trace import eval_mode, symbolic_trace

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ResetBatchNorm:
    """Config: recompute BatchNorm statistics on ``data``."""

    data: Iterable[Any] = field(repr=False, default=(), metadata={"data": True})
    max_batches: int | None = None


@dataclass(frozen=True)
class Repair:
    """Config: REPAIR on ``data`` (see module doc)."""

    data: Iterable[Any] = field(repr=False, default=(), metadata={"data": True})
    max_batches: int | None = None
    eps: float = 1e-5


def _run(model: nn.Module, data: list[Any], device: torch.device, label: str, show: bool) -> None:
    for batch in progress(data, label, show):
        model(*batch_inputs(batch, device))


def reset_batchnorm(model: nn.Module, data: list[Any], device: torch.device,
                    only: list[nn.Module] | None = None, show: bool = False) -> int:
    """Recompute the running statistics of ``model``'s BatchNorms (or of ``only``) on ``data``.
    Everything else runs in eval mode; returns the number of BatchNorms reset."""
    bns = only if only is not None else [m for m in model.modules() if isinstance(m, BATCHNORMS)]
    bns = [m for m in bns if isinstance(m, BATCHNORMS) and m.track_running_stats]
    if not bns:
        return 0
    with eval_mode(model):
        saved = [(m, m.momentum) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            _run(model, data, device, "batchnorm statistics", show)
        finally:
            for m, momentum in saved:
                m.momentum = momentum
                m.eval()
    return len(bns)


def _channel_axis(layer: nn.Module, y: torch.Tensor) -> int:
    return y.ndim - 1 if isinstance(layer, nn.Linear) else (1 if y.ndim > 1 else 0)


class _Stats:
    """Per-channel running mean and variance of a module's outputs (a forward hook)."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        ax = _channel_axis(module, out)
        y = out.detach().movedim(ax, 0).reshape(out.shape[ax], -1).double()
        self.n += y.shape[1]
        self.s = y.sum(1) if self.s is None else self.s + y.sum(1)
        self.ss = (y * y).sum(1) if self.ss is None else self.ss + (y * y).sum(1)

    def mean_std(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.s is not None and self.ss is not None
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean**2).clamp_min(0).add(eps).sqrt()


def _measure(model: nn.Module, names: list[str], data: list[Any], device: torch.device,
             eps: float, label: str, show: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    hooks, stats = [], {}
    for name in names:
        stats[name] = _Stats()
        hooks.append(model.get_submodule(name).register_forward_hook(stats[name]))
    try:
        with eval_mode(model):
            _run(model, data, device, label, show)
    finally:
        for h in hooks:
            h.remove()
    return {n: s.mean_std(eps) for n, s in stats.items()}


def repair_points(model: nn.Module, state: FusionState) -> list[tuple[str, str]]:
    """``(kind, module name)`` in execution order: ``("bn", name)`` for BatchNorms,
    ``("fold", name)`` for hidden Linear/Conv layers not followed by a BatchNorm."""
    assert state.spec is not None
    try:
        gm = symbolic_trace(model, stack_traces=False)
    except TraceError:  # not symbolically traceable (torch.export models): registration order
        points = []
        for name, mod in model.named_modules():
            if isinstance(mod, BATCHNORMS):
                points.append(("bn", name))
            elif isinstance(mod, LAYERS) and state.spec.groups_of(f"{name}.weight", 0):
                points.append(("fold", name))
        state.report.notes.append("repair: model not symbolically traceable; layers repaired in "
                                  "registration order, and a layer feeding a BatchNorm is folded "
                                  "too")
        return points
    points = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        mod = gm.get_submodule(str(node.target))
        name = str(node.target)
        if isinstance(mod, BATCHNORMS):
            points.append(("bn", name))
        elif isinstance(mod, LAYERS):
            users = list(node.users)
            feeds_bn = len(users) == 1 and users[0].op == "call_module" and isinstance(
                gm.get_submodule(str(users[0].target)), BATCHNORMS)
            if not feeds_bn and state.spec.groups_of(f"{name}.weight", 0):
                points.append(("fold", name))
        else:
            continue
        seen.add(name)
    return points


def _fold(layer: nn.Module, mean_f: torch.Tensor, std_f: torch.Tensor, mean_t: torch.Tensor,
          std_t: torch.Tensor) -> None:
    """``W' = W * s``, ``b' = (b - mu_f) * s + mu_t`` with ``s = sigma_t / sigma_f`` per channel."""
    w, b = layer.weight, layer.bias
    assert isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
    scale = (std_t / std_f).to(w.dtype)
    with torch.no_grad():
        w.mul_(scale.reshape(-1, *([1] * (w.ndim - 1))))
        b.copy_((b - mean_f.to(b.dtype)) * scale + mean_t.to(b.dtype))


def _to_fused(stat: torch.Tensor, state: FusionState, k: int, key: str,
              maps: dict[str, GroupMap]) -> torch.Tensor:
    """A per-channel statistic of model ``k``'s layer ``key`` in the fused basis: mapped by the
    merges of the groups on the layer's output axis (``M stat``)."""
    spec = state.spec_of(k)
    axis = spec.axes.get((key, 0))
    if axis is None or not axis.groups:
        return stat
    return map_groups(stat, 0, axis.layout, {g: maps[g] for g in axis.groups if g in maps},
                      sizes_of(spec), OUT)


class ResetBatchNormStats(Pass):
    name = "reset-batchnorm"

    def __init__(self, config: ResetBatchNorm) -> None:
        self.config = config

    def requires(self, state: FusionState) -> None:
        if state.fused is None:
            raise PipelineError("reset-batchnorm needs a fused model (run merge first)")

    def call(self, state: FusionState) -> None:
        assert state.fused is not None
        data = limited(self.config.data, self.config.max_batches)
        n = reset_batchnorm(state.fused, data, state.device, show=state.progress)
        state.report.notes.append(f"reset-batchnorm: {n} BatchNorm layers recomputed on "
                                  f"{len(data)} batches")
        if n == 0:
            state.report.notes.append("reset-batchnorm: the model has no BatchNorm; nothing "
                                      "changed (use Repair for nets without BatchNorm)")


class RepairStatistics(Pass):
    name = "repair"

    def __init__(self, config: Repair) -> None:
        self.config = config

    def requires(self, state: FusionState) -> None:
        if state.fused is None or state.spec is None:
            raise PipelineError("repair needs a fused model and the discovered groups")

    def call(self, state: FusionState) -> None:
        assert state.fused is not None and state.spec is not None
        cfg = self.config
        data = limited(cfg.data, cfg.max_batches)
        fused = state.fused
        points = repair_points(fused, state)
        folds = [name for kind, name in points if kind == "fold"]
        skipped = [n for n in folds if getattr(fused.get_submodule(n), "bias", None) is None]
        folds = [n for n in folds if n not in skipped]
        # endpoint statistics, each measured on the endpoint as it is, then mapped into the
        # fused basis through its merge M (a permutation: permuted; other widths: M mu, M sigma)
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        maps = state.alignment()
        if folds:
            for k, (model, st) in enumerate(zip(state.models, state.states)):
                endpoint = copy.deepcopy(model).to(state.device)
                endpoint.load_state_dict(st)
                stats = _measure(endpoint, folds, data, state.device, cfg.eps,
                                 f"endpoint {k} statistics", state.progress)
                w = state.weights[k]
                for name, (m, s) in stats.items():
                    if maps is not None:
                        m, s = (_to_fused(v, state, k, f"{name}.weight", maps[k]) for v in (m, s))
                    tm, ts = targets.get(name, (0 * m, 0 * s))
                    targets[name] = (tm + w * m, ts + w * s)
        for kind, name in progress(points, "repair layers", state.progress):
            if kind == "bn":
                reset_batchnorm(fused, data, state.device, only=[fused.get_submodule(name)])
            elif name in targets:
                mean_f, std_f = _measure(fused, [name], data, state.device, cfg.eps, "", False)[name]
                _fold(fused.get_submodule(name), mean_f, std_f, *targets[name])
        state.report.notes.append(
            f"repair: {len(targets)} layers folded, "
            f"{sum(1 for k, _ in points if k == 'bn')} BatchNorms reset on {len(data)} batches")
        if skipped:
            state.report.notes.append(f"repair: layers without a bias not repaired: {skipped}")


register_method("reset-bn", "repair", ResetBatchNorm, lambda c: [ResetBatchNormStats(c)],
                "recompute every BatchNorm's running statistics")
register_method("repair", "repair", Repair, lambda c: [RepairStatistics(c)],
                "REPAIR: restore every layer's per-channel statistics")
