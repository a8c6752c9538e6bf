"""The labelled datasets the client harness runs on, each as train and test tensors.

* ``"mnist"`` -- :func:`fxfuse.data.load_mnist`: the 50k training split is what clients share
  out, the 10k test split scores every model (the 10k validation split is unused).
  Images ``(N, 1, 28, 28)`` in [0, 1].
* ``"digits"`` -- :func:`fxfuse.data.load_digits_data`: scikit-learn's 8x8 digits, 1438 train /
  359 test (seeded 80/20 split).  Images ``(N, 1, 8, 8)`` in [0, 1].

Nothing is downloaded; a missing package raises :class:`~fxfuse.errors.InputError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import load_digits_data, load_mnist
from ..errors import InputError

__all__ = ["DATASETS", "Dataset", "load"]

DATASETS = ("mnist", "digits")


@dataclass(frozen=True)
class Dataset:
    """``train_x`` (N, 1, H, W) float32, ``train_y`` (N,) int64, and the same for test."""

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)

    @property
    def in_features(self) -> int:
        """Pixels per image (the input width of an MLP)."""
        return int(self.train_x[0].numel())

    @property
    def n_classes(self) -> int:
        return int(self.train_y.max()) + 1


def load(name: str) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`)."""
    if name == "mnist":
        x, y = load_mnist("train")
        xt, yt = load_mnist("test")
    elif name == "digits":
        x, y = load_digits_data("train")
        xt, yt = load_digits_data("test")
    else:
        raise InputError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    return Dataset(name, x, y, xt, yt)
