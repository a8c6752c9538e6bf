"""Training recipes for the fusion demo and benchmarks: :func:`train_classifier`, :func:`evaluate`.

Plain CPU mini-batch training with cross-entropy, deterministic for a fixed ``seed``
(the model's initial weights come from its factory's own seed). The functions never
change ``torch.set_num_threads``; the caller decides how many threads to use.

>>> from models.zoo import mlp_classifier
>>> from fxfuse.data import load_mnist
>>> x, y = load_mnist("train")  # doctest: +SKIP
>>> model = train_classifier(mlp_classifier(seed=0), x, y, epochs=1)  # doctest: +SKIP
>>> acc, loss = evaluate(model, *load_mnist("test"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_LR", "evaluate", "train_classifier"]

#: Learning rate used when ``lr`` is not given, per optimizer.
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}

M = TypeVar("M", bound=nn.Module)


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be 1-D class indices with one per sample: x has {x.shape[0]} samples, "
            f"y has shape {tuple(y.shape)}"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train_classifier(
    model: M,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float | None = None,
    seed: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    progress: bool = False,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> M:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; return it in eval mode.

    ``optimizer`` is ``"sgd"`` (with ``momentum``, default ``lr`` 0.1) or ``"adam"``
    (default ``lr`` 1e-3); the learning rate is constant. Every epoch visits all samples
    once in an order drawn from a private generator seeded with ``seed``; the global
    RNG (dropout, ...) is also seeded with ``seed`` inside a forked RNG state, so the
    caller's RNG is untouched and two runs with the same initial model, data and seed
    give identical weights. ``progress`` prints one line per epoch to stderr.
    ``callback(epoch, model)`` (epoch counted from 1) runs after every epoch, e.g. to
    :func:`evaluate` on held-out data; training mode is restored after it returns.
    """
    _check_xy(x, y)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    name = optimizer.lower()
    if name not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    rate = DEFAULT_LR[name] if lr is None else float(lr)
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"lr must be positive and finite, got {lr}")

    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=rate, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=rate, weight_decay=weight_decay)

    device = _device(model)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            start = time.perf_counter()
            order = torch.randperm(n, generator=gen)
            total, seen = 0.0, 0
            for idx in order.split(batch_size):
                xb = x[idx].to(device)
                yb = y[idx].to(device=device, dtype=torch.int64)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
                seen += idx.numel()
            if progress:
                print(
                    f"epoch {epoch + 1}/{epochs}: train loss {total / seen:.4f} "
                    f"({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            if callback is not None:
                callback(epoch + 1, model)
                model.train()
    return model.eval()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Return ``(accuracy in [0, 1], mean cross-entropy)`` of ``model`` on ``(x, y)``.

    Puts the model in eval mode (it stays there) and runs without gradients.
    """
    _check_xy(x, y)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model.eval()
    device = _device(model)
    correct = 0
    loss_sum = 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        xb = xb.to(device)
        yb = yb.to(device=device, dtype=torch.int64)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = x.shape[0]
    return correct / n, loss_sum / n
