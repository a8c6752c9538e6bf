"""Neuron-interpolation fusion (Luenam, Spanopoulos, Sant, Hofmann, Anagnostidis, Singh 2025):
N models of one architecture, any widths, into the target's widths, level by level.

It is a fusion method, not only an alignment: used as ``fuse(..., align=NeuronInterpolation(
data), target=...)`` it produces the fused weights itself (align + merge); ``weights=`` sets each
parent's share of the cluster mass (default uniform) and ``repair=`` runs after it as after any
method.  The levels come from the traced graph (:mod:`fxfuse.levels`), fitted in topological
order, each from the *fused* model's own inputs (the already fitted levels' outputs) to targets
built from the parents' values at the level's output (pre-activations):

* **importance** ``s_ki >= 0`` of parent ``k``'s unit ``i``: uniform (1), or captum's
  ``LayerConductance`` / ``LayerDeepLift`` at the level's output node (a probe ``Identity`` put
  after it in a copy of the traced graph) towards the label (data ``(x, y)``) or else the predicted
  class, ``|attribution|`` summed over samples and positions, ``/ n_samples + 1e-8``.  Mass:
  ``w_ki = share_k * s_ki / sum_i s_ki`` (``share``: the fuse ``weights``);
* **grouping** into the target's ``m`` units, a unit represented by its values over the fusion
  samples (and positions): importance-weighted K-means (scikit-learn ``KMeans`` with
  ``sample_weight``, started from the widest parent's ``m`` heaviest units) over every parent's
  units, or, for two parents of width ``m``, the Hungarian assignment minimising the grouping error
  ``w_i w_j / (w_i + w_j) ||a_i - b_j||^2``.  Cluster ``c``'s target is the mass-weighted mean
  ``t_c = sum_{(k,i) in c} w_ki a_ki / sum w_ki``; a residual stream is grouped once, at its first
  write, and every later write's targets use that grouping;
* **linear variant**: the level's producer (Linear, or a Conv on unfolded patches; a BatchNorm
  after it is set to the identity, a LayerNorm / RMSNorm right before a Linear loses its affine) gets its weights by ridge least squares from the fused inputs
  ``X`` to the targets: ``W = (X^T X + lam I)^-1 X^T T`` with ``lam = ridge * tr(X^T X) / d``
  (default ``ridge = 1e-3``; the bias column is not penalised): 400 samples against 785 inputs is
  underdetermined, the ridge picks the smallest-norm fit.  A level with no linear form (attention,
  a grouped conv, a user's leaf module, parameters outside the producer) is trained by the
  gradient variant instead, and the report says so;
* **gradient variant**: the level's own parameters (whatever layers they are) are trained with
  Adam on the mass-weighted MSE ``sum_c m_c mean (y_c - t_c)^2`` (``m_c`` the cluster mass,
  mean 1), 80/20 split of the samples, early stopping (``patience``), from the least-squares
  solution where the level has a linear form (``init="linear"``) or the target's own values;
* **last level**: targets are the parents' averaged logits ``z = sum_k share_k z_k`` (per class
  ``c``, with ``class_shares[k][c]``: ``sum_k q_kc z_kc / sum_k q_kc``); the linear variant fits
  them by least squares, the gradient variant distils them (``T^2 KL(softmax(z/T) ||
  softmax(y/T))``, temperature ``T``).

Everything runs in eval mode (BatchNorm is an affine map of its running statistics; no dropout).
Models must be symbolically traceable (the levels run as sub-graphs of the traced target).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from ..errors import ArchitectureMismatchError, InputError, PipelineError
from ..groups.spec import PermutationSpec
from ..ir.capture import SYMBOLIC
from ..ir.coords import as_rows, group_rows
from ..levels import CHANNELWISE, Level, find_levels, graph_module_of, level_module
from ..maps import GroupMap
from ..passes.base import FusionState, Pass, batch_inputs, limited, progress

VARIANTS = ("linear", "gradient")
GROUPINGS = ("kmeans", "hungarian")
IMPORTANCES = ("uniform", "conductance", "deeplift")
LINEAR_FORMS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class NeuronInterpolation:
    """Config: neuron-interpolation fusion (Luenam et al. 2025) on ``data``: fits the fused
    model level by level to importance-weighted groups of the parents' neurons (any widths)."""

    data: Iterable[Any] = field(repr=False, default=(), metadata={"data": True})
    variant: str = "linear"  # "linear" | "gradient"
    grouping: str = "kmeans"  # "kmeans" | "hungarian" (two parents of the target's widths)
    importance: str = "uniform"  # "uniform" | "conductance" | "deeplift"
    ridge: float = 1e-3  # least squares: lam = ridge * tr(X^T X) / d
    epochs: int = 100  # gradient variant: epochs per level at most (early stopping)
    last_epochs: int = 150  # the last level's distillation
    patience: int = 15
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 2.0
    init: str = "linear"  # gradient variant's start: "linear" (least squares) | "target"
    class_shares: tuple[tuple[float, ...], ...] | None = None  # [parent][class] data shares
    max_features: int = 20000  # K-means: at most this many coordinates per unit (seeded subset)
    conductance_steps: int = 10
    seed: int = 0
    max_batches: int | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("variant", self.variant, VARIANTS),
                                     ("grouping", self.grouping, GROUPINGS),
                                     ("importance", self.importance, IMPORTANCES),
                                     ("init", self.init, ("linear", "target"))):
            if value not in allowed:
                raise InputError(f"NeuronInterpolation({name}={value!r}): choose one of "
                                 f"{', '.join(map(repr, allowed))}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise InputError(f"NeuronInterpolation(ridge={self.ridge}): a non-negative number")
        if self.temperature <= 0 or self.lr <= 0 or self.batch_size < 1 or self.epochs < 0 \
                or self.last_epochs < 0 or self.patience < 1 or self.max_features < 1:
            raise InputError("NeuronInterpolation: temperature and lr must be positive; "
                             "batch_size, patience, max_features >= 1; epochs >= 0")


@dataclass
class LevelRecord:
    """How one level was fitted."""

    index: int
    group: str | None
    output: str
    width: int  # the target's units (output size for the last level)
    method: str  # "least squares", "gradient", "distillation", "shared basis", ...
    error: float  # relative fit error on the targets: ||y - t||_w^2 / ||t||_w^2
    seconds: float
    note: str = ""


@dataclass
class InterpolationReport:
    """What :func:`neuron_interpolation` did: one record per level, notes, and each parent's
    groupings as maps into the fused basis (``maps[k][group]``: :meth:`GroupMap.clusters`)."""

    levels: list[LevelRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    maps: list[dict[str, GroupMap]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["level  group                      width  method          rel.err  seconds"]
        for r in self.levels:
            g = r.group or "(output)"
            lines.append(f"{r.index:>5}  {g[:25]:<25}  {r.width:>5}  {r.method:<14}  "
                         f"{r.error:7.4f}  {r.seconds:7.2f}" + (f"  {r.note}" if r.note else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- data -----------------------------------------------------------------------------------------
def _samples(data: Iterable[Any], max_batches: int | None, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    batches = limited(data, max_batches)
    for b in batches:
        xs.append(batch_inputs(b, device)[0])
        if isinstance(b, (tuple, list)) and len(b) > 1 and isinstance(b[1], torch.Tensor):
            ys.append(b[1].to(device))
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) != 1:
        raise InputError(f"the fusion data's batches have different sample shapes {sorted(shapes)}"
                         f": give batches of one input shape")
    x = torch.cat(xs)
    y = torch.cat(ys) if len(ys) == len(xs) else None
    return x, y


class _Values(fx.Interpreter):
    """The values of the ``wanted`` nodes (stops as soon as all are seen)."""

    class _Done(Exception):
        pass

    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.seen[n.name] = out
            if len(self.seen) == len(self.wanted):
                raise _Values._Done
        return out


def node_values(gm: fx.GraphModule, x: torch.Tensor, wanted: Sequence[str], chunk: int = 256
                ) -> dict[str, torch.Tensor]:
    """``{node: value on all of x}``, run in chunks of ``chunk`` samples, no grad, eval mode."""
    parts: dict[str, list[torch.Tensor]] = {w: [] for w in wanted}
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                rec = _Values(gm, set(wanted))
                try:
                    rec.run(x[i:i + chunk])
                except _Values._Done:
                    pass
                for w in wanted:
                    if w not in rec.seen:
                        raise PipelineError(f"node {w!r} gave no tensor on the fusion data")
                    parts[w].append(rec.seen[w])
    finally:
        gm.train(was)
    return {w: torch.cat(v) for w, v in parts.items()}


# -- importance -----------------------------------------------------------------------------------
def importance_scores(gm: fx.GraphModule, level: Level, sizes: dict[str, int], x: torch.Tensor,
                      y: torch.Tensor | None, method: str, steps: int = 10, chunk: int = 64
                      ) -> torch.Tensor:
    """``s_i`` of every unit of ``level.group`` (module doc): ones, or ``|attribution|`` of
    captum's LayerConductance / LayerDeepLift at the level's output node, summed over samples and
    positions, divided by the number of samples, ``+ 1e-8``."""
    assert level.group is not None and level.tree is not None
    rows = group_rows(level.tree, level.group, sizes)
    assert rows is not None
    n = rows.shape[0]
    if method == "uniform":
        return torch.ones(n, dtype=torch.float64)
    import os

    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                       "matplotlib"))
    from captum.attr import LayerConductance, LayerDeepLift  # lazy: `import fxfuse` stays light

    probed = _probed(gm, level.output)
    layer = probed.get_submodule(PROBE)
    algo = LayerConductance(probed, layer) if method == "conductance" else LayerDeepLift(
        probed, layer)
    total = torch.zeros(n, dtype=torch.float64)
    probed.eval()
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        with torch.no_grad():
            out = probed(xb)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InputError(f"importance={method!r} attributes to a class: the model's output "
                             f"must be (batch, classes) logits, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}"
                             f"; use importance='uniform'")
        target = y[i:i + chunk].long() if y is not None else out.argmax(1)
        if method == "conductance":
            attr = algo.attribute(xb, target=target, n_steps=steps)
        else:
            attr = algo.attribute(xb, target=target)
        total += as_rows(attr.detach().abs(), level.axis, rows).sum(1).double().cpu()
    return total / x.shape[0] + 1e-8


PROBE = "_fxfuse_probe"


def _probed(gm: fx.GraphModule, node_name: str) -> fx.GraphModule:
    """A copy of ``gm`` with an ``Identity`` module right after ``node_name`` (a layer captum can
    hook, whatever op computed the node)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.add_submodule(PROBE, nn.Identity())
    node = next(n for n in new.graph.nodes if n.name == node_name)
    with new.graph.inserting_after(node):
        probe = new.graph.call_module(PROBE, (node,))
    node.replace_all_uses_with(probe, delete_user_cb=lambda u: u is not probe)
    new.recompile()
    return new


# -- grouping -------------------------------------------------------------------------------------
def group_units(feats: Sequence[torch.Tensor], mass: Sequence[torch.Tensor], m: int, grouping: str,
                seed: int = 0) -> list[torch.Tensor]:
    """Each parent's cluster index per unit (module doc): ``feats[k]: (n_k, D)`` unit vectors,
    ``mass[k]: (n_k,)``; ``m`` clusters."""
    sizes = [f.shape[0] for f in feats]
    if grouping == "hungarian":
        if len(feats) != 2 or sizes[0] != m or sizes[1] != m:
            raise InputError(f"grouping='hungarian' pairs two parents of the target's width: got "
                             f"{len(feats)} parents of widths {sizes} for {m} fused units; use "
                             f"grouping='kmeans' (any number of models and widths)")
        from scipy.optimize import linear_sum_assignment  # lazy

        a, b = feats[0].double(), feats[1].double()
        wa, wb = mass[0].double(), mass[1].double()
        dist = torch.cdist(a, b).square()
        cost = wa[:, None] * wb[None, :] / (wa[:, None] + wb[None, :]) * dist
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        second = torch.empty(m, dtype=torch.long)
        second[torch.as_tensor(cols)] = torch.as_tensor(rows)
        return [torch.arange(m), second]
    total = sum(sizes)
    if total < m:
        raise InputError(f"the target has {m} units here but the parents have only {total} "
                         f"together: K-means can not make more groups than there are neurons; "
                         f"give a narrower target or more (wider) parents")
    from sklearn.cluster import KMeans  # lazy: `import fxfuse` stays light

    pts = torch.cat([f.double() for f in feats]).cpu().numpy()
    w = torch.cat([x.double() for x in mass]).cpu().numpy()
    widest = max(range(len(sizes)), key=lambda k: sizes[k])
    if sizes[widest] >= m:  # start from the widest parent's m heaviest units
        off = sum(sizes[:widest])
        top = torch.argsort(mass[widest].double(), descending=True)[:m].sort().values
        init: Any = pts[off + top.numpy()]
        n_init = 1
    else:
        init, n_init = "k-means++", 3
    km = KMeans(n_clusters=m, init=init, n_init=n_init, random_state=seed, max_iter=300)
    labels = torch.as_tensor(km.fit(pts, sample_weight=w).labels_, dtype=torch.long)
    out, off = [], 0
    for n in sizes:
        out.append(labels[off:off + n])
        off += n
    return out


# -- targets --------------------------------------------------------------------------------------
@dataclass
class _Grouping:
    assign: list[torch.Tensor]  # per parent: cluster of each unit
    mass: list[torch.Tensor]  # per parent: w_ki
    m: int


def cluster_targets(values: Sequence[torch.Tensor], levels: Sequence[Level],
                    sizes: Sequence[dict[str, int]], target_level: Level,
                    target_sizes: dict[str, int], grouping: _Grouping, shares: Sequence[float],
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets in the target's layout at the level's output and the weight of every position
    of its axis (the mass of its cluster, mean 1)."""
    g = target_level.group
    assert g is not None and target_level.tree is not None
    axis = target_level.axis
    rows_t = group_rows(target_level.tree, g, target_sizes)
    assert rows_t is not None
    ref = values[0]
    shape = list(ref.shape)
    total = tree_len(target_level.tree, target_sizes)
    shape[axis] = total
    out = torch.zeros(shape, dtype=ref.dtype, device=ref.device).movedim(axis, 0)
    # positions outside the group (another block of the axis): the parents' weighted mean
    inside = torch.zeros(total, dtype=torch.bool)
    inside[rows_t.reshape(-1)] = True
    if not bool(inside.all()):
        if any(v.shape[axis] != total for v in values):
            raise ArchitectureMismatchError(f"level {target_level.index}: the axis of "
                                            f"{target_level.output} has positions outside group "
                                            f"{g!r} and they differ in size across models")
        rest = torch.stack([s * v.movedim(axis, 0) for s, v in zip(shares, values)]).sum(0)
        out[~inside] = rest[~inside]
    m, contexts = rows_t.shape
    cluster_mass = torch.zeros(m, dtype=torch.float64, device=ref.device)
    acc = torch.zeros((m, contexts * int(out[0].numel())), dtype=torch.float64, device=ref.device)
    for k, v in enumerate(values):
        lv = levels[k]
        assert lv.tree is not None
        rows_k = group_rows(lv.tree, g, sizes[k])
        if rows_k is None or rows_k.shape[1] != contexts:
            raise ArchitectureMismatchError(
                f"level {target_level.index} ({target_level.output}): group {g!r} sits on its "
                f"axis as {None if rows_k is None else rows_k.shape[1]} blocks in model {k} but "
                f"{contexts} in the target; the levels can not be paired")
        a = as_rows(v, lv.axis, rows_k).double()
        w = grouping.mass[k].to(a.device)
        acc.index_add_(0, grouping.assign[k].to(a.device), w[:, None] * a)
        cluster_mass.index_add_(0, grouping.assign[k].to(a.device), w)
    t = acc / cluster_mass.clamp_min(1e-30)[:, None]
    out[rows_t.reshape(-1).to(out.device)] = t.reshape(m * contexts, *out.shape[1:]).to(out.dtype)
    pos_w = torch.ones(total, dtype=torch.float64, device=ref.device)
    cm = cluster_mass / cluster_mass.mean().clamp_min(1e-30)
    pos_w[rows_t.reshape(-1).to(ref.device)] = cm[:, None].expand(m, contexts).reshape(-1)
    return out.movedim(0, axis), pos_w


def tree_len(tree: Any, sizes: dict[str, int]) -> int:
    from ..groups.spec import tree_size

    return tree_size(tree, sizes)


def averaged_logits(values: Sequence[torch.Tensor], shares: Sequence[float],
                    class_shares: Sequence[Sequence[float]] | None) -> torch.Tensor:
    """``sum_k share_k z_k``, or per class ``c`` ``sum_k q_kc z_kc / sum_k q_kc``."""
    if class_shares is None:
        return sum(s * v for s, v in zip(shares, values))  # type: ignore[return-value]
    q = torch.as_tensor(class_shares, dtype=values[0].dtype, device=values[0].device)
    if q.shape != (len(values), values[0].shape[-1]) or bool((q < 0).any()) or bool(
            (q.sum(0) <= 0).any()):
        raise InputError(f"class_shares must be (models, classes) = "
                         f"{(len(values), values[0].shape[-1])} non-negative numbers with every "
                         f"class held by some model, got shape {tuple(q.shape)}")
    stacked = torch.stack(list(values))
    q = q.reshape(q.shape[0], *([1] * (stacked.dim() - 2)), q.shape[1])
    return (q * stacked).sum(0) / q.sum(0)


# -- fitting --------------------------------------------------------------------------------------
PRE_NORMS = (nn.LayerNorm, nn.RMSNorm)


def _producer_module(gm: fx.GraphModule, level: Level
                     ) -> tuple[nn.Module, list[nn.Module], list[nn.Module]] | None:
    """The level's producer, its channel-wise followers and the norm right before it, if the
    level has a linear form: its owned parameters are exactly theirs, the producer is a Linear /
    Conv1d / Conv2d (groups 1, zero padding by numbers) and the group is on its channel axis.  A
    LayerNorm / RMSNorm over the last axis that feeds only a Linear producer (a pre-norm block)
    keeps its normalisation and loses its affine (weight 1, bias 0): the least-squares weights
    absorb it (``W (g * x + b) + c = (W diag g) x + (W b + c)``)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    prod = by_name[level.producer]
    if prod.op != "call_module":
        return None
    mod = gm.get_submodule(str(prod.target))
    if not isinstance(mod, LINEAR_FORMS):
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (
            mod.groups != 1 or isinstance(mod.padding, str) or mod.padding_mode != "zeros"):
        return None
    followers, names = [], [str(prod.target)]
    node = prod
    while node.name != level.output:
        node = next(iter(node.users))
        fmod = gm.get_submodule(str(node.target))
        if not isinstance(fmod, CHANNELWISE):
            return None
        followers.append(fmod)
        names.append(str(node.target))
    pre: list[nn.Module] = []
    src = prod.args[0] if prod.args else None
    if isinstance(mod, nn.Linear) and isinstance(src, fx.Node) and src.op == "call_module" \
            and len(src.users) == 1 and src.name in level.nodes:
        norm = gm.get_submodule(str(src.target))
        if isinstance(norm, PRE_NORMS) and len(tuple(norm.normalized_shape)) == 1:
            pre.append(norm)
            names.append(str(src.target))
    owned = {k.rsplit(".", 1)[0] for k in level.params}
    if not owned <= set(names):
        return None
    return mod, followers, pre


def _drop_affine(norms: list[nn.Module]) -> None:
    with torch.no_grad():
        for n in norms:
            w, b = getattr(n, "weight", None), getattr(n, "bias", None)
            if isinstance(w, torch.Tensor):
                w.fill_(1.0)
            if isinstance(b, torch.Tensor):
                b.fill_(0.0)


def _channel_axis_ok(mod: nn.Module, level: Level, ndim: int) -> bool:
    """The group lives on the producer's output channels (a Linear's last axis, a conv's 1)."""
    if level.is_last:
        return isinstance(mod, nn.Linear) or ndim == 2
    return level.axis == (ndim - 1 if isinstance(mod, nn.Linear) else 1)


def _producer_input(sub: fx.GraphModule, level: Level, inputs: Sequence[torch.Tensor]
                    ) -> torch.Tensor:
    """The fused model's value at the producer's input (its first argument), on all samples."""
    prod = next(n for n in sub.graph.nodes if n.name == level.producer)
    mod = sub.get_submodule(str(prod.target))
    seen: list[torch.Tensor] = []
    handle = mod.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, inputs[0].shape[0] if inputs else 1, 256):
                sub(*(v[i:i + 256] for v in inputs))
    finally:
        handle.remove()
    return torch.cat(seen)


def _design(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The producer's input as a design matrix ``(rows, in_features)`` (conv: unfolded patches)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        k, s, p, d = ((1, mod.kernel_size[0]), (1, mod.stride[0]),
                      (0, int(mod.padding[0])), (1, mod.dilation[0]))  # type: ignore[arg-type]
    else:
        assert isinstance(mod, nn.Conv2d)
        k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation  # type: ignore[assignment]
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*kk, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _responses(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Targets as ``(rows, out_features)`` matching :func:`_design`'s rows."""
    if isinstance(mod, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def ridge_solve(x: torch.Tensor, t: torch.Tensor, ridge: float, bias: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W, b`` minimising ``||X W^T + b - T||^2 + lam ||W||^2``, ``lam = ridge * tr(X^T X) / d``
    (the bias not penalised), in float64."""
    x64, t64 = x.double(), t.double()
    if bias:
        mx, mt = x64.mean(0), t64.mean(0)
        xc, tc = x64 - mx, t64 - mt
    else:
        xc, tc = x64, t64
    gram = xc.T @ xc
    lam = ridge * float(torch.diagonal(gram).mean()) if gram.numel() else 0.0
    gram.diagonal().add_(max(lam, 1e-12 * float(torch.diagonal(gram).abs().max().clamp_min(1))))
    w = torch.linalg.solve(gram, xc.T @ tc).T  # (out, in)
    b = (mt - w @ mx) if bias else None
    return w, b


def _set_linear(mod: nn.Module, followers: list[nn.Module], x: torch.Tensor, t: torch.Tensor,
                ridge: float) -> None:
    for f in followers:  # BatchNorm as the identity: the producer fits the level's targets
        assert isinstance(f, nn.modules.batchnorm._BatchNorm)
        with torch.no_grad():
            if f.weight is not None:
                f.weight.fill_(1.0)
                f.bias.fill_(0.0)
            if f.running_mean is not None and f.running_var is not None:
                f.running_mean.zero_()
                f.running_var.fill_(1.0 - f.eps)
    has_bias = getattr(mod, "bias", None) is not None
    w, b = ridge_solve(_design(mod, x), _responses(mod, t), ridge, has_bias)
    weight = mod.weight
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        weight.copy_(w.reshape(weight.shape).to(weight.dtype))
        if b is not None:
            bias = mod.bias
            assert isinstance(bias, torch.Tensor)
            bias.copy_(b.to(weight.dtype))


def _level_loss(y: torch.Tensor, t: torch.Tensor, axis: int, pos_w: torch.Tensor | None,
                temperature: float | None) -> torch.Tensor:
    if temperature is not None:  # distillation of logits
        logp = F.log_softmax(y / temperature, dim=-1)
        q = F.softmax(t / temperature, dim=-1)
        return F.kl_div(logp, q, reduction="batchmean") * temperature ** 2
    err = (y - t).square()
    if pos_w is not None:
        shape = [1] * err.dim()
        shape[axis] = -1
        err = err * pos_w.to(err.dtype).reshape(shape)
    return err.mean()


def _train_level(sub: fx.GraphModule, params: list[nn.Parameter], inputs: list[torch.Tensor],
                 target: torch.Tensor, axis: int, pos_w: torch.Tensor | None,
                 temperature: float | None, config: NeuronInterpolation, epochs: int) -> int:
    """Adam on the level's loss, 80/20 split of the samples, early stopping; returns the epochs
    run.  The best parameters (validation loss) are kept."""
    if not params or epochs == 0:
        return 0
    n = target.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, n // 5) if n >= 5 else 0
    val, tr = perm[:n_val], perm[n_val:]
    opt = torch.optim.Adam(params, lr=config.lr)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return _level_loss(sub(*(i[idx] for i in inputs)), target[idx], axis, pos_w, temperature)

    best = math.inf
    best_state = [p.detach().clone() for p in params]
    waited, run = 0, 0
    sub.eval()
    for _ in range(epochs):
        run += 1
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for i in range(0, order.numel(), config.batch_size):
            opt.zero_grad()
            loss_on(order[i:i + config.batch_size]).backward()
            opt.step()
        with torch.no_grad():
            v = float(loss_on(val if n_val else tr))
        if v < best - 1e-12:
            best, waited = v, 0
            best_state = [p.detach().clone() for p in params]
        else:
            waited += 1
            if waited >= config.patience:
                break
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    return run


def _rel_error(y: torch.Tensor, t: torch.Tensor, axis: int, pos_w: torch.Tensor | None) -> float:
    err = (y.double() - t.double()).square()
    ref = t.double().square()
    if pos_w is not None:
        shape = [1] * err.dim()
        shape[axis] = -1
        err, ref = err * pos_w.reshape(shape), ref * pos_w.reshape(shape)
    return float(err.sum() / ref.sum().clamp_min(1e-30))


# -- the method -----------------------------------------------------------------------------------
def _paired_levels(models: Sequence[nn.Module], target: nn.Module, specs: Sequence[PermutationSpec],
                   target_spec: PermutationSpec, x: torch.Tensor
                   ) -> tuple[list[fx.GraphModule], fx.GraphModule, list[list[Level]], list[Level]]:
    gms, levels = [], []
    for k, (m, s) in enumerate(zip(models, specs)):
        if s.tracer != SYMBOLIC:
            raise InputError(f"NeuronInterpolation runs each level as a sub-graph of the "
                             f"symbolically traced model; models[{k}] ({type(m).__name__}) traces "
                             f"only with torch.export. Make its forward symbolically traceable "
                             f"(a leaf module with @fxfuse.axis_rule for the untraceable part)")
        gm, _ = graph_module_of(m, s)
        gms.append(gm)
        levels.append(find_levels(m, (x[:2],), spec=s, graph=(gm, {})))
    if target_spec.tracer != SYMBOLIC:
        raise InputError(f"the target ({type(target).__name__}) traces only with torch.export; "
                         f"NeuronInterpolation needs a symbolically traceable target")
    tgm, _ = graph_module_of(target, target_spec)
    tlevels = find_levels(target, (x[:2],), spec=target_spec, graph=(tgm, {}))
    want = [(lv.output, lv.group) for lv in tlevels]
    for k, lvs in enumerate(levels):
        got = [(lv.output, lv.group) for lv in lvs]
        if got != want:
            diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                        min(len(got), len(want)))
            raise ArchitectureMismatchError(
                f"the levels of models[{k}] can not be paired with the target's: {len(got)} "
                f"levels vs {len(want)}, first difference at level {diff} "
                f"({got[diff] if diff < len(got) else 'none'} vs "
                f"{want[diff] if diff < len(want) else 'none'}); neuron interpolation fuses "
                f"models of one architecture (any widths)")
    return gms, tgm, levels, tlevels


def neuron_interpolation(
    models: Sequence[nn.Module], target: nn.Module, data: Iterable[Any],
    config: NeuronInterpolation | None = None, *, weights: Sequence[float] | None = None,
    specs: Sequence[PermutationSpec] | None = None, target_spec: PermutationSpec | None = None,
    device: str | torch.device | None = None, show_progress: bool = False,
) -> tuple[nn.Module, InterpolationReport]:
    """Fuse ``models`` (one architecture, any widths) into a copy of ``target`` (the fused
    architecture; never modified) by neuron interpolation (module doc) on ``data`` (batches ``x``
    or ``(x, y)``).  ``weights``: each parent's share of the cluster mass (default uniform).
    Returns the fused model and an :class:`InterpolationReport`."""
    from ..fuse import interpolation_weights
    from ..groups import find_groups
    from ..trace import model_device

    cfg = config if config is not None else NeuronInterpolation()
    if isinstance(models, nn.Module) or len(models) < 2:
        raise InputError("neuron_interpolation needs at least two models")
    if not isinstance(target, nn.Module):
        raise InputError(f"target must be an nn.Module (an instance of the fused architecture), "
                         f"got {type(target).__name__}")
    dev = torch.device(device) if device is not None else model_device(models[0])
    shares = interpolation_weights(weights, len(models))
    x, y = _samples(data, cfg.max_batches, dev)
    parents = [copy.deepcopy(m).to(dev).eval() for m in models]
    fused = copy.deepcopy(target).to(dev).eval()
    try:
        with torch.no_grad():
            for m in parents:
                m(x[:2])
            fused(x[:2])
    except Exception as exc:
        raise InputError(f"the models do not accept the fusion data's samples of shape "
                         f"{tuple(x.shape[1:])}: {type(exc).__name__}: {exc}") from exc
    if specs is None:
        specs = [find_groups(m, (x[:2],)) for m in parents]
    if len(specs) != len(parents):
        raise InputError(f"specs: one per model ({len(parents)}), got {len(specs)}")
    if target_spec is None:
        target_spec = find_groups(fused, (x[:2],))
    gms, tgm, plevels, tlevels = _paired_levels(parents, fused, specs, target_spec, x)
    psizes = [{g.name: g.size for g in s.groups} for s in specs]
    tsizes = {g.name: g.size for g in target_spec.groups}
    widest = max(max(tsizes.values(), default=1), 1)
    if x.shape[0] < 10:
        raise InputError(f"neuron interpolation fits every level on the fusion samples: got "
                         f"{x.shape[0]}, give at least 10 (the paper uses 400)")
    del widest
    report = InterpolationReport(maps=[{} for _ in parents])
    groupings: dict[str, _Grouping] = {}
    fused_vals: dict[str, torch.Tensor] = {n.name: x for n in tgm.graph.nodes
                                           if n.op == "placeholder"}
    last_use = {name: lv.index for lv in tlevels for name in lv.inputs}
    named = dict(fused.named_parameters())
    for lv in progress(tlevels, "neuron interpolation, levels", show_progress, len(tlevels)):
        start = time.perf_counter()
        outs = [plevels[k][lv.index].output for k in range(len(gms))]
        values = [node_values(gm, x, [o])[o] for gm, o in zip(gms, outs)]
        sub = level_module(tgm, lv)
        inputs = [fused_vals[i] for i in lv.inputs]
        notes: list[str] = []
        pos_w: torch.Tensor | None = None
        if lv.group is None:
            t = averaged_logits(values, shares, cfg.class_shares)
            width = int(t.shape[-1])
        else:
            if lv.basis is None:
                groupings[lv.group] = _group_level(
                    lv, [plevels[k][lv.index] for k in range(len(gms))], gms, psizes, tsizes,
                    values, x, y, shares, cfg)
            else:
                notes.append(f"grouped at level {lv.basis}")
            grouping = groupings[lv.group]
            t, pos_w = cluster_targets(values, [plevels[k][lv.index] for k in range(len(gms))],
                                       psizes, lv, tsizes, grouping, shares)
            width = grouping.m
        del values
        form = _producer_module(tgm, lv)
        if form is not None and not _channel_axis_ok(form[0], lv, t.dim()):
            form = None
        params = [named[k] for k in lv.params if k in named]
        method = ""
        if form is not None and (cfg.variant == "linear" or cfg.init == "linear"):
            _drop_affine(form[2])
            _set_linear(form[0], form[1], _producer_input(sub, lv, inputs), t, cfg.ridge)
            method = "least squares"
        if cfg.variant == "gradient" or form is None:
            if cfg.variant == "linear":
                notes.append("no linear form")
            distil = lv.is_last and cfg.variant == "gradient"
            ran = _train_level(sub, params, inputs, t, lv.axis, pos_w,
                               cfg.temperature if distil else None, cfg,
                               cfg.last_epochs if lv.is_last else cfg.epochs)
            kind = "distillation" if distil else "gradient"
            method = f"{method} + {kind}" if method else kind
            notes.append(f"{ran} epochs" if params else "no parameters to fit")
        with torch.no_grad():
            out = torch.cat([sub(*(v[i:i + 256] for v in inputs))
                             for i in range(0, x.shape[0], 256)])
        fused_vals[lv.output] = out
        report.levels.append(LevelRecord(lv.index, lv.group, lv.output, width, method,
                                         _rel_error(out, t, lv.axis, pos_w),
                                         time.perf_counter() - start, "; ".join(notes)))
        for name in [n for n in fused_vals if last_use.get(n, len(tlevels)) <= lv.index]:
            del fused_vals[name]
    for g, grouping in groupings.items():
        for k in range(len(parents)):
            report.maps[k][g] = cluster_map(grouping.assign[k], grouping.mass[k], grouping.m)
    fallback = [r.index for r in report.levels if "no linear form" in r.note]
    if fallback:
        report.notes.append(f"levels {fallback} have no linear form (attention, a grouped conv, "
                            f"a leaf module, parameters outside the producer): trained by the "
                            f"gradient variant")
    fused.eval()
    return fused, report


def cluster_map(assign: torch.Tensor, mass: torch.Tensor, m: int) -> GroupMap:
    """One parent's grouping as a many-to-one map: ``M[c, j] = w_j / sum_{j' in c} w_j'`` over
    its own units in cluster ``c`` (a zero row where it has none), ``U[j, c] = [assign_j = c]``."""
    n = assign.numel()
    coupling = torch.zeros(n, m, dtype=torch.float64)
    coupling[torch.arange(n), assign.cpu()] = mass.double().cpu()
    merge = coupling.T / coupling.T.sum(1, keepdim=True).clamp_min(1e-30)
    unmerge = (coupling > 0).double()
    return GroupMap(merge=merge, unmerge=unmerge)


def _group_level(level: Level, levels: Sequence[Level], gms: Sequence[fx.GraphModule],
                 sizes: Sequence[dict[str, int]], target_sizes: dict[str, int],
                 values: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor | None,
                 shares: Sequence[float], cfg: NeuronInterpolation) -> _Grouping:
    """Importance, mass and grouping of every parent's units at ``level`` (module doc)."""
    g = level.group
    assert g is not None
    m = target_sizes[g]
    feats, mass = [], []
    for k, (lv, v) in enumerate(zip(levels, values)):
        rows = group_rows(lv.tree, g, sizes[k]) if lv.tree is not None else None
        if rows is None:
            raise ArchitectureMismatchError(f"level {level.index}: group {g!r} is not on the "
                                            f"output of models[{k}]'s level; levels can not be "
                                            f"paired")
        feats.append(as_rows(v, lv.axis, rows).double())
        s = importance_scores(gms[k], lv, sizes[k], x, y, cfg.importance, cfg.conductance_steps)
        mass.append(shares[k] * s / s.sum())
    d = feats[0].shape[1]
    if cfg.grouping == "kmeans" and sum(f.shape[0] for f in feats) >= m and d < m:
        raise InputError(f"level {level.index} ({level.output}): {x.shape[0]} fusion samples give "
                         f"each unit {d} values, fewer than the target's {m} units of group "
                         f"{g!r}: K-means can not tell {m} groups apart; give at least "
                         f"{math.ceil(m * x.shape[0] / max(d, 1))} samples or a narrower target")
    if any(f.shape[1] != d for f in feats):
        raise ArchitectureMismatchError(f"level {level.index} ({level.output}): the parents' "
                                        f"units have different numbers of values per unit "
                                        f"({[f.shape[1] for f in feats]}); the levels can not be "
                                        f"paired")
    if d > cfg.max_features:
        gen = torch.Generator().manual_seed(cfg.seed + level.index)
        cols = torch.randperm(d, generator=gen)[:cfg.max_features].sort().values
        feats = [f[:, cols.to(f.device)] for f in feats]
    assign = group_units(feats, mass, m, cfg.grouping, cfg.seed)
    return _Grouping(assign, mass, m)


# -- the pass -------------------------------------------------------------------------------------
def _complete_maps(maps: list[dict[str, GroupMap]], state: FusionState
                   ) -> list[dict[str, GroupMap]] | None:
    """Every model's groupings, plus the identity for groups no level grouped (inside a leaf,
    a head split) where the model has the target's width; None (no maps: a repair after it then
    compares unmapped statistics) if such a group's width differs."""
    if state.spec is None:
        return None
    out = []
    for k, mk in enumerate(maps):
        sizes = {g.name: g.size for g in state.spec_of(k).groups}
        full = dict(mk)
        for g in state.spec.groups:
            if g.name in full:
                continue
            if sizes.get(g.name) != g.size:
                state.report.notes.append(
                    f"neuron-interpolation: group {g.name!r} is in no level and models[{k}] has "
                    f"another width there: no maps recorded")
                return None
            full[g.name] = GroupMap(index=torch.arange(g.size))
        out.append(full)
    return out


class InterpolateNeurons(Pass):
    """Neuron interpolation as an align pass that also merges: sets ``state.fused`` (a model of
    the target's class) and ``state.maps`` (each parent's groupings as many-to-one maps, for the
    report and for REPAIR's targets; a cluster with no unit of a parent has a zero row in that
    parent's merge).  The maps describe the grouping, not the fitted weights: re-applying them
    with :func:`fxfuse.apply_fusion` averages the parents' weights, it does not redo the fit."""

    name = "neuron-interpolation"

    def __init__(self, config: NeuronInterpolation) -> None:
        self.config = config

    def requires(self, state: FusionState) -> None:
        if len(state.models) != len(state.states) or not state.models:
            raise PipelineError("neuron interpolation runs the models: give them (not only "
                                "state dicts)")

    def call(self, state: FusionState) -> None:
        fused, rep = neuron_interpolation(
            state.models, state.target_model, self.config.data, self.config,
            weights=state.weights, specs=[state.spec_of(k) for k in range(len(state.models))],
            target_spec=state.spec, device=state.device, show_progress=state.progress)
        state.fused = fused
        state.maps = _complete_maps(rep.maps, state)
        state.report.notes.append("neuron-interpolation:\n" + str(rep))
        state.report.notes += [f"neuron-interpolation: {n}" for n in rep.notes]

    def ensures(self, state: FusionState) -> None:
        from ..trace import nonfinite_key

        assert state.fused is not None
        key = nonfinite_key(state.fused.state_dict())
        if key is not None:
            raise PipelineError(f"fused tensor {key!r} is not finite")
