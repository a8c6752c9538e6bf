"""``client_app``: a Flower ``ClientApp`` around the user's model and training step.

The user writes ``model_fn(context, config) -> nn.Module`` (a fresh model; seed it from
``context.node_config`` -- or the partition the server's ``config`` names -- to give clients their
own initialisations) and
``train_fn(model, context, config) -> TrainResult | int | (int, metrics)`` (train ``model`` on
the client's data; return how many examples it trained on, and optional float metrics); the
helper does Flower's message plumbing:

* train message -> build the model; unless the server says ``fxfuse-init = "local"`` (the
  one-shot round: train from the client's own initialisation), load the global arrays into it
  (strict: every key, every shape) -> ``train_fn`` -> reply ``{"arrays": ArrayRecord(state),
  "metrics": MetricRecord({"num-examples": n, ...})}``;
* evaluate message (only with ``evaluate_fn(model, context, config) -> (n, metrics)``) -> the
  global arrays loaded -> reply ``{"metrics": ...}``.

Anything ``train_fn`` raises becomes Flower's error reply, which the strategy drops and reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from ..errors import ArchitectureMismatchError, InputError, quote_error
from .strategy import INIT_KEY

__all__ = ["EvaluateFn", "ModelFn", "TrainFn", "TrainResult", "client_app"]

NUM_EXAMPLES = "num-examples"


@dataclass(frozen=True)
class TrainResult:
    """What a training step returns: ``num_examples`` it trained on (the client's weight in
    the fusion), float ``metrics`` to report, and ``model`` if it trained a copy rather than
    the model it was given (None: the given model, trained in place)."""

    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    model: nn.Module | None = None


ModelFn = Callable[[Context, ConfigRecord], nn.Module]
TrainFn = Callable[[nn.Module, Context, ConfigRecord], Any]
EvaluateFn = Callable[[nn.Module, Context, ConfigRecord], Any]


def _result(out: Any, what: str) -> TrainResult:
    if isinstance(out, TrainResult):
        res = out
    elif isinstance(out, tuple) and len(out) == 2:
        res = TrainResult(out[0], dict(out[1]))
    else:
        res = TrainResult(out)
    n = res.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"{what} must return the number of examples it used (a positive int), "
                         f"as TrainResult(n, metrics) or (n, metrics), got {out!r}")
    for k, v in res.metrics.items():
        if k == NUM_EXAMPLES or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not math.isfinite(v):
            raise InputError(f"{what}: metric {k!r}={v!r} must be a finite number other than "
                             f"{NUM_EXAMPLES!r}")
    return res


def _load_global(model: nn.Module, msg: Message) -> None:
    if "arrays" not in msg.content.array_records:
        raise InputError("the server's message holds no 'arrays' record to start from")
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArchitectureMismatchError(
            f"the global model does not load into this client's model "
            f"({quote_error(exc)}); build the architecture the server's factory builds") from exc


def client_app(model_fn: ModelFn, train_fn: TrainFn, evaluate_fn: EvaluateFn | None = None
               ) -> ClientApp:
    """A ``ClientApp`` whose train (and, with ``evaluate_fn``, evaluate) handler runs the user's
    functions (module doc)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get("config", ConfigRecord())
        model = model_fn(context, config)
        if not isinstance(model, nn.Module):
            raise InputError(f"model_fn returned a {type(model).__name__}, not a "
                             "torch.nn.Module")
        if config.get(INIT_KEY, "global") != "local":
            _load_global(model, msg)
        res = _result(train_fn(model, context, config), "train_fn")
        trained = res.model if res.model is not None else model
        state = {k: v.detach().cpu() for k, v in trained.state_dict().items()}
        metrics = MetricRecord({NUM_EXAMPLES: res.num_examples, **dict(res.metrics)})
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}),
                       reply_to=msg)

    if evaluate_fn is not None:
        @app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            config = msg.content.config_records.get("config", ConfigRecord())
            model = model_fn(context, config)
            _load_global(model, msg)
            res = _result(evaluate_fn(model, context, config), "evaluate_fn")
            metrics = MetricRecord({NUM_EXAMPLES: res.num_examples, **dict(res.metrics)})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app
