"""Selectors for adaptive model selection: which of K models should answer each input.

A selector is a frozen config (``Confidence``, ``Entropy``, ``Gate``, ``Density``) whose ``fit``
returns a :class:`Scorer`, an ``nn.Module`` giving a score per sample and model, ``(B, K)``; the
router sends sample ``b`` to ``argmax_k score[b, k]`` (the first maximum on ties).  Scorers read
one of three things, named by ``Scorer.reads``:

* ``"outputs"``: every model's output ``z_k: (B, C)`` (logits).  ``Confidence`` scores
  ``log max_c softmax(z_k / T_k)_c``; ``Entropy`` scores ``-H(softmax(z_k / T_k))`` with
  ``H(p) = -sum_c p_c log p_c``.  ``T_k`` is model k's temperature: 1 without labelled data,
  else the minimiser of the NLL ``-mean_i log softmax(z_k(x_i) / T_k)_{y_i}`` (Guo et al. 2017,
  per model) over the pooled data (``calibrate_on="pooled"``, the data the router will face) or
  over model k's own samples (``"own"``, needs sources).  Raw confidences of different models
  are not comparable (one model may be sharper everywhere); calibration rescales each.  Pooled
  calibration also flattens a model that is wrong on much of the pooled data (e.g. on other
  clients' classes), which can erase the in- / out-of-distribution contrast the selector needs:
  benchmarks/RESULTS.md measures both.  Data-free without labels.
* ``"input"``: the input alone, so a router can decide before it runs any model.  ``Gate``
  trains a small MLP ``g(x) = W2 relu(W1 std(x) + b1) + b2`` (``std``: per-feature
  standardisation with the data's mean and std) to predict either which client's data ``x`` comes
  from (``target="client"``: cross-entropy over the sample's source) or which models are right
  (``target="correct"``: a binary cross-entropy per model against ``[argmax z_k(x) == y]``).
  ``Density(space="input")`` fits a Gaussian per model on its own data in input space.
* ``"input+outputs"``: ``Gate(confidence=True)``, the gate's probability times each model's
  calibrated confidence (below).
* ``"features"``: every model's penultimate features (the input of the final ``nn.Linear``).
  ``Density(space="features")`` fits the Gaussian there.

Density (Lee et al. 2018's Mahalanobis score): on model k's own samples (source ``k``), class
means ``mu_kc`` (one mean when no labels) and one tied covariance ``S_k`` of the within-class
residuals, shrunk towards ``(tr S_k / d) I`` with the Ledoit-Wolf intensity; the distance is
``d_k(x) = min_c (f - mu_kc)^T S_k^-1 (f - mu_kc)``.  The feature spaces of different models are
different spaces (even of different sizes), so raw distances are not comparable: the score is
the negative z-score ``-(d_k(x) - m_k) / s_k``, with ``m_k, s_k`` the mean and std of ``d_k`` on
model k's own samples, i.e. how typical ``x`` is of the data model k was fitted to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

Reads = Literal["outputs", "input", "features", "input+outputs"]


@dataclass
class Samples:
    """Held-out data, pooled: inputs ``x: (N, ...)``, labels ``y: (N,)`` or None, and sources
    ``s: (N,)`` or None (``s_i = k``: sample i is from model k's own client)."""

    x: torch.Tensor
    y: torch.Tensor | None
    s: torch.Tensor | None


class Scorer(nn.Module):
    """Scores ``(B, K)``, higher = better suited; ``reads`` names what ``forward`` takes."""

    reads: Reads = "outputs"
    macs: int = 0  # multiply-accumulates per input (the selector's own cost)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# --- confidence / entropy ---------------------------------------------------------------------


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, steps: int = 100) -> float:
    """The ``T > 0`` minimising ``NLL(softmax(logits / T), y)`` (LBFGS on ``log T``, clamped to
    ``[0.05, 100]``); ``logits: (N, C)``, ``y: (N,)``."""
    z = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t if math.isfinite(t) else 1.0, 0.05), 100.0)


class SoftmaxScorer(Scorer):
    """``max_c log p_kc`` (``kind="confidence"``) or ``sum_c p_kc log p_kc`` (``"entropy"``),
    with ``p_k = softmax(z_k / T_k)``."""

    reads: Reads = "outputs"
    inv_t: torch.Tensor

    def __init__(self, kind: str, temperatures: list[float]) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("inv_t", 1.0 / torch.tensor(temperatures, dtype=torch.float32))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        cols = []
        for k, z in enumerate(xs):
            logp = F.log_softmax(z.float() * self.inv_t[k], dim=-1)
            if self.kind == "confidence":
                # log max_c p_c: the same order as max_c p_c, but it does not round to 0 = log 1
                # for several sharp models at once (float32 confidences saturate at 1.0).
                cols.append(logp.max(dim=-1).values)
            else:
                cols.append((logp.exp() * logp).sum(dim=-1))
        return torch.stack(cols, dim=1)


