"""Benchmark: heterogeneous-depth fusion (issue 18), three settings.

1. ``mlp``: MNIST MLPs of 1 / 2 / 3 / 4 hidden layers (width 256, ReLU), trained on the same data
   (the 50k training split; Adam 1e-3, batch 128, ``--epochs`` epochs; init seed 0 or 1).  For
   every pair of different depths (deeper model init 0, shallower init 1): each parent, the logit
   ensemble, and ``fxfuse.fuse`` at the deeper depth (the shallower model expanded with exact
   identity layers) and at the shallower depth (the deeper model's extra layers collapsed by
   fitting on the fusion data), by weight matching and activation matching, with and without
   REPAIR; beside it, the same-depth pair (both depths' init 0 / init 1 models) fused the same
   way.  Goal (issue 18, after "Is Depth Heterogeneity a Barrier to Model Merging?"): fusion of
   a heterogeneous pair within 1 point of the homogeneous pair at the same depth.
2. ``resnet``: ResNet-20-style (3 blocks per stage) vs ResNet-32-style (5 per stage) zoo
   ``ResNetCifar`` (BatchNorm, base width 16) on the bundled digits (8x8, repeated to 3
   channels); fused at ResNet-32 depth with weight matching + ResetBatchNorm, beside the
   homogeneous ResNet-32 pair.
3. ``node``: the Neural-ODE federated setting (Hoshino et al., IEICE 2024): ``--clients``
   clients of a Dirichlet(0.5) split of MNIST (images average-pooled to 14x14), one
   ``NODENet`` (one weight-tied ODE function, Euler steps, GroupNorm in the function) per client
   at iteration counts cycling through 1, 2, 4, 8; common init; one-shot (1 round of
   ``--local-epochs``) and ``--rounds`` rounds: the merged model (FedAvg and weight-matched
   averaging) evaluated at each count, every client at each count, and FedAvg of clients that
   all run the same count; parameters sent per round vs a ResNet of the same depth (the ODE
   function untied: one copy per Euler step).

``--write`` replaces this script's sections (``<!-- depth-<part>:begin/end -->``) in
``benchmarks/RESULTS.md``.  Set ``torch.set_num_threads(1)``: the CPU is shared.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks._report import (  # noqa: E402
    RESULTS_PATH,
    command_line,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    revision_note,
    write_section,
)
from fxfuse.bench import Budget, ModelSpec, datasets, split, train_clients  # noqa: E402
from fxfuse.bench.clients import train_client  # noqa: E402

Data = tuple[torch.Tensor, torch.Tensor]


# -- shared -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy %, mean cross-entropy) on ``(x, y)`` in batches of 1000."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), 1000):
        out = model(x[i:i + 1000])
        correct += int((out.argmax(1) == y[i:i + 1000]).sum())
        loss += float(F.cross_entropy(out, y[i:i + 1000], reduction="sum"))
    return 100.0 * correct / len(x), loss / len(x)


class Ensemble(nn.Module):
    """Mean of the members' logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def cell(acc_loss: tuple[float, float]) -> str:
    return f"{acc_loss[0]:.2f} ({acc_loss[1]:.3f})"


METHODS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "WM": (fxfuse.WeightMatching, lambda: None),
    "WM + REPAIR": (fxfuse.WeightMatching, fxfuse.Repair),
    "AM": (fxfuse.ActivationMatching, lambda: None),
    "AM + REPAIR": (fxfuse.ActivationMatching, fxfuse.Repair),
}


