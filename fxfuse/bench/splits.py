"""Client splits of a labelled dataset: seeded, recorded, and a partition of the samples.

``split(labels, n_clients, scheme, ...)`` assigns every sample index to exactly one client and
returns a frozen :class:`Split` (index arrays per client, per-client class counts, and every
parameter that produced it; JSON round-trip with :meth:`Split.to_json` / :meth:`Split.from_json`).
For class ``c`` with ``n_c`` samples (shuffled with the split's generator) and ``K`` clients:

* ``"dirichlet-per-class"`` -- the neuron-interpolation protocol (Luenam et al., arXiv
  2507.00037, ``create_non_iid_splits`` in ``AndrewSpano/neuron-interpolation-model-fusion``):
  concentrations ``a = linspace(1.0, 5.0, K)`` (smallest / largest = 0.2), permuted afresh for
  every class, ``p ~ Dirichlet(a)``, client ``k`` gets ``floor(p_k n_c)`` samples and the last
  client the rounding remainder.  So ``E[share of client k in class c] = a_pi_c(k) / sum(a)``:
  a client holds much of the classes where it drew a large concentration.  The concentration
  each client drew per class is recorded (:attr:`Split.concentrations`, ``(classes, K)``).
* ``"dirichlet"`` -- the PFNM / GAMF protocol (Yurochkin et al. 2019, ``partition_data`` with
  ``hetero-dir`` in ``IBM/probabilistic-federated-neural-matching``; GAMF's FedML driver uses
  the same partition with ``alpha = 0.5``): ``p ~ Dirichlet(alpha 1_K)``, ``p_k <- 0`` for every
  client already holding ``>= N / K`` samples (PFNM's balancing), renormalised, cut points
  ``floor(cumsum(p) n_c)``; the whole draw is repeated until every client holds at least
  ``min_size`` (PFNM: 10) samples.  Small ``alpha`` concentrates each class on few clients.
* ``"shards"`` -- the neuron-interpolation "sharded" protocol (``create_sharded_splits``): the
  classes are shuffled and cut into ``K`` near-equal disjoint sets (``array_split``); a client
  gets every sample of its classes and none of the others (needs ``K <= #classes``).
* ``"iid"`` -- the same repository's IID reference (``create_iid_splits``): every class is dealt
  out evenly, the first ``n_c mod K`` clients getting one extra sample.

Randomness comes from one ``numpy.random.default_rng(seed)`` (the global numpy / torch RNGs are
untouched), so one (labels, parameters, seed) always gives the same split; the draws follow the
cited procedures step by step, not their global-RNG streams bit for bit.

``fusion_set(split, labels, size)`` draws the small balanced set data-aware fusion methods use
from the clients' own training data (neuron interpolation's ``sample_balanced_subset``: 400
samples for MNIST): ``size // #classes`` per class where available, the rest dealt round-robin
over the classes that still have samples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["SCHEMES", "Split", "fusion_set", "split"]

#: Split schemes understood by :func:`split`.
SCHEMES = ("dirichlet-per-class", "dirichlet", "shards", "iid")

#: Concentration range of the neuron-interpolation protocol (smallest / largest = 0.2).
NI_CONCENTRATION = (1.0, 5.0)

_MAX_DRAWS = 1000


def _as_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"labels must be a non-empty 1-D array of class indices, got shape "
                         f"{tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"labels must hold integer class indices, got dtype {arr.dtype}; "
                         "convert with labels.astype(int) or labels.long()")
    return arr.astype(np.int64, copy=False)


def labels_digest(labels: Any) -> str:
    """sha256 of the label array (int64 bytes): ties a split to the labels it was drawn from."""
    return hashlib.sha256(np.ascontiguousarray(_as_labels(labels)).tobytes()).hexdigest()


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Split:
    """One client split: ``indices[k]`` (sorted int64) are client ``k``'s sample indices.

    ``classes``: the class labels present, sorted; ``counts``: ``(K, len(classes))`` samples of
    each class per client; ``concentrations``: ``(len(classes), K)`` Dirichlet concentration of
    each client per class (``"dirichlet-per-class"``: the permuted 1..5 ramp; ``"dirichlet"``:
    ``alpha`` everywhere; None otherwise); ``client_classes``: each client's class set
    (``"shards"`` only).  ``params`` holds the scheme's parameters; ``labels_sha256`` the digest of
    the labels it was drawn from (:func:`fusion_set` and the client cache check it).
    """

    scheme: str
    n_clients: int
    seed: int
    params: dict[str, Any]
    n_samples: int
    labels_sha256: str
    classes: tuple[int, ...]
    indices: tuple[np.ndarray, ...] = field(repr=False)
    counts: np.ndarray = field(repr=False)
    concentrations: np.ndarray | None = field(repr=False, default=None)
    client_classes: tuple[tuple[int, ...], ...] | None = None

    @property
    def sizes(self) -> tuple[int, ...]:
        """Samples per client."""
        return tuple(int(ix.size) for ix in self.indices)

    def shares(self) -> np.ndarray:
        """``(K, classes)``: each client's fraction of every class (columns sum to 1)."""
        return self.counts / np.maximum(self.counts.sum(axis=0, keepdims=True), 1)

    def subset(self, k: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Client ``k``'s rows of each tensor (each of length :attr:`n_samples`)."""
        if not 0 <= k < self.n_clients:
            raise InputError(f"client {k} does not exist: this split has {self.n_clients} clients")
        idx = torch.from_numpy(np.array(self.indices[k]))
        out = []
        for t in tensors:
            if t.shape[0] != self.n_samples:
                raise InputError(f"this split covers {self.n_samples} samples but a tensor of "
                                 f"length {t.shape[0]} was given; pass the data the split was "
                                 "drawn for")
            out.append(t[idx])
        return tuple(out)

    def describe(self) -> str:
        """One line: scheme, parameters, seed and samples per client."""
        ps = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return (f"{self.scheme}({ps}) over {self.n_clients} clients, seed {self.seed}: "
                f"{'/'.join(str(s) for s in self.sizes)} samples")

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme, "n_clients": self.n_clients, "seed": self.seed,
            "params": dict(self.params), "n_samples": self.n_samples,
            "labels_sha256": self.labels_sha256, "classes": list(self.classes),
            "indices": [ix.tolist() for ix in self.indices],
            "counts": self.counts.tolist(),
            "concentrations": None if self.concentrations is None
            else self.concentrations.tolist(),
            "client_classes": None if self.client_classes is None
            else [list(c) for c in self.client_classes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Split:
        try:
            d = json.loads(text)
            out = cls(
                scheme=str(d["scheme"]), n_clients=int(d["n_clients"]), seed=int(d["seed"]),
                params=dict(d["params"]), n_samples=int(d["n_samples"]),
                labels_sha256=str(d["labels_sha256"]),
                classes=tuple(int(c) for c in d["classes"]),
                indices=tuple(_frozen(np.asarray(ix, dtype=np.int64)) for ix in d["indices"]),
                counts=_frozen(np.asarray(d["counts"], dtype=np.int64)),
                concentrations=None if d["concentrations"] is None
                else _frozen(np.asarray(d["concentrations"], dtype=np.float64)),
                client_classes=None if d["client_classes"] is None
                else tuple(tuple(int(c) for c in cs) for cs in d["client_classes"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not a Split JSON document ({type(exc).__name__}: {exc}); write "
                             "one with Split.to_json()") from exc
        out._check()
        return out

    @property
    def fingerprint(self) -> str:
        """sha256 of :meth:`to_json`: equal for equal splits (keys the client cache)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Split) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def _check(self) -> None:
        if len(self.indices) != self.n_clients:
            raise InputError(f"Split has {len(self.indices)} index arrays for {self.n_clients} "
                             "clients")
        every = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        if every.size != self.n_samples or not np.array_equal(np.sort(every),
                                                              np.arange(self.n_samples)):
            raise InputError("Split indices are not a partition of 0..n_samples-1 (a sample is "
                             "missing or given to two clients); draw the split again with split()")


def _concentration_ramp(n_clients: int, low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, n_clients)


def _draw_dirichlet_per_class(rng: np.random.Generator, by_class: list[np.ndarray],
                              n_clients: int, low: float, high: float
                              ) -> tuple[list[list[np.ndarray]], np.ndarray]:
    ramp = _concentration_ramp(n_clients, low, high)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    conc = np.zeros((len(by_class), n_clients))
    for c, idx in enumerate(by_class):
        idx = rng.permutation(idx)
        a = rng.permutation(ramp)
        conc[c] = a
        p = rng.dirichlet(a)
        counts = np.floor(p * idx.size).astype(np.int64)
        counts[-1] += idx.size - counts.sum()
        for k, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[k].append(chunk)
    return parts, conc


def _draw_dirichlet(rng: np.random.Generator, by_class: list[np.ndarray], n_clients: int,
                    alpha: float, min_size: int, n_total: int) -> list[list[np.ndarray]]:
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        held = np.zeros(n_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n_clients, alpha))
            p = p * (held < n_total / n_clients)  # PFNM's balancing: full clients take no more
            p = p / p.sum()
            cuts = (np.cumsum(p) * idx.size).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
                held[k] += chunk.size
        if held.min() >= min_size:
            return parts
    raise InputError(
        f"split(scheme='dirichlet', alpha={alpha}): no draw in {_MAX_DRAWS} gave every one of the "
        f"{n_clients} clients at least min_size={min_size} samples of {n_total}; lower min_size, "
        "raise alpha or use fewer clients")


def _draw_shards(rng: np.random.Generator, classes: np.ndarray, by_class: list[np.ndarray],
                 n_clients: int) -> tuple[list[list[np.ndarray]], tuple[tuple[int, ...], ...]]:
    """Every client its own classes (disjoint sets of about ``classes / n_clients``)."""
    if n_clients > classes.size:
        raise InputError(f"scheme='shards' gives every client its own classes: {n_clients} "
                         f"clients need at least {n_clients} classes, the labels have "
                         f"{classes.size}; use fewer clients or scheme='dirichlet'")
    order = rng.permutation(classes.size)
    sets = [np.sort(s) for s in np.array_split(order, n_clients)]
    client_classes = tuple(tuple(int(classes[i]) for i in s) for s in sets)
    return [[by_class[i] for i in s] for s in sets], client_classes


def _draw_iid(rng: np.random.Generator, by_class: list[np.ndarray], n_clients: int
              ) -> list[list[np.ndarray]]:
    """Every class spread evenly over the clients (sizes differ by at most one)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for idx in by_class:
        idx = rng.permutation(idx)
        base, extra = divmod(idx.size, n_clients)
        sizes = np.array([base + (1 if k < extra else 0) for k in range(n_clients)])
        for k, chunk in enumerate(np.split(idx, np.cumsum(sizes)[:-1])):
            parts[k].append(chunk)
    return parts


def _check_split_args(y: np.ndarray, n_clients: Any, scheme: str) -> int:
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) \
            or n_clients < 1:
        raise InputError(f"n_clients must be a positive int, got {n_clients!r}")
    if scheme not in SCHEMES:
        raise InputError(f"unknown split scheme {scheme!r}; expected one of {list(SCHEMES)}")
    if int(n_clients) > y.size:
        raise InputError(f"{n_clients} clients for {y.size} samples: every client needs data")
    return int(n_clients)


def split(
    labels: Any,
    n_clients: int,
    scheme: str = "dirichlet-per-class",
    *,
    alpha: float = 0.5,
    concentration: tuple[float, float] = NI_CONCENTRATION,
    min_size: int = 10,
    seed: int = 0,
) -> Split:
    """Split the samples of ``labels`` (1-D integer classes, tensor or array) over ``n_clients``.

    ``scheme``: one of :data:`SCHEMES` (module doc).  ``alpha``: the Dirichlet parameter of
    ``"dirichlet"`` (PFNM / GAMF: 0.5).  ``concentration``: ``(low, high)`` of the per-client
    ramp of ``"dirichlet-per-class"`` (neuron interpolation: ``(1.0, 5.0)``).  ``min_size``:
    ``"dirichlet"`` redraws until every client holds at least this many samples (PFNM: 10).
    Only the parameters of the chosen scheme are recorded in :attr:`Split.params`.
    """
    y = _as_labels(labels)
    n_clients = _check_split_args(y, n_clients, scheme)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {}
    conc: np.ndarray | None = None
    client_classes: tuple[tuple[int, ...], ...] | None = None

    if scheme == "dirichlet-per-class":
        low, high = (float(v) for v in concentration)
        if not (0 < low <= high and np.isfinite(high)):
            raise InputError(f"concentration must be (low, high) with 0 < low <= high, got "
                             f"{concentration!r}")
        params = {"concentration": [low, high]}
        parts, conc = _draw_dirichlet_per_class(rng, by_class, n_clients, low, high)
    elif scheme == "dirichlet":
        if not (float(alpha) > 0 and np.isfinite(alpha)):
            raise InputError(f"alpha must be a positive finite number, got {alpha!r}")
        if min_size < 0 or min_size * n_clients > y.size:
            raise InputError(f"min_size={min_size} for {n_clients} clients needs more than the "
                             f"{y.size} samples there are; lower it")
        params = {"alpha": float(alpha), "min_size": int(min_size)}
        parts = _draw_dirichlet(rng, by_class, n_clients, float(alpha), int(min_size), y.size)
        conc = np.full((classes.size, n_clients), float(alpha))
    elif scheme == "shards":
        parts, client_classes = _draw_shards(rng, classes, by_class, n_clients)
    else:  # iid
        parts = _draw_iid(rng, by_class, n_clients)

    indices = tuple(_frozen(np.sort(np.concatenate(p)).astype(np.int64)) if p
                    else _frozen(np.zeros(0, np.int64)) for p in parts)
    counts = np.stack([np.array([int(np.count_nonzero(y[ix] == c)) for c in classes])
                       for ix in indices])
    out = Split(scheme=scheme, n_clients=n_clients, seed=int(seed), params=params,
                n_samples=int(y.size), labels_sha256=labels_digest(y),
                classes=tuple(int(c) for c in classes), indices=indices,
                counts=_frozen(counts.astype(np.int64)),
                concentrations=None if conc is None else _frozen(conc),
                client_classes=client_classes)
    out._check()
    return out


def fusion_set(
    split: Split,
    labels: Any,
    size: int = 400,
    *,
    seed: int = 0,
    clients: Sequence[int] | None = None,
) -> np.ndarray:
    """Sorted indices of a class-balanced set of ``size`` samples from the clients' own data.

    Drawn from the union of ``clients``' indices (default: every client): ``size // #classes``
    of every class where it has that many, the remaining places dealt one at a time round-robin
    over the classes that still have unused samples (neuron interpolation's
    ``sample_balanced_subset``; 400 for MNIST).  ``labels`` must be the labels the split was
    drawn from.  Deterministic for one ``seed``.
    """
    y = _as_labels(labels)
    if labels_digest(y) != split.labels_sha256:
        raise InputError("fusion_set: these labels are not the ones the split was drawn from "
                         f"({y.size} labels given, the split covers {split.n_samples}); pass the "
                         "same labels given to split()")
    chosen = range(split.n_clients) if clients is None else list(clients)
    for k in chosen:
        if not 0 <= int(k) < split.n_clients:
            raise InputError(f"fusion_set: client {k} does not exist (the split has "
                             f"{split.n_clients})")
    pool = np.concatenate([split.indices[int(k)] for k in chosen]) if len(chosen) else \
        np.zeros(0, np.int64)
    if size < 1 or size > pool.size:
        raise InputError(f"fusion_set: size must be between 1 and the {pool.size} samples the "
                         f"chosen clients hold, got {size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y[pool])
    queues = [list(rng.permutation(pool[y[pool] == c])) for c in classes]
    per_class = size // classes.size
    picked: list[int] = []
    for q in queues:
        picked.extend(q[:per_class])
        del q[:per_class]
    while len(picked) < size:
        for q in queues:
            if len(picked) == size:
                break
            if q:
                picked.append(q.pop(0))
    return np.sort(np.asarray(picked, dtype=np.int64))
