"""``FusionStrategy``: Flower's FedAvg with its aggregation replaced by fxfuse's.

A Message-API strategy (``flwr.serverapp.strategy``, flwr 1.4x): sampling, messaging and
metric averaging are FedAvg's; ``aggregate_train`` turns the replies into
:class:`~fxfuse.flower.aggregate.ClientUpdate` s and runs
:func:`~fxfuse.flower.aggregate.aggregate_updates` (align by any registered ``align=`` config,
merge weighted by each client's ``num-examples``, optional repair) on the server's model factory
and example inputs -- the server never sees the clients' data.

Rounds.  ``client_init="local"``: in round 1 the clients train from their own initialisations
(the one-shot setting; the config sent to them says ``fxfuse-init = "local"``) and are aligned
jointly; later rounds start from the global model and every client is aligned to it
(``alignment="auto"``).  ``client_init="global"``: every round starts from the global model
(FedAvg's protocol, with align-then-average).

Bad replies (an error reply, no or several ArrayRecords, arrays that do not fit the server's
model, NaN/inf, no example count) are excluded with a logged reason and the round goes on; with
no usable reply the round raises :class:`~fxfuse.flower.aggregate.FederatedRoundError`.  With
``save_dir`` every round's global model is written atomically to ``round-NNN.pt`` (round 0: the
initial model) and ``global.pt`` (the latest), so a failed round loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log
from torch import nn

from ..align.weights import WeightMatching
from ..errors import InputError, quote_error
from ..groups import find_groups
from ..trace import as_input_tuple
from .aggregate import (
    ALIGNMENTS,
    Aggregation,
    ClientUpdate,
    Rejection,
    aggregate_updates,
    check_align,
)

__all__ = ["INIT_KEY", "FusionStrategy", "RoundRecord"]

#: The train-config key telling the client helper where to start: "local" or "global".
INIT_KEY = "fxfuse-init"
CLIENT_INITS = ("global", "local")


@dataclass(frozen=True)
class RoundRecord:
    """What one round's aggregation did: clients used and rejected, alignment, seconds, and
    the file its global model was saved to (None without ``save_dir``)."""

    server_round: int
    used: list[str]
    rejected: list[Rejection]
    alignment: str
    seconds: float
    saved: Path | None


class FusionStrategy(FedAvg):
    """FedAvg whose ``aggregate_train`` fuses the clients with fxfuse (module doc).

    ``factory``: builds a fresh instance of the global model's architecture; ``example_inputs``:
    inputs its ``forward`` takes (tracing, verification); ``align``: a registered align config
    (default :class:`~fxfuse.WeightMatching`; None averages without aligning: FedAvg);
    ``repair``: a registered repair config or None; ``data``: the server's calibration batches
    for methods that need data (activation matching, repair); ``alignment``: ``"auto"``,
    ``"joint"`` or ``"to-global"``; ``client_init``: ``"global"`` or ``"local"``; ``save_dir``:
    where every round's global model is saved; ``keep_average``: also compute the plain weighted
    average of the same replies (:attr:`last_average`, for comparison); ``partitions``: serve
    this many client partitions over however many SuperNodes are connected (partition ``p``
    goes to node ``p mod nodes``; its train config names ``partition-id`` and
    ``num-partitions``), for more clients than node processes fit.  Other keyword arguments
    go to FedAvg (``fraction_train``, ``min_train_nodes``, ...); ``fraction_evaluate`` defaults
    to 0 (evaluate the global model on the server with ``start(evaluate_fn=...)``, or pass a
    value and an ``evaluate_fn`` to :func:`~fxfuse.flower.client_app`).
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        example_inputs: Any,
        *,
        align: Any = WeightMatching(),  # noqa: B008 - frozen config
        repair: Any = None,
        data: Any = None,
        alignment: str = "auto",
        client_init: str = "global",
        save_dir: str | Path | None = None,
        keep_average: bool = False,
        partitions: int | None = None,
        device: str | torch.device = "cpu",
        fraction_evaluate: float = 0.0,
        **fedavg: Any,
    ) -> None:
        super().__init__(fraction_evaluate=fraction_evaluate, **fedavg)
        if alignment not in ("auto", *ALIGNMENTS):
            raise InputError(f"alignment must be 'auto', 'joint' or 'to-global', got "
                             f"{alignment!r}")
        if client_init not in CLIENT_INITS:
            raise InputError(f"client_init must be 'global' or 'local', got {client_init!r}")
        if not callable(factory):
            raise InputError("factory must be a function returning a fresh torch.nn.Module of "
                             "the global model's architecture")
        check_align(align)
        model = factory()
        if not isinstance(model, nn.Module):
            raise InputError(f"factory returned a {type(model).__name__}, not a "
                             "torch.nn.Module")
        self.factory = factory
        self.example_inputs = as_input_tuple(example_inputs)
        self.spec = find_groups(model, self.example_inputs)
        self.reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.align = align
        self.repair = repair
        self.data = data
        self.alignment = alignment
        self.client_init = client_init
        self.keep_average = keep_average
        if partitions is not None and (isinstance(partitions, bool) or not
                                       isinstance(partitions, int) or partitions < 1):
            raise InputError(f"partitions must be a positive int or None, got {partitions!r}")
        self.partitions = partitions
        self.device = device
        self.save_dir = None if save_dir is None else Path(save_dir)
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[RoundRecord] = []
        self.last_aggregation: Aggregation | None = None
        self._global: dict[str, torch.Tensor] | None = None
        self._local_round = False

    # ---- Flower hooks ---------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> fxfuse: align=%s, repair=%s, alignment=%s, client_init=%s",
            self.align, self.repair, self.alignment, self.client_init)
        log(INFO, "\t├──> fxfuse: %d groups in the server's model; saving to %s",
            len(self.spec.groups), self.save_dir or "(not saved)")
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        if server_round == 1 and self.save_dir is not None:
            self._save(0, self._global)
        self._local_round = server_round == 1 and self.client_init == "local"
        config[INIT_KEY] = "local" if self._local_round else "global"
        if self.partitions is None:
            return super().configure_train(server_round, arrays, config, grid)
        config["server-round"] = server_round
        sample_nodes(grid, self.min_available_nodes, max(self.min_train_nodes, 1))  # waits
        nodes = sorted(grid.get_node_ids())
        messages = []
        for pid in range(self.partitions):
            cfg = ConfigRecord({**dict(config), "partition-id": pid,
                                "num-partitions": self.partitions})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(Message(content=record, message_type=MessageType.TRAIN,
                                    dst_node_id=nodes[pid % len(nodes)]))
        log(INFO, "configure_train: %d partitions over %d nodes", self.partitions, len(nodes))
        return messages

    def round_alignment(self) -> str:
        """The alignment of the round being aggregated (``"auto"`` resolved)."""
        if self.alignment != "auto":
            return self.alignment
        return "joint" if self._local_round or self._global is None else "to-global"

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates, rejected, by_name = self.updates_from(replies)
        for r in rejected:
            log(WARNING, "fxfuse round %d: excluded %s", server_round, r)
        alignment = self.round_alignment()
        agg = aggregate_updates(
            updates, spec=self.spec, factory=self.factory, reference=self.reference,
            align=self.align, repair=self.repair, data=self.data,
            example_inputs=self.example_inputs, alignment=alignment, anchor=self._global,
            keep_average=self.keep_average, device=self.device, rejected=rejected,
            on_reject=lambda r: log(WARNING, "fxfuse round %d: excluded %s", server_round, r))
        self.last_aggregation = agg
        saved = self._save(server_round, agg.state) if self.save_dir is not None else None
        self.rounds.append(RoundRecord(server_round, agg.used, agg.rejected, alignment,
                                       agg.seconds, saved))
        log(INFO, "fxfuse round %d: fused %d clients (%s) in %.2f s, %d excluded",
            server_round, len(agg.used), alignment, agg.seconds, len(agg.rejected))
        used = [by_name[n].content for n in agg.used]
        try:
            metrics = self.train_metrics_aggr_fn(used, self.weighted_by_key)
        except Exception as exc:  # the clients' own metrics are not uniform: report ours only
            log(WARNING, "fxfuse round %d: client metrics not averaged (%s)", server_round,
                quote_error(exc))
            metrics = MetricRecord()
        metrics["fxfuse-clients-used"] = len(agg.used)
        metrics["fxfuse-clients-excluded"] = len(agg.rejected)
        metrics["fxfuse-aggregation-s"] = agg.seconds
        return ArrayRecord(agg.state), metrics

    # ---- helpers ----------------------------------------------------------------------------
    def updates_from(self, replies: list[Message]
                     ) -> tuple[list[ClientUpdate], list[Rejection], dict[str, Message]]:
        """The replies as client updates (named ``node <id>``), and those refused before their
        arrays are read: error replies, not exactly one ArrayRecord."""
        updates: list[ClientUpdate] = []
        rejected: list[Rejection] = []
        by_name: dict[str, Message] = {}
        per_node: dict[int, int] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            per_node[node] = per_node.get(node, 0) + 1
            name = f"node {node}" + (f" #{per_node[node]}" if per_node[node] > 1 else "")
            by_name[name] = msg  # "#2", "#3": further partitions served by the same node
            if msg.has_error():
                rejected.append(Rejection(name, f"replied with an error: {msg.error.reason}"))
                continue
            content = msg.content
            if len(content.array_records) != 1:
                rejected.append(Rejection(name, f"sent {len(content.array_records)} "
                                                "ArrayRecords; a train reply holds exactly one"))
                continue
            record = next(iter(content.array_records.values()))
            count = None
            for mr in content.metric_records.values():
                if self.weighted_by_key in mr:
                    value = mr[self.weighted_by_key]
                    count = value if isinstance(value, (int, float)) else None
                    break
            updates.append(ClientUpdate(name, record.to_torch_state_dict, count))
        return updates, rejected, by_name

    def _save(self, server_round: int, state: dict[str, torch.Tensor]) -> Path:
        from ..exporter import publish, staged_file

        assert self.save_dir is not None
        target = self.save_dir / f"round-{server_round:03d}.pt"
        for path in (target, self.save_dir / "global.pt"):
            with staged_file(path) as staged:
                torch.save({k: v.detach().cpu() for k, v in state.items()}, staged)
                publish(staged, path)
        return target

    @property
    def last_average(self) -> dict[str, torch.Tensor] | None:
        """The plain weighted average of the last round's used clients (``keep_average=True``)."""
        return None if self.last_aggregation is None else self.last_aggregation.average
