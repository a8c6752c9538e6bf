"""The guard of the methods that need every model at the target's widths.

Weight matching and activation matching search permutations: a permutation maps ``n`` units to
``n``.  Models of different widths (:mod:`fxfuse.pairing`) need a map from ``n`` units to ``m``:
optimal transport (:class:`fxfuse.OptimalTransport`), graph matching into a universe at the
target's widths (:class:`fxfuse.GraphMatching`) or neuron interpolation.
"""

from __future__ import annotations

from ..errors import ArchitectureMismatchError
from ..pairing import sizes_of
from ..passes.base import FusionState


def width_mismatch(state: FusionState) -> str | None:
    """``"models[k]: g n -> m, ..."`` for the first model whose widths differ from the target's,
    or None when every model has them."""
    if state.specs is None or state.spec is None:
        return None
    target = sizes_of(state.spec)
    for k, spec in enumerate(state.specs):
        mine = sizes_of(spec)
        diff = [f"{g} {mine[g]} vs {n}" for g, n in target.items() if mine.get(g) != n]
        if diff:
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            return f"models[{k}] has groups {', '.join(diff[:3])}{more} (model vs target units)"
    return None


def require_equal_widths(state: FusionState, method: str) -> None:
    """Raise :class:`ArchitectureMismatchError` pointing to the width-changing methods when a
    model's widths differ from the target's."""
    why = width_mismatch(state)
    if why is not None:
        raise ArchitectureMismatchError(
            f"{method} needs every model at the target's widths, but {why}. For models of "
            f"different widths use align=fxfuse.OptimalTransport() (or fxfuse.GraphMatching(), "
            f"or neuron interpolation), which map n units onto m")
