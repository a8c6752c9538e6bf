"""fxfuse.flower without a server: the strategy's aggregation on in-memory Flower replies, the
client helper called in-process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import fxfuse

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fxfuse.flower import (  # noqa: E402
    INIT_KEY,
    ClientUpdate,
    FederatedRoundError,
    FusionStrategy,
    TrainResult,
    aggregate_updates,
    client_app,
)

X = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))


def make_model(seed: int = 0, hidden: int = 16) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                             nn.ReLU(), nn.Linear(hidden, 3))


class FakeGrid:
    """The part of a Grid the strategy's configure_train uses."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's process identity, as a ServerApp process has it (instructions need it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def instruction(node: int, arrays: ArrayRecord | None = None,
                config: dict[str, object] | None = None) -> Message:
    md = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                  reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600,
                  message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": arrays or ArrayRecord(make_model().state_dict()),
                          "config": ConfigRecord(config or {})})  # type: ignore[arg-type]
    return Message(metadata=md, content=content)  # type: ignore[call-overload]


def reply(node: int, state: dict[str, torch.Tensor] | None, n: float | None = None,
          error: str | None = None) -> Message:
    ins = instruction(node)
    if error is not None:
        return Message(Error(code=0, reason=error), reply_to=ins)
    metrics = MetricRecord({"num-examples": n} if n is not None else {"loss": 1.0})
    content = RecordDict({"metrics": metrics})
    if state is not None:
        content["arrays"] = ArrayRecord({k: v.clone() for k, v in state.items()})
    return Message(content, reply_to=ins)


def strategy_for(tmp_path: Path, **kw: object) -> FusionStrategy:
    kw.setdefault("client_init", "local")
    kw.setdefault("keep_average", True)
    return FusionStrategy(make_model, X, save_dir=tmp_path, **kw)  # type: ignore[arg-type]


