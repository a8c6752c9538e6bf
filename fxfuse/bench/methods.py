"""The scoreboard's methods: named callables from the trained clients to one model to score.

A method is ``fn(ctx: Context) -> nn.Module`` (or ``(nn.Module, note)``): it sees the clients,
their FedAvg weights ``n_k / n``, two example inputs and the balanced fusion set drawn from the
clients' training data, never the test data.  It raises :class:`NotApplicable` with the reason
when the setting does not allow it (the scoreboard prints ``n/a: <reason>``).  Adding a row is one
registration::

    from fxfuse.bench.methods import Context, method

    @method("my fusion")
    def my_fusion(ctx: Context) -> nn.Module:
        return fxfuse.fuse(ctx.models, ctx.example, align=..., weights=ctx.weights)

:data:`METHODS` keeps registration order, which is the row order.  The built-in rows:

* ``vanilla average`` -- ``fxfuse.fuse(align=None)``: the FedAvg average
  ``sum_k (n_k / n) W_k`` (one round of FedAvg when the clients share their initialisation);
* ``weight matching`` / ``+ REPAIR`` -- Git Re-Basin weight matching (MergeMany for K > 2), then
  optionally REPAIR on the fusion set, merged with the FedAvg weights;
* ``activation matching`` / ``+ REPAIR`` -- units matched by the correlation of their
  activations on the fusion set;
* ``logit ensemble`` -- the uniform mean of the K clients' logits: K forward passes, not one
  network (the usual upper reference);
* ``AMS: <selector>`` -- :func:`fxfuse.adaptive_selection`: each test input answered by one
  client, chosen by the selector fitted on the fusion set tagged with each sample's client
  (``ctx.extras["fusion_index"]``); the note gives compute per input (PyTorch / ONNX).

Every fused model of the built-ins uses the same weights (FedAvg shares); the fuse methods need
clients of one architecture (else ``n/a``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .clients import TrainedClient, client_weights
from .splits import Split

__all__ = ["METHODS", "Context", "Ensemble", "NotApplicable", "method", "require_one_architecture"]


class NotApplicable(Exception):
    """A method does not apply to a setting; ``str(exc)`` is the reason shown in its cell."""


@dataclass
class Context:
    """What a method may use: ``clients`` (trained, eval mode), ``split``, ``init`` (how the
    clients were initialised), ``example`` (two training inputs, for tracing) and the fusion set
    ``fusion_x`` / ``fusion_y`` (balanced, from the clients' own data)."""

    clients: list[TrainedClient]
    split: Split
    init: str
    example: torch.Tensor
    fusion_x: torch.Tensor
    fusion_y: torch.Tensor
    fusion_batch_size: int = 100
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[nn.Module]:
        return [c.model for c in self.clients]

    @property
    def weights(self) -> list[float]:
        """FedAvg weights: each client's share of the training samples."""
        return client_weights(self.clients)

    def fusion_batches(self) -> list[Any]:
        """The fusion set's inputs in batches of :attr:`fusion_batch_size`."""
        return list(self.fusion_x.split(self.fusion_batch_size))


Method = Callable[[Context], "nn.Module | tuple[nn.Module, str]"]

#: Registered methods, in row order: name -> callable.
METHODS: dict[str, Method] = {}


def method(name: str) -> Callable[[Method], Method]:
    """Register ``fn`` as the scoreboard row ``name`` (names are unique)."""
    def register(fn: Method) -> Method:
        if name in METHODS:
            raise InputError(f"a scoreboard method named {name!r} is already registered")
        METHODS[name] = fn
        return fn
    return register


def require_one_architecture(ctx: Context) -> None:
    """Raise :class:`NotApplicable` unless every client has model 0's class and parameter
    shapes (what averaging and permutation alignment need)."""
    ref = ctx.models[0]
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for c in ctx.clients[1:]:
        if type(c.model) is not type(ref):
            raise NotApplicable(f"clients have different architectures "
                                f"({type(ref).__name__}, {type(c.model).__name__})")
        other = {k: tuple(v.shape) for k, v in c.model.state_dict().items()}
        if other.keys() != shapes.keys():
            raise NotApplicable(f"clients 0 and {c.index} have different layers")
        for key, shape in shapes.items():
            if other[key] != shape:
                raise NotApplicable(f"clients differ in width ({key}: client 0 "
                                    f"{'x'.join(map(str, shape))}, client {c.index} "
                                    f"{'x'.join(map(str, other[key]))})")


class Ensemble(nn.Module):
    """Mean of the members' outputs (logits), ``weights`` uniform unless given."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None
                 ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        w = [1.0 / len(members)] * len(members) if weights is None else list(weights)
        self.register_buffer("weights", torch.tensor(w, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([m(x) for m in self.members])
        w: torch.Tensor = self.weights  # type: ignore[assignment]
        return (out * w.view(-1, *([1] * (out.dim() - 1)))).sum(0)


def _fuse(ctx: Context, align: Any, repair: Any) -> nn.Module:
    import fxfuse

    require_one_architecture(ctx)
    return fxfuse.fuse(ctx.models, ctx.example, align=align, repair=repair, weights=ctx.weights,
                       progress=False)


@method("vanilla average")
def vanilla_average(ctx: Context) -> nn.Module:
    return _fuse(ctx, None, None)


@method("weight matching")
def weight_matching(ctx: Context) -> nn.Module:
    import fxfuse

    return _fuse(ctx, fxfuse.WeightMatching(), None)


@method("weight matching + REPAIR")
def weight_matching_repair(ctx: Context) -> nn.Module:
    import fxfuse

    return _fuse(ctx, fxfuse.WeightMatching(), fxfuse.Repair(data=ctx.fusion_batches()))


@method("activation matching")
def activation_matching(ctx: Context) -> nn.Module:
    import fxfuse

    return _fuse(ctx, fxfuse.ActivationMatching(data=ctx.fusion_batches()), None)


@method("activation matching + REPAIR")
def activation_matching_repair(ctx: Context) -> nn.Module:
    import fxfuse

    data = ctx.fusion_batches()
    return _fuse(ctx, fxfuse.ActivationMatching(data=data), fxfuse.Repair(data=data))


@method("logit ensemble")
def logit_ensemble(ctx: Context) -> tuple[nn.Module, str]:
    return Ensemble(ctx.models), f"{len(ctx.clients)} forward passes"


# -- adaptive model selection (fxfuse.adaptive_selection): one client answers each input --------
def _fusion_sources(ctx: Context) -> torch.Tensor:
    """For each fusion-set sample, the client whose training data holds it."""
    import numpy as np

    index = ctx.extras.get("fusion_index")
    if index is None:
        raise NotApplicable("the context has no extras['fusion_index'] (which client holds each "
                            "fusion sample)")
    owner = np.full(ctx.split.n_samples, -1, dtype=np.int64)
    for k, ix in enumerate(ctx.split.indices):
        owner[ix] = k
    return torch.from_numpy(owner[np.asarray(index)])


def _selection_row(name: str, selector: Any) -> None:
    @method(f"AMS: {name}")
    def row(ctx: Context) -> tuple[nn.Module, str]:
        import fxfuse

        data = (ctx.fusion_x, ctx.fusion_y, _fusion_sources(ctx))
        router = fxfuse.adaptive_selection(ctx.models, ctx.example, data, selector).eval()
        rep = router.report
        assert rep is not None
        return router, (f"kMAC/input {rep.macs_pytorch / 1e3:.0f} PyTorch, "
                        f"{rep.macs_onnx / 1e3:.0f} ONNX")


def _register_selection_rows() -> None:
    from ..combine import Confidence, Density, Entropy, Gate

    for name, sel in (("confidence", Confidence(calibrate=False)),
                      ("confidence, calibrated", Confidence()),
                      ("confidence, own-calibrated", Confidence(calibrate_on="own")),
                      ("entropy, calibrated", Entropy()),
                      ("gate (client)", Gate(target="client")),
                      ("gate (correct)", Gate(target="correct")),
                      ("gate (correct) x confidence", Gate(target="correct", confidence=True)),
                      ("density (input)", Density(space="input")),
                      ("density (features)", Density(space="features"))):
        _selection_row(name, sel)


_register_selection_rows()
