"""Adaptive model selection: one module that sends each sample of a batch to one of K models.

``router = adaptive_selection(models, x, data, selector)`` returns a :class:`Router`.  With
``s(x): (B, K)`` the selector's scores (``fxfuse.combine.selectors``), sample ``b`` goes to
``c_b = argmax_k s(x)[b, k]`` and the router's output is ``y_b = f_{c_b}(x_b)``: row ``b`` of
model ``c_b``'s own output, nothing averaged.  The models may be of different classes and
shapes; their outputs must have one shape.  ``router(x)`` returns only the prediction (a drop-in
model), ``router.choices(x)`` the model index per sample, ``router.report`` the shares and
accuracies on ``data``, and ``router.evaluate(x, y)`` the same on held-out data.

Cost, per input (``RouteReport`` states it in multiply-accumulates of Linear / Conv layers):

* PyTorch, selectors that read only the input (``gate``, ``density`` in input space): the
  selector runs first and each model runs only on the samples routed to it, so a sample costs
  the selector plus its chosen model.  ``confidence``, ``entropy``, ``Gate(confidence=True)``
  and feature-space ``density`` must run every model on every sample (they choose from the
  models' outputs or features).
* ONNX / ``torch.export``: a static graph cannot skip a model, so every model runs on every
  sample and the chosen rows are gathered (``GatherElements``); the cost is the sum of all models
  plus the selector, as for a logit ensemble.

Data: a tensor ``x``, a tuple ``(x, y)`` or ``(x, y, source)``, or an iterable of such batches;
``y`` is the class label (``None`` if unknown), ``source[i] = k`` says sample ``i`` comes from
model ``k``'s own client data.  Which selector needs what: ``confidence`` / ``entropy`` nothing
(labels calibrate temperatures), ``gate`` labels or sources, ``density`` sources.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError
from ..trace import eval_mode, model_device
from .selectors import (
    SELECTORS,
    Confidence,
    Density,
    Gate,
    Samples,
    Scorer,
    Selector,
)

__all__ = ["RouteReport", "Router", "adaptive_selection"]

DataArg = torch.Tensor | tuple[Any, ...] | Iterable[Any] | None
_BATCH = 512


@dataclass(frozen=True)
class RouteReport:
    """A router measured on one data set.

    ``shares[k]``: fraction of samples routed to model k; ``accuracy``: the router's accuracy
    (None without labels); ``model_accuracy[k]``: model k's alone; ``ensemble_accuracy``: the
    mean-logit ensemble's; ``oracle_accuracy``: fraction some model gets right (a ceiling for any
    selector); ``source_match``: fraction routed to their own client's model (None without
    sources); ``temperatures``: per model (confidence / entropy); ``macs[k]``: model k's
    multiply-accumulates per input (Linear / Conv layers only), ``selector_macs`` the selector's;
    ``macs_pytorch``: mean per input on this data in PyTorch, ``macs_onnx``: per input in ONNX.
    """

    selector: str
    n: int
    shares: tuple[float, ...]
    accuracy: float | None
    model_accuracy: tuple[float, ...] | None
    ensemble_accuracy: float | None
    oracle_accuracy: float | None
    source_match: float | None
    temperatures: tuple[float, ...] | None
    macs: tuple[int, ...]
    selector_macs: int
    macs_pytorch: float
    macs_onnx: int

    def __str__(self) -> str:
        def pct(v: float | None) -> str:
            return "    -" if v is None else f"{100 * v:6.2f}%"

        lines = [f"router ({self.selector}) on {self.n} samples",
                 "model   share   accuracy  temperature  MACs/input"]
        for k, share in enumerate(self.shares):
            acc = None if self.model_accuracy is None else self.model_accuracy[k]
            t = "" if self.temperatures is None else f"{self.temperatures[k]:.3g}"
            lines.append(f"{k:<5} {100 * share:6.2f}%  {pct(acc)}  {t:>11}  {self.macs[k]:>10}")
        lines.append(f"router accuracy {pct(self.accuracy)}, logit ensemble "
                     f"{pct(self.ensemble_accuracy)}, oracle {pct(self.oracle_accuracy)}, "
                     f"routed to own client {pct(self.source_match)}")
        lines.append(f"MACs per input: PyTorch {self.macs_pytorch:.0f}, ONNX {self.macs_onnx} "
                     f"(selector {self.selector_macs})")
        return "\n".join(lines)


def _exporting() -> bool:
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def _gather(outs: list[torch.Tensor], choice: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of ``outs[choice[b]]``: ``(K, B, ...)`` gathered along K."""
    stacked = torch.stack(outs)
    idx = choice.view((1, -1) + (1,) * (stacked.dim() - 2)).expand((1,) + stacked.shape[1:])
    return stacked.gather(0, idx).squeeze(0)


