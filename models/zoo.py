"""All model factories in one namespace, e.g. ``models.zoo:resnet20`` for CLIs.

Every factory takes keyword arguments with defaults (``factory()`` works), builds a
deterministic random-init model (``seed=0`` by default; ``seed=None`` uses the
global RNG) and returns it in eval mode.
"""

from __future__ import annotations

from .convnext import convnext
from .densenet import densenet
from .features import (
    broadcast_net,
    channel_shuffle_net,
    concat_split_net,
    conv1d_net,
    conv3d_net,
    flatten_net,
    glu_mlp,
    grouped_conv,
    groupnorm_net,
    layernorm_mlp,
    rmsnorm_mlp,
    se_net,
    swiglu_mlp,
    tied_block_net,
    transpose_net,
)
from .leaf import leaf_mlp
from .mlp import mlp, mlp_classifier
from .mobilenet import mobilenetv2, mobilenetv2_lib
from .node import node_net
from .resnet import bottleneck_resnet, resnet20, resnet20_ln, resnet50
from .shufflenet import shufflenet, shufflenetv2_lib
from .squeezenet import squeezenet
from .transformer import llama_lm, sdpa_net
from .vgg import vgg, vgg_bn
from .vit import vit, vit_b

__all__ = [
    "bottleneck_resnet",
    "broadcast_net",
    "channel_shuffle_net",
    "concat_split_net",
    "conv1d_net",
    "conv3d_net",
    "convnext",
    "densenet",
    "flatten_net",
    "glu_mlp",
    "grouped_conv",
    "groupnorm_net",
    "layernorm_mlp",
    "leaf_mlp",
    "mlp",
    "mlp_classifier",
    "mobilenetv2",
    "mobilenetv2_lib",
    "node_net",
    "resnet20",
    "resnet20_ln",
    "resnet50",
    "rmsnorm_mlp",
    "se_net",
    "shufflenet",
    "shufflenetv2_lib",
    "squeezenet",
    "swiglu_mlp",
    "tied_block_net",
    "transpose_net",
    "vgg",
    "vgg_bn",
    "llama_lm",
    "sdpa_net",
    "vit",
    "vit_b",
]