def start_round(strategy: FusionStrategy, server_round: int, global_state: dict[str, torch.Tensor],
                nodes: list[int]) -> list[Message]:
    return list(strategy.configure_train(server_round, ArrayRecord(global_state),
                                         ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]


def states(seeds: list[int]) -> list[dict[str, torch.Tensor]]:
    return [make_model(s).state_dict() for s in seeds]


@pytest.mark.parametrize("align", [fxfuse.WeightMatching(), fxfuse.ActivationMatching()],
                         ids=["weight", "activation"])
def test_one_shot_aggregation_equals_fuse_on_the_same_states(tmp_path: Path, task_identity: None,
                                                             align: object) -> None:
    calib = [torch.randn(16, 12, generator=torch.Generator().manual_seed(1))]
    strategy = strategy_for(tmp_path, align=align, data=calib)
    sent = start_round(strategy, 1, make_model(99).state_dict(), [11, 12, 13])
    assert [dict(m.content["config"])[INIT_KEY] for m in sent] == ["local"] * 3
    sts, counts = states([1, 2, 3]), [100, 300, 50]
    arrays, metrics = strategy.aggregate_train(
        1, [reply(11 + k, s, n) for k, (s, n) in enumerate(zip(sts, counts))])
    assert arrays is not None and metrics is not None
    models = [make_model(s) for s in (1, 2, 3)]
    expected = fxfuse.fuse(models, X, align=align, weights=counts, progress=False,
                           data=calib).state_dict()
    got = arrays.to_torch_state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    # and it is not the plain average (the alignment did something)
    plain = strategy.last_average
    assert plain is not None
    assert max(float((plain[k] - got[k]).abs().max()) for k in got) > 1e-2
    assert metrics["fxfuse-clients-used"] == 3 and metrics["fxfuse-clients-excluded"] == 0
    assert torch.load(tmp_path / "round-001.pt", weights_only=True).keys() == expected.keys()
    assert (tmp_path / "round-000.pt").is_file() and (tmp_path / "global.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global.pt", "round-000.pt",
                                                           "round-001.pt"]


def test_bad_replies_are_excluded_by_name_and_the_round_goes_on(tmp_path: Path,
                                                                task_identity: None) -> None:
    strategy = strategy_for(tmp_path)
    start_round(strategy, 1, make_model(99).state_dict(), list(range(1, 9)))
    good = states([1, 2])
    nan = {k: v.clone() for k, v in good[0].items()}
    nan["2.weight"][0, 0] = float("nan")
    missing = {k: v for k, v in good[1].items() if k != "4.bias"}
    wider = make_model(5, hidden=24).state_dict()
    replies = [reply(1, good[0], 10), reply(2, good[1], 30), reply(3, None, error="OOM"),
               reply(4, nan, 10), reply(5, missing, 10), reply(6, wider, 10),
               reply(7, good[0], None), reply(8, good[1], -3)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    rec = strategy.rounds[-1]
    assert rec.used == ["node 1", "node 2"]
    reasons = {r.name: r.reason for r in rec.rejected}
    assert set(reasons) == {f"node {i}" for i in range(3, 9)}
    assert "error: OOM" in reasons["node 3"]
    assert "'2.weight'" in reasons["node 4"] and "NaN" in reasons["node 4"]
    assert "'4.bias'" in reasons["node 5"] and "architecture" in reasons["node 5"]
    assert "(24, 12)" in reasons["node 6"] and "(16, 12)" in reasons["node 6"]
    assert "example count" in reasons["node 7"] and "-3" in reasons["node 8"]
    assert metrics["fxfuse-clients-excluded"] == 6
    # the result is the fusion of the two good clients alone
    expected = fxfuse.fuse([make_model(1), make_model(2)], X, weights=[10, 30],
                           progress=False).state_dict()
    for k, v in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)


def test_all_clients_bad_fails_the_round_and_keeps_the_previous_global(tmp_path: Path,
                                                                       task_identity: None
                                                                       ) -> None:
    strategy = strategy_for(tmp_path)
    first = states([1, 2])
    start_round(strategy, 1, make_model(99).state_dict(), [1, 2])
    arrays, _ = strategy.aggregate_train(1, [reply(1, first[0], 5), reply(2, first[1], 5)])
    assert arrays is not None
    saved = (tmp_path / "global.pt").read_bytes()
    start_round(strategy, 2, arrays.to_torch_state_dict(), [1, 2])
    nan = {k: torch.full_like(v, float("inf")) for k, v in first[0].items()}
    with pytest.raises(FederatedRoundError) as info:
        strategy.aggregate_train(2, [reply(1, nan, 5), reply(2, None, error="crashed")])
    msg = str(info.value)
    assert "node 1" in msg and "node 2" in msg and "previous global model is kept" in msg
    assert (tmp_path / "global.pt").read_bytes() == saved
    assert not (tmp_path / "round-002.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global.pt", "round-000.pt",
                                                           "round-001.pt"]


def test_rounds_after_the_first_align_each_client_to_the_global_model(tmp_path: Path,
                                                                       task_identity: None
                                                                       ) -> None:
    # clients = the global model plus small noise, each with its hidden units shuffled: aligned
    # to the global model, their average is the global plus the mean noise; the plain average is
    # far from it
    strategy = strategy_for(tmp_path, client_init="global")
    g = make_model(0)
    spec = fxfuse.find_groups(g, X)
    gen = torch.Generator().manual_seed(3)
    clients = []
    for _ in range(4):
        noisy = make_model(0)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        perms = {grp.name: torch.randperm(grp.size, generator=gen) for grp in spec.groups}
        clients.append(fxfuse.permute(noisy, spec, perms).state_dict())
    sent = start_round(strategy, 1, g.state_dict(), [1, 2, 3, 4])
    assert {dict(m.content["config"])[INIT_KEY] for m in sent} == {"global"}
    arrays, _ = strategy.aggregate_train(1, [reply(i + 1, s, 10) for i, s in
                                             enumerate(clients)])
    assert arrays is not None and strategy.rounds[-1].alignment == "to-global"
    got = arrays.to_torch_state_dict()
    ref = g.state_dict()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 0.05
    plain = aggregate_updates([ClientUpdate(str(i), s, 10) for i, s in enumerate(clients)],
                              spec=spec, factory=make_model, reference=ref, align=None)
    assert max(float((plain.state[k] - ref[k]).abs().max()) for k in ref) > 0.1


def test_the_client_helper_starts_from_the_global_model_unless_told_local() -> None:
    seen: list[torch.Tensor] = []

    def train_fn(model: nn.Module, context: Context, config: ConfigRecord) -> TrainResult:
        seen.append(next(model.parameters()).detach().clone())
        return TrainResult(42, {"loss": 0.5})

    app = client_app(lambda ctx, cfg: make_model(7), train_fn)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})
    g = make_model(3).state_dict()
    out = app(instruction(5, ArrayRecord(g), {INIT_KEY: "global"}), ctx)
    torch.testing.assert_close(seen[-1], g["0.weight"])
    assert dict(out.content["metrics"]) == {"num-examples": 42, "loss": 0.5}
    torch.testing.assert_close(out.content.array_records["arrays"].to_torch_state_dict()["0.weight"],
                               g["0.weight"])
    app(instruction(5, ArrayRecord(g), {INIT_KEY: "local"}), ctx)
    torch.testing.assert_close(seen[-1], make_model(7).state_dict()["0.weight"])


