"""Registry of reference models: ``ZOO``, :func:`get` and :func:`names`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import zoo
from ._utils import randn_inputs


@dataclass(frozen=True)
class ModelEntry:
    """One reference model: a deterministic factory plus deterministic example inputs."""

    name: str
    factory: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]]
    tags: frozenset[str]
    description: str


ZOO: dict[str, ModelEntry] = {}


def _register(
    name: str,
    factory: Callable[[], nn.Module],
    shapes: tuple[tuple[int, ...], ...],
    tags: set[str],
    description: str,
) -> None:
    if name in ZOO:
        raise ValueError(f"duplicate zoo entry {name!r}")
    ZOO[name] = ModelEntry(
        name=name,
        factory=factory,
        example_inputs=partial(randn_inputs, *shapes, seed=0),
        tags=frozenset(tags),
        description=description,
    )


def get(name: str) -> ModelEntry:
    """Return the entry called ``name`` (KeyError listing known names otherwise)."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(ZOO)}") from None


def names(tag: str | None = None, exclude: tuple[str, ...] = ("large",)) -> list[str]:
    """Names of entries (registration order) carrying ``tag`` and none of ``exclude``.

    A tag asked for explicitly is never excluded, so ``names("large")`` lists the
    large models.
    """
    excluded = set(exclude) - ({tag} if tag is not None else set())
    return [
        n
        for n, e in ZOO.items()
        if (tag is None or tag in e.tags) and not (e.tags & excluded)
    ]


IMG32 = ((2, 3, 32, 32),)
IMG16 = ((2, 3, 16, 16),)
TOKENS = ((2, 5, 16),)

