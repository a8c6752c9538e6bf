"""Fusion passes: align, merge, repair, verify (see :mod:`fxfuse.passes.base` for the contract)."""

from __future__ import annotations

from ..methods import register_method
from .align import ActivationMatching, AlignActivations, AlignWeights, WeightMatching
from .base import FusionReport, FusionState, Pass, Pipeline
from .merge import MergeWeights, VerifyFused
from .repair import Repair, RepairStatistics, ResetBatchNorm, ResetBatchNormStats

# the built-in methods (recipe names are the command line's --align / --repair values)
register_method("weight", "align", WeightMatching, lambda c: [AlignWeights(c)])
register_method("activation", "align", ActivationMatching, lambda c: [AlignActivations(c)])
register_method("reset-bn", "repair", ResetBatchNorm, lambda c: [ResetBatchNormStats(c)])
register_method("repair", "repair", Repair, lambda c: [RepairStatistics(c)])

__all__ = [
    "ActivationMatching",
    "AlignActivations",
    "AlignWeights",
    "FusionReport",
    "FusionState",
    "MergeWeights",
    "Pass",
    "Pipeline",
    "Repair",
    "RepairStatistics",
    "ResetBatchNorm",
    "ResetBatchNormStats",
    "VerifyFused",
    "WeightMatching",
]
