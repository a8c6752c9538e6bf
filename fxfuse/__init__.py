"""fxfuse: trace PyTorch models with torch.fx, discover their permutation groups, fuse them.

The public names below are imported on first use (PEP 562 ``__getattr__``): ``import fxfuse``
loads only the errors, so a process that only discovers groups (``fxfuse.find_groups``, the
``fxfuse groups`` command) does not pay for importing alignment, repair, export, routing and
depth code it never runs.  ``fxfuse.<submodule>`` is imported on first use too.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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

# public name -> the submodule that defines it
_LAZY: dict[str, str] = {
    "ActivationMatching": "align",
    "GraphMatching": "align",
    "OptimalTransport": "align",
    "WeightMatching": "align",
    "NeuronInterpolation": "align.interp",
    "neuron_interpolation": "align.interp",
    "Router": "combine",
    "RouteReport": "combine",
    "adaptive_selection": "combine",
    "align_states": "core",
    "apply_fusion": "core",
    "load_fusion": "core",
    "merge_states": "core",
    "repair_states": "core",
    "save_fusion": "core",
    "DepthAlignment": "depth",
    "DepthError": "depth",
    "NoExactIdentityError": "depth",
    "align_depth": "depth",
    "neuron_disturbance": "diagnostics",
    "ExportReport": "exporter",
    "export": "exporter",
    "fuse": "fuse",
    "find_groups": "groups",
    "AxisSpec": "groups.spec",
    "Group": "groups.spec",
    "Member": "groups.spec",
    "PermutationSpec": "groups.spec",
    "GroupMap": "maps",
    "apply_maps": "maps",
    "recipe_from_json": "methods",
    "recipe_to_json": "methods",
    "register_method": "methods",
    "FusionReport": "passes",
    "Pass": "passes",
    "Pipeline": "passes",
    "VerifyResult": "permute",
    "permute": "permute",
    "verify": "permute",
    "Repair": "repair",
    "ResetBatchNorm": "repair",
    "axis_rule": "rules",
    "WeightScopeRegularizer": "train",
    "weight_scopes": "train",
}


# the submodules ``import fxfuse`` made attributes when it imported everything; the optional and
# heavy ones (cli, flower, bench, demo, data, export_onnx, testing) are attributes only once
# imported, as before (so ``hasattr(fxfuse, "flower")`` neither imports Flower nor raises)
_SUBMODULES = frozenset({"align", "combine", "core", "depth", "diagnostics", "errors", "exporter",
                         "groups", "ir", "levels", "maps", "methods", "pairing", "passes",
                         "repair", "rules", "solvers", "trace", "train"})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: fxfuse.trace
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``fxfuse`` itself.  Loading a submodule sets it as an attribute of its package, so
    loading ``fxfuse/fuse.py`` or ``fxfuse/permute.py`` (from anywhere) would replace the
    functions ``fxfuse.fuse`` / ``fxfuse.permute`` with those modules; the functions win, as
    they did when they were imported eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return  # the public function of that name is looked up (or was bound) instead
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
