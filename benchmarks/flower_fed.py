"""Benchmark: federated fusion with fxfuse.flower (issue 20), MNIST clients of the shared harness.

1. One-shot: K clients (``fxfuse.bench.train_clients``, ``init="different"``, MLP 784-256-10,
   Budget() = 10 epochs Adam 1e-3) under Dirichlet(0.5) and the 1..5-concentration protocol;
   the global model of ``FusionStrategy.aggregate_train`` on Flower reply messages built from
   them: FedAvg (``align=None``), weight matching, activation matching + REPAIR, OT, vs the
   logit ensemble; accuracy on the MNIST test set less the server's 400 calibration images.
2. Rounds: 16 clients, Dirichlet(0.5), R rounds of 1 local epoch each; FedAvg vs fxfuse
   (weight matching to the global model every round) from a common init, and fxfuse with a
   one-shot first round (clients from their own inits).  In-process: the strategy's
   configure_train / aggregate_train driven by a loop, no SuperLink.
3. Server cost: aggregation wall (and CPU) time and the peak resident memory it adds beyond the
   replies, per K, in a fresh process each (MLP 784-1024-1024-10 at random init, 7.1 MB per
   model), sampled every 2 ms from /proc/self/statm after a warm-up and ``malloc_trim``, with
   ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the resident set (glibc otherwise
   keeps them in its heap and the figure measures fragmentation, not the aggregation).
4. Deployment engine: the example app (examples/flower_app) on a SuperLink and N SuperNodes on
   127.0.0.1, one-shot, MNIST: wall time and accuracy; 64 clients as partitions served in turn
   by 16 SuperNodes.

Run: ``python -m benchmarks.flower_fed --write`` (about 20-30 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._report import (
    command_line,
    fxfuse_revision,
    load_average,
    revision_note,
    write_section,
)

BEGIN = "<!-- BEGIN flower_fed -->"
END = "<!-- END flower_fed -->"
MLP = ("models.zoo:mlp_classifier", {"in_dim": 784, "widths": [256]})
CALIB = 400


def _setup() -> Any:
    import fxfuse.bench as fb

    data = fb.datasets.load("mnist")
    calib = list(data.test_x[:CALIB].split(100))
    return data, calib, (data.test_x[CALIB:], data.test_y[CALIB:])


@torch.no_grad()
def _acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(torch.cat([model(xb).argmax(1) for xb in x.split(2000)]).eq(y).float().mean())


def _factory() -> torch.nn.Module:
    from models.zoo import mlp_classifier

    return mlp_classifier(widths=(256,), in_dim=784, seed=0)


def _replies(states: list[dict[str, torch.Tensor]], counts: list[int]) -> list[Any]:
    from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

    out = []
    for k, (s, n) in enumerate(zip(states, counts)):
        md = Metadata(run_id=1, message_id=f"m{k}", src_node_id=0, dst_node_id=k + 1,
                      reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600,
                      message_type=MessageType.TRAIN)
        ins = Message(metadata=md, content=RecordDict())  # type: ignore[call-overload]
        out.append(Message(RecordDict({"arrays": ArrayRecord(s),
                                       "metrics": MetricRecord({"num-examples": n})}),
                           reply_to=ins))
    return out


class _Grid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _methods(calib: list[torch.Tensor]) -> list[tuple[str, Any, Any]]:
    import fxfuse

    return [("vanilla average (= FedAvg round)", None, None),
            ("weight matching", fxfuse.WeightMatching(), None),
            ("activation matching + REPAIR", fxfuse.ActivationMatching(), fxfuse.Repair()),
            ("OT (OptimalTransport)", fxfuse.OptimalTransport(), None)]


def one_shot(ks: list[int]) -> list[str]:
    import fxfuse.bench as fb
    from fxfuse.flower import FusionStrategy

    torch.set_num_threads(1)
    _identity()
    data, calib, (xe, ye) = _setup()
    rows = []
    for scheme, label in (("dirichlet", "Dirichlet(0.5)"), ("dirichlet-per-class", "1..5 conc.")):
        for k in ks:
            s = fb.split(data.train_y, k, scheme=scheme, alpha=0.5, seed=0)
            t0 = time.perf_counter()
            clients = fb.train_clients(data.train_x, data.train_y, s, fb.ModelSpec(*MLP),
                                       fb.Budget(), seed=0, init="different", progress=False)
            train_s = time.perf_counter() - t0
            states = [c.model.state_dict() for c in clients]
            counts = [c.n_samples for c in clients]
            cells = []
            for _name, align, repair in _methods(calib):
                try:
                    st = FusionStrategy(_factory, calib[0][:8], align=align, repair=repair,
                                        data=calib, client_init="local")
                    st.configure_train(1, __import__("flwr").app.ArrayRecord(
                        _factory().state_dict()), __import__("flwr").app.ConfigRecord(),
                        _Grid(k))  # type: ignore[arg-type]
                    arrays, _ = st.aggregate_train(1, _replies(states, counts))
                    m = _factory()
                    m.load_state_dict(arrays.to_torch_state_dict())  # type: ignore[union-attr]
                    cells.append(f"{100 * _acc(m, xe, ye):.2f} ({st.rounds[-1].seconds:.1f} s)")
                except Exception as exc:  # reported as a failed cell, not hidden
                    cells.append(f"failed: {type(exc).__name__}: {str(exc)[:80]}")
            with torch.no_grad():
                logits = sum(torch.softmax(c.model.eval()(xe), 1) for c in clients)
            ens = float(logits.argmax(1).eq(ye).float().mean())  # type: ignore[union-attr]
            best = max(_acc(c.model, xe, ye) for c in clients)
            rows.append(f"| {label} | {k} | " + " | ".join(cells) +
                        f" | {100 * ens:.2f} | {100 * best:.2f} | {train_s:.0f} s |")
            print(rows[-1], flush=True)
    return rows


def rounds(k: int, n_rounds: int) -> list[str]:
    from flwr.app import ArrayRecord, ConfigRecord

    import fxfuse
    import fxfuse.bench as fb
    from fxfuse.flower import FusionStrategy

    torch.set_num_threads(1)
    _identity()
    data, calib, (xe, ye) = _setup()
    s = fb.split(data.train_y, k, scheme="dirichlet", alpha=0.5, seed=0)
    parts = [s.subset(i, data.train_x, data.train_y) for i in range(k)]
    variants = [("FedAvg, common init", None, "global"),
                ("fxfuse WM to global, common init", fxfuse.WeightMatching(), "global"),
                ("fxfuse WM, one-shot round 1 then to global", fxfuse.WeightMatching(), "local")]
    curves = {}
    for name, align, init in variants:
        st = FusionStrategy(_factory, calib[0][:8], align=align, client_init=init)
        g = _factory().state_dict()
        accs = []
        for r in range(1, n_rounds + 1):
            msgs = list(st.configure_train(r, ArrayRecord(g), ConfigRecord(), _Grid(k)))  # type: ignore[arg-type]
            local = dict(msgs[0].content["config"])["fxfuse-init"] == "local"
            states, counts = [], []
            for i, (x, y) in enumerate(parts):
                m = fb.clients.ModelSpec(*MLP).build(1000 + i) if local else _factory()
                if not local:
                    m.load_state_dict(g)
                trained, _ = fb.train_client(m, x, y, fb.Budget(epochs=1 if not local else 10),
                                             seed=7919 * r + i)
                states.append(trained.state_dict())
                counts.append(int(x.shape[0]))
            arrays, _ = st.aggregate_train(r, _replies(states, counts))
            g = arrays.to_torch_state_dict()  # type: ignore[union-attr]
            m = _factory()
            m.load_state_dict(g)
            accs.append(100 * _acc(m, xe, ye))
            print(name, r, f"{accs[-1]:.2f}", flush=True)
        curves[name] = accs
    head = "| round | " + " | ".join(curves) + " |"
    rows = [head, "|" + "---|" * (len(curves) + 1)]
    for r in range(n_rounds):
        rows.append(f"| {r + 1} | " + " | ".join(f"{c[r]:.2f}" for c in curves.values()) + " |")
    return rows


def cost_child(k: int, method: str) -> dict[str, float]:
    """In this (fresh) process: K random 1024-wide MLP replies, one aggregation; seconds and
    the peak RSS the aggregation added, in MB and in models."""
    import gc

    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    import fxfuse
    from fxfuse.flower import FusionStrategy
    from models.zoo import mlp_classifier

    torch.set_num_threads(1)
    _identity()

    def factory() -> torch.nn.Module:
        return mlp_classifier(widths=(1024, 1024), in_dim=784, seed=0)

    model_mb = sum(t.numel() * t.element_size() for t in factory().state_dict().values()) / 2**20
    x = torch.randn(8, 784)
    if method == "FedAvg (flwr)":
        st: Any = FedAvg(fraction_evaluate=0.0)
    else:
        align = None if method == "fxfuse align=None" else fxfuse.WeightMatching()
        alignment = "joint" if method == "fxfuse WM joint" else "to-global"
        st = FusionStrategy(factory, x, align=align, alignment=alignment)
        st.configure_train(2, ArrayRecord(factory().state_dict()), ConfigRecord(), _Grid(k))
    replies = _replies([mlp_classifier(widths=(1024, 1024), in_dim=784, seed=i + 1).state_dict()
                        for i in range(k)], [100 + i for i in range(k)])
    # warm-up (imports, solver threads) on a tiny model, so the peak below is the aggregation's
    small = [mlp_classifier(widths=(8,), in_dim=4, seed=i) for i in range(2)]
    fxfuse.fuse(small, torch.randn(2, 4), progress=False)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back: RSS then grows
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # with what the aggregation itself allocates
    page = resource.getpagesize() / 2**20
    statm = Path("/proc/self/statm")

    def rss() -> float:
        return int(statm.read_text().split()[1]) * page

    peak = [rss()]
    before = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    st.aggregate_train(2, replies)
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss())
    return {"seconds": sec, "cpu": cpu, "added_mb": peak[0] - before, "model_mb": model_mb}


def cost(ks: list[int], joint_max: int) -> list[str]:
    methods = ["FedAvg (flwr)", "fxfuse align=None", "fxfuse WM to-global", "fxfuse WM joint"]
    rows = []
    for k in ks:
        cells = []
        for m in methods:
            if m == "fxfuse WM joint" and k > joint_max:
                cells.append(f"not run (K > {joint_max})")
                continue
            out = subprocess.run([sys.executable, "-m", "benchmarks.flower_fed", "--cost-child",
                                  str(k), m], capture_output=True, text=True, timeout=1800,
                                 env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
            if out.returncode != 0:
                cells.append(f"failed: {out.stderr.strip().splitlines()[-1][:80]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append(f"{r['seconds']:.2f} s (cpu {r['cpu']:.2f} s), +{r['added_mb']:.0f} MB "
                         f"({r['added_mb'] / r['model_mb']:.1f} models)")
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return ["| K | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods), *rows]


def deployment(configs: list[tuple[int, int]]) -> list[str]:
    from fxfuse.flower.local import LocalFederation

    app = Path(__file__).resolve().parent.parent / "examples" / "flower_app"
    rows = []
    for nodes, parts in configs:
        with tempfile.TemporaryDirectory(prefix="fxfuse-flower-bench-") as tmp:
            out = Path(tmp) / "out"
            t0 = time.perf_counter()
            fed = LocalFederation(nodes, Path(tmp) / "fed")
            cfg = {"dataset": "mnist", "hidden": 128, "num-partitions": parts,
                   "local-epochs": 5, "num-server-rounds": 1, "client-init": "local",
                   "align": "weight", "calibration-size": CALIB, "output-dir": str(out),
                   "partitions-by-server": parts != nodes, "min-nodes": nodes,
                   "round-timeout": 900}
            try:
                fed.start()
                res = fed.run(app, cfg, results=out / "results.json", timeout=1800)
                last = res["rounds"][-1]
                cell = (f"{100 * last['accuracy']:.2f} | {100 * last['average_accuracy']:.2f} | "
                        f"{last['aggregation_s']:.1f} s | {time.perf_counter() - t0:.0f} s")
            except Exception as exc:  # reported, not hidden
                cell = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | |"
            finally:
                left = fed.stop()
        rows.append(f"| {nodes} | {parts} | {cell} | {'none' if not left else left} |")
        print(rows[-1], flush=True)
    return ["| SuperNodes | clients | fused (WM) acc | plain average acc | aggregation | "
            "wall (start to stop) | processes left |", "|---|---|---|---|---|---|---|", *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    ap.add_argument("--clients", default="4,16,64")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--deploy", default="4x4,16x16,16x64", help="NODESxCLIENTS,...")
    ap.add_argument("--cost-child", nargs=2, metavar=("K", "METHOD"))
    ap.add_argument("--parts", default="oneshot,rounds,cost,deploy")
    args = ap.parse_args()
    if args.cost_child:
        print(json.dumps(cost_child(int(args.cost_child[0]), args.cost_child[1])))
        return
    rev, load0, t0 = fxfuse_revision(), load_average(), time.time()
    ks = [int(k) for k in args.clients.split(",")]
    parts = set(args.parts.split(","))
    begin, end, title = BEGIN, END, "## Federated fusion on Flower (issue 20)"
    if parts == {"deploy"}:  # a re-run of the deployment part alone: its own section
        begin, end = BEGIN.replace("fed", "fed deploy"), END.replace("fed", "fed deploy")
        title = "### Federated fusion on Flower: deployment engine re-run (issue 20)"
    sec = [begin, title, "",
           command_line("python -m benchmarks.flower_fed " + " ".join(sys.argv[1:])), ""]
    if "oneshot" in parts:
        sec += ["### 1. One-shot (clients from their own inits), accuracy % (aggregation time)",
                "", "| split | K | " + " | ".join(n for n, _, _ in _methods([])) +
                " | logit ensemble | best client | client training |",
                "|---|---|" + "---|" * 7, *one_shot(ks), ""]
    if "rounds" in parts:
        sec += ["### 2. Rounds (16 clients, Dirichlet(0.5), 1 local epoch per round), "
                "accuracy %", "", *rounds(16, args.rounds), ""]
    if "cost" in parts:
        sec += ["### 3. Server cost per aggregation (random MLP 784-1024-1024-10, 7.1 MB)", "",
                *cost(ks, joint_max=4), ""]
    if "deploy" in parts:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.deploy.split(",") if c]
        sec += ["### 4. Deployment engine (example app, MNIST, MLP 784-128-128-10, 5 local "
                "epochs, one-shot)", "", *deployment(configs), ""]  # type: ignore[arg-type]
    sec += [f"Commit {revision_note(rev)}; load average {load0} at start, {load_average()} at "
            f"end; {time.time() - t0:.0f} s in all.", end]
    text = "\n".join(sec)
    print(text)
    if args.write:
        write_section(text, begin, end)


if __name__ == "__main__":
    main()
