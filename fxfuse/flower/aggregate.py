"""One federated aggregation step on state dicts, through the functional core (no Flower here).

Clients ``k = 1..K`` return states ``theta_k`` and example counts ``n_k``.  Each reply is first
checked against the server's architecture (the state of a model its factory builds): same keys,
same shapes, finite values, a positive example count; a client that fails is *rejected by name*
with its reason and the round goes on without it.  With ``w_k = n_k / sum_j n_j`` over the
clients kept, the global state is

    theta = sum_k w_k * A_k(theta_k)

with ``A_k`` client ``k``'s alignment maps (:func:`fxfuse.core.align_states`, applied by
:func:`fxfuse.core.merge_states`), found one of two ways:

* ``"joint"`` -- all clients aligned together into client 0's basis, exactly as
  :func:`fxfuse.fuse` does with the same states in the same order (weight matching: every client
  matched to client 0, then MergeMany rounds).  The one-shot setting: clients trained from their
  own initialisations share no basis but the one alignment gives them.  Holds all K states.
* ``"to-global"`` -- every client aligned on its own to the global model it started from
  (``[global, theta_k]``, two models per alignment: time linear in K), its weighted contribution
  added to a running sum, and the state dropped: about two models' memory beyond the replies
  (the running sum and the current client's aligned copy).  The multi-round setting
  (align-then-average every round, as FedMA's and GAMF's federated variants do).  A client
  whose alignment fails is rejected, not the round.

Integer buffers (``num_batches_tracked``) take the first kept client's value, as in
:func:`fxfuse.core.merge_states`.  An optional repair (ResetBatchNorm, REPAIR) then runs on the
server's calibration data through :func:`fxfuse.core.repair_states`; REPAIR needs every kept
client's state and maps, so with a repair the ``"to-global"`` path keeps them too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import align_states, merge_states, repair_states
from ..errors import FxFuseError, listing, quote_error
from ..groups.spec import PermutationSpec
from ..maps import GroupMap
from ..methods import method_of
from ..pairing import resized
from ..trace import nonfinite_key

__all__ = ["ALIGNMENTS", "Aggregation", "ClientUpdate", "FederatedRoundError", "Rejection",
           "aggregate_updates", "check_update"]

State = dict[str, torch.Tensor]
ALIGNMENTS = ("joint", "to-global")


class FederatedRoundError(FxFuseError):
    """No client of a round could be aggregated (each one's reason is in the message); the
    previous global model is kept."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its ``name`` (in logs and rejections), its ``state`` (a state dict,
    or a function returning one, called once when the client's turn comes: a Flower reply is
    converted to tensors only then) and ``num_examples`` (None: the client sent none)."""

    name: str
    state: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] = field(repr=False)
    num_examples: float | None


@dataclass(frozen=True)
class Rejection:
    """A client left out of a round, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class Aggregation:
    """The outcome of one aggregation: the global ``state``, the clients ``used`` (in order)
    with their normalised ``weights``, the ``rejected`` ones, the ``alignment`` used, its wall
    time in ``seconds``, and (``keep_average=True``) ``average``: the plain weighted average of
    the same clients (FedAvg's result on the same replies, for comparison)."""

    state: State
    used: list[str]
    weights: list[float]
    rejected: list[Rejection]
    alignment: str
    seconds: float
    average: State | None = None


def check_update(update: ClientUpdate, reference: Mapping[str, torch.Tensor],
                 spec: PermutationSpec | None = None) -> tuple[State | None, str | None]:
    """``(state, None)`` if the update fits the server's architecture (``reference``: a state dict
    of it), its floating tensors cast to the reference's dtypes; else ``(None, reason)``.  With
    ``spec`` (the server model's), a state of other widths fits too when its widths can be read
    off the spec (:func:`fxfuse.pairing.resized`: same layers, other group sizes)."""
    n = update.num_examples
    if n is None:
        return None, "sent no example count (a 'num-examples' metric); it can not be weighted"
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return None, f"sent example count {n!r}; it must be a positive number"
    try:
        raw = update.state() if callable(update.state) else update.state
        state = {str(k): v for k, v in raw.items()}
    except Exception as exc:  # a reply that can not be read as tensors, of any kind
        return None, f"sent arrays that can not be read as tensors ({quote_error(exc)})"
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        what = (f"lacks {listing(missing)}" if missing else "") + \
               (" and " if missing and extra else "") + (f"has extra {listing(extra)}" if extra
                                                        else "")
        return None, (f"does not fit the server's architecture: its state {what}; the clients "
                      "must train the model the server's factory builds")
    out: State = {}
    for key, ref in reference.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            return None, f"sent {key!r} as a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(ref.shape) and spec is None:
            return None, (f"does not fit the server's architecture: {key!r} has shape "
                          f"{tuple(t.shape)}, the server's model {tuple(ref.shape)} (clients of "
                          "other widths are fused with align=OptimalTransport() or GraphMatching() "
                          "and no repair)")
        if t.is_floating_point() != ref.is_floating_point():
            return None, f"sent {key!r} as {t.dtype}, the server's model holds {ref.dtype}"
        out[key] = t.to(ref.dtype) if t.dtype != ref.dtype else t
    if spec is not None and any(out[k].shape != ref.shape for k, ref in reference.items()):
        try:
            resized(spec, out, "its state")
        except FxFuseError as exc:
            return None, f"does not fit the server's architecture at any widths: {exc}"
    bad = nonfinite_key(out)
    if bad is not None:
        return None, f"sent {bad!r} with NaN or infinite values"
    return out, None


