"""Axis rules, one table keyed by fx target (see :mod:`fxfuse.rules.registry`)."""

from __future__ import annotations

from . import attention, elementwise, layers, shape  # noqa: F401,E402  (register the rules)
from .aten import canonical  # noqa: E402
from .registry import (
    AxisRef,
    Cut,
    Free,
    NewAxis,
    OpView,
    Relation,
    Rule,
    Same,
    TensorHandle,
    axis_rule,
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
    "Same",
    "TensorHandle",
    "axis_rule",
    "canonical",
    "lookup",
    "rule_table",
    "same",
    "target_name",
]