def test_the_client_helper_refuses_a_bad_training_step_and_a_wrong_model() -> None:
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    no_count = client_app(lambda ctx, cfg: make_model(), lambda m, c, cfg: 0)
    with pytest.raises(Exception, match="number of examples"):
        no_count(instruction(5), ctx)
    wider = client_app(lambda ctx, cfg: make_model(hidden=24), lambda m, c, cfg: 3)
    with pytest.raises(Exception, match="does not load into this client's model"):
        wider(instruction(5), ctx)


def make_bn_model(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bn = nn.BatchNorm1d(16)
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        return nn.Sequential(nn.Linear(12, 16), bn, nn.ReLU(), nn.Linear(16, 3)).eval()


@pytest.mark.parametrize("alignment", ["joint", "to-global"])
def test_repair_runs_on_the_servers_calibration_data(tmp_path: Path, task_identity: None,
                                                     alignment: str) -> None:
    calib = [torch.randn(32, 12, generator=torch.Generator().manual_seed(2))]
    strategy = FusionStrategy(make_bn_model, X, repair=fxfuse.ResetBatchNorm(), data=calib,
                              alignment=alignment, client_init="local")
    start_round(strategy, 1, make_bn_model(9).state_dict(), [1, 2, 3])
    sts = [make_bn_model(s).state_dict() for s in (1, 2, 3)]
    arrays, _ = strategy.aggregate_train(1, [reply(i + 1, s, 10 * (i + 1))
                                             for i, s in enumerate(sts)])
    assert arrays is not None
    got = arrays.to_torch_state_dict()
    # the fused BatchNorm statistics are those of the fused model on the calibration data
    fused = make_bn_model()
    fused.load_state_dict(got)
    with torch.no_grad():
        h = fused[0](calib[0])
    torch.testing.assert_close(got["1.running_mean"], h.mean(0), rtol=1e-4, atol=1e-4)
    if alignment == "joint":
        expected = fxfuse.fuse([make_bn_model(s) for s in (1, 2, 3)], X, weights=[10, 20, 30],
                               repair=fxfuse.ResetBatchNorm(), data=calib,
                               progress=False).state_dict()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)


def test_a_self_merging_method_runs_through_fuse_on_the_calibration_data() -> None:
    """Neuron interpolation computes the fused weights itself: the aggregation gives exactly
    fxfuse.fuse on models holding the clients' states (also when asked for to-global)."""
    ni = fxfuse.NeuronInterpolation(epochs=2) if hasattr(fxfuse, "NeuronInterpolation") else None
    if ni is None:
        pytest.skip("neuron interpolation is not registered")
    server = make_model(0)
    spec = fxfuse.find_groups(server, X)
    clients = [make_model(i) for i in (1, 2, 3)]
    ups = [ClientUpdate(str(i), m.state_dict(), 10 * (i + 1)) for i, m in enumerate(clients)]
    calib = [torch.randn(64, 12, generator=torch.Generator().manual_seed(5))]
    want = fxfuse.fuse(clients, X, align=ni, data=calib, weights=[10, 20, 30],
                       progress=False).state_dict()
    for mode in ("joint", "to-global"):
        got = aggregate_updates(ups, spec=spec, factory=make_model, reference=server.state_dict(),
                                align=ni, data=calib, example_inputs=X, alignment=mode,
                                anchor=server.state_dict())
        for k, v in want.items():
            torch.testing.assert_close(got.state[k], v)


def test_clients_of_other_widths_are_fused_into_the_servers_widths_by_ot() -> None:
    """With OptimalTransport, a client at other widths is read off the server's spec and fused
    into the server model's widths (joint: as fxfuse.fuse with that target; to-global: onto the
    global model); weight matching still refuses it by name."""
    server = make_model(0)
    spec = fxfuse.find_groups(server, X)
    ref = server.state_dict()
    same, wider, narrow = make_model(1), make_model(2, hidden=32), make_model(3, hidden=8)
    ups = [ClientUpdate("a", same.state_dict(), 10), ClientUpdate("b", wider.state_dict(), 10),
           ClientUpdate("c", narrow.state_dict(), 20)]
    ot = fxfuse.OptimalTransport()
    got = aggregate_updates(ups, spec=spec, factory=make_model, reference=ref, align=ot)
    assert not got.rejected
    want = fxfuse.fuse([same, wider, narrow], X, align=ot, weights=[10, 10, 20],
                       progress=False).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got.state[k], v)
    onto = aggregate_updates(ups[1:], spec=spec, factory=make_model, reference=ref, align=ot,
                             alignment="to-global", anchor=ref)
    assert {k: v.shape for k, v in onto.state.items()} == {k: v.shape for k, v in ref.items()}
    wm = aggregate_updates(ups, spec=spec, factory=make_model, reference=ref,
                           align=fxfuse.WeightMatching())
    assert [r.name for r in wm.rejected] == ["b", "c"]
    assert "OptimalTransport" in wm.rejected[0].reason