@dataclass(frozen=True)
class Confidence:
    """Route to the model with the highest (calibrated) maximum softmax probability.  Data-free;
    with labelled ``data`` and ``calibrate=True`` each model gets its NLL temperature first."""

    calibrate: bool = True
    calibrate_on: Literal["pooled", "own"] = "pooled"
    kind = "confidence"

    def fit(self, outputs: list[torch.Tensor], data: Samples | None) -> SoftmaxScorer:
        temps = [1.0] * len(outputs)
        if self.calibrate and data is not None and data.y is not None:
            y = data.y
            on = self.calibrate_on
            if on == "own" and data.s is None:
                raise InputError(f"{type(self).__name__}(calibrate_on='own') needs each "
                                 "sample's source: pass data batches as (x, y, source)")
            if on == "own":
                assert data.s is not None
                temps = [fit_temperature(z[data.s == k], y[data.s == k]) if bool(
                    (data.s == k).any()) else 1.0 for k, z in enumerate(outputs)]
            elif on == "pooled":
                temps = [fit_temperature(z, y) for z in outputs]
            else:
                raise InputError(f"calibrate_on must be 'pooled' or 'own', got {on!r}")
        return SoftmaxScorer(self.kind, temps)


@dataclass(frozen=True)
class Entropy(Confidence):
    """Route to the model whose (calibrated) softmax has the lowest entropy.  Data-free; with
    labelled ``data`` and ``calibrate=True`` each model gets its NLL temperature first."""

    kind = "entropy"


# --- gate ---------------------------------------------------------------------------------------


class GateScorer(Scorer):
    """``g(x) = W2 relu(W1 (flatten(x) - mean) / std + b1) + b2``: ``(B, K)`` logits."""

    reads: Reads = "input"
    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int, k: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", 1.0 / std)
        self.net = nn.Sequential(nn.Linear(mean.numel(), hidden), nn.ReLU(), nn.Linear(hidden, k))
        self.macs = mean.numel() * hidden + hidden * k

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0].flatten(1).float()
        out: torch.Tensor = self.net((x - self.mean) * self.inv_std)
        return out


@dataclass(frozen=True)
class Gate:
    """A small MLP on the input that picks the model.  ``target="client"`` learns which model's
    client an input resembles (needs sources); ``"correct"`` learns which models classify it
    right (needs labels).  ``None``: ``"correct"`` when the data has labels, else ``"client"``
    (measured: ``"correct"`` routes as well or better on every MNIST split of
    ``benchmarks/route_selection.py``, by up to 2.3 points on Dirichlet splits).
    ``confidence=True`` multiplies the gate's probability for model k by model k's calibrated
    confidence (a product of experts: ``log g_k(x) + log max_c softmax(z_k / T_k)_c``, with
    ``log g = log-sigmoid`` for ``"correct"``, ``log-softmax`` for ``"client"``); every model
    then runs on every sample.
    Trained with Adam for ``epochs`` epochs on minibatches of ``batch_size`` from a private
    generator seeded with ``seed`` (the global RNG is untouched)."""

    target: Literal["client", "correct"] | None = None
    confidence: bool = False
    hidden: int = 64
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    kind = "gate"

    def resolved_target(self, data: Samples) -> str:
        return self.target or ("correct" if data.y is not None else "client")

    def fit(self, outputs: list[torch.Tensor], data: Samples | None) -> Scorer:
        if data is None:
            raise InputError("selector 'gate' trains on data: pass data=[(x, y, source), ...] "
                             "(source: which model's client each sample is from) or (x, y)")
        target = self.resolved_target(data)
        k = len(outputs)
        if target == "client":
            if data.s is None:
                raise InputError("Gate(target='client') needs each sample's source: pass data "
                                 "batches as (x, y, source) with source[i] = the model index")
            labels: torch.Tensor = data.s
        elif target == "correct":
            if data.y is None:
                raise InputError("Gate(target='correct') needs labels: pass data as (x, y) "
                                 "batches")
            labels = torch.stack([z.argmax(-1) == data.y for z in outputs], dim=1).float()
        else:
            raise InputError(f"Gate target must be 'client', 'correct' or None, got {target!r}")
        x = data.x.flatten(1).float()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            gate = GateScorer(mean, std, self.hidden, k).to(x.device)
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(gate.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n = x.shape[0]
        with torch.enable_grad():
            for _ in range(self.epochs):
                for idx in torch.randperm(n, generator=gen).to(x.device).split(self.batch_size):
                    logits = gate([x[idx]])
                    if target == "client":
                        loss = F.cross_entropy(logits, labels[idx])
                    else:
                        loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        gate.eval()
        if not self.confidence:
            return gate
        return ProductScorer(gate, Confidence().fit(outputs, data), target)


class ProductScorer(Scorer):
    """``log g_k(x) + log max_c softmax(z_k / T_k)_c``: a gate times calibrated confidences;
    reads ``[x, z_1, ..., z_K]``."""

    reads: Reads = "input+outputs"

    def __init__(self, gate: GateScorer, soft: SoftmaxScorer, target: str) -> None:
        super().__init__()
        self.gate, self.soft, self.target = gate, soft, target
        self.macs = gate.macs

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        g = self.gate([xs[0]])
        log_g = F.logsigmoid(g) if self.target == "correct" else F.log_softmax(g, dim=1)
        out: torch.Tensor = log_g + self.soft(xs[1:])
        return out


# --- density ------------------------------------------------------------------------------------


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of centred rows ``x: (n, d)``:
    ``(1 - a) S + a (tr S / d) I`` with the intensity ``a`` of Ledoit & Wolf (2004)."""
    n, d = x.shape
    s = x.T @ x / n
    mu = torch.trace(s) / d
    x2 = x * x
    delta_ = (s * s).sum()
    beta_ = (x2.T @ x2).sum() / n
    beta = (beta_ - delta_) / (d * n)
    delta = (delta_ - 2 * mu * torch.trace(s) + d * mu * mu) / d
    a = torch.clamp(beta / delta, 0.0, 1.0) if delta > 0 else torch.ones(())
    return (1 - a) * s + a * mu * torch.eye(d, dtype=x.dtype, device=x.device)


def min_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``min_j |a_i - b_j|^2`` for ``a: (N, d)``, ``b: (C, d)`` -> ``(N,)``, as
    ``|a|^2 - 2 a.b + |b|^2`` (no ``(N, C, d)`` intermediate)."""
    sq = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)
    return sq.clamp_min(0).min(dim=1).values


