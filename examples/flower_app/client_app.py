"""The ClientApp: each SuperNode serves the partition its node config names (partition-id,
num-partitions), or, when the server's train config names one, that partition (several
partitions per SuperNode, served in turn).  fxfuse.flower.client_app does the messaging."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context
from task import accuracy, load, make_model, partition
from torch import nn

from fxfuse.bench import Budget, train_client
from fxfuse.flower import TrainResult, client_app

torch.set_num_threads(1)


def _partition(context: Context, config: ConfigRecord) -> tuple[int, int]:
    pid = config.get("partition-id", context.node_config["partition-id"])
    n = config.get("num-partitions", context.node_config["num-partitions"])
    return int(pid), int(n)  # type: ignore[arg-type]


def model_fn(context: Context, config: ConfigRecord) -> nn.Module:
    """A fresh model with the partition's own initialisation (used in a local-start round)."""
    pid, _ = _partition(context, config)
    return make_model(context.run_config, seed=int(context.run_config["seed"]) + 1000 + pid)  # type: ignore[arg-type]


def train_fn(model: nn.Module, context: Context, config: ConfigRecord) -> TrainResult:
    cfg = context.run_config
    pid, n = _partition(context, config)
    x, y = partition(cfg, pid, n)
    budget = Budget(epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),  # type: ignore[arg-type]
                    lr=float(cfg["lr"]))  # type: ignore[arg-type]
    server_round = int(config.get("server-round", 1))  # type: ignore[arg-type]
    seed = int(cfg["seed"]) + 7919 * server_round + pid  # type: ignore[arg-type]
    trained, loss = train_client(model, x, y, budget, seed=seed)
    return TrainResult(int(x.shape[0]), {"train-loss": loss}, model=trained)


def evaluate_fn(model: nn.Module, context: Context, config: ConfigRecord
                ) -> tuple[int, dict[str, float]]:
    data = load(str(context.run_config["dataset"]))
    return int(data.test_y.numel()), {"accuracy": accuracy(model, data.test_x, data.test_y)}


app = client_app(model_fn, train_fn, evaluate_fn)