#: Align methods that map ``n`` units onto ``m`` (recipe names): only these take clients whose
#: widths differ from the server model's (fused into the server model's widths).
WIDTH_CHANGING = {"ot", "graph"}


def _width_changing(align: Any) -> bool:
    return align is not None and method_of(align, "align").name in WIDTH_CHANGING


#: Align methods whose pass produces the fused weights itself (``state.fused``), which
#: :func:`fxfuse.core.align_states` does not return (merging their maps alone gives another
#: result than ``fxfuse.fuse``: measured up to 0.24 apart on a small MLP).  The aggregation runs
#: them through :func:`fxfuse.fuse` on models the factory builds, always jointly (every kept
#: client of the round at once), on the server's calibration data.
SELF_MERGING = {"neuron-interpolation": "neuron interpolation"}


def check_align(align: Any) -> None:
    """Raise InputError for an align config the aggregation can not run."""
    if align is None:
        return
    method_of(align, "align")  # registered (InputError naming the choices otherwise)


def _self_merging(align: Any) -> bool:
    return align is not None and method_of(align, "align").name in SELF_MERGING


def _needs_models(align: Any) -> bool:
    """Methods that run the models (they need data: activation matching) get the factory."""
    return align is not None and method_of(align, "align").needs_data


def aggregate_updates(
    updates: Sequence[ClientUpdate],
    *,
    spec: PermutationSpec,
    factory: Callable[[], nn.Module],
    reference: Mapping[str, torch.Tensor],
    align: Any,
    repair: Any = None,
    data: Any = None,
    example_inputs: Any = None,
    alignment: str = "joint",
    anchor: Mapping[str, torch.Tensor] | None = None,
    keep_average: bool = False,
    device: str | torch.device = "cpu",
    rejected: Sequence[Rejection] = (),
    on_reject: Callable[[Rejection], None] | None = None,
) -> Aggregation:
    """Check, align, merge (and repair) the clients' states (module doc).

    ``spec``: the server model's permutation spec (:func:`fxfuse.find_groups`); ``factory``:
    builds a fresh server model (for methods that run models, and repair); ``reference``: its
    state dict (the architecture replies must fit); ``align`` / ``repair``: registered configs
    or None (``align=None``: plain weighted averaging, FedAvg); ``data``: the server's
    calibration batches for the methods that need data; ``alignment``: ``"joint"`` or
    ``"to-global"`` (then ``anchor`` is the global state the clients started from).
    ``rejected``: clients already refused (error replies), reported with the others;
    ``on_reject`` is called for every client rejected here as it is found.  Raises
    :class:`FederatedRoundError` when no client is usable.
    """
    check_align(align)
    if alignment not in ALIGNMENTS:
        raise FederatedRoundError(f"alignment must be one of {list(ALIGNMENTS)}, got "
                                  f"{alignment!r}")
    if alignment == "to-global" and anchor is None:
        raise FederatedRoundError("alignment='to-global' needs the global state the clients "
                                  "started from (anchor=...)")
    t0 = time.perf_counter()
    refused: list[Rejection] = list(rejected)

    def reject(name: str, reason: str) -> None:
        r = Rejection(name, reason)
        refused.append(r)
        if on_reject is not None:
            on_reject(r)

    models_factory = factory if _needs_models(align) else None
    run_kw: dict[str, Any] = dict(data=data, factory=models_factory, example_inputs=example_inputs,
                                  device=device, progress=False)
    names: list[str] = []
    counts: list[float] = []
    states: list[State] = []
    maps: list[dict[str, GroupMap]] | None = None
    total: State | None = None
    plain: State | None = None
    if _self_merging(align):
        alignment = "joint"  # they fuse every client at once (SELF_MERGING)
    keep_states = alignment == "joint" or repair is not None
    if alignment == "to-global":
        assert anchor is not None
        anchor_state = {k: v.detach().to(reference[k].dtype) for k, v in anchor.items()}
        maps = [] if align is not None else None
    specs: list[PermutationSpec] = []
    other_widths = _width_changing(align) and repair is None
    for u in updates:
        state, reason = check_update(u, reference, spec if other_widths else None)
        if state is None:
            reject(u.name, str(reason))
            continue
        n = float(u.num_examples)  # type: ignore[arg-type]  # checked above
        own = spec if all(state[k].shape == r.shape for k, r in reference.items()) else resized(
            spec, state, u.name)
        if alignment == "to-global":
            m_k: dict[str, GroupMap] | None = None
            if align is not None:
                try:
                    m_k = align_states([spec, own], [anchor_state, state], align, **run_kw)[1]
                except FxFuseError as exc:
                    reject(u.name, f"could not be aligned to the global model "
                                   f"({quote_error(exc)})")
                    continue
            part = merge_states([own], [state], None if m_k is None else [m_k], [n])
            total = part if total is None else _add(total, part)
            if keep_states:
                states.append(state)
                if maps is not None and m_k is not None:
                    maps.append(m_k)
        else:
            states.append(state)
        if keep_average and own is spec:  # the plain average: clients at the server's widths
            part = merge_states(None, [state], None, [n])
            plain = part if plain is None else _add(plain, part)
        names.append(u.name)
        counts.append(n)
        specs.append(own)
        del state
    if not names:
        raise FederatedRoundError(
            f"no client of this round could be aggregated ({len(refused)} rejected: "
            + "; ".join(str(r) for r in refused) + "); the previous global model is kept. Fix "
            "the clients (their arrays must fit the server's model, be finite and come with a "
            "'num-examples' metric) and run the round again")
    weights = [c / sum(counts) for c in counts]
    if _self_merging(align):
        if example_inputs is None:
            raise FederatedRoundError(f"{SELF_MERGING[method_of(align, 'align').name]} runs the "
                                      "models: give the server's example inputs")
        from ..core import _models_from
        from ..fuse import fuse

        fused = fuse(_models_from(factory, states), example_inputs, align=align, repair=repair,
                     weights=weights, data=data, device=device, progress=False)
        merged = {k: v.detach().clone() for k, v in fused.state_dict().items()}
        maps, repair = None, None  # the repair ran inside fuse
    elif alignment == "joint":
        at_server = [k for k, sp in enumerate(specs) if sp is spec]
        if not at_server:
            raise FederatedRoundError(
                "no client of this round has the server model's widths, and the fused units are "
                "an anchor client's: include at least one client at the server's widths")
        if align is not None and len(states) > 1:
            maps = align_states(specs, states, align, anchor=at_server[0], **run_kw)
        else:
            maps = None
        merged = merge_states(specs, states, maps, weights)
    else:
        assert total is not None
        merged = _scaled(total, 1.0 / sum(counts))
    if repair is not None:
        merged = repair_states(spec, states, maps or None, merged, repair, factory, data=data,
                               weights=weights, device=device, progress=False)
    bad = nonfinite_key(merged)
    if bad is not None:
        raise FederatedRoundError(f"the aggregated {bad!r} is not finite; the previous global "
                                  "model is kept")
    merged = {k: v.to(reference[k].dtype) for k, v in merged.items()}
    average = None if plain is None else {k: v.to(reference[k].dtype)
                                          for k, v in _scaled(plain, 1.0 / sum(counts)).items()}
    return Aggregation(merged, names, weights, refused, alignment, time.perf_counter() - t0,
                       average)


def _add(total: State, part: State) -> State:
    """``total + part`` for floating tensors (in place); integer buffers keep ``total``'s."""
    for k, v in part.items():
        if v.is_floating_point() or v.is_complex():
            total[k].add_(v)
    return total


def _scaled(total: State, factor: float) -> State:
    return {k: v * factor if v.is_floating_point() or v.is_complex() else v
            for k, v in total.items()}