class DensityScorer(Scorer):
    """``-(min_c (f_k - mu_kc)^T P_k (f_k - mu_kc) - m_k) / s_k`` per model (see the module)."""

    def __init__(self, reads: Reads, fits: list[tuple[torch.Tensor, torch.Tensor, float, float]]):
        super().__init__()
        self.reads = reads
        self.n = len(fits)
        for k, (means, root, m, s) in enumerate(fits):
            # P = L L^T: d(f) = ||f L - mu L||^2, computed as |fL|^2 - 2 fL.muL + |muL|^2.
            self.register_buffer(f"root{k}", root)
            self.register_buffer(f"mroot{k}", means @ root)
            self.register_buffer(f"stats{k}", torch.tensor([m, 1.0 / s]))
        self.macs = sum(r.shape[0] * r.shape[1] + mu.shape[0] * r.shape[1] for mu, r, _, _ in fits)

    def distances(self, f: torch.Tensor, k: int) -> torch.Tensor:
        root, mroot = getattr(self, f"root{k}"), getattr(self, f"mroot{k}")
        return min_sq_dist(f.flatten(1).float() @ root, mroot)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        cols = []
        for k in range(self.n):
            stats = getattr(self, f"stats{k}")
            f = xs[0] if self.reads == "input" else xs[k]
            cols.append(-(self.distances(f, k) - stats[0]) * stats[1])
        return torch.stack(cols, dim=1)


@dataclass(frozen=True)
class Density:
    """Per-model Gaussian (class-conditional with tied, Ledoit-Wolf-shrunk covariance when the
    data has labels) in ``space="features"`` (each model's penultimate features, the default:
    the space the model itself classifies in) or ``"input"`` (shared by all models; lets the
    router decide before running any model).  Needs data with sources."""

    space: Literal["features", "input"] = "features"
    kind = "density"

    def fit(self, feats: list[torch.Tensor], data: Samples | None) -> DensityScorer:
        if data is None or data.s is None:
            raise InputError("selector 'density' fits each model on its own data: pass "
                             "data=[(x, y, source), ...] with source[i] = the model index "
                             "(y may be None)")
        fits = []
        for k, f in enumerate(feats):
            own = data.s == k
            fk = f[own].flatten(1).double()
            if fk.shape[0] < 2:
                raise InputError(f"selector 'density' needs at least 2 samples from model {k}'s "
                                 f"own data (source {k}), got {fk.shape[0]}")
            if data.y is not None:
                yk = data.y[own]
                classes = yk.unique()  # sorted
                means = torch.stack([fk[yk == c].mean(0) for c in classes.tolist()])
                resid = fk - means[torch.searchsorted(classes, yk)]
            else:
                means = fk.mean(0, keepdim=True)
                resid = fk - means
            cov = ledoit_wolf(resid)
            cov = cov + 1e-6 * torch.trace(cov) / cov.shape[0] * torch.eye(
                cov.shape[0], dtype=cov.dtype, device=cov.device)
            # P = S^-1 = L L^T with L = U diag(e^-1/2) from the eigendecomposition S = U e U^T.
            evals, evecs = torch.linalg.eigh(cov)
            root = evecs * evals.clamp_min(1e-12).rsqrt()
            d = min_sq_dist(fk @ root, means @ root)
            fits.append((means.float(), root.float(), float(d.mean()),
                         max(float(d.std()), 1e-6)))
        return DensityScorer("input" if self.space == "input" else "features", fits)


Selector = Confidence | Entropy | Gate | Density

#: ``selector=`` names -> default configs.
SELECTORS: dict[str, Selector] = {
    "confidence": Confidence(),
    "entropy": Entropy(),
    "gate": Gate(),
    "density": Density(),
}
