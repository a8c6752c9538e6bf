"""Small transformers written the way users write them (no nn.MultiheadAttention).

* :class:`SDPABlockNet`: pre-norm blocks with separate q/k/v projections, a reshape into
  (heads, head_dim), ``F.scaled_dot_product_attention`` and a GELU MLP, on float tokens.
* :class:`LlamaLM`: a LLaMA-style causal LM: token embedding, RMSNorm, rotary position
  embeddings (rotate_half), grouped-query attention (k/v heads repeated with expand+reshape),
  SwiGLU MLP, final RMSNorm and an output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import build


class SDPABlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size(0), x.size(1), x.size(2)
        h = self.ln1(x)
        q = self.q(h).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(h).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SDPABlockNet(nn.Module):
    """Linear token embedding -> 2 SDPA blocks -> LayerNorm -> Linear head (per token)."""

    def __init__(self, in_dim: int = 16, dim: int = 32, heads: int = 4, depth: int = 2,
                 num_classes: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(*[SDPABlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1 = nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.size(0), x.size(2)
        rep = self.heads // self.kv_heads
        x = x[:, :, None, :, :].expand(b, self.kv_heads, rep, t, self.head_dim)
        return x.reshape(b, self.heads, t, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t = x.size(0), x.size(1)
        h = self.norm1(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v),
                                           is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaLM(nn.Module):
    """Token ids (N, T) -> logits (N, T, vocab)."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, kv_heads: int = 2,
                 depth: int = 2, hidden: int = 64, max_len: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([LlamaBlock(dim, heads, kv_heads, hidden)
                                     for _ in range(depth)])
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // heads
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.size(1)
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def sdpa_net(seed: int | None = 0) -> SDPABlockNet:
    return build(SDPABlockNet, seed)


def llama_lm(kv_heads: int = 2, seed: int | None = 0) -> LlamaLM:
    return build(lambda: LlamaLM(kv_heads=kv_heads), seed)
