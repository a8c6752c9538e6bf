"""Re-expressing a model at another depth: expansion with exact identities, collapse by fitting.

**Expansion** (shallow model ``S`` -> the deeper architecture ``D``, map ``phi``): a copy of the
``D`` template whose block ``phi(i)`` gets ``S``'s block ``i`` tensors (equal signatures, copied
in order), whose parameters outside every block come from ``S`` by name, and whose unmatched
blocks are set to the identity (:mod:`fxfuse.depth.identity`; tensors an identity leaves alone
keep the template's values, so fusing with the template averages its block towards the
identity).  The result computes ``S``'s function: checked on the example inputs to relative
``tolerance`` (``max|y_D - y_S| / max|y_S|``), else :class:`DepthError`.

**Collapse** (deep model ``D`` -> the shallower architecture ``S``, map ``phi`` of ``S``'s blocks
onto ``D``'s): ``S``'s block ``i`` replaces ``D``'s blocks ``phi(i) .. phi(i+1) - 1`` (block 0
also the unmatched ones before ``phi(0)``).  It starts from ``D``'s block ``phi(i)`` and, where it
stands for several blocks, is fitted by Adam to the composed blocks on data: inputs ``h`` = ``D``'s
activations entering ``phi(i)``, targets ``t`` = ``D``'s activations leaving the span, loss
``||block(h) - t||^2 / ||t - mean(t)||^2``.  The fitted level is an approximation and is reported
with its loss before and after; nothing is collapsed without data.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError
from ..trace import eval_mode, symbolic_trace
from .blocks import Block, BlockSequence
from .errors import DepthError
from .identity import identity_tensors
from .similarity import _Capture

State = dict[str, torch.Tensor]


def _copy_block(src_state: State, a: Block, dst_state: State, b: Block, what: str) -> None:
    if a.signature != b.signature:
        raise DepthError(
            f"{what}: block {a.index} ({a.name!r}) and block {b.index} ({b.name!r}) have "
            f"different layers or shapes, so one can not stand for the other; give a level map "
            f"(DepthAlignment(map=...)) that pairs blocks of equal shapes")
    for ka, kb in zip(a.keys, b.keys):
        dst_state[kb] = src_state[ka].detach().clone().to(dst_state[kb].device)


def _copy_free(src: BlockSequence, dst: BlockSequence, src_state: State, dst_state: State,
               what: str) -> None:
    for k in src.free_keys:
        if k not in dst_state or dst_state[k].shape != src_state[k].shape:
            raise DepthError(f"{what}: parameter {k!r} outside the blocks has no counterpart of "
                             f"shape {tuple(src_state[k].shape)} in the target architecture")
        dst_state[k] = src_state[k].detach().clone()


def rel_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    scale = float(ref.abs().max())
    return float((ref - got).abs().max()) / (scale if scale > 0 else 1.0)


def _outputs(model: nn.Module, inputs: Sequence[object]) -> torch.Tensor:
    with eval_mode(model):
        out = model(*inputs)
    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            out = next(iter(out.values()))
        else:
            out = out[0]
    return out.detach().double()


def expand(shallow: BlockSequence, template: BlockSequence, phi: Sequence[int],
           example_inputs: Sequence[object], tolerance: float = 1e-5
           ) -> tuple[nn.Module, list[str]]:
    """``shallow`` re-expressed in ``template``'s architecture (module doc) and one line per
    inserted block."""
    model = copy.deepcopy(template.model)
    state: State = {k: v.detach().clone() for k, v in template.model.state_dict().items()}
    src = shallow.model.state_dict()
    what = f"expanding {type(shallow.model).__name__} to {type(template.model).__name__}"
    for i, j in enumerate(phi):
        _copy_block(src, shallow.blocks[i], state, template.blocks[j], what)
    _copy_free(shallow, template, src, state, what)
    lines = []
    for j, b in enumerate(template.blocks):
        if j in phi:
            continue
        values, done = identity_tensors(template, b, state)
        state.update(values)
        lines.append(f"inserted block {j} ({b.kind} {b.name!r}) as the identity: "
                     f"{'; '.join(done) or 'no tensor changed'}")
    model.load_state_dict(state)
    err = rel_error(_outputs(shallow.model, example_inputs), _outputs(model, example_inputs))
    if not err <= tolerance:
        raise DepthError(f"{what}: the expanded model differs from the shallow one by relative "
                         f"{err:.3g} (> {tolerance:g}) on the example inputs; inserted: "
                         f"{'; '.join(lines) or 'nothing'}")
    return model, lines


def block_module(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """``block`` of ``gm`` as a module ``sub(x_in) -> x_out``, sharing ``gm``'s parameters."""
    by_name = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {by_name[block.input]: graph.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise DepthError(f"block {block.index} ({block.name!r}) reads {a.name!r}, "
                                 f"computed outside it: it can not be fitted on its own")
            env[a] = graph.node_copy(a, arg)
        return env[a]

    for name in block.nodes:
        node = by_name[name]
        env[node] = graph.node_copy(node, arg)
    graph.output(env[by_name[block.output]])
    return fx.GraphModule(gm, graph, f"block{block.index}")


def _capture(seq: BlockSequence, names: set[str], batches: Sequence[torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with eval_mode(seq.graph):
        for x in batches:
            cap = _Capture(seq.graph, names)
            cap.run(x)
            for n, v in cap.seen.items():
                got[n].append(v)
    return {n: torch.cat(v) for n, v in got.items()}


def _fit(sub: nn.Module, h: torch.Tensor, t: torch.Tensor, steps: int, lr: float,
         seed: int = 0) -> tuple[float, float]:
    """Adam on ``||sub(h) - t||^2 / ||t - mean t||^2``; (loss before, loss after)."""
    params = [p for p in sub.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    denom = float((t - t.mean(dim=0, keepdim=True)).pow(2).sum()) / t.shape[0]
    denom = denom if denom > 0 else 1.0

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return (sub(h[idx]) - t[idx]).pow(2).sum() / (idx.numel() * denom)

    everything = torch.arange(h.shape[0])
    with torch.no_grad():
        before = float(loss_on(everything))
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batch = min(128, h.shape[0])
    sub.eval()  # BatchNorm keeps its statistics: the block is fitted as it will run
    for _ in range(steps):
        idx = torch.randint(0, h.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        loss_on(idx).backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        after = float(loss_on(everything))
    return before, after


NEIGHBOURS = ("best", "previous", "next")


def _spans(phi: Sequence[int], n: int, into: Sequence[str]) -> list[tuple[int, int]]:
    """Each target block's span ``[start, end)`` of deep blocks, given where every run of
    unmatched deep blocks between two matched ones goes (``into[r]``: "previous" / "next")."""
    starts, ends = list(phi), [j + 1 for j in phi]
    starts[0], ends[-1] = 0, n  # unmatched blocks at either end have one neighbour
    for r in range(len(phi) - 1):
        if phi[r + 1] - phi[r] > 1:
            if into[r] == "previous":
                ends[r] = phi[r + 1]
            else:
                starts[r + 1] = phi[r] + 1
    return list(zip(starts, ends))


def collapse(deep: BlockSequence, template: BlockSequence, phi: Sequence[int],
             batches: Sequence[torch.Tensor] | None, steps: int = 200, lr: float = 1e-3,
             into: str = "best") -> tuple[nn.Module, list[str]]:
    """``deep`` re-expressed in the shallower ``template`` architecture (module doc) and one
    line per collapse.  ``into``: where a run of unmatched deep blocks between two matched ones
    goes: the ``"previous"`` or ``"next"`` matched block, or ``"best"``: both are fitted and the
    lower fitted loss on the data wins (stated in the line)."""
    if into not in NEIGHBOURS:
        raise InputError(f"collapse: into must be one of {NEIGHBOURS}, got {into!r}")
    what = f"collapsing {type(deep.model).__name__} to {type(template.model).__name__}"
    n, m = len(deep.blocks), len(phi)
    runs = [r for r in range(m - 1) if phi[r + 1] - phi[r] > 1]
    first = _spans(phi, n, ["previous"] * max(m - 1, 0))
    if any(e - s > 1 for s, e in first) and not batches:
        names = ", ".join(repr(deep.blocks[j].name) for j in range(n) if j not in phi)
        raise InputError(f"{what}: merging blocks ({names}) into their neighbours needs data to "
                         f"fit the merged blocks on; pass data= (batches of inputs) or choose the "
                         f"deeper model as the target")
    model = copy.deepcopy(template.model)
    state: State = {k: v.detach().clone() for k, v in template.model.state_dict().items()}
    src = deep.model.state_dict()
    for i, j in enumerate(phi):
        _copy_block(src, deep.blocks[j], state, template.blocks[i], what)
    _copy_free(deep, template, src, state, what)
    model.load_state_dict(state)
    if not batches or all(e - s == 1 for s, e in first):
        return model, []
    candidates = {tuple(_spans(phi, n, ["previous" if r != q else side for r in range(m - 1)]))
                  for q in runs for side in ("previous", "next")} | {tuple(first)}
    wanted = {deep.blocks[s].input for c in candidates for s, _ in c} | {
        deep.blocks[e - 1].output for c in candidates for _, e in c}
    acts = _capture(deep, wanted, batches)
    gm = symbolic_trace(model, stack_traces=False)
    fitted: dict[tuple[int, int, int], tuple[float, float, State]] = {}

    def fit(i: int, s: int, e: int) -> tuple[float, float, State]:
        """Block ``i`` fitted to deep blocks ``s .. e-1`` from the copied start (memoised)."""
        if (i, s, e) not in fitted:
            block = template.blocks[i]
            h, t = acts[deep.blocks[s].input], acts[deep.blocks[e - 1].output]
            if h.shape[1:] != block.shape_in or t.shape[1:] != block.shape_out:
                raise DepthError(f"{what}: blocks {s}..{e - 1} map {tuple(h.shape[1:])} -> "
                                 f"{tuple(t.shape[1:])} but the target's block {i} "
                                 f"({block.name!r}) maps {block.shape_in} -> "
                                 f"{block.shape_out}: give another level map")
            model.load_state_dict({**model.state_dict(), **{k: state[k] for k in block.keys}})
            before, after = _fit(block_module(gm, block), h, t, steps, lr)
            now = model.state_dict()
            fitted[(i, s, e)] = (before, after, {k: now[k].clone() for k in block.keys})
        return fitted[(i, s, e)]

    choice = {r: "previous" if into == "best" else into for r in runs}
    notes: dict[int, str] = {}
    if into == "best":
        for r in runs:
            prev = _spans(phi, n, ["previous"] * (m - 1))
            nxt = _spans(phi, n, ["previous" if q != r else "next" for q in range(m - 1)])
            loss_prev = fit(r, *prev[r])[1]
            loss_next = fit(r + 1, *nxt[r + 1])[1]
            choice[r] = "previous" if loss_prev <= loss_next else "next"
            notes[r] = (f" (into the {choice[r]} block: fitted loss {loss_prev:.4g} as part of "
                        f"block {r}, {loss_next:.4g} as part of block {r + 1})")
    spans = _spans(phi, n, [choice.get(r, "previous") for r in range(m - 1)])
    lines = []
    final: State = {}
    for i, (s, e) in enumerate(spans):
        if e - s == 1:
            continue
        before, after, tensors = fit(i, s, e)
        final.update(tensors)
        why = "".join(notes[r] for r in runs if r in notes and i in (r, r + 1) and (
            (choice[r] == "previous" and i == r) or (choice[r] == "next" and i == r + 1)))
        lines.append(f"collapsed blocks {s}..{e - 1} "
                     f"({', '.join(repr(deep.blocks[k].name) for k in range(s, e))}) into "
                     f"block {i} ({template.blocks[i].name!r}), fitted on "
                     f"{acts[deep.blocks[s].input].shape[0]} samples: relative loss "
                     f"{before:.4g} -> {after:.4g}{why}")
    model.load_state_dict({**state, **final})
    return model, lines
