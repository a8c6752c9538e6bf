"""Rules for attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

``sdpa(q, k, v)`` with ``q: (.., L, E)``, ``k: (.., S, E)``, ``v: (.., S, Ev)``:
``softmax(q k^T / sqrt(E)) v`` sums over ``E`` (q and k share its permutation) and over ``S``
(k, v and the mask share it), and is equivariant in ``L`` (unless causal: positions matter), in
``Ev`` and in the batch/head axes.  With ``enable_gqa`` each k/v head serves ``Hq / Hkv``
consecutive query heads: ``q heads = kv heads x r`` with ``r`` free (the copies are identical).

``nn.MultiheadAttention`` packs ``[W_q; W_k; W_v]`` into ``in_proj_weight: (3E, E)``; each block's
rows are ``heads x head_dim``, so ``in_proj_weight[0] = (h x d_qk) + (h x d_qk) + (h x d_v)``
with one head atom ``h`` shared by q, k, v and the columns of ``out_proj.weight``
(``h x d_v``).  Head structure is found from the module's own layout, never given by hand.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ir.layout import Prod, Sum
from .elementwise import broadcast_relations
from .registry import Cut, OpView, Relation, Same, TensorHandle, axis_rule, decline, same

POSITIONS = "causal attention depends on token positions"


def _batch(t: TensorHandle, keep: int) -> TensorHandle:
    return TensorHandle(t.index, t.shape[:-keep], t.dtype)


@axis_rule(F.scaled_dot_product_attention)
def sdpa_rule(op: OpView) -> list[Relation]:
    q, k, v = op.tensor(0, "query"), op.tensor(1, "key"), op.tensor(2, "value")
    if min(q.ndim, k.ndim, v.ndim) < 2:
        raise decline("attention of 1-d tensors")
    mask, causal = op.arg(3, "attn_mask"), op.arg(5, "is_causal", False)
    gqa = op.arg(7, "enable_gqa", False)
    y = op.out
    rels: list[Relation] = [Same(q[-1], k[-1]), Same(k[-2], v[-2]), Same(y[-1], v[-1])]
    if causal:
        rels += [Cut(q[-2], POSITIONS), Cut(k[-2], POSITIONS), Cut(y[-2], POSITIONS)]
    else:
        rels.append(Same(q[-2], y[-2]))
    if gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        rep = op.new("query_heads_per_kv_head", q.shape[-3] // k.shape[-3])
        rels += [*same(q[-3], y[-3], Prod((k[-3], rep))), Same(k[-3], v[-3])]
        rels += broadcast_relations([_batch(q, 3)], _batch(y, 3))
        rels += broadcast_relations([_batch(k, 3), _batch(v, 3)], _batch(y, 3))
    else:
        rels += broadcast_relations([_batch(q, 2), _batch(k, 2), _batch(v, 2)], _batch(y, 2))
    if isinstance(mask, TensorHandle):
        if mask.shape[-1] > 1:
            rels.append(Same(mask[-1], k[-2]))
        if mask.ndim >= 2 and mask.shape[-2] > 1:
            rels.append(Same(mask[-2], y[-2]) if not causal else Cut(mask[-2], POSITIONS))
        rels += broadcast_relations([_batch(mask, 2)], _batch(y, 2))
    return rels


@axis_rule(nn.MultiheadAttention)
def multihead_attention_rule(op: OpView) -> list[Relation]:
    m = op.module
    if not isinstance(m, nn.MultiheadAttention):
        raise decline("not a torch MultiheadAttention module")
    w_in, b_in = op.param("in_proj_weight"), op.param("in_proj_bias")
    w_out, b_out = op.param("out_proj.weight"), op.param("out_proj.bias")
    if w_in is None or w_out is None or m.bias_k is not None or not m._qkv_same_embed_dim:
        raise decline("separate q/k/v projections or bias_k/bias_v are not described")
    q, k, v = op.arg(0, "query"), op.arg(1, "key"), op.arg(2, "value")
    if not all(isinstance(t, TensorHandle) for t in (q, k, v)) or q.ndim != 3:
        raise decline("unbatched input")
    outs = op.outs
    y = outs[0]
    heads, hd = m.num_heads, m.head_dim
    h = op.new("heads", heads)
    d_qk, d_v = op.new("qk_head_dim", hd), op.new("v_head_dim", hd)
    rows = Sum((Prod((h, d_qk)), Prod((h, d_qk)), Prod((h, d_v))))
    rels: list[Relation] = [*same(rows, w_in[0], *([b_in[0]] if b_in else []))]
    rels += same(w_in[1], q[-1], k[-1], v[-1])
    rels += [Same(w_out[1], Prod((h, d_v))), *same(w_out[0], y[-1], *([b_out[0]] if b_out else []))]
    b_ax, s_ax = (0, 1) if m.batch_first else (1, 0)
    rels += [*same(q[b_ax], k[b_ax], v[b_ax], y[b_ax]), Same(q[s_ax], y[s_ax]),
             Same(k[s_ax], v[s_ax])]
    if len(outs) > 1:  # attention weights (N, [H,] L, S); averaged ones ignore the heads
        w = outs[1]
        rels += [Same(w[0], y[b_ax]), Same(w[-2], q[s_ax]), Same(w[-1], k[s_ax])]
        if w.ndim == 4:
            rels.append(Same(w[1], h))
    for name, pos in (("key_padding_mask", 3), ("attn_mask", 5)):
        mask = op.arg(pos, name)
        if isinstance(mask, TensorHandle):
            if mask.ndim == 2 and name == "key_padding_mask":
                rels += [Same(mask[0], q[b_ax]), Same(mask[1], k[s_ax])]
            elif mask.ndim == 2:
                rels += [Same(mask[0], q[s_ax]), Same(mask[1], k[s_ax])]
            else:
                raise decline(f"a {mask.ndim}-d {name}")
    return rels