class Router(nn.Module):
    """Routes each sample to one model (see the module docstring); build with
    :func:`adaptive_selection`.  ``models[k]`` are the given modules (shared, not copied)."""

    def __init__(self, models: Sequence[nn.Module], scorer: Scorer, selector: str,
                 taps: list[fx.GraphModule] | None = None) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.scorer = scorer
        self.selector = selector
        # Feature taps share the models' submodules; kept out of the module tree so the
        # state_dict and exported graph hold each weight once.
        self._taps = taps
        self.report: RouteReport | None = None

    def _run(self, x: torch.Tensor, dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
        reads = self.scorer.reads
        if reads == "features":
            assert self._taps is not None
            pairs = [tap(x) for tap in self._taps]
            outs = [p[0] for p in pairs]
            choice = self.scorer([p[1] for p in pairs]).argmax(dim=1)
            return _gather(outs, choice), choice
        if reads in ("outputs", "input+outputs"):
            outs = [m(x) for m in self.models]
            choice = self.scorer([x, *outs] if reads == "input+outputs" else outs).argmax(dim=1)
            return _gather(outs, choice), choice
        choice = self.scorer([x]).argmax(dim=1)
        if dense or x.shape[0] == 0:
            return _gather([m(x) for m in self.models], choice), choice
        out: torch.Tensor | None = None
        for k in choice.unique().tolist():
            idx = (choice == k).nonzero().squeeze(1)
            yk = self.models[k](x.index_select(0, idx))
            if out is None:
                out = yk.new_empty((x.shape[0],) + tuple(yk.shape[1:]))
            out[idx] = yk
        assert out is not None
        return out, choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, dense=_exporting())[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, choices)`` in one pass."""
        return self._run(x, dense=_exporting())

    def choices(self, x: torch.Tensor) -> torch.Tensor:
        """The model index each sample of ``x`` goes to, ``(B,)`` int64."""
        if self.scorer.reads == "input":
            return self.scorer([x]).argmax(dim=1)
        return self._run(x, dense=True)[1]

    def evaluate(self, data: DataArg) -> RouteReport:
        """Shares, accuracies and cost on ``data`` (same forms as ``adaptive_selection``'s)."""
        samples = as_samples(data, len(self.models))
        if samples is None:
            raise InputError("evaluate needs data: a tensor x, (x, y), (x, y, source) or batches")
        return _measure(self, samples)


# --- building -------------------------------------------------------------------------------


def _as_batch(item: Any, i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        return item, None, None
    if isinstance(item, (tuple, list)) and len(item) in (2, 3) \
            and all(t is None or isinstance(t, torch.Tensor) for t in item) \
            and isinstance(item[0], torch.Tensor):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise InputError(f"data batch {i} is a {type(item).__name__}; each batch must be a tensor x, "
                     "(x, y) or (x, y, source) of tensors")


def as_samples(data: DataArg, k: int) -> Samples | None:
    """Pool ``data`` (see the module docstring) into one :class:`Samples`; checks shapes."""
    if data is None:
        return None
    single = isinstance(data, torch.Tensor) or (
        isinstance(data, tuple) and 0 < len(data) <= 3
        and all(t is None or isinstance(t, torch.Tensor) for t in data))
    items = [data] if single else list(data)  # type: ignore[call-overload]
    batches = [_as_batch(item, i) for i, item in enumerate(items)]
    if not batches or sum(b[0].shape[0] if b[0].dim() else 0 for b in batches) == 0:
        raise InputError("data is empty; pass held-out samples: a tensor x, (x, y), "
                         "(x, y, source) or a list of such batches")
    parts: list[list[torch.Tensor]] = [[], [], []]
    for i, batch in enumerate(batches):
        x = batch[0]
        if x.dim() == 0:
            raise InputError(f"data batch {i}: x is a scalar; expected (N, ...) samples")
        for j, name in ((1, "y"), (2, "source")):
            t = batch[j]
            if t is not None:
                if t.dim() != 1 or t.shape[0] != x.shape[0] or t.is_floating_point():
                    raise InputError(f"data batch {i}: {name} must be an integer tensor of shape "
                                     f"({x.shape[0]},), got {t.dtype} {tuple(t.shape)}")
                parts[j].append(t.long())
        parts[0].append(x)
    for j, name in ((1, "labels y"), (2, "sources")):
        if parts[j] and len(parts[j]) != len(batches):
            raise InputError(f"data: only some batches carry {name}; give them for all or none")
    xs = torch.cat(parts[0])
    s = torch.cat(parts[2]) if parts[2] else None
    if s is not None and (int(s.min()) < 0 or int(s.max()) >= k):
        raise InputError(f"data: source indices must be model indices 0..{k - 1}, got "
                         f"{int(s.min())}..{int(s.max())}")
    return Samples(xs, torch.cat(parts[1]) if parts[1] else None, s)


def _feature_tap(model: nn.Module, k: int) -> fx.GraphModule:
    """``model`` traced to return ``(output, input of the final nn.Linear)``."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise InputError(f"Density(space='features'): models[{k}] ({type(model).__name__}) "
                         f"could not be traced with torch.fx ({type(exc).__name__}); use "
                         "Density(space='input')") from exc
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    node = out_node.args[0]
    for _ in range(8):  # walk back through single-input tail ops (e.g. log_softmax)
        if not isinstance(node, fx.Node):
            break
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   nn.Linear):
            out_node.args = ((out_node.args[0], node.args[0]),)
            gm.recompile()
            return gm
        node = node.args[0] if node.args else None
    raise InputError(f"Density(space='features'): models[{k}] ({type(model).__name__}) does not "
                     "end in an nn.Linear whose input could be used as penultimate features; use "
                     "Density(space='input')")


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates per input of the Linear and Conv layers of ``model`` on ``x[:1]``."""
    total = [0]

    def hook(mod: nn.Module, _: Any, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            total[0] += out.numel() * mod.in_features
        elif isinstance(mod, nn.modules.conv._ConvNd):
            w = mod.weight
            total[0] += out.numel() * (w.shape[1] * int(torch.tensor(w.shape[2:]).prod()))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with eval_mode(model):
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _outputs(fns: Sequence[Any], x: torch.Tensor, device: torch.device) -> list[Any]:
    """Each of ``fns`` on ``x`` in batches of ``_BATCH`` (on ``device``), concatenated."""
    res: list[list[Any]] = [[] for _ in fns]
    for chunk in x.split(_BATCH):
        chunk = chunk.to(device)
        for k, fn in enumerate(fns):
            res[k].append(fn(chunk))
    out: list[Any] = []
    for r in res:
        if isinstance(r[0], tuple):
            out.append(tuple(torch.cat([p[i] for p in r]) for i in range(len(r[0]))))
        else:
            out.append(torch.cat(r))
    return out


def _measure(router: Router, data: Samples) -> RouteReport:
    device = model_device(router)
    soft = getattr(router.scorer, "soft", router.scorer)
    inv_t = getattr(soft, "inv_t", None)
    temps = None if inv_t is None else tuple((1.0 / inv_t).tolist())
    k = len(router.models)
    with eval_mode(router):
        outs = [o.cpu() for o in _outputs(list(router.models), data.x, device)]
        choice = torch.cat([router.choices(c.to(device)) for c in data.x.split(_BATCH)]).cpu()
    routed = _gather(outs, choice)
    shares = tuple(float((choice == j).float().mean()) for j in range(k))
    acc = model_acc = ens = oracle = None
    if data.y is not None and routed.dim() == 2:
        y = data.y.cpu()
        right = torch.stack([o.argmax(-1) == y for o in outs])
        acc = float((routed.argmax(-1) == y).float().mean())
        model_acc = tuple(float(r.float().mean()) for r in right)
        ens = float((torch.stack(outs).float().mean(0).argmax(-1) == y).float().mean())
        oracle = float(right.any(0).float().mean())
    match = None if data.s is None else float((choice == data.s.cpu()).float().mean())
    x1 = data.x[:1].to(device)
    macs = tuple(count_macs(m, x1) for m in router.models)
    sel = router.scorer.macs
    sparse = router.scorer.reads == "input"
    pt = sel + (sum(s * m for s, m in zip(shares, macs)) if sparse else sum(macs))
    return RouteReport(router.selector, int(data.x.shape[0]), shares, acc, model_acc, ens,
                       oracle, match, temps, macs, sel, float(pt), sel + sum(macs))


def _selector(selector: str | Selector) -> Selector:
    if isinstance(selector, str):
        if selector not in SELECTORS:
            raise InputError(f"unknown selector {selector!r}; use one of {sorted(SELECTORS)} or "
                             "a config such as fxfuse.combine.Gate(target='client')")
        return SELECTORS[selector]
    if not isinstance(selector, (Confidence, Gate, Density)):
        raise InputError(f"selector must be a name {sorted(SELECTORS)} or a Confidence / Entropy "
                         f"/ Gate / Density config, got {type(selector).__name__}")
    return selector


def _describe(sel: Selector, data: Samples | None) -> str:
    if isinstance(sel, Gate):
        target = sel.resolved_target(data) if data is not None else sel.target
        return f"gate(target={target}{', x confidence' if sel.confidence else ''})"
    if isinstance(sel, Density):
        return f"density(space={sel.space})"
    if sel.calibrate and data is not None and data.y is not None:
        return f"{sel.kind}(calibrated on {sel.calibrate_on} data)"
    return f"{sel.kind}(raw)"


def adaptive_selection(
    models: Sequence[nn.Module],
    example_inputs: torch.Tensor | tuple[torch.Tensor],
    data: DataArg = None,
    selector: str | Selector = "confidence",
) -> Router:
    """A :class:`Router` over ``models`` that sends each sample to one model.

    ``example_inputs``: one batch ``x`` (a tensor, or a 1-tuple) every model accepts; their
    outputs on it must be tensors of one shape.  ``data``: held-out samples (module docstring);
    ``selector``: ``"confidence"``, ``"entropy"``, ``"gate"``, ``"density"`` or a config
    (:class:`~fxfuse.combine.Confidence`, ``Entropy``, ``Gate``, ``Density``).  The models are
    used, not copied, and never modified (training flags are restored).  ``router.report``
    measures the router on ``data`` (on ``example_inputs`` without data); fitted selectors see
    that data, so take held-out figures from ``router.evaluate``.

    Raises :class:`~fxfuse.errors.InputError` for fewer than two models, outputs that are not
    tensors of one shape, empty or malformed data, or a selector that needs data (or labels, or
    sources) it was not given.
    """
    example = _check_inputs(models, example_inputs)
    sel = _selector(selector)
    k = len(models)
    samples = as_samples(data, k)
    if isinstance(sel, (Gate, Density)) and samples is None:
        raise InputError(f"selector {sel.kind!r} is fitted on data; pass data=[(x, y, source)] "
                         "batches (source: the model index of each sample's client), or use the "
                         "data-free 'confidence' / 'entropy'")
    device = model_device(models[0])
    ref = _reference_outputs(models, example, sel, samples)
    taps = None
    if isinstance(sel, Density) and sel.space == "features":
        with eval_mode(*models):  # traced in eval mode: functional dropout etc. baked as eval
            taps = [_feature_tap(m, i) for i, m in enumerate(models)]
    with eval_mode(*models):
        scorer = _fit(sel, models, ref, samples, taps, device)
    router = Router(models, scorer.to(device), _describe(sel, samples), taps)
    router.report = _measure(router, samples or Samples(example, None, None))
    return router


def _check_inputs(models: Sequence[nn.Module], example_inputs: Any) -> torch.Tensor:
    """The example batch, after checking there are two or more modules to route between."""
    if isinstance(models, nn.Module) or len(models) < 2:
        raise InputError("adaptive_selection needs at least two models, e.g. "
                         "fxfuse.adaptive_selection([model_a, model_b], x)")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InputError(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1:
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() == 0:
        raise InputError("example_inputs must be one batch tensor (N, ...) the models accept; "
                         "routers take models with a single tensor input")
    return example_inputs


def _reference_outputs(models: Sequence[nn.Module], example: torch.Tensor, sel: Selector,
                       samples: Samples | None) -> list[torch.Tensor]:
    """Every model's output on the example batch: tensors of one shape, class logits (N, C)
    where the selector reads them."""
    with eval_mode(*models):
        ref = [m(example.to(model_device(m))) for m in models]
    for i, out in enumerate(ref):
        if not isinstance(out, torch.Tensor):
            raise InputError(f"models[{i}] returns a {type(out).__name__}; routing needs each "
                             "model to return one tensor")
        if out.shape != ref[0].shape:
            raise InputError(f"models[{i}] has output shape {tuple(out.shape)} but models[0] "
                             f"has {tuple(ref[0].shape)} on example_inputs; routed models must "
                             "give outputs of one shape (e.g. the same number of classes)")
    needs_logits = isinstance(sel, Confidence) or (isinstance(sel, Gate) and (sel.confidence or (
        samples is not None and sel.resolved_target(samples) == "correct")))
    if needs_logits and ref[0].dim() != 2:
        raise InputError(f"selector {sel.kind!r} reads class logits (N, C); the models output "
                         f"{tuple(ref[0].shape)}: use Gate(target='client') or Density")
    return ref


def _fit(sel: Selector, models: Sequence[nn.Module], ref: list[torch.Tensor],
         samples: Samples | None, taps: Sequence[nn.Module] | None, device: torch.device
         ) -> Scorer:
    """The selector fitted on the samples (the models in eval mode)."""
    outs = [] if samples is None else [o.float() for o in _outputs(list(models), samples.x,
                                                                   device)]
    if isinstance(sel, Confidence):
        if samples is None:
            with torch.no_grad():
                return sel.fit(ref, None)
        return sel.fit(outs, samples)
    assert samples is not None
    if isinstance(sel, Gate):
        return sel.fit(outs, Samples(samples.x.to(device), _to(samples.y, device),
                                     _to(samples.s, device)))
    if taps is not None:
        feats = [p[1] for p in _outputs(taps, samples.x, device)]
    else:
        feats = [samples.x.to(device)] * len(models)
    return sel.fit(feats, Samples(samples.x, _to(samples.y, device), _to(samples.s, device)))


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
