"""Levels: a network cut, along its traced graph, into the sub-networks that compute each group.

A *level* is the sub-network between the outputs of earlier levels and the node where one group's
units are computed (Luenam et al. 2025, "Model Fusion via Neuron Interpolation", who ask every
model class to declare its levels by hand; here they are read off the graph discovery traced and
its :class:`~fxfuse.groups.spec.PermutationSpec`):

* the **producer** of group ``g`` is a node whose output carries ``g`` on exactly one axis, as the
  only group there (``g``, or ``g`` repeated as GLU's ``(g + g)``), while none of its activation
  inputs carries ``g``: a Linear / conv / embedding / a user's leaf module where ``g``'s units are
  computed;
* the level's **output** is the producer extended through channel-wise followers with no mixing
  across units (BatchNorm: :data:`CHANNELWISE`), stopping before an elementwise nonlinearity
  (:data:`NONLINEAR`; ``Level.activation`` names it) or any other op, so a level's targets are
  pre-activations and the nonlinearity starts the next level;
* its **nodes** are the backward closure of the output up to earlier levels' outputs and the
  graph's inputs (parameters and constants included): everything the level computes, whatever
  layers they are (attention, a user's leaf module, a concat);
* a **residual stream** is one group written by many producers (a stem and every block's last
  layer): every producer is a level, ``Level.basis`` is the index of the stream's first level
  (``None`` on that one), where the stream is clustered once; the later writes are fitted in that
  basis (the authors' ``align_skip_connections``);
* a producer whose output carries several distinct groups (``heads x head_dim`` of an attention
  projection) or groups on several axes is not a level boundary: it stays inside the level that
  reads it;
* the **last level** (``group=None``) ends at the model's (first tensor) output.

Levels are in topological order of their outputs; level ``i`` reads only the outputs of levels
``< i`` (``Level.inputs``) and graph inputs.  ``Level.params`` are the ``state_dict`` keys whose
values the level's nodes use that no earlier level used (the parameters it owns: trained or
solved there); ``Level.shared_params`` the ones an earlier level owns.

API::

    levels = find_levels(model, example_inputs)          # or find_levels(model, x, spec=spec)
    for lv in levels: print(lv)
    sub = level_module(graph_module_of(model, spec), lv)  # an nn.Module: sub(*inputs) -> output

Used by neuron interpolation (:mod:`fxfuse.align.interp`) and by heterogeneous-depth fusion.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import InputError
from .groups.spec import PermutationSpec, tree_groups
from .ir.capture import SYMBOLIC
from .ir.layout import Tree

# -- per-op tables ------------------------------------------------------------------------------
# elementwise nonlinearities (a level's output stops before them: targets are pre-activations)
NONLINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
NONLINEAR_FUNCTIONS: frozenset[Any] = frozenset({
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
    torch.nn.functional.leaky_relu, torch.nn.functional.elu, torch.nn.functional.selu,
    torch.nn.functional.celu, torch.nn.functional.gelu, torch.nn.functional.silu,
    torch.nn.functional.mish, torch.sigmoid, torch.nn.functional.sigmoid, torch.tanh,
    torch.nn.functional.tanh, torch.nn.functional.hardtanh, torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid, torch.nn.functional.softplus,
})
NONLINEAR_METHODS = frozenset({"relu", "relu_", "sigmoid", "tanh", "sigmoid_", "tanh_"})
NONLINEAR_ATEN = frozenset({"relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh",
                            "hardtanh", "hardswish", "leaky_relu", "elu", "mish", "softplus"})
# channel-wise followers of a producer that stay in its level (no mixing across units)
CHANNELWISE: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

NONLINEAR = (NONLINEAR_MODULES, NONLINEAR_FUNCTIONS, NONLINEAR_METHODS, NONLINEAR_ATEN)


@dataclass(frozen=True)
class Level:
    """One level (module doc).  ``group`` is None for the last level (the model output)."""

    index: int
    group: str | None
    output: str            # the node whose values are the level's targets
    producer: str          # the node where the group's units are computed (== output if no BN)
    axis: int              # the axis of ``output`` the group lives on (-1 for the last level)
    tree: Tree | None      # that axis' layout tree (None for the last level)
    nodes: tuple[str, ...]  # every node the level computes, topological order (params included)
    inputs: tuple[str, ...]  # earlier levels' outputs and graph inputs it reads
    input_groups: tuple[str, ...]  # the groups those inputs carry
    activation: str | None  # the elementwise nonlinearity right after ``output`` (its op name)
    basis: int | None      # residual stream: the level where this group was clustered first
    params: tuple[str, ...]  # state_dict keys the level owns (first use)
    shared_params: tuple[str, ...]  # state_dict keys it uses that an earlier level owns

    @property
    def is_last(self) -> bool:
        return self.group is None

    def __str__(self) -> str:
        what = f"group {self.group!r}" if self.group else "output"
        extra = f", then {self.activation}" if self.activation else ""
        stream = f", stream basis of level {self.basis}" if self.basis is not None else ""
        return (f"level {self.index}: {what} at {self.output} (producer {self.producer}{extra}"
                f"{stream}); reads {', '.join(self.inputs) or 'nothing'}; "
                f"{len(self.nodes)} nodes, owns {len(self.params)} tensors")


def graph_module_of(model: nn.Module, spec: PermutationSpec,
                    example_inputs: Sequence[Any] | None = None
                    ) -> tuple[fx.GraphModule, dict[str, str]]:
    """The graph discovery traced for ``spec`` (the same node names) and, for an exported graph,
    its lifted placeholders' ``state_dict`` names (empty for a symbolic trace)."""
    from .trace import export_trace, symbolic_trace

    if spec.tracer == SYMBOLIC:
        return symbolic_trace(model, stack_traces=False), {}
    if example_inputs is None:
        raise InputError("an exported graph is specialised to its inputs: pass example_inputs")
    return export_trace(model, example_inputs)


