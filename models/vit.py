"""Vision Transformer (pre-norm, nn.MultiheadAttention). ``vit_b`` is ViT-B/16-sized."""

from __future__ import annotations

import torch
from torch import nn

from ._utils import build


class EncoderBlock(nn.Module):
    """x + MHA(LN(x)); x + MLP(LN(x)) with MLP = Linear -> GELU -> Linear."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        a = self.attn(h, h, h, need_weights=False)[0]
        x = x + a
        h = self.ln2(x)
        return x + self.fc2(self.act(self.fc1(h)))


class ViT(nn.Module):
    """Conv patch embedding -> [cls] + tokens + learned pos-emb -> blocks -> LN -> Linear on [cls]."""

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *[EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit(
    image_size: int = 32,
    patch_size: int = 8,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 64,
    num_classes: int = 10,
    seed: int | None = 0,
) -> ViT:
    """Generic ViT factory (defaults: a tiny ViT for (N, 3, 32, 32); not registered in ZOO)."""
    return build(
        lambda: ViT(image_size, patch_size, dim, depth, heads, mlp_dim, num_classes),
        seed,
    )


def vit_b(num_classes: int = 1000, seed: int | None = 0) -> ViT:
    """ViT-B/16 layout (768 dim, 12 blocks, 12 heads, MLP 3072) for (N, 3, 224, 224)."""
    return vit(224, 16, 768, 12, 12, 3072, num_classes, seed)
