"""The ServerApp: FedAvg's messaging with fxfuse's aggregation (fxfuse.flower.FusionStrategy).

The server holds a model factory, one example batch and a small calibration set (never the
clients' data); it evaluates every round's global model and, beside it, the plain weighted
average of the same replies (what FedAvg would have produced), saves every round's global model
atomically, and writes results.json (atomically too) into the output folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from task import accuracy, make_model, server_sets

from fxfuse.exporter import publish, staged_file
from fxfuse.flower import FusionStrategy
from fxfuse.methods import config_from_dict

torch.set_num_threads(1)
app = ServerApp()


def _method(name: str) -> object | None:
    return None if name in ("", "none") else config_from_dict({"method": name})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out = Path(str(cfg["output-dir"]) or "fxfuse-flower-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    calib, (x_eval, y_eval) = server_sets(cfg)
    n_parts = int(cfg["num-partitions"])  # type: ignore[arg-type]
    per_node = bool(cfg.get("partitions-by-server", False))
    strategy = FusionStrategy(
        lambda: make_model(cfg), calib[0][:8], align=_method(str(cfg["align"])),
        repair=_method(str(cfg["repair"])), data=calib, client_init=str(cfg["client-init"]),
        save_dir=out / "rounds", keep_average=True,
        partitions=n_parts if per_node else None,
        fraction_train=1.0, min_train_nodes=1 if per_node else n_parts,
        min_available_nodes=int(cfg.get("min-nodes", 0)) or n_parts)  # type: ignore[arg-type]
    rounds: list[dict[str, object]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model(cfg)
        model.load_state_dict(arrays.to_torch_state_dict())
        row: dict[str, object] = {"round": server_round, "accuracy": accuracy(model, x_eval,
                                                                               y_eval)}
        if server_round > 0 and strategy.last_average is not None:
            model.load_state_dict(strategy.last_average)
            row["average_accuracy"] = accuracy(model, x_eval, y_eval)
            rec = strategy.rounds[-1]
            row.update(used=rec.used, excluded=[str(r) for r in rec.rejected],
                       alignment=rec.alignment, aggregation_s=rec.seconds)
        rounds.append(row)
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, float)})

    t0 = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model(cfg).state_dict()),
                   num_rounds=int(cfg["num-server-rounds"]),  # type: ignore[arg-type]
                   timeout=float(cfg["round-timeout"]),  # type: ignore[arg-type]
                   train_config=ConfigRecord(), evaluate_fn=evaluate)
    results = {"config": dict(cfg), "rounds": rounds, "seconds": time.perf_counter() - t0}
    target = out / "results.json"
    with staged_file(target) as staged:
        staged.write_text(json.dumps(results, indent=1))
        publish(staged, target)
