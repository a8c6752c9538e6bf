"""Federated fusion on Flower (``pip install 'fxfuse[flower]'``; ``import fxfuse`` does not load
this package nor Flower).

* :class:`FusionStrategy` -- a Message-API strategy (FedAvg's sampling and messaging) whose
  aggregation aligns and merges the clients' arrays with fxfuse's functional core, one-shot
  (clients from their own initialisations, aligned jointly) or over rounds (each client aligned
  to the global model, then averaged), weighted by the clients' example counts;
* :func:`client_app` -- a ``ClientApp`` around the user's model and training step;
* :func:`aggregate_updates` -- the aggregation itself on state dicts (no Flower involved).

>>> from fxfuse.flower import FusionStrategy, client_app                     # doctest: +SKIP
>>> strategy = FusionStrategy(make_model, x_example, align=fxfuse.WeightMatching(),
...                           client_init="local", save_dir="rounds")       # doctest: +SKIP
>>> result = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
...                         num_rounds=1)                                    # doctest: +SKIP
"""

from __future__ import annotations

from ..errors import InputError

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - flwr is in the dev extra
    raise InputError("fxfuse.flower needs Flower: pip install 'fxfuse[flower]' (flwr>=1.42)"
                     ) from exc

from .aggregate import (  # noqa: E402
    ALIGNMENTS,
    Aggregation,
    ClientUpdate,
    FederatedRoundError,
    Rejection,
    aggregate_updates,
    check_update,
)
from .client import TrainResult, client_app  # noqa: E402
from .strategy import INIT_KEY, FusionStrategy, RoundRecord  # noqa: E402

__all__ = [
    "ALIGNMENTS",
    "INIT_KEY",
    "Aggregation",
    "ClientUpdate",
    "FederatedRoundError",
    "FusionStrategy",
    "Rejection",
    "RoundRecord",
    "TrainResult",
    "aggregate_updates",
    "check_update",
    "client_app",
]
