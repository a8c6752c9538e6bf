"""Benchmark: weight scope alignment (WSA) on sklearn digits, pairs and a federated run.

1. Pairs of 64-64-64-10 MLPs (different init seeds; Adam 1e-3, batch 64, 20 epochs) trained with
   the regulariser toward a reference init's scopes at several strengths (0 = without), on the
   full training set (IID) and on the two clients of a Dirichlet(0.5) label split: the test-loss
   barrier along the linear path (alpha in 0, .25, .5, .75, 1; barrier = max over alpha of
   L(alpha) minus the endpoints' line) and the midpoint test loss for naive interpolation, after weight matching and after
   activation matching (fusion set: 500 training images).
2. The std fusion rule: pairs trained toward the fused scopes of a first-stage pair (mixture vs
   mean of stds).
3. Federated: 4 clients of a Dirichlet(0.5) split, common init, 10 rounds of 2 local epochs:
   FedAvg, FedAvg + WSA (each round's target the fused scopes of the last round's clients), and
   weight-matched averaging (fxfuse.fuse with WeightMatching, FedAvg weights); test accuracy per
   round.

``--write`` replaces the section between ``<!-- wsa:begin -->`` and ``<!-- wsa:end -->`` in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
from fxfuse.bench import datasets, split  # noqa: E402
from models.zoo import mlp_classifier  # noqa: E402

BEGIN, END = "<!-- wsa:begin -->", "<!-- wsa:end -->"
WIDTHS = (64, 64)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)

Data = tuple[torch.Tensor, torch.Tensor]


def mlp(seed: int) -> nn.Module:
    return mlp_classifier(widths=WIDTHS, in_dim=64, seed=seed)


def train(model: nn.Module, data: Data, seed: int, epochs: int,
          reg: fxfuse.WeightScopeRegularizer | None) -> nn.Module:
    x, y = data
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if reg is not None:
                loss = loss + reg(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_loss(model: nn.Module, test: Data) -> tuple[float, float]:
    with torch.no_grad():
        out = model(test[0])
        return float(F.cross_entropy(out, test[1])), float((out.argmax(1) == test[1]).float().mean())


def path(a: nn.Module, b: nn.Module, align: object, ex: torch.Tensor, test: Data
         ) -> tuple[float, float]:
    """(midpoint test loss, barrier) along the linear path from ``a`` to (aligned) ``b``."""
    losses = []
    for alpha in ALPHAS:
        if alpha in (0.0, 1.0):
            losses.append(test_loss(a if alpha == 0.0 else b, test)[0])
            continue
        fused = fxfuse.fuse([a, b], ex, align=align, weights=[1 - alpha, alpha],  # type: ignore
                            progress=False)
        losses.append(test_loss(fused, test)[0])
    bar = max(la - ((1 - al) * losses[0] + al * losses[-1]) for al, la in zip(ALPHAS, losses))
    return losses[ALPHAS.index(0.5)], bar


def pair_rows(parts: Sequence[Data], strengths: Sequence[float], pairs: int, test: Data,
              fusion_x: torch.Tensor, label: str, naive: dict[float, float]) -> list[str]:
    """Table rows per strength; ``naive`` gets each strength's mean naive midpoint loss."""
    ex = fusion_x[:2]
    target = fxfuse.weight_scopes(mlp(0), ex)
    aligns = [("naive", None), ("weight matching", fxfuse.WeightMatching()),
              ("activation matching", fxfuse.ActivationMatching(data=list(fusion_x.split(100))))]
    rows = []
    for lam in strengths:
        reg = fxfuse.WeightScopeRegularizer(target, lam) if lam else None
        ends: list[float] = []
        mids: dict[str, list[float]] = {n: [] for n, _ in aligns}
        bars: dict[str, list[float]] = {n: [] for n, _ in aligns}
        for rep in range(pairs):
            a = train(mlp(2 * rep + 1), parts[0], 1, 20, reg)
            b = train(mlp(2 * rep + 2), parts[-1], 2, 20, reg)
            ends += [test_loss(a, test)[0], test_loss(b, test)[0]]
            for name, align in aligns:
                mid, bar = path(a, b, align, ex, test)
                mids[name].append(mid)
                bars[name].append(bar)
        cells = " | ".join(f"{sum(mids[n]) / len(mids[n]):.3f} ({sum(bars[n]) / len(bars[n]):.3f})"
                           for n in mids)
        naive[lam] = sum(mids["naive"]) / len(mids["naive"])
        rows.append(f"| {label} | {lam:g} | {sum(ends) / len(ends):.3f} | {cells} |")
        print(rows[-1], flush=True)
    return rows


