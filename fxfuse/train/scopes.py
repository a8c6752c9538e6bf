"""Weight scope alignment (WSA; Xu, Li, Gan, Zhan 2024): per-layer weight scopes, their fusion
across models, and the KL regulariser that pulls a model's scopes to a target.

A *layer* is a producer weight of the spec (:func:`fxfuse.find_groups`): a parameter whose axis 0
has the ``out`` role and with ``ndim >= 2`` (Linear ``(out, in)``, Conv ``(out, in, kh, kw)``);
norm affines and biases (1-D) are not layers.  Layers are named by state_dict key, so a target
applies to any model of the architecture, whatever its classes are called.

The *scope* of a layer with weights ``w`` (all ``n`` entries) is ``(mu, s)``,
``mu = mean(w)``, ``s^2 = mean((w - mu)^2)`` (population std).  Fusing the scopes
``(mu_k, s_k)`` of K models (weights ``a_k``, uniform unless given, summing to 1):

* ``mu_t = sum_k a_k mu_k``;
* ``std_rule="mixture"``: moment matching of the mixture of the K Gaussians,
  ``s_t^2 = sum_k a_k (s_k^2 + mu_k^2) - mu_t^2``;
* ``std_rule="mean"``: ``s_t = sum_k a_k s_k``.

The mixture std is the std of the pooled weights and is >= the mean of stds (equal when the means
and stds agree).  Default: ``"mixture"``, the std of the pooled weights.  Measured
(``benchmarks/scopes.py``, digits MLPs 64-64-64-10 on label-skewed clients): the two rules' target
stds agree to 3 decimals in every layer (0.1072 vs 0.1071, ...), and pairs trained toward either
target have the same naive midpoint test loss (1.703 vs 1.705); the rules differ only when the
models' layer means or stds spread apart, where the mixture keeps the pooled weights' spread.

The regulariser sums, over the target's layers, the KL divergence of the layer's Gaussian from the
target's::

    KL(N(mu, s^2) || N(mu_t, s_t^2)) = log(s_t / s) + (s^2 + (mu - mu_t)^2) / (2 s_t^2) - 1/2

times ``strength``; ``mu`` and ``s`` are computed from the live parameter, so the term is
differentiable and its gradient pulls both moments toward the target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureMismatchError, InputError, listing

__all__ = ["DEFAULT_STRENGTH", "STD_RULES", "Scope", "WeightScopeRegularizer", "WeightScopes",
           "weight_scopes"]

STD_RULES = ("mixture", "mean")

#: Default regulariser strength (per layer KL, summed over layers), measured by
#: ``benchmarks/scopes.py`` (digits MLP 64-64-64-10, Adam 1e-3, 20 epochs, two Dirichlet clients,
#: target: a reference init's scopes): mean naive-midpoint test loss of 3 pairs 1.729 without,
#: 1.614 / 1.606 / 1.668 / 1.781 at strength 0.03 / 0.1 / 0.3 / 1; on IID pairs every strength
#: tried raised it (benchmarks/RESULTS.md).
DEFAULT_STRENGTH = 0.1

# std floor in the KL's log and division: a constant layer has s = 0
_EPS = 1e-12


@dataclass(frozen=True)
class Scope:
    """The Gaussian summary of one layer's weights: ``mean`` and (population) ``std``."""

    mean: float
    std: float


@dataclass(frozen=True)
class WeightScopes:
    """Per layer (state_dict key, in model order): the fused target :attr:`layers`, each model's
    own scope in :attr:`per_model`, the layer :attr:`shapes` and the :attr:`std_rule` used."""

    layers: dict[str, Scope]
    per_model: tuple[dict[str, Scope], ...]
    shapes: dict[str, tuple[int, ...]]
    std_rule: str

    def mismatch(self) -> dict[str, tuple[float, float]]:
        """Per layer: the largest spread across the models of the mean and of the std
        (``max - min``), the scope mismatch WSA removes."""
        out: dict[str, tuple[float, float]] = {}
        for key in self.layers:
            means = [m[key].mean for m in self.per_model]
            stds = [m[key].std for m in self.per_model]
            out[key] = (max(means) - min(means), max(stds) - min(stds))
        return out


def producer_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """The state_dict keys of ``model``'s producer weights (axis 0 ``out``, ``ndim >= 2``)."""
    from ..groups import find_groups

    spec = find_groups(model, example_inputs)
    params = dict(model.named_parameters(remove_duplicate=False))
    return [key for key, p in params.items()
            if p.ndim >= 2 and p.is_floating_point() and spec.roles.get((key, 0)) == "out"]


def _scope(w: torch.Tensor) -> Scope:
    w = w.detach().double().flatten()
    return Scope(float(w.mean()), float(w.std(correction=0)))


def _fuse(scopes: Sequence[Scope], weights: Sequence[float], std_rule: str) -> Scope:
    mu = sum(a * s.mean for a, s in zip(weights, scopes))
    if std_rule == "mixture":
        var = sum(a * (s.std ** 2 + s.mean ** 2) for a, s in zip(weights, scopes)) - mu ** 2
        return Scope(mu, math.sqrt(max(var, 0.0)))
    return Scope(mu, sum(a * s.std for a, s in zip(weights, scopes)))


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(a) for a in weights]
    if len(w) != n or not all(math.isfinite(a) and a >= 0 for a in w) or sum(w) <= 0:
        raise InputError(f"weights must be {n} non-negative finite numbers with a positive sum "
                         f"(one per model), got {list(weights)!r}")
    return [a / sum(w) for a in w]