# --- architectures -----------------------------------------------------------
_register(
    "mlp",
    zoo.mlp,
    ((2, 1, 28, 28),),
    {"mlp", "linear", "flatten"},
    "MLP 784-64-64-10 with nn.Flatten on 1x28x28 inputs.",
)
_register(
    "vgg",
    zoo.vgg,
    IMG32,
    {"conv", "maxpool", "flatten", "linear"},
    "Small VGG (16-16-M-32-32-M-64-M), flatten of a 64x4x4 map, 2 Linear layers.",
)
_register(
    "vgg_bn",
    zoo.vgg_bn,
    IMG32,
    {"conv", "batchnorm", "maxpool", "flatten", "linear"},
    "Small VGG with BatchNorm2d after every conv.",
)
_register(
    "resnet20",
    zoo.resnet20,
    IMG32,
    {"conv", "batchnorm", "residual"},
    "CIFAR ResNet-20 (widths 8/16/32), BN, 1x1-conv projection shortcuts.",
)
_register(
    "resnet20_ln",
    zoo.resnet20_ln,
    IMG32,
    {"conv", "layernorm", "permute", "residual"},
    "CIFAR ResNet-20 with channel LayerNorm (permute -> nn.LayerNorm(C) -> permute).",
)
_register(
    "bottleneck_resnet",
    zoo.bottleneck_resnet,
    IMG32,
    {"conv", "batchnorm", "residual", "bottleneck"},
    "Small bottleneck ResNet (1x1-3x3-1x1 x4 expansion, projection shortcuts), 4 blocks.",
)
_register(
    "mobilenetv2",
    zoo.mobilenetv2,
    IMG32,
    {"conv", "batchnorm", "residual", "depthwise", "se", "broadcast"},
    "MobileNetV2-style inverted residuals (ReLU6, depthwise 3x3) with conv-SE + hardsigmoid.",
)
_register(
    "mobilenetv2_lib",
    zoo.mobilenetv2_lib,
    IMG32,
    {"conv", "batchnorm", "residual", "depthwise"},
    "MobileNetV2 as libraries build it (17 inverted residuals, ReLU6, depthwise 3x3, residual "
    "when stride 1 and widths agree, 1x1 conv to 4x the last width) at 1/4 widths, library init.",
)
_register(
    "squeezenet",
    zoo.squeezenet,
    IMG32,
    {"conv", "concat", "maxpool"},
    "SqueezeNet 1.1 layout at 1/4 widths: 8 fire modules (1x1 squeeze + ReLU -> 1x1 and 3x3 "
    "expand, concatenated), max-pools, dropout -> 1x1 conv -> ReLU -> GAP classifier.",
)
_register(
    "densenet",
    zoo.densenet,
    IMG32,
    {"conv", "batchnorm", "concat", "avgpool"},
    "DenseNet-BC: 3 dense blocks of 3 BN-ReLU-conv layers (growth 8), transitions.",
)
_register(
    "shufflenet",
    zoo.shufflenet,
    IMG32,
    {"conv", "batchnorm", "depthwise", "concat", "split", "shuffle", "reshape"},
    "ShuffleNetV2-style: chunk split, depthwise branches, cat, channel shuffle; stride-2 and stride-1 units.",
)
_register(
    "shufflenetv2_lib",
    zoo.shufflenetv2_lib,
    IMG32,
    {"conv", "batchnorm", "depthwise", "concat", "split", "shuffle", "reshape", "maxpool"},
    "ShuffleNet V2 as libraries build it: stages of 1 downsampling + 3 / 7 / 3 split units, "
    "view/transpose/contiguous/view shuffle (groups 2), small widths.",
)
_register(
    "convnext",
    zoo.convnext,
    IMG32,
    {
        "conv",
        "depthwise",
        "layernorm",
        "permute",
        "residual",
        "linear",
        "layerscale",
        "broadcast",
    },
    "ConvNeXt-style: dw7x7 -> channels-last LN -> MLP(4x) GELU -> layer scale -> residual.",
)
_register(
    "node_net",
    zoo.node_net,
    IMG16,
    {"conv", "batchnorm", "residual", "tied"},
    "Neural-ODE net: one weight-tied ODE function applied 3x in an explicit Euler loop.",
)
_register(
    "resnet50",
    zoo.resnet50,
    ((1, 3, 224, 224),),
    {"conv", "batchnorm", "residual", "bottleneck", "maxpool", "large"},
    "Real ResNet-50 layout (3,4,6,3 bottlenecks, 1000 classes); benchmark only.",
)
_register(
    "vit_b",
    zoo.vit_b,
    ((1, 3, 224, 224),),
    {"conv", "layernorm", "residual", "attention", "linear", "concat", "large"},
    "ViT-B/16-sized pre-norm transformer with nn.MultiheadAttention; benchmark only.",
)

