"""The federated-style client harness behind ``benchmarks/scoreboard.py`` (not imported by
``import fxfuse``): label-skewed client splits (:mod:`.splits`), seeded client training with an
on-disk cache (:mod:`.clients`), and the datasets they run on (:mod:`.datasets`).

>>> from fxfuse.bench import datasets, split, train_clients, Budget, ModelSpec
>>> data = datasets.load("digits")                                   # doctest: +SKIP
>>> s = split(data.train_y, 4, scheme="dirichlet-per-class", seed=0)  # doctest: +SKIP
>>> clients = train_clients(data.train_x, data.train_y, s,
...                         ModelSpec("models.zoo:mlp_classifier", {"in_dim": 64}),
...                         Budget(epochs=5), seed=0, init="different")  # doctest: +SKIP
"""

from __future__ import annotations

from . import datasets
from .clients import (
    INITS,
    Budget,
    ModelSpec,
    TrainedClient,
    client_weights,
    default_cache_dir,
    train_client,
    train_clients,
)
from .splits import SCHEMES, Split, fusion_set, split

__all__ = [
    "INITS",
    "SCHEMES",
    "Budget",
    "ModelSpec",
    "Split",
    "TrainedClient",
    "client_weights",
    "datasets",
    "default_cache_dir",
    "fusion_set",
    "split",
    "train_client",
    "train_clients",
]
