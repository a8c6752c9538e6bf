"""Small single-feature models, one per graph pattern, so each can be tested in isolation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import build, channel_shuffle


class Conv1dNet(nn.Module):
    """Conv1d-BN1d-ReLU x2 -> GAP -> Linear. Input (N, 4, 32)."""

    def __init__(self, in_ch: int = 4, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_ch, width, 3, padding=1, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class Conv3dNet(nn.Module):
    """Conv3d-BN3d-ReLU x2 -> GAP -> Linear. Input (N, 2, 6, 6, 6)."""

    def __init__(self, in_ch: int = 2, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_ch, width, 3, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class GroupedConvNet(nn.Module):
    """conv -> grouped conv (groups=2) -> grouped conv (groups=4) -> conv, all with bias. Input (N, 3, 16, 16)."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.gconv2 = nn.Conv2d(width, width, 3, padding=1, groups=2)
        self.relu2 = nn.ReLU()
        self.gconv4 = nn.Conv2d(width, 2 * width, 3, padding=1, groups=4)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.relu4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.gconv2(x))
        x = self.relu3(self.gconv4(x))
        x = self.relu4(self.conv4(x))
        return self.fc(self.flatten(self.pool(x)))


class GroupNormNet(nn.Module):
    """conv -> GroupNorm(4, 16) -> ReLU, twice -> GAP -> Linear. Input (N, 3, 16, 16)."""

    def __init__(self, width: int = 16, groups: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.gn1 = nn.GroupNorm(groups, width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.gn2 = nn.GroupNorm(groups, width)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.gn1(self.conv1(x)))
        x = self.relu2(self.gn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


class RMSNormMLP(nn.Module):
    """Token MLP: Linear -> RMSNorm -> GELU -> Linear -> RMSNorm -> ReLU -> Linear. Input (N, 5, 16)."""

    def __init__(self, in_dim: int = 16, hidden: int = 32, out_dim: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.norm1 = nn.RMSNorm(hidden, eps=1e-6)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.RMSNorm(hidden, eps=1e-6)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.fc1(x)))
        x = self.act2(self.norm2(self.fc2(x)))
        return self.head(x)


class PreNormMLPBlock(nn.Module):
    """x + fc2(relu(fc1(LN(x))))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class LayerNormMLP(nn.Module):
    """Linear embed -> 2 pre-LN residual MLP blocks -> final LN -> Linear head. Input (N, 5, 16)."""

    def __init__(
        self, in_dim: int = 16, dim: int = 32, hidden: int = 64, out_dim: int = 8
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.block1 = PreNormMLPBlock(dim, hidden)
        self.block2 = PreNormMLPBlock(dim, hidden)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.block1(x)
        x = self.block2(x)
        return self.head(self.norm(x))


class GLUMLP(nn.Module):
    """Linear(2H) -> F.glu(dim=-1); Linear(2H) -> chunk(2, -1) -> a * sigmoid(b); Linear head. Input (N, 5, 16)."""

    def __init__(self, in_dim: int = 16, hidden: int = 32, out_dim: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, 2 * hidden)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.fc1(x), dim=-1)
        parts = self.fc2(x).chunk(2, dim=-1)
        x = parts[0] * torch.sigmoid(parts[1])
        return self.head(x)


class SwiGLUBlock(nn.Module):
    """x + down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class SwiGLUMLP(nn.Module):
    """Linear embed -> 2 residual SwiGLU blocks -> Linear head. Input (N, 5, 16)."""

    def __init__(
        self, in_dim: int = 16, dim: int = 32, hidden: int = 48, out_dim: int = 8
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.block1 = SwiGLUBlock(dim, hidden)
        self.block2 = SwiGLUBlock(dim, hidden)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.block1(x)
        x = self.block2(x)
        return self.head(x)


class SEGate(nn.Module):
    """Squeeze-excitation with Linear layers: GAP -> flatten -> Linear -> ReLU -> Linear -> sigmoid -> x * s[..., None, None]."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(channels, reduced)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(reduced, channels)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.flatten(self.pool(x))
        s = self.sigmoid(self.fc2(self.relu(self.fc1(s))))
        s = s.unsqueeze(-1).unsqueeze(-1)
        return x * s


class SENet(nn.Module):
    """conv-BN-ReLU x2 -> SE gate -> conv-ReLU -> GAP -> Linear. Input (N, 3, 16, 16)."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.se = SEGate(width, width // 4)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.features(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.flatten(self.pool(x)))


class BroadcastNet(nn.Module):
    """Broadcasting elementwise ops with per-channel parameters. Input (N, 3, 16, 16).

    conv1 -> * scale(C,1,1) + bias(1,C,1,1) -> relu -> conv2 -> torch.sub(., shift(C,1,1))
    -> torch.div(., div(C,1,1)) -> * 2 -> + conv3(h) -> - 0.5 -> relu -> GAP -> Linear.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.scale = nn.Parameter(0.5 + torch.rand(width, 1, 1))
        self.bias = nn.Parameter(0.1 * torch.randn(1, width, 1, 1))
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 1)
        self.shift = nn.Parameter(0.1 * torch.randn(width, 1, 1))
        self.div = nn.Parameter(0.5 + torch.rand(width, 1, 1))
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) * self.scale + self.bias
        h = self.relu1(h)
        y = torch.sub(self.conv2(h), self.shift)
        y = torch.div(y, self.div)
        y = y * 2
        y = y + self.conv3(h)
        y = self.relu2(y - 0.5)
        return self.fc(self.flatten(self.pool(y)))


class ConcatSplitNet(nn.Module):
    """cat(conv_a 8ch, conv_b 16ch) -> split [8, 16] -> convs -> cat -> chunk(2) -> convs -> cat. Input (N, 3, 16, 16)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv_p1 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv_p2 = nn.Conv2d(16, 12, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv_q1 = nn.Conv2d(12, 8, 3, padding=1)
        self.conv_q2 = nn.Conv2d(12, 8, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.conv_a(x), self.conv_b(x)], dim=1)
        h = self.relu1(h)
        p = torch.split(h, [8, 16], dim=1)
        h = torch.cat([self.conv_p1(p[0]), self.conv_p2(p[1])], dim=1)
        h = self.relu2(h)
        q = h.chunk(2, dim=1)
        h = torch.cat([self.conv_q1(q[0]), self.conv_q2(q[1])], dim=1)
        h = self.relu3(h)
        return self.fc(self.flatten(self.pool(h)))


class FlattenNet(nn.Module):
    """conv -> maxpool -> {x.view(x.size(0), -1) -> Linear} + {conv -> torch.flatten(., 1) -> Linear} -> Linear.

    Input (N, 3, 8, 8); the flatten sees 8x4x4 and 4x4x4 feature maps.
    """

    def __init__(self, width: int = 8, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc_view = nn.Linear(width * 16, hidden)
        self.conv2 = nn.Conv2d(width, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc_flat = nn.Linear(4 * 16, hidden)
        self.relu3 = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        a = self.fc_view(x.view(x.size(0), -1))
        b = self.fc_flat(torch.flatten(self.relu2(self.conv2(x)), 1))
        return self.head(self.relu3(a + b))


class TransposeNet(nn.Module):
    """Linear on tokens -> transpose(1, 2) -> Conv1d over the sequence -> transpose back -> Linear. Input (N, 6, 16)."""

    def __init__(self, in_dim: int = 16, dim: int = 24, out_dim: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.relu1 = nn.ReLU()
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(x))
        x = x.transpose(1, 2)
        x = self.relu2(self.conv(x))
        x = x.transpose(1, 2)
        return self.head(x)


class ChannelShuffleNet(nn.Module):
    """conv -> ReLU -> channel shuffle (4 groups) -> conv -> ReLU -> GAP -> Linear. Input (N, 3, 16, 16)."""

    def __init__(self, width: int = 16, groups: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = channel_shuffle(x, self.groups)
        x = self.relu2(self.conv2(x))
        return self.fc(self.flatten(self.pool(x)))


class TiedBlockNet(nn.Module):
    """Linear-ReLU -> the same (Linear -> ReLU) block module called 3 times -> Linear. Input (N, 16)."""

    def __init__(
        self, in_dim: int = 16, dim: int = 32, repeats: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.repeats = repeats
        self.embed = nn.Linear(in_dim, dim)
        self.relu = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.embed(x))
        for _ in range(self.repeats):
            x = self.block(x)
        return self.head(x)


def conv1d_net(seed: int | None = 0) -> Conv1dNet:
    """Conv1d + BatchNorm1d stack; input (N, 4, 32)."""
    return build(Conv1dNet, seed)


def conv3d_net(seed: int | None = 0) -> Conv3dNet:
    """Conv3d + BatchNorm3d stack; input (N, 2, 6, 6, 6)."""
    return build(Conv3dNet, seed)


def grouped_conv(seed: int | None = 0) -> GroupedConvNet:
    """Grouped convs (groups=2, groups=4) between dense convs; input (N, 3, 16, 16)."""
    return build(GroupedConvNet, seed)


def groupnorm_net(seed: int | None = 0) -> GroupNormNet:
    """nn.GroupNorm(4, 16) after convs; input (N, 3, 16, 16)."""
    return build(GroupNormNet, seed)


def rmsnorm_mlp(seed: int | None = 0) -> RMSNormMLP:
    """nn.RMSNorm on token features; input (N, 5, 16)."""
    return build(RMSNormMLP, seed)


def layernorm_mlp(seed: int | None = 0) -> LayerNormMLP:
    """Pre-LN residual token MLP; input (N, 5, 16)."""
    return build(LayerNormMLP, seed)


def glu_mlp(seed: int | None = 0) -> GLUMLP:
    """F.glu and chunk-based GLU; input (N, 5, 16)."""
    return build(GLUMLP, seed)


def swiglu_mlp(seed: int | None = 0) -> SwiGLUMLP:
    """Residual SwiGLU blocks; input (N, 5, 16)."""
    return build(SwiGLUMLP, seed)


def se_net(seed: int | None = 0) -> SENet:
    """Squeeze-excitation (Linear) gate on a conv net; input (N, 3, 16, 16)."""
    return build(SENet, seed)


def broadcast_net(seed: int | None = 0) -> BroadcastNet:
    """Broadcasting per-channel parameters and scalar elementwise ops; input (N, 3, 16, 16)."""
    return build(BroadcastNet, seed)


def concat_split_net(seed: int | None = 0) -> ConcatSplitNet:
    """torch.cat / torch.split (unequal) / chunk (equal); input (N, 3, 16, 16)."""
    return build(ConcatSplitNet, seed)


def flatten_net(seed: int | None = 0) -> FlattenNet:
    """conv -> view(N, -1) / torch.flatten -> Linear; input (N, 3, 8, 8)."""
    return build(FlattenNet, seed)


def transpose_net(seed: int | None = 0) -> TransposeNet:
    """Linear on tokens, transpose, Conv1d, transpose back; input (N, 6, 16)."""
    return build(TransposeNet, seed)


def channel_shuffle_net(groups: int = 4, seed: int | None = 0) -> ChannelShuffleNet:
    """conv -> channel shuffle -> conv; input (N, 3, 16, 16)."""
    return build(lambda: ChannelShuffleNet(groups=groups), seed)


def tied_block_net(repeats: int = 3, seed: int | None = 0) -> TiedBlockNet:
    """One Linear-ReLU block module called ``repeats`` times; input (N, 16)."""
    return build(lambda: TiedBlockNet(repeats=repeats), seed)