def rule_rows(parts: Sequence[Data], test: Data, ex: torch.Tensor, lam: float) -> list[str]:
    first = [train(mlp(50), parts[0], 50, 20, None), train(mlp(51), parts[-1], 51, 20, None)]
    rows = []
    for rule in fxfuse.train.STD_RULES:
        target = fxfuse.weight_scopes(first, ex, std_rule=rule)
        reg = fxfuse.WeightScopeRegularizer(target, lam)
        stds = ", ".join(f"{s.std:.4f}" for s in target.layers.values())
        mids = []
        for rep in range(2):
            a = train(mlp(2 * rep + 1), parts[0], 1, 20, reg)
            b = train(mlp(2 * rep + 2), parts[-1], 2, 20, reg)
            mids.append(path(a, b, None, ex, test)[0])
        rows.append(f"| {rule} | {stds} | {sum(mids) / len(mids):.3f} |")
        print(rows[-1], flush=True)
    return rows


def average(models: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]})
    return out


def federated(parts: Sequence[Data], test: Data, ex: torch.Tensor, rounds: int, lam: float
              ) -> dict[str, list[float]]:
    n = [len(p[0]) for p in parts]
    weights = [k / sum(n) for k in n]
    curves: dict[str, list[float]] = {}
    for name in ("FedAvg", f"FedAvg + WSA ({lam:g}, mixture)", "weight-matched averaging"):
        glob = mlp(0)
        curve = []
        target = fxfuse.weight_scopes(glob, ex)
        for r in range(rounds):
            reg = fxfuse.WeightScopeRegularizer(target, lam) if "WSA" in name else None
            clients = [train(glob, p, 100 * r + k, 2, reg) for k, p in enumerate(parts)]
            if "WSA" in name:
                target = fxfuse.weight_scopes(clients, ex, weights=weights)
            if name.startswith("weight"):
                glob = fxfuse.fuse(clients, ex, align=fxfuse.WeightMatching(), weights=weights,
                                   progress=False)
            else:
                glob = average(clients, weights)
            curve.append(test_loss(glob, test)[1])
        curves[name] = curve
        print(name, [f"{100 * a:.1f}" for a in curve], flush=True)
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load_start, revision = time.perf_counter(), load_average(), fxfuse_revision()
    d = datasets.load("digits")
    test = (d.test_x, d.test_y)
    fusion_x = d.train_x[:500]
    s2 = split(d.train_y, 2, scheme="dirichlet", seed=0)
    two = [(d.train_x[torch.as_tensor(ix.copy())], d.train_y[torch.as_tensor(ix.copy())])
           for ix in s2.indices]
    strengths = (0.0, 0.03, 0.1, 0.3, 1.0)
    iid: dict[float, float] = {}
    skew: dict[float, float] = {}
    rows = pair_rows([(d.train_x, d.train_y)], strengths, args.pairs, test, fusion_x, "IID", iid)
    rows += pair_rows(two, strengths, args.pairs, test, fusion_x, "Dirichlet(0.5), 2 clients",
                      skew)
    lam = fxfuse.train.scopes.DEFAULT_STRENGTH
    rules = rule_rows(two, test, fusion_x[:2], lam)
    s4 = split(d.train_y, 4, scheme="dirichlet", seed=0)
    four = [(d.train_x[torch.as_tensor(ix.copy())], d.train_y[torch.as_tensor(ix.copy())])
            for ix in s4.indices]
    curves = federated(four, test, fusion_x[:2], args.rounds, lam)
    fl_rows = [f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in c) + " |"
               for name, c in curves.items()]
    best_iid, best_skew = min(iid, key=iid.__getitem__), min(skew, key=skew.__getitem__)
    final = {name: c[-1] for name, c in curves.items()}
    wsa_name = next(n for n in final if "WSA" in n)
    reading = (
        f"Reading: on the label-skewed pairs the naive midpoint loss is lowest at strength "
        f"{best_skew:g} ({skew[best_skew]:.3f} against {skew[0.0]:.3f} without); on IID pairs "
        f"at strength {best_iid:g} ({iid[best_iid]:.3f}, without: {iid[0.0]:.3f}), i.e. "
        + ("the regulariser does not help IID pairs here. " if best_iid == 0.0 else "")
        + f"Federated, after {args.rounds} rounds: FedAvg {100 * final['FedAvg']:.1f}%, "
        f"{wsa_name} {100 * final[wsa_name]:.1f}%, weight-matched averaging "
        f"{100 * final['weight-matched averaging']:.1f}%"
        + (" (WSA does not beat FedAvg here: a miss)." if final[wsa_name] <= final["FedAvg"]
           else "."))
    section = "\n".join([
        BEGIN, "## Weight scope alignment (WSA) on digits (issue 19)", "",
        command_line("python benchmarks/scopes.py --write"), "",
        f"- Date: {datetime.date.today()}; commit {revision_note(revision)}",
        machine_line(1),
        "- Method: sklearn digits (1438 train / 359 test), MLP 64-64-64-10, Adam 1e-3 batch 64; "
        "regulariser `fxfuse.WeightScopeRegularizer` (summed per-layer Gaussian KL over the "
        "producer weights) added to the cross-entropy. Pairs: different init seeds, 20 epochs, "
        f"{args.pairs} pairs per row, target the scopes of a reference init (seed 0). Dirichlet "
        "split: `fxfuse.bench.split(scheme='dirichlet', seed=0)`. Barrier: max over alpha in "
        "{.25, .5, .75} of the test loss minus the endpoints' line; aligned paths from "
        "`fxfuse.fuse(weights=[1-alpha, alpha])` (activation matching on 500 training images).",
        load_line(load_start, time.perf_counter() - started), "",
        "### 1. Pairs: midpoint test loss and barrier by strength (mean over pairs)", "",
        "Cells: midpoint test loss (barrier). With label-skewed clients each endpoint misses "
        "classes, so the midpoint lies below the endpoints' line (barrier 0) and the midpoint "
        "loss is the figure to compare.", "",
        "| data | strength | endpoint test loss | naive | weight matching "
        "| activation matching |", "|---|---:|---:|---:|---:|---:|", *rows, "",
        f"### 2. Std fusion rule (Dirichlet pairs, strength {lam:g}, target: fused scopes of a "
        "first-stage pair)", "",
        "| std rule | target std per layer | naive midpoint test loss (mean of 2 pairs) |", "|---|---|---:|",
        *rules, "",
        f"### 3. Federated, 4 Dirichlet(0.5) clients, common init, {args.rounds} rounds x 2 local "
        "epochs: test accuracy % per round", "",
        "| method | " + " | ".join(str(r + 1) for r in range(args.rounds)) + " |",
        "|---|" + "---:|" * args.rounds, *fl_rows, "", reading, "", END])
    if args.write:
        write_section(section, BEGIN, END)
        print(f"wrote {RESULTS_PATH}")
    else:
        print(section)


if __name__ == "__main__":
    main()
