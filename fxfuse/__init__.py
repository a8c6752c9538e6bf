"""fxfuse: trace PyTorch models with torch.fx, discover their permutation groups, fuse them."""

from __future__ import annotations

from .errors import (
    FxFuseError,
    InputError,
    PermutationError,
    SpecError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from .groups import find_groups
from .permute import VerifyResult, permute, verify
from .rules import axis_rule
from .spec import AxisSpec, Group, Member, PermutationSpec

__version__ = "0.1.0"

__all__ = [
    "AxisSpec",
    "FxFuseError",
    "Group",
    "InputError",
    "Member",
    "PermutationError",
    "PermutationSpec",
    "SpecError",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "VerifyResult",
    "axis_rule",
    "find_groups",
    "permute",
    "verify",
]