def find_levels(model: nn.Module, example_inputs: Any, *, spec: PermutationSpec | None = None,
                graph: tuple[fx.GraphModule, dict[str, str]] | None = None) -> list[Level]:
    """The levels of ``model`` (module doc), in topological order; ``spec`` defaults to
    ``find_groups(model, example_inputs)`` and ``graph`` to :func:`graph_module_of`."""
    from .groups import find_groups
    from .trace import as_input_tuple

    inputs = as_input_tuple(example_inputs)
    if spec is None:
        spec = find_groups(model, inputs)
    gm, lifted = graph if graph is not None else graph_module_of(model, spec, inputs)
    return levels_of_graph(gm, spec, lifted)


def is_nonlinear(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is an elementwise nonlinearity (:data:`NONLINEAR`)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), NONLINEAR_MODULES)
    if node.op == "call_method":
        return str(node.target) in NONLINEAR_METHODS
    if node.op == "call_function":
        if node.target in NONLINEAR_FUNCTIONS:
            return True
        packet = getattr(node.target, "_overloadpacket", None)  # aten ops of an exported graph
        return packet is not None and getattr(packet, "__name__", "") in NONLINEAR_ATEN
    return False


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))


def _is_channelwise(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                    CHANNELWISE)


def _sources(node: fx.Node, spec: PermutationSpec, params: set[str]) -> list[fx.Node]:
    """The activation nodes ``node`` reads, looking through tuple plumbing: an input that is an
    element of a multi-output op's result (``getitem`` of a node with no activation entry, e.g.
    ``chunk`` or a leaf attention) stands for that op's own inputs."""
    out: list[fx.Node] = []
    stack = [a for a in node.all_input_nodes if a.name not in params]
    while stack:
        a = stack.pop()
        if a.name not in spec.activations and a.op != "placeholder":
            stack += [b for b in a.all_input_nodes if b.name not in params]
        else:
            out.append(a)
    return out


def _writes(node: fx.Node, group: str, gm: fx.GraphModule, spec: PermutationSpec) -> bool:
    """Whether ``node`` (or the multi-output module it is an element of) is a module with a
    matrix / kernel parameter whose output axis is in ``group``: it computes ``group``'s units
    even though its input carries ``group`` too (a leaf attention writing a residual stream)."""
    src = node
    if node.op == "call_function" and node.target is operator.getitem and node.args and \
            isinstance(node.args[0], fx.Node):
        src = node.args[0]
    if src.op != "call_module":
        return False
    prefix = f"{src.target}."
    for key, p in gm.get_submodule(str(src.target)).named_parameters(prefix=str(src.target)):
        if p.dim() < 2 or not key.startswith(prefix):
            continue
        for axis in range(p.dim()):
            if spec.roles.get((key, axis)) == "out" and group in spec.groups_of(key, axis):
                return True
    return False


def _unit_axis(spec: PermutationSpec, name: str) -> tuple[str, int, Tree] | None:
    """(group, axis, tree) if ``name``'s output carries exactly one distinct group, on one axis."""
    trees = spec.activations.get(name)
    if not trees:
        return None
    found = [(a, t, set(tree_groups(t))) for a, t in enumerate(trees) if tree_groups(t)]
    if len(found) != 1 or len(found[0][2]) != 1:
        return None
    axis, tree, groups = found[0]
    return next(iter(groups)), axis, tree


def _param_keys(node: fx.Node, gm: fx.GraphModule, lifted: dict[str, str],
                keys: set[str]) -> list[str]:
    """The state_dict keys a node reads directly (a module's tensors, an attribute, a lifted
    placeholder)."""
    if node.op == "call_module":
        prefix = f"{node.target}."
        return [k for k in keys if k.startswith(prefix)]
    if node.op == "get_attr":
        return [str(node.target)] if str(node.target) in keys else []
    if node.op == "placeholder" and node.name in lifted:
        return [lifted[node.name]] if lifted[node.name] in keys else []
    return []


