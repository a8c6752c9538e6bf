"""Fusion passes: align, merge, repair, verify (see :mod:`fxfuse.passes.base` for the contract)."""

from __future__ import annotations

from .align import ActivationMatching, AlignActivations, AlignWeights, WeightMatching
from .base import FusionReport, FusionState, Pass, Pipeline
from .merge import MergeWeights, VerifyFused
from .repair import Repair, RepairStatistics, ResetBatchNorm, ResetBatchNormStats

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
