"""The block sequence of a network: its levels along the stream, for depth alignment.

Built on the shared level finder (:func:`fxfuse.levels.find_levels`, whose *producers* are the
nodes where a group's units are computed) and on the traced graph's **stream cut points**: a node
``v`` is a cut point when every path from the inputs to the output passes through it, i.e. in
topological order no edge ``u -> w`` with ``pos(u) < pos(v) < pos(w)`` jumps over it.  The spans
between consecutive cut points are either single nodes (a plain chain) or parallel regions (a
residual branch beside its shortcut, attention beside the stream).  A **block** (depth level) is

* ``"residual"``: a span holding an ``add`` of two tensors, together with the following spans that
  stay inside the same module (``layer1.0``: its trailing ReLU; ``blocks.0``: attention and MLP
  sub-blocks); a residual span written directly in the root module (a Neural-ODE Euler step
  ``x + dt * f(x)``) is a block of its own;
* ``"layer"``: a producer of the level finder (a Linear / conv) with the chain ops that follow it
  up to the next producer or residual block (BatchNorm, ReLU); chain ops with no producer before
  them in the chain (``flatten``, a final norm, pooling) belong to the next layer.

A **stage** is a run of blocks with one output shape: a block whose output shape differs from
the previous block's starts a new stage (``layer2.0`` with its projection shortcut).  Blocks whose parameters are all used by an earlier block are
weight-tied to it (``Block.tied_to``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError
from ..trace import VALUE, TensorMeta, as_input_tuple, record_values

ADD_FUNCTIONS: frozenset[Any] = frozenset({operator.add, operator.iadd, torch.add})
ADD_METHODS = frozenset({"add", "add_"})


@dataclass(frozen=True)
class Block:
    """One depth level (module doc).  ``nodes``: graph node names in order; ``input``/``output``:
    the cut points before / at its end; ``keys``: the state_dict keys its nodes use (first use
    order); ``signature``: per key ``(owner type, local key, shape)``, equal for blocks whose
    weights can be copied into each other."""

    index: int
    kind: str  # "residual" | "layer"
    name: str
    nodes: tuple[str, ...]
    input: str
    output: str
    keys: tuple[str, ...]
    signature: tuple[tuple[str, str, tuple[int, ...]], ...]
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    stage: int
    tied_to: int | None = None
    joints: tuple[str, ...] = ()  # the cut points inside the block (each span's last node)

    @property
    def keeps_shape(self) -> bool:
        return self.shape_in == self.shape_out

    def __str__(self) -> str:
        tied = f", tied to block {self.tied_to}" if self.tied_to is not None else ""
        return (f"block {self.index} ({self.kind} {self.name!r}, stage {self.stage}): "
                f"{self.shape_in} -> {self.shape_out}, {len(self.keys)} tensors{tied}")


@dataclass
class BlockSequence:
    """A model's blocks, its traced graph (node values recorded on the example inputs) and the
    state_dict keys no block uses (``free_keys``: parameters read outside the stream)."""

    model: nn.Module
    graph: fx.GraphModule
    blocks: list[Block]
    free_keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def depth(self) -> int:
        """Number of blocks with their own parameters (weight-tied repeats not counted)."""
        return sum(b.tied_to is None for b in self.blocks)

    def stages(self) -> list[list[Block]]:
        out: list[list[Block]] = []
        for b in self.blocks:
            if not out or out[-1][-1].stage != b.stage:
                out.append([])
            out[-1].append(b)
        return out

    def __str__(self) -> str:
        return "\n".join(str(b) for b in self.blocks)


def _shape(node: fx.Node) -> tuple[int, ...]:
    v = node.meta.get(VALUE)
    return tuple(v.shape[1:]) if isinstance(v, TensorMeta) else ()


def is_add(node: fx.Node, stream: set[fx.Node] | None = None) -> bool:
    """An addition of two tensors computed from the inputs (a residual join; a learned
    positional embedding added to the stream is not one)."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in ADD_METHODS:
        pass
    else:
        return False
    tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)
               and isinstance(a.meta.get(VALUE), TensorMeta)
               and (stream is None or a in stream)]
    return len(tensors) == 2