def levels_of_graph(gm: fx.GraphModule, spec: PermutationSpec,
                    lifted: dict[str, str] | None = None) -> list[Level]:
    """:func:`find_levels` on an already traced graph (``lifted``: an exported graph's parameter
    placeholders -> ``state_dict`` names)."""
    lifted = lifted or {}
    nodes = list(gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    keys = set(gm.state_dict().keys()) | set(lifted.values())
    params = {n.name for n in nodes if n.op == "get_attr" or n.name in lifted}

    def carries(name: str, group: str) -> bool:
        return any(group in tree_groups(t) for t in spec.activations.get(name, ()))

    # producers and the level outputs that extend them
    ends: list[tuple[fx.Node, fx.Node, str | None, int, Tree | None, str | None]] = []
    for n in nodes:
        if not n.op.startswith("call"):
            continue
        unit = _unit_axis(spec, n.name)
        if unit is None:
            continue
        group, unit_axis, unit_tree = unit
        acts = _sources(n, spec, params)
        if any(carries(a.name, group) for a in acts) and not _writes(n, group, gm, spec):
            continue
        end = n
        while len(end.users) == 1:
            nxt = next(iter(end.users))
            if not (_is_channelwise(nxt, gm) and _unit_axis(spec, nxt.name) == unit):
                break
            end = nxt
        after = next((u for u in end.users if is_nonlinear(u, gm)), None)
        ends.append((n, end, group, unit_axis, unit_tree,
                     _op_name(after, gm) if after is not None else None))
    out_node = next(n for n in reversed(nodes) if n.op == "output")
    final = _first_tensor_node(out_node.args[0])
    if final is None:
        raise InputError("the model's output holds no tensor computed by the graph: there is "
                         "no last level to fit")
    ends.sort(key=lambda e: order[e[1].name])
    ends = [e for e in ends if e[1] is not final]
    boundaries: set[str] = {n.name for n in nodes if n.op == "placeholder" and n.name not in params}
    first_of: dict[str, int] = {}
    owned: set[str] = set()
    levels: list[Level] = []
    specs = [*ends, (final, final, None, -1, None, None)]
    for producer, out, g, axis, tree, act in specs:
        body, reads = _closure(out, boundaries)
        used: list[str] = []
        for name in body:
            for k in _param_keys(by_name[name], gm, lifted, keys):
                if k not in used:
                    used.append(k)
        mine = tuple(k for k in used if k not in owned)
        owned.update(mine)
        input_groups = tuple(dict.fromkeys(
            gg for r in reads for t in spec.activations.get(r, ()) for gg in tree_groups(t)))
        basis = None
        if g is not None:
            basis = first_of.get(g)
            first_of.setdefault(g, len(levels))
        levels.append(Level(len(levels), g, out.name, producer.name, axis, tree,
                            tuple(sorted(body, key=order.__getitem__)),
                            tuple(sorted(reads, key=order.__getitem__)), input_groups, act,
                            basis, mine, tuple(k for k in used if k not in mine)))
        boundaries.add(out.name)
    return levels


def _first_tensor_node(v: Any) -> fx.Node | None:
    if isinstance(v, fx.Node):
        return v
    if isinstance(v, (list, tuple)):
        for u in v:
            found = _first_tensor_node(u)
            if found is not None:
                return found
    if isinstance(v, dict):
        for u in v.values():
            found = _first_tensor_node(u)
            if found is not None:
                return found
    return None


def _closure(out: fx.Node, boundaries: set[str]) -> tuple[list[str], list[str]]:
    """(nodes computing ``out`` back to ``boundaries``, the boundary nodes read)."""
    body: dict[str, None] = {}
    reads: dict[str, None] = {}
    stack = [out]
    while stack:
        n = stack.pop()
        if n.name in body:
            continue
        body[n.name] = None
        for a in n.all_input_nodes:
            if a.name in boundaries:
                reads[a.name] = None
            elif a.name not in body:
                stack.append(a)
    return list(body), list(reads)


def level_module(gm: fx.GraphModule, level: Level) -> fx.GraphModule:
    """The level as a module of its own: ``sub(*values of level.inputs) -> value of
    level.output``, sharing ``gm``'s submodules and parameters (training it trains them).  Only
    for symbolically traced graphs (an exported graph lifts its parameters to inputs)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name in level.inputs:
        env[by_name[name]] = graph.placeholder(name)
    for name in level.nodes:
        node = by_name[name]
        if node.op == "placeholder":
            raise InputError(f"level {level.index} reads graph input {name!r} that is not one of "
                             f"its inputs; was the graph exported? levels run only on symbolic "
                             f"traces")
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[by_name[level.output]])
    return fx.GraphModule(gm, graph, f"level{level.index}")

