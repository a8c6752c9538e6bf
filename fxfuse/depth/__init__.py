"""Heterogeneous depth: models with different numbers of blocks or layers, fused at one depth.

* :mod:`.blocks`: a model's block sequence (on the shared level finder :mod:`fxfuse.levels`);
* :mod:`.similarity`: block similarity (linear CKA on data, or weight spectra);
* :mod:`.match`: the monotone block map by dynamic programming;
* :mod:`.identity`: exact identity blocks (zero residual branch, identity Linear / conv / BN);
* :mod:`.expand`: expansion (exact) and collapse (fitted on data);
* :mod:`.align`: :func:`align_depth` and its config :class:`DepthAlignment`.
"""

from __future__ import annotations

from .align import DepthAlignment, DepthReport, ModelDepth, align_depth, needs_depth_alignment
from .blocks import Block, BlockSequence, block_sequence
from .errors import DepthError, NoExactIdentityError
from .expand import collapse, expand
from .identity import IDENTITY_RULES, identity_rule, identity_tensors
from .match import match_levels
from .similarity import activation_similarity, cka, weight_similarity

__all__ = [
    "IDENTITY_RULES",
    "Block",
    "BlockSequence",
    "DepthAlignment",
    "DepthError",
    "DepthReport",
    "ModelDepth",
    "NoExactIdentityError",
    "activation_similarity",
    "align_depth",
    "block_sequence",
    "cka",
    "collapse",
    "expand",
    "identity_rule",
    "identity_tensors",
    "match_levels",
    "needs_depth_alignment",
    "weight_similarity",
]
