"""``align_depth``: models of different depth -> the same models at the target's depth.

For each model whose parameters differ from the target's: find both block sequences
(:func:`~fxfuse.depth.blocks.block_sequence`), measure block similarity (CKA on ``data``, else
weight spectra), solve the monotone map (:func:`~fxfuse.depth.match.match_levels`; or take the
user's ``map``), then **expand** a shallower model with exact identity blocks, or **collapse** a
deeper one onto the target's blocks by fitting on data.  Every returned model is an instance of
the target's class with the target's parameter names and shapes, so the equal-depth core
(:func:`fxfuse.fuse`) aligns and merges them.  The inputs are never modified; models that already
have the target's parameters are returned as they are.

``fuse`` runs this when the models' parameters and block counts differ (or when ``depth=`` is
given)::

    models, report = align_depth([deep, shallow], x, target=0, config=DepthAlignment(data=dl))
    fused = fxfuse.fuse(models, x, align=fxfuse.WeightMatching())
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..trace import as_input_tuple
from .blocks import BlockSequence, block_sequence
from .errors import DepthError, NoExactIdentityError
from .expand import NEIGHBOURS, collapse, expand
from .identity import HINT, has_identity
from .match import match_levels
from .similarity import activation_similarity, weight_similarity

SIMILARITIES = ("auto", "cka", "weights")


@dataclass(frozen=True)
class DepthAlignment:
    """How models of different depth are put at the target's depth.

    ``data``: batches (``x`` or ``(x, y)``) for CKA similarity and for fitting collapsed blocks
    (filled from ``fuse(..., data=)``).  ``map``: per model, ``None`` or the level map: for the
    shallower of (model, target), the index of the deeper one's block matched to each of its
    blocks, e.g. ``((0, 1, 3, 4), None)`` (blocks as :func:`block_sequence` lists them).
    ``similarity``: ``"cka"`` (needs data), ``"weights"``, or ``"auto"`` (CKA with data).
    ``max_batches``: batches read from ``data``.  ``fit_steps`` / ``fit_lr``: Adam steps and
    rate per collapsed block.  ``tolerance``: relative output error an expansion may show (it is
    exact up to float rounding).  ``collapse_into``: where unmatched blocks of a deeper model go
    when collapsing: ``"previous"`` / ``"next"`` matched block, or ``"best"`` (both fitted, the
    lower loss on the data kept)."""

    data: Any = field(default=None, compare=False, repr=False, metadata={"data": True})
    map: tuple[tuple[int, ...] | None, ...] | None = None
    similarity: str = "auto"
    max_batches: int = 4
    fit_steps: int = 300
    fit_lr: float = 1e-3
    tolerance: float = 1e-5
    collapse_into: str = "best"

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise InputError(f"DepthAlignment(similarity={self.similarity!r}): expected one of "
                             f"{SIMILARITIES}")
        if self.max_batches < 1 or self.fit_steps < 0 or not self.fit_lr > 0 or \
                not self.tolerance >= 0:
            raise InputError("DepthAlignment: max_batches >= 1, fit_steps >= 0, fit_lr > 0 and "
                             "tolerance >= 0 are required")
        if self.collapse_into not in NEIGHBOURS:
            raise InputError(f"DepthAlignment(collapse_into={self.collapse_into!r}): expected one "
                             f"of {NEIGHBOURS}")
        if self.map is not None:
            object.__setattr__(self, "map", tuple(
                None if m is None else tuple(int(j) for j in m) for m in self.map))


@dataclass
class ModelDepth:
    """What happened to one model: ``action`` is ``"kept"``, ``"expanded"`` or ``"collapsed"``;
    ``map``: the shallower side's block -> the deeper side's block; ``similarity``: how the map
    was found (``"cka"``, ``"weights"``, ``"given"``); ``lines``: every insertion / collapse."""

    index: int
    action: str
    blocks: int
    target_blocks: int
    map: tuple[int, ...] = ()
    similarity: str = ""
    lines: list[str] = field(default_factory=list)


@dataclass
class DepthReport:
    target: int | None
    models: list[ModelDepth] = field(default_factory=list)

    def notes(self) -> list[str]:
        out = []
        for m in self.models:
            if m.action == "kept":
                continue
            out.append(f"depth: model {m.index} {m.action} from {m.blocks} to "
                       f"{m.target_blocks} blocks (map {list(m.map)}, {m.similarity})")
            out += [f"depth: model {m.index}: {line}" for line in m.lines]
        return out

    def __str__(self) -> str:
        return "\n".join(self.notes()) or "depth: every model already has the target's depth"


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def needs_depth_alignment(models: Sequence[nn.Module]) -> bool:
    """Whether ``fuse`` starts depth handling by itself: the models are of one class and their
    parameter names differ (more blocks or layers; different widths keep the names).  Models of
    different classes are fused at another depth only when asked (``depth=``)."""
    names = [list(m.state_dict()) for m in models]
    return all(type(m) is type(models[0]) for m in models) and any(n != names[0] for n in names)


def _inputs(data: Any, max_batches: int) -> list[torch.Tensor] | None:
    if data is None:
        return None
    from ..passes.base import batch_inputs, limited

    return [batch_inputs(b, torch.device("cpu"))[0] for b in limited(data, max_batches)]


def _stage_error(short: BlockSequence, deep: BlockSequence, k: int, allowed: torch.Tensor,
                 expanding: bool) -> DepthError:
    who = (f"model {k} ({type(short.model).__name__})" if expanding
           else f"the target ({type(short.model).__name__})")
    other = "the target" if expanding else f"model {k} ({type(deep.model).__name__})"
    j = 0
    for i, b in enumerate(short.blocks):  # earliest monotone pairing: where does it run out?
        nxt = next((jj for jj in range(j, len(deep)) if bool(allowed[i, jj])), None)
        if nxt is None:
            return DepthError(
                f"{who}: block {i} ({b.kind} {b.name!r}, stage {b.stage}: {b.shape_in} -> "
                f"{b.shape_out}) has no block of the same layers and shapes in {other} after "
                f"its block {j - 1}: the streams can not be put in correspondence at stage "
                f"{b.stage}, so {other} can not be "
                f"{'expanded from' if expanding else 'collapsed onto'} it; fuse models of one "
                f"width per stage (OptimalTransport aligns different widths), or give "
                f"DepthAlignment(map=...)")
        j = nxt + 1
    deep_shapes = [s[-1].shape_out for s in deep.stages()]
    for st in short.stages():
        if st[-1].shape_out not in deep_shapes:
            return DepthError(
                f"model {k} ({type(short.model).__name__}) vs {type(deep.model).__name__}: "
                f"stage {st[0].stage} (blocks {st[0].index}..{st[-1].index}, output "
                f"shape {st[-1].shape_out}) has no stage of that shape in the deeper model "
                f"(stages end in {deep_shapes}): the streams can not be put in correspondence; "
                f"fuse models of one width per stage (OptimalTransport aligns different widths), "
                f"or give DepthAlignment(map=...)")
    return DepthError(f"model {k}: no monotone map of its {len(short)} blocks onto the deeper "
                      f"model's {len(deep)} blocks pairs blocks of equal layers and shapes; "
                      f"give DepthAlignment(map=...) or fuse models of one layout per stage")


def _solve(short: BlockSequence, deep: BlockSequence, expanding: bool, config: DepthAlignment,
           batches: list[torch.Tensor] | None, given: tuple[int, ...] | None, k: int
           ) -> tuple[list[int], str]:
    m, n = len(short), len(deep)
    allowed = torch.tensor([[a.kind == b.kind and a.signature == b.signature for b in deep.blocks]
                            for a in short.blocks], dtype=torch.bool).reshape(m, n)
    reasons: list[str | None] = [None] * n
    if expanding:
        reasons = [has_identity(deep, b) for b in deep.blocks]
        free = torch.tensor([r is None for r in reasons], dtype=torch.bool)
    else:
        free = torch.ones(n, dtype=torch.bool)
    if given is not None:
        if len(given) != m or any(not 0 <= j < n for j in given) or any(
                b <= a for a, b in zip(given, given[1:])):
            raise InputError(f"DepthAlignment(map=...) for model {k}: expected {m} increasing "
                             f"block indices in 0..{n - 1}, got {list(given)}")
        for i, j in enumerate(given):
            if not bool(allowed[i, j]):
                raise DepthError(f"DepthAlignment(map=...) for model {k}: block {i} "
                                 f"({short.blocks[i].name!r}) and block {j} "
                                 f"({deep.blocks[j].name!r}) differ in layers or shapes")
        if expanding:
            for j in range(n):
                if j not in given and not bool(free[j]):
                    raise NoExactIdentityError(
                        f"DepthAlignment(map=...) for model {k} leaves the target's block {j} "
                        f"unmatched, so it must be an identity, and {reasons[j]}. {HINT}")
        return list(given), "given"
    use_cka = config.similarity == "cka" or (config.similarity == "auto" and batches)
    if use_cka:
        if not batches:
            raise InputError("DepthAlignment(similarity='cka') needs data: pass data= (batches "
                             "of inputs), or use similarity='weights'")
        sim, how = activation_similarity(short, deep, batches), "cka"
    else:
        sim, how = weight_similarity(short, deep), "weights"
    phi = match_levels(sim, allowed, free)
    if phi is None:
        relaxed = match_levels(sim, allowed, torch.ones(n, dtype=torch.bool))
        if relaxed is None:  # no pairing of equal blocks at all: the streams differ
            raise _stage_error(short, deep, k, allowed, expanding)
        missing = [j for j in range(n) if j not in relaxed and not bool(free[j])]
        raise NoExactIdentityError(
            f"model {k}: expanding its {m} blocks to the target's {n} needs block "
            f"{missing[0]} of the target inserted as an identity, and {reasons[missing[0]]}. "
            f"{HINT}")
    return phi, how


def align_depth(models: Sequence[nn.Module], example_inputs: Any,
                target: int | nn.Module = 0, config: DepthAlignment | None = None
                ) -> tuple[list[nn.Module], DepthReport]:
    """Every model re-expressed at ``target``'s depth (module doc).  ``target``: the index of a
    model, or a model (an instance of the architecture to produce: its weights fill only
    tensors an identity leaves alone).  Returns the models and a :class:`DepthReport`."""
    config = config if config is not None else DepthAlignment()
    if isinstance(models, nn.Module) or not models:
        raise InputError("align_depth needs a list of models")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InputError(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    if isinstance(target, nn.Module):
        template_model, t_index = target, next(
            (i for i, m in enumerate(models) if m is target), None)
    elif isinstance(target, int) and not isinstance(target, bool) and \
            -len(models) <= target < len(models):
        t_index = target % len(models)
        template_model = models[t_index]
    else:
        raise InputError(f"target must be a model index in 0..{len(models) - 1} or an "
                         f"nn.Module, got {target!r}")
    if config.map is not None and len(config.map) != len(models):
        raise InputError(f"DepthAlignment(map=...) needs one entry per model ({len(models)}), "
                         f"got {len(config.map)}")
    inputs = as_input_tuple(example_inputs)
    batches = _inputs(config.data, config.max_batches)
    report = DepthReport(t_index)
    t_sig = _signature(template_model)
    template: BlockSequence | None = None
    out: list[nn.Module] = []
    for k, model in enumerate(models):
        if _signature(model) == t_sig:
            out.append(model)
            report.models.append(ModelDepth(k, "kept", -1, -1))
            continue
        if template is None:
            template = block_sequence(copy.deepcopy(template_model), inputs)
        seq = block_sequence(copy.deepcopy(model), inputs)
        given = config.map[k] if config.map is not None else None
        if len(seq) < len(template):
            phi, how = _solve(seq, template, True, config, batches, given, k)
            new, lines = expand(seq, template, phi, inputs, config.tolerance)
            action = "expanded"
        elif len(seq) > len(template):
            phi, how = _solve(template, seq, False, config, batches, given, k)
            new, lines = collapse(seq, template, phi, batches, config.fit_steps, config.fit_lr,
                                  config.collapse_into)
            action = "collapsed"
        else:
            raise DepthError(f"model {k} has as many blocks ({len(seq)}) as the target but "
                             f"different parameters ({_first_difference(model, template_model)}): "
                             f"that is not a depth difference; different widths are aligned by "
                             f"OptimalTransport")
        out.append(new)
        report.models.append(ModelDepth(k, action, len(seq), len(template), tuple(phi), how,
                                        lines))
    return out, report


def _first_difference(a: nn.Module, b: nn.Module) -> str:
    sa, sb = a.state_dict(), b.state_dict()
    for key, t in sb.items():
        if key not in sa:
            return f"{key!r} missing"
        if sa[key].shape != t.shape:
            return f"{key!r} has shape {tuple(sa[key].shape)}, the target's {tuple(t.shape)}"
    extra = [key for key in sa if key not in sb]
    return f"{extra[0]!r} is not in the target" if extra else "same names and shapes"
