"""fxfuse: trace PyTorch models with torch.fx, discover their permutation groups, fuse them."""

from __future__ import annotations

from .align import ActivationMatching, GraphMatching, OptimalTransport, WeightMatching
from .align.interp import NeuronInterpolation, neuron_interpolation
from .combine import Router, RouteReport, adaptive_selection
from .core import (
    align_states,
    apply_fusion,
    load_fusion,
    merge_states,
    repair_states,
    save_fusion,
)
from .depth import DepthAlignment, DepthError, NoExactIdentityError, align_depth
from .diagnostics import neuron_disturbance
from .errors import (
    ArchitectureMismatchError,
    ExportError,
    FxFuseError,
    InputError,
    PermutationError,
    PipelineError,
    SpecError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from .exporter import ExportReport, export
from .fuse import fuse
from .groups import find_groups
from .groups.spec import AxisSpec, Group, Member, PermutationSpec
from .maps import GroupMap, apply_maps
from .methods import recipe_from_json, recipe_to_json, register_method
from .passes import FusionReport, Pass, Pipeline
from .permute import VerifyResult, permute, verify
from .repair import Repair, ResetBatchNorm
from .rules import axis_rule
from .train import WeightScopeRegularizer, weight_scopes

__version__ = "0.1.0"

__all__ = [
    "GroupMap",
    "align_depth",
    "align_states",
    "apply_fusion",
    "apply_maps",
    "load_fusion",
    "merge_states",
    "neuron_disturbance",
    "repair_states",
    "recipe_from_json",
    "recipe_to_json",
    "register_method",
    "save_fusion",
    "ActivationMatching",
    "ArchitectureMismatchError",
    "AxisSpec",
    "DepthAlignment",
    "DepthError",
    "ExportError",
    "ExportReport",
    "FusionReport",
    "FxFuseError",
    "GraphMatching",
    "Group",
    "InputError",
    "NoExactIdentityError",
    "OptimalTransport",
    "NeuronInterpolation",
    "neuron_interpolation",
    "Member",
    "PermutationError",
    "PermutationSpec",
    "Pass",
    "Pipeline",
    "PipelineError",
    "Repair",
    "ResetBatchNorm",
    "RouteReport",
    "Router",
    "SpecError",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "VerifyResult",
    "WeightMatching",
    "WeightScopeRegularizer",
    "adaptive_selection",
    "axis_rule",
    "export",
    "find_groups",
    "fuse",
    "permute",
    "verify",
    "weight_scopes",
]
