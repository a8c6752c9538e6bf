"""Merge aligned weights, and check the fused model.

Merge (:func:`fxfuse.core.merge_states`): ``theta = sum_k w_k * A_k(theta_k)``, ``A_k`` model
``k``'s alignment maps, for every floating tensor (parameters and float buffers
such as BatchNorm running statistics, averaged like the weights they describe), with ``w`` the
interpolation weights (non-negative, summing to 1).  Integer buffers (``num_batches_tracked``)
are not averaged: model 0's value is kept.  The fused model is a copy of the target (model 0 by
default; the user's class, at the target's widths) with the merged state loaded.  An align method
that produces the fused weights itself (neuron interpolation) sets ``state.fused``; merge then
leaves it.
"""

from __future__ import annotations

import copy

import torch

from ..core import merge_states
from ..errors import ArchitectureMismatchError, PipelineError, VerificationError
from ..maps import GroupMap, index_perms, rebase
from ..permute import rel_diff
from ..trace import eval_mode, nonfinite_key
from .base import FusionState, Pass


class MergeWeights(Pass):
    name = "merge"

    def requires(self, state: FusionState) -> None:
        if not state.states:
            raise PipelineError("merge needs the models' states")

    def call(self, state: FusionState) -> None:
        if state.fused is not None:  # the align method produced the fused weights itself
            state.report.notes.append("merge: the fused weights come from the align method")
            return
        maps = state.alignment()
        if maps is None and state.specs is not None:
            from ..align.widths import width_mismatch

            raise ArchitectureMismatchError(
                f"averaging without alignment needs every model at the target's widths, but "
                f"{width_mismatch(state)}; use align=fxfuse.OptimalTransport() (or "
                f"fxfuse.GraphMatching()) for models of different widths")
        if maps is not None and state.anchor not in (None, 0):
            maps = self._to_anchor_basis(state, maps)
        specs = state.specs if state.specs is not None else state.spec
        merged = merge_states(specs, state.states, maps, state.weights)
        fused = copy.deepcopy(state.target_model).to(state.device)
        fused.load_state_dict(merged)
        state.fused = fused

    @staticmethod
    def _to_anchor_basis(state: FusionState, maps: list[dict[str, GroupMap]]
                         ) -> list[dict[str, GroupMap]]:
        """Maps found in model 0's basis (permutation methods) taken into the anchor's, where
        the fused units are the anchor's (``fuse(..., anchor=)``); state and report follow."""
        assert state.anchor is not None
        if all(m.is_permutation and torch.equal(m.index.cpu(), torch.arange(m.index.numel()))
               for m in maps[state.anchor].values() if m.index is not None):
            return maps
        maps = rebase(maps, state.anchor)
        state.maps = maps
        if state.perms is not None:
            state.perms = index_perms(maps)
        state.report.notes.append(f"merge: maps taken into models[{state.anchor}]'s basis "
                                  f"(the anchor)")
        return maps

    def ensures(self, state: FusionState) -> None:
        assert state.fused is not None
        key = nonfinite_key(state.fused.state_dict())
        if key is not None:
            raise PipelineError(f"merged tensor {key!r} is not finite")


class VerifyFused(Pass):
    """The fused model runs on the example inputs and gives finite outputs; with ``reference``
    set, its outputs must also equal the reference model's (self-fusion checks)."""

    name = "verify"

    def __init__(self, reference: torch.nn.Module | None = None, tolerance: float = 1e-5) -> None:
        self.reference = reference
        self.tolerance = tolerance

    def requires(self, state: FusionState) -> None:
        if state.fused is None:
            raise PipelineError("verify needs a fused model")

    def call(self, state: FusionState) -> None:
        from torch.utils._pytree import tree_flatten

        assert state.fused is not None
        xs = tuple(x.to(state.device) if isinstance(x, torch.Tensor) else x
                   for x in state.example_inputs)
        with eval_mode(state.fused):
            outs = [o for o in tree_flatten(state.fused(*xs))[0] if isinstance(o, torch.Tensor)]
        for i, o in enumerate(outs):
            if o.is_floating_point() and not bool(torch.isfinite(o).all()):
                raise VerificationError(f"output {i} of the fused model is not finite")
        if self.reference is not None:
            with eval_mode(self.reference):
                ref = [o for o in tree_flatten(self.reference(*xs))[0]
                       if isinstance(o, torch.Tensor)]
            diff = rel_diff(ref, outs)
            if diff > self.tolerance:
                raise VerificationError(f"the fused model differs from the reference by {diff:.3g} "
                                        f"(relative max difference > {self.tolerance:g})")
            state.report.notes.append(f"verify: fused == reference within {diff:.2g}")
