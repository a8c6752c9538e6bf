"""Apply group permutations to a model, and check that doing so leaves its function unchanged.

``permute`` maps every parameter/buffer axis through its index permutation
(``W' = W.index_select(axis, axis_index(layout, perms))``) in a deep copy of the model: if a hidden
activation ``h`` becomes ``h[p]``, the layer producing it gets rows ``W[p]`` and the layer reading
it columns ``W[:, p]``, so ``W'_2 h' = W_2 h`` and the outputs are unchanged.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import InputError, VerificationError
from .groups.spec import PermutationSpec, axis_index, check_perms
from .trace import as_input_tuple, eval_mode, nonfinite_key


def with_metadata(state: dict[str, torch.Tensor], source: Mapping[str, Any] | nn.Module
                  ) -> dict[str, torch.Tensor]:
    """``state`` carrying ``source``'s state-dict metadata (``_metadata``: each module's
    ``version``, which ``state_dict()`` attaches and ``_load_from_state_dict`` reads; BatchNorm
    and third-party modules upgrade or refuse old layouts by it).  ``source``: a state dict, or a
    model (its own ``state_dict()``'s).  A plain ``dict`` cannot hold the attribute, so the
    result is an ``OrderedDict`` like torch's; without metadata at ``source``, ``state`` as is."""
    meta = getattr(source.state_dict() if isinstance(source, nn.Module) else source,
                   "_metadata", None)
    if meta is None:
        return state
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
    return out


def apply_perms(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with every axis of ``spec`` permuted by ``perms`` (checked LongTensors); the
    tensors that no group touches are shared, not copied; ``state``'s metadata is kept."""
    sizes = {g.name: g.size for g in spec.groups}
    out = with_metadata(dict(state), state)
    for (key, axis), a in spec.axes.items():
        if not a.groups or not any(g in perms for g in a.groups):
            continue
        t = out[key]
        out[key] = t.index_select(axis, axis_index(a.layout, perms, sizes, t.device))
    return out


def permuted_state_dict(
    model: nn.Module, spec: PermutationSpec, perms: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The model's state_dict with every axis of ``spec`` permuted by ``perms`` (new tensors)."""
    checked = check_perms(spec, perms)
    state = model.state_dict()
    spec.lint({k: tuple(v.shape) for k, v in state.items()})
    return apply_perms(state, spec, checked)


def permute(model: nn.Module, spec: PermutationSpec, perms: Mapping[str, Any]) -> nn.Module:
    """A new model of the same class with ``perms`` applied; ``model`` is left untouched."""
    state = permuted_state_dict(model, spec, perms)
    new = copy.deepcopy(model)
    new.load_state_dict(state)
    return new


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: largest relative output difference over all outputs."""

    max_rel_diff: float
    n_groups: int
    tolerance: float


def _run(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with eval_mode(model):
        out = model(*inputs)
    leaves, _ = tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def rel_diff(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """``max |ref - got| / max |ref|`` over all outputs (infinite on a shape mismatch)."""
    if len(ref) != len(got):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            return float("inf")
        a64, b64 = a.detach().double(), b.detach().double()
        scale = max(a64.abs().max().item() if a64.numel() else 0.0, 1e-12)
        diff = (a64 - b64).abs().max().item() if a64.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale)
    return worst


def verify(
    model: nn.Module, spec: PermutationSpec, example_inputs: Any, *, seed: int = 0,
    tolerance: float = 1e-4,
) -> VerifyResult:
    """Permute every group at random (never the identity) and check the outputs do not change.

    Raises :class:`VerificationError` naming the groups that break the function (each group is
    then tried alone) if the relative output difference exceeds ``tolerance``, and
    :class:`InputError` naming the parameter if one is not finite.
    """
    inputs = as_input_tuple(example_inputs)
    if not spec.groups:
        return VerifyResult(0.0, 0, tolerance)
    key = nonfinite_key(model.state_dict())  # NaN outputs would look like a broken rule
    if key is not None:
        raise InputError(f"parameter {key!r} of {type(model).__name__} has NaN or infinite "
                         "values; verify compares outputs, which needs finite weights")
    try:
        ref = _run(model, inputs)
    except Exception as exc:
        raise InputError(f"the model does not run on example_inputs: {exc}") from exc
    perms = spec.random_perms(seed)
    diff = rel_diff(ref, _run(permute(model, spec, perms), inputs))
    if diff <= tolerance:
        return VerifyResult(diff, len(spec.groups), tolerance)
    bad = []
    for g in spec.groups:
        d = rel_diff(ref, _run(permute(model, spec, {g.name: perms[g.name]}), inputs))
        if d > tolerance:
            bad.append(f"{g.name} (size {g.size}, rel diff {d:.3g}; members: "
                       f"{', '.join(str(m) for m in g.members[:6])}"
                       f"{', ...' if len(g.members) > 6 else ''})")
    detail = "\n  ".join(bad) if bad else "no single group; only their combination"
    raise VerificationError(
        f"permuting the groups changed the outputs of {type(model).__name__} (relative max "
        f"difference {diff:.3g} > {tolerance:g}). Groups that break it:\n  {detail}\nThis is a bug "
        f"in an axis rule: report it, or cut the op with a rule of your own (fxfuse.axis_rule)."
    )
