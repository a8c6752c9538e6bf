"""The pass contract and the generic passes: a pipeline runs discover -> align -> merge -> repair
-> verify (see :mod:`fxfuse.passes.base` for the contract).  The method passes live with their
methods: :mod:`fxfuse.align` (weight and activation matching) and :mod:`fxfuse.repair`."""

from __future__ import annotations

from .base import FusionReport, FusionState, Pass, Pipeline
from .merge import MergeWeights, VerifyFused

__all__ = [
    "FusionReport",
    "FusionState",
    "MergeWeights",
    "Pass",
    "Pipeline",
    "VerifyFused",
]
