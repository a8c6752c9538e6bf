"""Combine trained models without averaging their weights: route each input to one model
(:func:`adaptive_selection`, ``route.py``; the selectors in ``selectors.py``)."""

from __future__ import annotations

from .route import Router, RouteReport, adaptive_selection, count_macs
from .selectors import Confidence, Density, Entropy, Gate, Samples, Scorer

__all__ = [
    "Confidence",
    "Density",
    "Entropy",
    "Gate",
    "RouteReport",
    "Router",
    "Samples",
    "Scorer",
    "adaptive_selection",
    "count_macs",
]