def weight_scopes(models: nn.Module | Sequence[nn.Module], example_inputs: Any, *,
                  std_rule: str = "mixture", weights: Sequence[float] | None = None
                  ) -> WeightScopes:
    """Per producer layer, each model's weight scope and their fusion (module docstring).

    ``models``: one model or several of one architecture (same producer keys and shapes);
    ``example_inputs`` traces model 0 to find its producers.  ``weights``: the fusion weights
    (e.g. FedAvg's ``n_k / n``), uniform unless given.  No model is modified.
    """
    ms = [models] if isinstance(models, nn.Module) else list(models)
    if not ms or not all(isinstance(m, nn.Module) for m in ms):
        raise InputError("weight_scopes needs one nn.Module or a non-empty list of them, got "
                         f"{type(models).__name__}")
    if std_rule not in STD_RULES:
        raise InputError(f"std_rule must be one of {list(STD_RULES)}, got {std_rule!r}")
    a = _check_weights(weights, len(ms))
    keys = producer_layers(ms[0], example_inputs)
    if not keys:
        raise InputError(f"{type(ms[0]).__name__} has no producer weights (Linear/Conv-like "
                         "parameters whose rows are a channel group); nothing to regularise")
    ref = dict(ms[0].named_parameters(remove_duplicate=False))
    shapes = {k: tuple(ref[k].shape) for k in keys}
    per_model: list[dict[str, Scope]] = []
    for i, m in enumerate(ms):
        params = dict(m.named_parameters(remove_duplicate=False))
        _check_layers(params, shapes, f"model {i}", "model 0")
        per_model.append({k: _scope(params[k]) for k in keys})
    fused = {k: _fuse([pm[k] for pm in per_model], a, std_rule) for k in keys}
    return WeightScopes(fused, tuple(per_model), shapes, std_rule)


def _check_layers(params: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                  what: str, against: str) -> None:
    missing = [k for k in shapes if k not in params]
    if missing:
        raise ArchitectureMismatchError(
            f"{what} has no parameter {listing(missing)} that {against} has; weight scopes pair "
            "layers by state_dict key, so use models (and targets) of one architecture")
    for k, shape in shapes.items():
        if tuple(params[k].shape) != shape:
            raise ArchitectureMismatchError(
                f"{what}'s {k!r} has shape {tuple(params[k].shape)}, {against}'s {shape}; "
                "use models (and targets) of one architecture and width")


def gaussian_kl(mu: torch.Tensor, s: torch.Tensor, mu_t: float, s_t: float) -> torch.Tensor:
    """``KL(N(mu, s^2) || N(mu_t, s_t^2))`` (tensors ``mu``, ``s``; floats target)."""
    s = s.clamp_min(_EPS)
    return (math.log(s_t) - torch.log(s) + (s ** 2 + (mu - mu_t) ** 2) / (2 * s_t ** 2) - 0.5)


class WeightScopeRegularizer:
    """``reg(model) -> strength * sum_l KL(scope_l(model) || target_l)``, a scalar tensor to add
    to the training loss (module docstring)::

        target = fxfuse.weight_scopes(reference, x)          # or the fused scopes of clients
        reg = fxfuse.WeightScopeRegularizer(target, strength=1.0)
        loss = F.cross_entropy(model(x), y) + reg(model)

    ``target``: a :class:`WeightScopes`; every target layer must be a parameter of the model with
    the target's shape (else :class:`~fxfuse.errors.InputError`).  ``strength > 0``.
    """

    def __init__(self, target: WeightScopes, strength: float = DEFAULT_STRENGTH) -> None:
        if not isinstance(target, WeightScopes):
            raise InputError("WeightScopeRegularizer needs a WeightScopes target (from "
                             f"fxfuse.weight_scopes), got {type(target).__name__}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
                or not math.isfinite(strength) or strength <= 0:
            raise InputError(f"strength must be a positive finite number, got {strength!r}; "
                             "to train without the regulariser, leave it out of the loss")
        flat = [k for k, s in target.layers.items() if not (s.std > 0 and math.isfinite(s.std))]
        if flat:
            raise InputError(f"the target's std is zero or not finite for {listing(flat)}; a "
                             "target scope needs a positive std (use scopes of models whose "
                             "layers are not constant)")
        self.target = target
        self.strength = float(strength)

    def per_layer(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per target layer, the (unscaled) KL term of ``model``."""
        if not isinstance(model, nn.Module):
            raise InputError(f"reg(model) needs an nn.Module, got {type(model).__name__}")
        params = dict(model.named_parameters(remove_duplicate=False))
        try:
            _check_layers(params, self.target.shapes, type(model).__name__, "the target")
        except ArchitectureMismatchError as exc:
            raise InputError(str(exc)) from None
        out = {}
        for key, t in self.target.layers.items():
            w = params[key].flatten()
            mu = w.mean()
            s = ((w - mu) ** 2).mean().sqrt()
            out[key] = gaussian_kl(mu, s, t.mean, t.std)
        return out

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = self.per_layer(model)
        return self.strength * torch.stack(list(terms.values())).sum()

    def __repr__(self) -> str:
        return (f"WeightScopeRegularizer({len(self.target.layers)} layers, "
                f"strength={self.strength:g}, std_rule={self.target.std_rule!r})")
