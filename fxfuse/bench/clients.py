"""Client training with a stated budget, deterministic for a seed, cached on disk.

A client ``k`` of a :class:`~fxfuse.bench.splits.Split` trains its own model (built by a
:class:`ModelSpec`: a ``"module:factory"`` name plus keyword arguments, one spec for all clients
or one per client, so widths and architectures may differ) on its own samples only:
cross-entropy, :class:`Budget` (epochs over the client's data, batch size, constant learning
rate, SGD with momentum or Adam, weight decay), every epoch a fresh order from a private
generator.  Two initialisations:

* ``init="different"`` -- client ``k`` starts from init seed ``seed + k`` (the one-shot fusion
  setting of OTFusion, PFNM and neuron interpolation: independently initialised local models);
* ``init="common"`` -- every client starts from init seed ``seed`` (FedAvg's single round: the
  server broadcasts one initial model).

Data order seed is ``seed + k`` in both cases, so the two settings differ only in the start.
"Deterministic" means bit-identical weights on one machine with one ``torch`` thread count; other
thread counts or CPUs may round differently (the cache key does not include them: a cached
client is the same recipe, not necessarily the same bits another machine would produce).
A factory that takes a ``seed`` argument (every ``models.zoo`` factory) is called with the init
seed; any other is called under a forked global RNG seeded with it.

**Cache.**  A trained client is stored as ``<key>.pt`` in ``cache_dir`` (default
:func:`default_cache_dir`), ``key = sha256`` of (factory, kwargs, split fingerprint, client
index, digest of the client's inputs and labels, init seed, order seed, budget, torch version).
Writes are atomic (temporary file, then rename); an unreadable entry is retrained and replaced.
Loaded entries keep the training time of the run that produced them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..trace import model_device
from .splits import Split, labels_digest

__all__ = ["INITS", "Budget", "ModelSpec", "TrainedClient", "client_weights", "default_cache_dir",
           "train_client", "train_clients"]

_CACHE_FORMAT = 1
INITS = ("different", "common")


@dataclass(frozen=True)
class Budget:
    """What one client's training costs: ``epochs`` passes over its data in batches of
    ``batch_size``, ``optimizer`` ``"adam"`` or ``"sgd"`` (with ``momentum``) at constant ``lr``
    and ``weight_decay``.  The default is the neuron-interpolation MNIST recipe's optimiser
    (Adam 1e-3, batch 128) without its warm-up schedule and cutmix, for 10 epochs."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise InputError(f"Budget.epochs must be an int >= 0, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise InputError(f"Budget.batch_size must be a positive int, got {self.batch_size!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"Budget.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"Budget.lr must be positive and finite, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"Budget.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise InputError(f"Budget.momentum must be in [0, 1), got {self.momentum!r}")

    def describe(self) -> str:
        opt = (f"SGD(lr={self.lr:g}, momentum={self.momentum:g}" if self.optimizer == "sgd"
               else f"Adam(lr={self.lr:g}")
        wd = f", weight_decay={self.weight_decay:g}" if self.weight_decay else ""
        epochs = f"{self.epochs} epoch{'' if self.epochs == 1 else 's'}"
        return f"{epochs}, batch {self.batch_size}, {opt}{wd}), constant lr"


def _resolve(name: str) -> Callable[..., nn.Module]:
    mod_name, _, attr = name.partition(":")
    if not mod_name or not attr:
        raise InputError(f"model factory {name!r} must be 'package.module:callable', e.g. "
                         "'models.zoo:mlp_classifier'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"model factory {name!r}: cannot import {mod_name!r} ({exc}); run from "
                         "the directory that holds it or add it to sys.path") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"model factory {name!r}: {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"model factory {name!r} is not callable")
    return obj  # type: ignore[no-any-return]


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A model to build per client: ``factory`` (``"package.module:callable"``) and its
    JSON-serialisable keyword arguments (the pair is part of the cache key)."""

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str):
            raise InputError(f"ModelSpec.factory must be a 'module:callable' string, got "
                             f"{type(self.factory).__name__}; use ModelSpec.of(fn, **kwargs)")
        if "seed" in self.kwargs:
            raise InputError("ModelSpec.kwargs must not hold 'seed': train_clients sets the init "
                             "seed from its seed and init arguments")
        try:
            json.dumps(dict(self.kwargs), sort_keys=True)
        except TypeError as exc:
            raise InputError(f"ModelSpec.kwargs must be JSON-serialisable ({exc})") from exc

    @classmethod
    def of(cls, fn: Callable[..., nn.Module], **kwargs: Any) -> ModelSpec:
        """The spec of a module-level callable ``fn`` (its import name is the cache key)."""
        qual = getattr(fn, "__qualname__", "")
        if "<" in qual or not getattr(fn, "__module__", None):
            raise InputError(f"ModelSpec.of needs a module-level function or class, got {fn!r} "
                             "(lambdas and local functions have no stable import name)")
        return cls(f"{fn.__module__}:{qual}", dict(kwargs))

    def key(self) -> dict[str, Any]:
        return {"factory": self.factory,
                "kwargs": json.loads(json.dumps(dict(self.kwargs), sort_keys=True))}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.factory.rpartition(':')[2]}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(json.dumps(self.key(), sort_keys=True))

    def build(self, init_seed: int) -> nn.Module:
        """A fresh model initialised from ``init_seed`` (the caller's RNG is untouched)."""
        fn = _resolve(self.factory)
        try:
            takes_seed = "seed" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_seed = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = fn(**self.kwargs, seed=init_seed) if takes_seed else fn(**self.kwargs)
        if not isinstance(model, nn.Module):
            raise InputError(f"model factory {self.factory!r} returned a "
                             f"{type(model).__name__}, not a torch.nn.Module")
        return model


@dataclass(frozen=True)
class TrainedClient:
    """One trained client: its ``model`` (eval mode) and how it was made.

    ``train_seconds`` is the wall time of the training run that produced the weights (kept from
    the cache entry when ``cached``); ``final_loss`` the mean training loss of its last epoch.
    """

    index: int
    model: nn.Module = field(repr=False)
    spec: ModelSpec
    init: str
    init_seed: int
    order_seed: int
    n_samples: int
    budget: Budget
    train_seconds: float
    final_loss: float
    cached: bool
    key: str = field(repr=False)


def default_cache_dir() -> Path:
    """``$FXFUSE_BENCH_CACHE``, else ``$XDG_CACHE_HOME/fxfuse-bench``, else
    ``~/.cache/fxfuse-bench``."""
    env = os.environ.get("FXFUSE_BENCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxfuse-bench"


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError("x and y must be torch tensors")
    if x.dim() == 0 or x.shape[0] == 0:
        raise InputError(f"x must hold at least one sample, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"y must be 1-D class indices, one per sample: x has {x.shape[0]} "
                         f"samples, y has shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"y must hold integer class indices, got dtype {y.dtype}")


def train_client(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: Budget,
                 seed: int = 0) -> tuple[nn.Module, float]:
    """Train a copy of ``model`` on ``(x, y)`` under ``budget``; ``(trained copy in eval mode,
    mean training loss of the last epoch)``.  ``model`` is not modified.

    Minimises the mean cross-entropy; epoch ``e`` visits the samples in the order of a generator
    seeded with ``seed`` (advanced once per epoch), and the global RNG (dropout) is seeded with
    ``seed`` inside a forked state: one (model, data, budget, seed) gives the same weights.
    """
    _check_xy(x, y)
    trained = copy.deepcopy(model)
    params = [p for p in trained.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    opt: torch.optim.Optimizer
    if budget.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=budget.lr, momentum=budget.momentum,
                              weight_decay=budget.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=budget.lr, weight_decay=budget.weight_decay)
    device = model_device(trained)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    last = float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trained.train()
        for _ in range(budget.epochs):
            total = 0.0
            for idx in torch.randperm(n, generator=gen).split(budget.batch_size):
                xb = x[idx].to(device)
                yb = y[idx].to(device=device, dtype=torch.int64)
                loss = F.cross_entropy(trained(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            last = total / n
    if budget.epochs and not math.isfinite(last):
        raise InputError(f"client training diverged (last epoch loss {last}); lower the "
                         f"learning rate (Budget.lr={budget.lr:g})")
    return trained.eval(), last


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _load_entry(path: Path, model: nn.Module) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(entry["meta"])
        model.load_state_dict(entry["state_dict"])
        return dict(meta)
    except Exception as exc:  # a corrupt or stale entry of any kind: retrain and replace it
        warnings.warn(f"client cache entry {path} is unreadable ({type(exc).__name__}); "
                      "retraining it", stacklevel=3)
        return None


def _store_entry(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "meta": json.dumps(meta, sort_keys=True)}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_clients_args(x: torch.Tensor, y: torch.Tensor, split: Split,
                        models: ModelSpec | Sequence[ModelSpec], init: str) -> list[ModelSpec]:
    """The per-client model specs, after checking that ``(x, y)`` is the data ``split`` was
    drawn for and every client holds samples."""
    _check_xy(x, y)
    if x.shape[0] != split.n_samples:
        raise InputError(f"the split covers {split.n_samples} samples but x has {x.shape[0]}; "
                         "pass the data the split was drawn for")
    if labels_digest(y) != split.labels_sha256:
        raise InputError("these labels are not the ones the split was drawn from; pass the "
                         "labels given to split()")
    if init not in INITS:
        raise InputError(f"init must be one of {list(INITS)}, got {init!r}")
    specs = [models] * split.n_clients if isinstance(models, ModelSpec) else list(models)
    if len(specs) != split.n_clients or not all(isinstance(s, ModelSpec) for s in specs):
        raise InputError(f"models must be one ModelSpec or {split.n_clients} of them (one per "
                         f"client), got {len(specs)} items")
    if split.n_clients and min(split.sizes) == 0:
        empty = [k for k, s in enumerate(split.sizes) if s == 0]
        raise InputError(f"clients {empty} of the split hold no samples; draw a split with data "
                         "for every client")
    return specs


def train_clients(
    x: torch.Tensor,
    y: torch.Tensor,
    split: Split,
    models: ModelSpec | Sequence[ModelSpec],
    budget: Budget = Budget(),  # noqa: B008 - frozen config
    *,
    seed: int = 0,
    init: str = "different",
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[TrainedClient]:
    """Train one model per client of ``split`` on that client's rows of ``(x, y)``.

    ``models``: one :class:`ModelSpec` for every client, or a sequence with one per client.
    ``init``: ``"different"`` (client ``k`` init seed ``seed + k``) or ``"common"`` (all
    ``seed``); see the module doc.  ``cache=False`` always trains and writes nothing;
    ``cache_dir`` defaults to :func:`default_cache_dir`.  ``progress`` prints one line per client
    to stderr.  Returns the clients in order.
    """
    specs = _check_clients_args(x, y, split, models, init)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out: list[TrainedClient] = []
    for k, spec in enumerate(specs):
        init_seed = seed if init == "common" else seed + k
        order_seed = seed + k
        xk, yk = split.subset(k, x, y)
        key_doc = {"format": _CACHE_FORMAT, "model": spec.key(), "split": split.fingerprint,
                   "client": k, "data": _digest(xk, yk), "init_seed": init_seed,
                   "order_seed": order_seed, "budget": asdict(budget),
                   "torch": torch.__version__.split("+")[0]}
        key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
        path = root / f"{key}.pt"
        model = spec.build(init_seed)
        meta = _load_entry(path, model) if cache else None
        if meta is not None:
            model.eval()
            seconds, loss, cached = float(meta["train_seconds"]), float(meta["final_loss"]), True
        else:
            start = time.perf_counter()
            model, loss = train_client(model, xk, yk, budget, seed=order_seed)
            seconds, cached = time.perf_counter() - start, False
            if cache:
                _store_entry(path, model, {"key": key_doc, "train_seconds": seconds,
                                           "final_loss": loss})
        if progress:
            print(f"client {k}: {spec.describe()}, {xk.shape[0]} samples, init {init} "
                  f"(seed {init_seed}), {'cached' if cached else 'trained'} "
                  f"{seconds:.1f} s, final train loss {loss:.4f}", file=sys.stderr, flush=True)
        out.append(TrainedClient(index=k, model=model, spec=spec, init=init,
                                 init_seed=init_seed, order_seed=order_seed,
                                 n_samples=int(xk.shape[0]), budget=budget,
                                 train_seconds=seconds, final_loss=loss, cached=cached,
                                 key=key))
    return out


def client_weights(clients: Sequence[TrainedClient]) -> list[float]:
    """FedAvg weights ``n_k / sum_j n_j`` (each client's share of the training samples)."""
    total = sum(c.n_samples for c in clients)
    return [c.n_samples / total for c in clients]

