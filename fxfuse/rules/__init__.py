"""Axis rules, one table keyed by fx target (see :mod:`fxfuse.rules.registry`)."""

from __future__ import annotations

from . import attention, einsum, elementwise, indexing, layers, shape  # noqa: F401,E402  (register the rules)
from .aten import canonical  # noqa: E402
from .registry import (
    AxisRef,
    Cut,
    Free,
    NewAxis,
    OpView,
    Relation,
    Rule,
    RuleDoesNotApply,
    RuleError,
    Same,
    TensorHandle,
    axis_rule,
    decline,
    lookup,
    rule_table,
    same,
    target_name,
)

__all__ = [
    "AxisRef",
    "Cut",
    "Free",
    "NewAxis",
    "OpView",
    "Relation",
    "Rule",
    "RuleDoesNotApply",
    "RuleError",
    "Same",
    "TensorHandle",
    "axis_rule",
    "canonical",
    "decline",
    "lookup",
    "rule_table",
    "same",
    "target_name",
]
