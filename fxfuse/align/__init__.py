"""Alignment methods: how each model's units map into the fused basis (:mod:`fxfuse.maps`).

Each method is a config (parameters only) and the pass that runs it, registered once with
:func:`fxfuse.methods.register_method` (its recipe name is the command line's ``--align`` value).
"""

from __future__ import annotations

from ..methods import register_method
from .activations import ActivationMatching, AlignActivations
from .graph import AlignGraph, GraphMatching
from .interp import InterpolateNeurons, NeuronInterpolation, neuron_interpolation
from .ot import AlignOptimalTransport, OptimalTransport
from .weights import AlignWeights, WeightMatching

register_method("weight", "align", WeightMatching, lambda c: [AlignWeights(c)],
                "weight matching (Git Re-Basin), no data")
register_method("activation", "align", ActivationMatching, lambda c: [AlignActivations(c)],
                "match what the units compute on data")
register_method("ot", "align", OptimalTransport, lambda c: [AlignOptimalTransport(c)],
                "optimal transport (Singh & Jaggi): models of any widths onto the anchor's units")
register_method("graph", "align", GraphMatching, lambda c: [AlignGraph(c)],
                "graph matching (GAMF): second-order weight affinity, N models via a universe")
register_method("neuron-interpolation", "align", NeuronInterpolation,
                lambda c: [InterpolateNeurons(c)],
                "neuron interpolation (Luenam et al.): fit the fused model level by level, any "
                "widths (align + merge)")

__all__ = ["ActivationMatching", "AlignActivations", "AlignGraph", "AlignOptimalTransport",
           "AlignWeights", "GraphMatching", "InterpolateNeurons", "NeuronInterpolation",
           "OptimalTransport", "WeightMatching", "neuron_interpolation"]