# -- 1. MNIST MLPs ------------------------------------------------------------------------------
def run_mlp(args: argparse.Namespace) -> list[str]:
    ds = datasets.load("mnist")
    one = split(ds.train_y, 1, "iid", seed=0)
    budget = Budget(epochs=args.epochs)
    depths = (1, 2, 3, 4)
    models: dict[tuple[int, int], nn.Module] = {}
    seconds = 0.0
    for d in depths:
        spec = ModelSpec("models.zoo:mlp_classifier", {"widths": [256] * d})
        for init in (0, 1):
            (c,) = train_clients(ds.train_x, ds.train_y, one, spec, budget, seed=init,
                                 progress=True)
            models[(d, init)] = c.model
            seconds += c.train_seconds
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds.train_x), generator=gen)[:2048]
    fusion = [ds.train_x[idx[i:i + 256]] for i in range(0, 2048, 256)]
    x0 = fusion[0][:8]
    test = (ds.test_x, ds.test_y)
    parent = {k: evaluate(m, *test) for k, m in models.items()}

    def fused(pair: Sequence[nn.Module], target: int, name: str,
              weights: Sequence[float] | None = None) -> tuple[float, float]:
        align, repair = METHODS[name]
        report = fxfuse.FusionReport()
        m = fxfuse.fuse(list(pair), x0, align=align(), repair=repair(), target=target,
                        data=fusion, progress=False, report=report, weights=weights)
        return evaluate(m, *test)

    homo = {(d, name): fused([models[(d, 0)], models[(d, 1)]], 0, name)
            for d in depths for name in METHODS}
    lines = [
        "| pair (deep init 0 / shallow init 1) | deep | shallow | deep collapsed | ensemble | "
        "method | "
        "fused at deep depth | same-depth pair at deep depth | diff | fused at shallow depth | "
        "same-depth pair at shallow depth | diff |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    misses, total = 0, 0
    for da in depths:
        for db in depths:
            if db >= da:
                continue
            deep, shallow = models[(da, 0)], models[(db, 1)]
            ens = evaluate(Ensemble([deep, shallow]), *test)
            alone = fused([deep, shallow], 1, "WM", weights=[1, 0])  # the collapse by itself
            for k, name in enumerate(METHODS):
                at_deep = fused([deep, shallow], 0, name)
                at_shallow = fused([deep, shallow], 1, name)
                hd, hs = homo[(da, name)], homo[(db, name)]
                dd, ds_ = at_deep[0] - hd[0], at_shallow[0] - hs[0]
                total += 2
                misses += (dd < -1.0) + (ds_ < -1.0)
                first = k == 0
                lines.append(
                    f"| {da} vs {db} hidden | {cell(parent[(da, 0)]) if first else ''} | "
                    f"{cell(parent[(db, 1)]) if first else ''} | "
                    f"{cell(alone) if first else ''} | {cell(ens) if first else ''} | "
                    f"{name} | {cell(at_deep)} | {cell(hd)} | {dd:+.2f} | {cell(at_shallow)} | "
                    f"{cell(hs)} | {ds_:+.2f} |")
                print(lines[-1], flush=True)
    head = [
        f"- Models: `models.zoo:mlp_classifier(widths=[256] * d)`, d = 1..4, trained on the 50k "
        f"MNIST training split with {budget.describe()} (init seeds 0 and 1, data order "
        f"seed = init seed; harness `fxfuse.bench.train_clients`, one IID client; "
        f"{seconds:.0f} s of training in all, cached runs keep their first time).",
        "- Fusion: `fxfuse.fuse([deep, shallow], x, align=..., repair=..., target=0 | 1, "
        "data=fusion)` with 2048 training images as the fusion data (8 batches of 256); depth "
        "handling is automatic (expansion by exact identity layers for target 0; collapse by "
        "fitting the shallower target's layer to the deeper model's composed layers, "
        "`DepthAlignment()` defaults, for target 1). Same-depth pair: the init-0 and init-1 "
        "models of one depth, same call.",
        "- *deep collapsed*: the deeper model alone at the shallower depth (`weights=[1, 0]`, "
        "target 1): what the collapse keeps before any averaging.",
        "- Cells: test accuracy % (test cross-entropy) on the 10k MNIST test split. *diff* = "
        "heterogeneous minus homogeneous accuracy (points); goal: >= -1.0.",
        f"- Result: {total - misses} of {total} heterogeneous figures within 1 point of the "
        f"same-depth pair; {misses} miss{'es' if misses != 1 else ''}"
        f"{' (marked by a diff below -1.00)' if misses else ''}.",
        "",
    ]
    return head + lines


# -- 2. ResNet-20 vs ResNet-32 on digits ------------------------------------------------------------
def resnet_digits(depth: int = 20, seed: int = 0) -> nn.Module:
    """ResNetCifar(depth, base width 16, BN) for (N, 1, 8, 8) digits, channel repeated to 3."""
    from models._utils import build
    from models.resnet import ResNetCifar

    return build(lambda: nn.Sequential(Repeat3(), ResNetCifar(depth, base_width=16)), seed)


class Repeat3(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def run_resnet(args: argparse.Namespace) -> list[str]:
    ds = datasets.load("digits")
    one = split(ds.train_y, 1, "iid", seed=0)
    budget = Budget(epochs=args.resnet_epochs, batch_size=64, lr=3e-3)
    models: dict[tuple[int, int], nn.Module] = {}
    for depth in (20, 32):
        for init in (0, 1):
            spec = ModelSpec("benchmarks.depth:resnet_digits", {"depth": depth})
            (c,) = train_clients(ds.train_x, ds.train_y, one, spec, budget, seed=init,
                                 progress=True)
            models[(depth, init)] = c.model
    test = (ds.test_x, ds.test_y)
    data = [ds.train_x[i:i + 256] for i in range(0, len(ds.train_x), 256)]
    x0 = ds.train_x[:8]
    rows = ["| models | method | test acc % (loss) |", "|---|---|---:|"]
    for key, m in models.items():
        rows.append(f"| ResNet-{key[0]} init {key[1]} | parent | {cell(evaluate(m, *test))} |")
    pairs = {"ResNet-32 (init 0) + ResNet-20 (init 1), at ResNet-32 depth":
             ([models[(32, 0)], models[(20, 1)]], 0),
             "ResNet-32 (init 0) + ResNet-32 (init 1) (homogeneous)":
             ([models[(32, 0)], models[(32, 1)]], 0),
             "ResNet-32 (init 0) + ResNet-20 (init 1), at ResNet-20 depth":
             ([models[(32, 0)], models[(20, 1)]], 1),
             "ResNet-20 (init 0) + ResNet-20 (init 1) (homogeneous)":
             ([models[(20, 0)], models[(20, 1)]], 0)}
    for label, (pair, target) in pairs.items():
        rows.append(f"| {label} | ensemble | {cell(evaluate(Ensemble(pair), *test))} |")
        for name, align, repair in (("naive + ResetBatchNorm", None, fxfuse.ResetBatchNorm()),
                                    ("WM", fxfuse.WeightMatching(), None),
                                    ("WM + ResetBatchNorm", fxfuse.WeightMatching(),
                                     fxfuse.ResetBatchNorm())):
            report = fxfuse.FusionReport()
            fused = fxfuse.fuse(pair, x0, align=align, repair=repair, target=target, data=data,
                                progress=False, report=report)
            rows.append(f"| {label} | {name} | {cell(evaluate(fused, *test))} |")
            print(rows[-1], flush=True)
    head = [
        "- Models: `ResNetCifar(depth, base_width=16)` (BatchNorm; stages 16/32/64; depth 20 = "
        "3 blocks per stage, 32 = 5) behind a channel repeat, on the bundled 8x8 digits "
        f"(1438 train / 359 test), {budget.describe()}, init seeds 0 / 1.",
        "- Fusion data: the training images in batches of 256 (ResetBatchNorm, collapse fits).",
        "",
    ]
    return head + rows


# -- 3. Neural-ODE federated ------------------------------------------------------------------------
def node_mnist(steps: int = 1, seed: int = 0) -> nn.Module:
    """NODENet (16 channels, GroupNorm in the ODE function) on (N, 1, 14, 14) images."""
    from models.node import node_net

    return node_net(steps=steps, channels=16, norm="gn", in_channels=1, seed=seed)


def _untied_params(model: nn.Module, steps: int) -> int:
    """Parameters of the same network with the ODE function untied (one copy per step)."""
    f = sum(p.numel() for p in model.get_submodule("f").parameters())
    rest = sum(p.numel() for p in model.parameters()) - f
    return rest + steps * f


def run_node(args: argparse.Namespace) -> list[str]:
    ds = datasets.load("mnist")
    pool = nn.AvgPool2d(2)
    n = args.node_samples
    x, y = pool(ds.train_x[:n]), ds.train_y[:n]
    xt, yt = pool(ds.test_x), ds.test_y
    counts = [(1, 2, 4, 8)[k % 4] for k in range(args.clients)]
    parts = split(y, args.clients, "dirichlet", alpha=0.5, seed=0)
    budget = Budget(epochs=args.local_epochs, batch_size=64, lr=args.node_lr)
    x0 = x[:8]
    test = (xt, yt)
    global0 = node_mnist(seed=0)

    def local(model: nn.Module, k: int, steps: int, rnd: int) -> nn.Module:
        xk, yk = parts.subset(k, x, y)
        start = copy.deepcopy(model)
        start.steps = steps  # type: ignore[assignment]
        trained, _ = train_client(start, xk, yk, budget, seed=1000 * rnd + k)
        return trained

    def merge(clients: Sequence[nn.Module], weights: list[float], how: str) -> nn.Module:
        if how == "FedAvg":
            return fxfuse.fuse(list(clients), x0, align=None, weights=weights, progress=False)
        return fxfuse.fuse(list(clients), x0, align=fxfuse.WeightMatching(), weights=weights,
                           progress=False)

    def at_counts(model: nn.Module) -> list[tuple[float, float]]:
        return [evaluate(model.at_steps(k), *test) for k in (1, 2, 4, 8)]  # type: ignore[operator]

    weights = [s / sum(parts.sizes) for s in parts.sizes]
    rows = ["| model | rounds | at k=1 | at k=2 | at k=4 | at k=8 |", "|---|---:|---:|---:|---:|---:|"]
    started = time.perf_counter()
    # one-shot: one round from the common init
    clients = [local(global0, k, counts[k], 0) for k in range(args.clients)]
    for k, c in enumerate(clients):
        rows.append(f"| client {k} (trains at k={counts[k]}, {parts.sizes[k]} samples) | 1 | "
                    + " | ".join(cell(v) for v in at_counts(c)) + " |")
    for how in ("FedAvg", "weight matching"):
        rows.append(f"| merged, mixed counts, {how} | 1 | "
                    + " | ".join(cell(v) for v in at_counts(merge(clients, weights, how))) + " |")
    print("\n".join(rows), flush=True)
    # several rounds: mixed counts (FedAvg and weight matching), and equal counts (FedAvg)
    runs: dict[str, list[int]] = {"mixed counts, FedAvg": counts,
                                  "mixed counts, weight matching": counts}
    for k in args.equal_counts:
        runs[f"every client at k={k}, FedAvg"] = [k] * args.clients
    for label, cs in runs.items():
        how = "weight matching" if "weight matching" in label else "FedAvg"
        g = global0
        for rnd in range(args.rounds):
            clients = [local(g, k, cs[k], rnd) for k in range(args.clients)]
            g = merge(clients, weights, how)
        rows.append(f"| merged, {label} | {args.rounds} | "
                    + " | ".join(cell(v) for v in at_counts(g)) + " |")
        print(rows[-1], flush=True)
    node_p = sum(p.numel() for p in global0.parameters())
    comm = ["", "| model sent per round and client | parameters | float32 bytes | vs ResNet |",
            "|---|---:|---:|---:|"]
    for steps in (1, 2, 4, 8):
        res_p = _untied_params(global0, steps)
        comm.append(f"| NODENet (one tied ODE function) vs ResNet with {steps} untied blocks "
                    f"| {node_p} vs {res_p} | {4 * node_p} vs {4 * res_p} | "
                    f"-{100 * (1 - node_p / res_p):.0f}% |")
    head = [
        f"- Data: the first {n} MNIST training images, average-pooled to 14x14, split over "
        f"{args.clients} clients by Dirichlet(0.5) (sizes {list(parts.sizes)}); test: the 10k "
        f"test split, pooled the same way.",
        f"- Model: `NODENet(channels=16, norm='gn', in_channels=1)` (stem conv-BN-ReLU, one ODE "
        f"function GN-conv-ReLU-conv integrated by Euler steps x += (1/k) f(x), GAP, Linear); "
        f"client k trains at count {counts} (cycling 1, 2, 4, 8), common init, "
        f"{budget.describe()} per round, FedAvg weights n_k / n.",
        "- Merging: FedAvg = `fxfuse.fuse(clients, x, align=None, weights=n_k/n)`; weight "
        "matching = the same with `align=WeightMatching()`. The merged model is evaluated at "
        "each count by `model.at_steps(k)` (the stem's BatchNorm keeps the averaged "
        "statistics; no repair). The tied function uses GroupNorm: with BatchNorm in the tied "
        "function, a client trained at k=6 on digits scored ~10% at eval even after its "
        "statistics were reset at k=6 (one set of running statistics for six differently "
        "distributed calls), so this benchmark does not use it.",
        f"- Cells: test accuracy % (test cross-entropy). Federated part ran "
        f"{time.perf_counter() - started:.0f} s.",
        "",
    ]
    return head + rows + comm


PARTS = {"mlp": ("MLPs of different depth on MNIST", run_mlp),
         "resnet": ("ResNet-20 vs ResNet-32 on digits", run_resnet),
         "node": ("Neural-ODE clients at different iteration counts (federated MNIST)",
                  run_node)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--epochs", type=int, default=3, help="MLP training epochs")
    p.add_argument("--resnet-epochs", type=int, default=15)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--node-lr", type=float, default=1e-2)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--node-samples", type=int, default=8000)
    p.add_argument("--equal-counts", type=int, nargs="*", default=[1, 8])
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    parts = list(PARTS) if args.part == "all" else [args.part]
    for part in parts:
        title, fn = PARTS[part]
        started, load_start, revision = time.perf_counter(), load_average(), fxfuse_revision()
        body = fn(args)
        argv_text = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
        section = [
            f"<!-- depth-{part}:begin -->", f"## Heterogeneous depth: {title} (issue 18)", "",
            command_line(f"python benchmarks/depth.py {argv_text}".strip()), "",
            f"- Date: {datetime.date.today()}; commit {revision_note(revision)}",
            machine_line(1), load_line(load_start, time.perf_counter() - started), "",
            *body, f"<!-- depth-{part}:end -->"]
        text = "\n".join(section)
        print(text, flush=True)
        if args.write:
            write_section(text, f"<!-- depth-{part}:begin -->", f"<!-- depth-{part}:end -->",
                          RESULTS_PATH)


if __name__ == "__main__":
    main()