def _stream_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes reachable from a graph input that reach the first tensor of the output, in order."""
    nodes = list(gm.graph.nodes)
    out = next(n for n in reversed(nodes) if n.op == "output")
    final = _first_node(out.args[0])
    if final is None:
        raise InputError("the model's output holds no computed tensor: it has no stream")
    fwd: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in fwd for a in n.all_input_nodes):
            fwd.add(n)
    back: set[fx.Node] = {final}
    for n in reversed(nodes):
        if n in back:
            back.update(n.all_input_nodes)
    return [n for n in nodes if n in fwd and n in back and n.op != "output"]


def _first_node(v: Any) -> fx.Node | None:
    if isinstance(v, fx.Node):
        return v
    if isinstance(v, (list, tuple)):
        for u in v:
            if (f := _first_node(u)) is not None:
                return f
    if isinstance(v, dict):
        for u in v.values():
            if (f := _first_node(u)) is not None:
                return f
    return None


def cut_points(nodes: Sequence[fx.Node]) -> list[int]:
    """Positions in ``nodes`` (topological) that no edge jumps over (module doc)."""
    pos = {n: i for i, n in enumerate(nodes)}
    reach = -1  # the furthest position an edge from an earlier node reaches
    cuts = []
    for i, n in enumerate(nodes):
        if reach <= i:
            cuts.append(i)
        ends = [pos[u] for u in n.users if u in pos]
        reach = max(reach, *ends) if ends else reach
    return cuts


def _owner(nodes: Sequence[fx.Node]) -> str:
    """The deepest module containing every node of ``nodes`` ("" for the root)."""
    paths = []
    for n in nodes:
        stack = list(n.meta.get("nn_module_stack", {}).keys())
        if n.op == "call_module" and stack and stack[-1] == n.target:
            stack = stack[:-1]  # a leaf's own module is not its owner
        paths.append(stack)
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return str(common[-1]) if common else ""


def _inside(node: fx.Node, owner: str) -> bool:
    return owner in node.meta.get("nn_module_stack", {})


def _keys_of(nodes: Sequence[fx.Node], gm: fx.GraphModule, state: dict[str, torch.Tensor]
             ) -> tuple[list[str], list[tuple[str, str, tuple[int, ...]]]]:
    keys: list[str] = []
    sig: list[tuple[str, str, tuple[int, ...]]] = []
    seen_nodes: set[fx.Node] = set()
    for n in nodes:
        reads = [n] + [a for a in n.all_input_nodes if a.op == "get_attr"]
        for r in reads:
            if r in seen_nodes:
                continue
            seen_nodes.add(r)
            if r.op == "call_module":
                mod = gm.get_submodule(str(r.target))
                for local in mod.state_dict():
                    key = f"{r.target}.{local}"
                    if key in state and key not in keys:
                        keys.append(key)
                        sig.append((type(mod).__name__, local, tuple(state[key].shape)))
            elif r.op == "get_attr" and str(r.target) in state and str(r.target) not in keys:
                keys.append(str(r.target))
                sig.append(("attr", "", tuple(state[str(r.target)].shape)))
    return keys, sig


def block_sequence(model: nn.Module, example_inputs: Any) -> BlockSequence:
    """The blocks of ``model`` (module doc), traced on ``example_inputs``."""
    from ..groups import find_groups
    from ..levels import find_levels, graph_module_of
    from ..trace import eval_mode

    inputs = as_input_tuple(example_inputs)
    with eval_mode(model):
        spec = find_groups(model, inputs)
        gm, lifted = graph_module_of(model, spec, inputs)
        if lifted:
            raise InputError("depth alignment needs a torch.fx symbolic trace of the model "
                             "(it was exported with torch.export)")
        levels = find_levels(model, inputs, spec=spec, graph=(gm, lifted))
        record_values(gm, inputs)
    producers = {lv.producer for lv in levels}
    state = gm.state_dict()
    nodes = _stream_nodes(gm)
    on_stream = set(nodes)
    cuts = cut_points(nodes)
    spans = [nodes[a + 1:b + 1] for a, b in zip(cuts, cuts[1:])]
    starts = [nodes[a] for a in cuts[:-1]]
    if cuts[0] != 0:  # several inputs: the first span starts at the graph's first node
        spans.insert(0, nodes[:cuts[0] + 1])
        starts.insert(0, nodes[0])

    # group spans into blocks: (kind, name, span indices)
    groups: list[tuple[str, str, list[int]]] = []
    pending: list[int] = []
    for i, span in enumerate(spans):
        residual = any(is_add(n, on_stream) for n in span)
        if groups and groups[-1][0] == "residual" and groups[-1][1] and not pending \
                and all(_inside(n, groups[-1][1]) for n in span):
            groups[-1][2].append(i)
            continue
        if residual:
            owner = _owner(span) or _owner([n for n in span if n.meta.get("nn_module_stack")]
                                           or span)
            if pending:  # chain ops before a block, with no layer before them: a layer of their own
                groups.append(("layer", "", pending))
                pending = []
            groups.append(("residual", owner, [i]))
            continue
        if any(n.name in producers for n in span):
            groups.append(("layer", "", pending + [i]))
            pending = []
            continue
        if groups and groups[-1][0] == "layer" and not pending:
            groups[-1][2].append(i)
        else:
            pending.append(i)
    if pending:
        groups.append(("layer", "", pending))

    blocks: list[Block] = []
    owned: dict[str, int] = {}
    used_names: dict[str, int] = {}
    stage, prev_shape = 0, None
    for kind, owner, idx in groups:
        bnodes = [n for i in idx for n in spans[i]]
        keys, sig = _keys_of(bnodes, gm, state)
        name = owner or _name(spans, idx, producers)
        if name in used_names:  # a tied module called again
            used_names[name] += 1
            name = f"{name}#{used_names[name]}"
        else:
            used_names[name] = 0
        shape_in, shape_out = _shape(starts[idx[0]]), _shape(spans[idx[-1]][-1])
        if prev_shape is not None and shape_out != prev_shape:
            stage += 1
        prev_shape = shape_out
        tied = None
        if keys and all(k in owned for k in keys):
            tied = owned[keys[0]]
        for k in keys:
            owned.setdefault(k, len(blocks))
        blocks.append(Block(len(blocks), kind, name, tuple(n.name for n in bnodes),
                            starts[idx[0]].name, spans[idx[-1]][-1].name, tuple(keys),
                            tuple(sig), shape_in, shape_out, stage, tied,
                            tuple(spans[i][-1].name for i in idx)))
    free = tuple(k for k in state if k not in owned)
    return BlockSequence(model, gm, blocks, free)


def _name(spans: Sequence[Sequence[fx.Node]], idx: Sequence[int], producers: set[str]) -> str:
    """A chain layer's name: its producer's module (else its first module node's target, else
    its first node's name)."""
    flat = [n for i in idx for n in spans[i]]
    for pick in (lambda n: n.name in producers, lambda n: n.op == "call_module"):
        for n in flat:
            if pick(n):
                return str(n.target) if n.op == "call_module" else n.name
    return flat[0].name