# --- single-feature models ---------------------------------------------------
_register(
    "conv1d_net",
    zoo.conv1d_net,
    ((2, 4, 32),),
    {"feature", "conv1d", "batchnorm"},
    "Conv1d + BatchNorm1d stack.",
)
_register(
    "conv3d_net",
    zoo.conv3d_net,
    ((2, 2, 6, 6, 6),),
    {"feature", "conv3d", "batchnorm"},
    "Conv3d + BatchNorm3d stack.",
)
_register(
    "grouped_conv",
    zoo.grouped_conv,
    IMG16,
    {"feature", "conv", "grouped"},
    "Conv2d groups=2 and groups=4 (not depthwise, with bias) between dense convs.",
)
_register(
    "groupnorm_net",
    zoo.groupnorm_net,
    IMG16,
    {"feature", "conv", "groupnorm"},
    "nn.GroupNorm(4, 16) after convs.",
)
_register(
    "rmsnorm_mlp",
    zoo.rmsnorm_mlp,
    TOKENS,
    {"feature", "mlp", "linear", "rmsnorm", "sequence"},
    "nn.RMSNorm on token features.",
)
_register(
    "layernorm_mlp",
    zoo.layernorm_mlp,
    TOKENS,
    {"feature", "mlp", "linear", "layernorm", "residual", "sequence"},
    "Pre-LN residual token MLP with final LayerNorm.",
)
_register(
    "glu_mlp",
    zoo.glu_mlp,
    TOKENS,
    {"feature", "mlp", "linear", "glu", "split", "sequence"},
    "F.glu and Linear(2H) -> chunk(2, -1) -> a * sigmoid(b).",
)
_register(
    "swiglu_mlp",
    zoo.swiglu_mlp,
    TOKENS,
    {"feature", "mlp", "linear", "glu", "residual", "sequence"},
    "Residual SwiGLU blocks: down(silu(gate(x)) * up(x)).",
)
_register(
    "se_net",
    zoo.se_net,
    IMG16,
    {"feature", "conv", "batchnorm", "se", "broadcast", "linear"},
    "Squeeze-excitation gate (GAP -> Linear -> ReLU -> Linear -> sigmoid -> multiply).",
)
_register(
    "broadcast_net",
    zoo.broadcast_net,
    IMG16,
    {"feature", "conv", "broadcast"},
    "Per-channel (C,1,1)/(1,C,1,1) parameters with mul/add/sub/div and scalar ops.",
)
_register(
    "concat_split_net",
    zoo.concat_split_net,
    IMG16,
    {"feature", "conv", "concat", "split"},
    "torch.cat of branches, torch.split [8, 16] and chunk(2), re-concatenation.",
)
_register(
    "flatten_net",
    zoo.flatten_net,
    ((2, 3, 8, 8),),
    {"feature", "conv", "flatten", "linear", "maxpool"},
    "conv -> x.view(x.size(0), -1) and torch.flatten(x, 1) -> Linear.",
)
_register(
    "transpose_net",
    zoo.transpose_net,
    ((2, 6, 16),),
    {"feature", "linear", "conv1d", "transpose", "sequence"},
    "Linear on tokens -> transpose(1, 2) -> Conv1d -> transpose back -> Linear.",
)
_register(
    "channel_shuffle_net",
    zoo.channel_shuffle_net,
    IMG16,
    {"feature", "conv", "shuffle", "reshape"},
    "conv -> channel shuffle (4 groups, reshape/transpose/reshape) -> conv.",
)
_register(
    "tied_block_net",
    zoo.tied_block_net,
    ((2, 16),),
    {"feature", "mlp", "linear", "tied"},
    "The same Linear-ReLU block module called 3 times in sequence.",
)
_register(
    "leaf_mlp",
    zoo.leaf_mlp,
    ((2, 1, 8, 8),),
    {"feature", "mlp", "linear", "leaf"},
    "Linear -> ReLU -> a user's GatedMixer kept whole as a leaf (rule on its input and output "
    "channels only) -> ReLU -> Linear.",
)

# --- transformers --------------------------------------------------------------------------
_register(
    "vit_tiny",
    zoo.vit,
    IMG32,
    {"transformer", "attention", "mha", "layernorm", "residual", "concat"},
    "ViT: conv patch embedding, class token, learned positional embedding, nn.MultiheadAttention.",
)
_register(
    "sdpa_net",
    zoo.sdpa_net,
    TOKENS,
    {"transformer", "attention", "sdpa", "layernorm", "residual", "sequence"},
    "Hand-written attention: q/k/v Linear -> view/transpose into heads -> SDPA -> out proj.",
)


def _token_ids(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 64, (2, 8), generator=gen),)


ZOO["llama_lm"] = ModelEntry(
    name="llama_lm",
    factory=zoo.llama_lm,
    example_inputs=_token_ids,
    tags=frozenset({"transformer", "attention", "sdpa", "rmsnorm", "rope", "gqa", "swiglu",
                    "embedding", "residual", "sequence"}),
    description="LLaMA-style LM: RMSNorm, RoPE (rotate_half), GQA (4 q / 2 kv heads), SwiGLU.",
)
