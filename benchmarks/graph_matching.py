"""Benchmarks of graph matching (GAMF, ``fxfuse.GraphMatching``; issue 17), three parts:

1. ``demo``: the pygmtools model-fusion demo's architecture (``DemoCNN``: replicate-pad 1,
   conv 1->32 5x5, maxpool 2 (pad 1), pad 1, conv 32->64 5x5, maxpool, flatten 3136 -> fc 32 ->
   fc 10, no bias, no ReLU after fc1, as in the demo), two models trained by us on differently
   distributed MNIST (the demo's checkpoints are downloaded; nothing is here): model A gets
   ``SKEW`` of every class 0-4 and ``1 - SKEW`` of every class 5-9 of the 50k training split,
   model B the rest (a disjoint split; seeded).  Test accuracy of both endpoints, and of naive
   averaging, weight matching and graph matching (the paper's full schedule) at weights
   ``w / 1 - w`` for w = 0.1 .. 0.9, the alignment times.  Goals (issue): graph matching's gain
   over naive at 0.5/0.5 >= the demo's +6.6 points, its best weighting above both endpoints, well
   under the demo's 78.5 s.
2. ``federated``: five clients of a Dirichlet(alpha=0.5) split of MNIST (GAMF's federated
   setting; :func:`fxfuse.bench.split`), the 784-256-10 MLP and ``DemoCNN``, on the shared
   client harness (:func:`fxfuse.bench.scoreboard.run_setting`: cached clients, FedAvg weights,
   each client, vanilla average, weight matching (MergeMany), graph matching, logit ensemble);
   beside each table the cycle consistency of independent pairwise weight matching (every pair of
   clients matched on its own, the fraction of units that do not return to themselves around a
   3-cycle i -> j -> k -> i) and of graph matching's matchings.
3. ``scale``: alignment time (wall and CPU of the align pass) and memory (peak RSS of the fuse
   call above the RSS before it) of weight matching, graph matching with the paper's schedule
   and with ``GraphMatching.short()`` on two random inits of the 3x512 MLP, ResNet-20 x1 and x4
   and ResNet-50, each run in a fresh child process, plus the squared weight distance each
   reaches (``sum_t ||A_t - P(B_t)||^2``, what weight matching minimises).

Run from the repository root (each part writes its own section of RESULTS.md with ``--write``)::

    python benchmarks/graph_matching.py demo --write
    python benchmarks/graph_matching.py federated --write
    python benchmarks/graph_matching.py scale --write
    python benchmarks/graph_matching.py optimum --write   # 4. tiny nets: the exhaustive optimum
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

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
    run_child,
    write_section,
)
from fxfuse.bench import Budget, ModelSpec, datasets  # noqa: E402

NUM_THREADS = 1
SKEW = 0.9
DEMO_BUDGET = Budget(epochs=1, batch_size=64, lr=1e-3, optimizer="adam")
DEMO_REFERENCE = {"endpoints": (84.18, 83.81), "naive": 47.16, "graph": 53.74, "best": 85.21,
                  "best_at": "0.8/0.2", "seconds": 78.5}
MARK = {part: (f"<!-- graph-matching-{part}:begin -->", f"<!-- graph-matching-{part}:end -->")
        for part in ("demo", "federated", "scale", "optimum")}


class DemoCNN(nn.Module):
    """The pygmtools model-fusion demo's CNN (module doc); input ``(N, 1, 28, 28)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, bias=False)
        self.pool = nn.MaxPool2d(2, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 5, bias=False)
        self.fc1 = nn.Linear(3136, 32, bias=False)
        self.fc2 = nn.Linear(32, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.relu(self.conv1(F.pad(x, (1, 1, 1, 1), mode="replicate"))))
        h = self.pool(F.relu(self.conv2(F.pad(h, (1, 1, 1, 1), mode="replicate"))))
        return self.fc2(self.fc1(h.flatten(1)))


def demo_cnn(seed: int = 0) -> DemoCNN:
    """A seeded ``DemoCNN`` (the client harness's factory)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DemoCNN().eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000),
                                                                        y.split(1000)))
    return 100.0 * hits / len(y)


def header(part: str, title: str, command: str, revision: str) -> list[str]:
    return [MARK[part][0], f"## Graph matching (GAMF, issue 17): {title}", "",
            command_line(command), "",
            f"- Date: {datetime.date.today()}; commit {revision_note(revision)}",
            machine_line(NUM_THREADS)]


# -- 1. the pygmtools demo's models --------------------------------------------------------------
def skewed_halves(y: torch.Tensor, skew: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of model A (``skew`` of every class 0-4, ``1 - skew`` of 5-9) and model B (the
    rest), each class shuffled by a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = round((skew if c < 5 else 1 - skew) * idx.numel())
        a.append(idx[:k])
        b.append(idx[k:])
    return torch.cat(a).sort().values, torch.cat(b).sort().values


def trained_pair(data: datasets.Dataset, quick: bool) -> tuple[list[nn.Module], list[int],
                                                               float]:
    from fxfuse.bench import default_cache_dir, train_client

    ia, ib = skewed_halves(data.train_y, SKEW, seed=0)
    budget = DEMO_BUDGET
    models, seconds = [], 0.0
    cache = default_cache_dir() / "graph-matching-demo"
    cache.mkdir(parents=True, exist_ok=True)
    for k, idx in enumerate((ia, ib)):
        if quick:
            idx = idx[:2000]
        path = cache / f"demo-cnn-{k}-skew{SKEW}-{budget.describe()}-{idx.numel()}.pt".replace(
            " ", "_").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
        model = demo_cnn(seed=k)
        if path.exists():
            model.load_state_dict(torch.load(path))
        else:
            start = time.perf_counter()
            model, _ = train_client(model, data.train_x[idx], data.train_y[idx], budget, seed=k)
            seconds += time.perf_counter() - start
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
        models.append(model.eval())
    return models, [int(ia.numel()), int(ib.numel())], seconds


def part_demo(args: argparse.Namespace, revision: str) -> list[str]:
    data = datasets.load("mnist")
    models, sizes, train_s = trained_pair(data, args.quick)
    tx, ty = data.test_x, data.test_y
    if args.quick:
        tx, ty = tx[:2000], ty[:2000]
    example = data.train_x[:2]
    spec = fxfuse.find_groups(models[0], (example,))
    states = [m.state_dict() for m in models]
    cfg = fxfuse.GraphMatching.short() if args.quick else fxfuse.GraphMatching()
    methods: dict[str, Any] = {"naive average": None, "weight matching": fxfuse.WeightMatching(),
                               "graph matching": cfg}
    maps: dict[str, Any] = {}
    secs: dict[str, float] = {}
    cpus: dict[str, float] = {"naive average": 0.0}
    notes: list[str] = []
    for name, align in methods.items():
        if align is None:
            maps[name], secs[name] = None, 0.0
            continue
        report = fxfuse.FusionReport()
        cpu0 = time.process_time()
        fxfuse.fuse(models, example, align=align, progress=False, report=report)
        cpus[name] = time.process_time() - cpu0
        maps[name] = report.maps
        secs[name] = next(t for n, t in report.timings if n.startswith("align"))
        notes += [n for n in report.notes if n.startswith("graph matching")]
    ends = [accuracy(m, tx, ty) for m in models]
    ws = [round(0.1 * i, 1) for i in range(1, 10)]
    acc: dict[str, dict[float, float]] = {}
    for name in methods:
        acc[name] = {}
        for w in ws:
            fused = copy.deepcopy(models[0])
            fused.load_state_dict(fxfuse.merge_states(spec, states, maps[name], [w, 1 - w]))
            acc[name][w] = accuracy(fused, tx, ty)
        print(f"  {name}: " + " ".join(f"{acc[name][w]:.2f}" for w in ws), file=sys.stderr)
    rows = [f"| {name} | {secs[name]:.2f} s | {cpus[name]:.2f} s | " + " | ".join(
        f"**{acc[name][w]:.2f}**" if acc[name][w] == max(acc[name].values()) else
        f"{acc[name][w]:.2f}" for w in ws) + " |" for name in methods]
    gain = acc["graph matching"][0.5] - acc["naive average"][0.5]
    ref_gain = DEMO_REFERENCE["graph"] - DEMO_REFERENCE["naive"]
    best_w = max(ws, key=lambda w: acc["graph matching"][w])
    best = acc["graph matching"][best_w]
    t_gm = max(secs["graph matching"], cpus["graph matching"])

    def verdict(ok: bool) -> str:
        return "met" if ok else "**miss**"

    goals = [
        f"- Gain of graph matching over naive averaging at 0.5/0.5: {gain:+.2f} points "
        f"(demo: {ref_gain:+.2f}): {verdict(gain >= ref_gain)}.",
        f"- Best graph-matching weighting: {best:.2f}% at {best_w:g}/{1 - best_w:g}, endpoints "
        f"{ends[0]:.2f} / {ends[1]:.2f}: {verdict(best > max(ends))} (above both endpoints).",
        f"- Graph-matching time: align pass {secs['graph matching']:.2f} s wall, whole fuse call "
        f"{cpus['graph matching']:.2f} s CPU (demo: {DEMO_REFERENCE['seconds']} s, dense "
        f"affinity + spectral matching): {verdict(t_gm < DEMO_REFERENCE['seconds'] / 4)} (goal "
        f"read as the larger of the two < 1/4 of it).",
    ]
    return [
        *header("demo", "the pygmtools demo's CNNs on label-skewed MNIST",
                "python benchmarks/graph_matching.py demo --write", revision),
        f"- Models: `DemoCNN` (module doc), no bias; model A trained on {sizes[0]} images "
        f"({SKEW:g} of each class 0-4, {1 - SKEW:.1f} of each class 5-9 of the 50k training "
        f"split), model B on the other {sizes[1]}; init seeds 0 / 1; {DEMO_BUDGET.describe()} "
        f"(`fxfuse.bench.train_client`, cached; {train_s:.0f} s of training in this run). "
        f"Scored on the {len(ty)} MNIST test images.",
        f"- Alignment found once per method (`fxfuse.fuse(report=...)`: `report.maps`, the align "
        f"pass's time; graph matching: `{cfg!r}`: {'; '.join(notes)}), merged at each weighting "
        f"(`fxfuse.merge_states`, weights w / 1 - w).",
        f"- Demo (pygmtools docs, its own downloaded checkpoints): endpoints "
        f"{DEMO_REFERENCE['endpoints'][0]} / {DEMO_REFERENCE['endpoints'][1]}, naive "
        f"{DEMO_REFERENCE['naive']}, graph matching {DEMO_REFERENCE['graph']} at 0.5/0.5, best "
        f"{DEMO_REFERENCE['best']} at {DEMO_REFERENCE['best_at']}, {DEMO_REFERENCE['seconds']} s "
        f"on a CPU. Not the same models: only the gains compare.",
        load_line(args.load_start, time.perf_counter() - args.started), "",
        f"Endpoints: model A {ends[0]:.2f}%, model B {ends[1]:.2f}% test accuracy.", "",
        "| method (w = weight of model A) | align (wall) | fuse CPU | " + " | ".join(
            f"{w:g}" for w in ws) + " |", "|---|---:|---:|" + "---:|" * len(ws), *rows, "", *goals, "", MARK["demo"][1]]


# -- 2. five Dirichlet clients on the shared harness --------------------------------------------
def _pairwise(perms: list[dict[str, torch.Tensor]]) -> dict[tuple[int, int],
                                                             dict[str, torch.Tensor]]:
    """``out[(i, j)][g][u]``: model j's unit matched with model i's unit u, from maps into one
    common basis (``perms[k][g][p]``: model k's unit at position p)."""
    out = {}
    for i, j in itertools.permutations(range(len(perms)), 2):
        per = {}
        for g, pi in perms[i].items():
            m = torch.empty_like(pi)
            m[pi] = perms[j][g]
            per[g] = m
        out[(i, j)] = per
    return out


def cycle_error(pairwise: dict[tuple[int, int], dict[str, torch.Tensor]], n: int
                ) -> tuple[float, int]:
    """Fraction of (3-cycle, unit) pairs that do not come back around i -> j -> k -> i (i < j <
    k), and the number of 3-cycles."""
    wrong = total = 0
    cycles = list(itertools.combinations(range(n), 3))
    for i, j, k in cycles:
        for g, m in pairwise[(i, j)].items():
            around = pairwise[(k, i)][g][pairwise[(j, k)][g][m]]
            wrong += int((around != torch.arange(m.numel())).sum())
            total += m.numel()
    return wrong / max(total, 1), len(cycles)


def consistency_rows(models: list[nn.Module], example: torch.Tensor,
                     graph_perms: list[dict[str, torch.Tensor]]) -> list[str]:
    """Independent pairwise weight matching of every pair beside graph matching's maps (from
    its scoreboard row, ``graph_perms``; its time is that row's)."""
    n = len(models)
    independent: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    start = time.perf_counter()
    for i, j in itertools.combinations(range(n), 2):
        r = fxfuse.FusionReport()
        fxfuse.fuse([models[i], models[j]], example, progress=False, report=r)
        assert r.perms is not None
        pw = _pairwise(r.perms)
        independent[(i, j)], independent[(j, i)] = pw[(0, 1)], pw[(1, 0)]
    t_wm = time.perf_counter() - start
    err_wm, cycles = cycle_error(independent, n)
    err_gm, _ = cycle_error(_pairwise(graph_perms), n)
    return [f"| independent pairwise weight matching ({n * (n - 1) // 2} pairs) | {cycles} | "
            f"{100 * err_wm:.1f}% | {t_wm:.1f} s |",
            f"| graph matching (one universe; its row above) | {cycles} | {100 * err_gm:.1f}% "
            f"| - |"]


def part_federated(args: argparse.Namespace, revision: str) -> list[str]:
    from fxfuse.bench.methods import METHODS, Context, require_one_architecture
    from fxfuse.bench.scoreboard import Setting, render_counts, render_table, run_setting

    graph = fxfuse.GraphMatching.short() if args.quick else fxfuse.GraphMatching()

    found: dict[str, list[dict[str, torch.Tensor]]] = {}  # init -> the row's permutations

    def graph_matching(ctx: Context) -> tuple[nn.Module, str]:
        require_one_architecture(ctx)
        report = fxfuse.FusionReport()
        fused = fxfuse.fuse(ctx.models, ctx.example, align=graph, weights=ctx.weights,
                            progress=False, report=report)
        assert report.perms is not None
        found[ctx.init] = report.perms
        note = next(n for n in report.notes if n.startswith("graph matching"))
        return fused, note.split(" (")[0].replace("graph matching: ", "")

    chosen = {"vanilla average": METHODS["vanilla average"],
              "weight matching": METHODS["weight matching"], "graph matching": graph_matching,
              "logit ensemble": METHODS["logit ensemble"]}
    data = datasets.load("mnist")
    mlp = ModelSpec("models.zoo:mlp_classifier", {"in_dim": 784, "widths": [256]})
    cnn = ModelSpec("benchmarks.graph_matching:demo_cnn", {})
    budgets = {"MLP": Budget(epochs=1 if args.quick else 10, batch_size=128, lr=1e-3),
               "CNN": Budget(epochs=1 if args.quick else 2, batch_size=128, lr=1e-3)}
    out = [*header("federated", "five Dirichlet(0.5) MNIST clients",
                   "python benchmarks/graph_matching.py federated --write", revision),
           f"- Clients: `fxfuse.bench.split(scheme='dirichlet', alpha=0.5, seed=0)` of the 50k "
           f"MNIST training split, 5 clients; MLP 784-256-10 ({budgets['MLP'].describe()}) and "
           f"`DemoCNN` ({budgets['CNN'].describe()}); `init`: different = client k from seed "
           f"k, common = all from seed 0 (MLP only: CNN clients took ~5 min each to train on "
           f"the shared cores). Rows: `fxfuse.bench.scoreboard.run_setting` with "
           f"vanilla average, weight matching (MergeMany), graph matching (`{graph!r}`), logit "
           f"ensemble; FedAvg weights (client shares) for the fused rows.",
           "- Cycle consistency: fraction of units not mapped back to themselves around the "
           "3-cycles of the 5 clients (10 cycles, every group).", ""]
    # CNN clients of one init only: on the shared cores one client took ~5 min to train
    inits = {"MLP": ("different", "common"), "CNN": ("different",)}
    for label, spec in (("MLP", mlp), ("CNN", cnn)):
        setting = Setting("mnist", 5, "dirichlet", alpha=0.5, models=spec,
                          budget=budgets[label], label=label, inits=inits[label])
        print(f"== {setting.title()}", file=sys.stderr, flush=True)
        table = run_setting(setting, data, chosen, progress=True)
        out += [f"### {label}: {setting.title()}", "", *render_counts(table.split), "",
                *render_table(table), "",
                "| matchings | 3-cycles | units not returning | time |", "|---|---:|---:|---:|"]
        for init, clients in table.clients.items():
            if init not in found:
                out.append(f"| {init} init: graph matching's row failed (see the table) | - | - "
                           f"| - |")
                continue
            rows = consistency_rows([c.model for c in clients], data.train_x[:2], found.pop(init))
            out += [row.replace("| ", f"| {init} init: ", 1) for row in rows]
        out.append("")
    out += [load_line(args.load_start, time.perf_counter() - args.started), "",
            MARK["federated"][1]]
    return out


# -- 3. scale ------------------------------------------------------------------------------------
SCALE_MODELS = ("mlp-3x512", "resnet20-x1", "resnet20-x4", "resnet50")
SCALE_METHODS = ("weight", "graph-short", "graph")


def scale_pair(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    from models import zoo

    if name == "mlp-3x512":
        return (zoo.mlp_classifier(seed=0), zoo.mlp_classifier(seed=1),
                torch.randn(2, 1, 28, 28))
    if name.startswith("resnet20"):
        w = int(name.rsplit("x", 1)[1])
        return zoo.resnet20(width=w, seed=0), zoo.resnet20(width=w, seed=1), torch.randn(
            2, 3, 32, 32)
    return zoo.resnet50(seed=0), zoo.resnet50(seed=1), torch.randn(1, 3, 224, 224)


def _count_steps() -> tuple[dict[str, float], Any]:
    """Patch the align passes to record their own CPU time, and weight matching's stopping rule
    to count its sweeps (every sweep of every descent: pooled, exact, both starts); returns the
    record and an undo."""
    from fxfuse.align import graph, weights

    rec = {"align_cpu": 0.0, "sweeps": 0}
    done, calls = weights._StoppingRule.done, (weights.AlignWeights.call, graph.AlignGraph.call)

    def counted(self: Any, gains: list[float]) -> bool:
        rec["sweeps"] += 1
        return done(self, gains)

    def timed(call: Any) -> Any:
        def wrapper(self: Any, state: Any) -> None:
            cpu0 = time.process_time()
            call(self, state)
            rec["align_cpu"] += time.process_time() - cpu0
        return wrapper

    weights._StoppingRule.done = counted  # type: ignore[method-assign]
    weights.AlignWeights.call = timed(calls[0])  # type: ignore[method-assign]
    graph.AlignGraph.call = timed(calls[1])  # type: ignore[method-assign]

    def undo() -> None:
        weights._StoppingRule.done = done  # type: ignore[method-assign]
        weights.AlignWeights.call, graph.AlignGraph.call = calls  # type: ignore[method-assign]
    return rec, undo


def scale_child(name: str, method: str) -> None:
    torch.set_num_threads(NUM_THREADS)
    a, b, x = scale_pair(name)
    align = {"weight": fxfuse.WeightMatching(), "graph": fxfuse.GraphMatching(),
             "graph-short": fxfuse.GraphMatching.short()}[method]
    rec, undo = _count_steps()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = fxfuse.FusionReport()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fxfuse.fuse([a, b], x, align=align, progress=False, report=report)
    total = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    undo()
    align_s = next(s for n, s in report.timings if n.startswith("align"))
    assert report.perms is not None and report.spec is not None
    from fxfuse.permute import apply_perms

    sa, sb = a.state_dict(), apply_perms(b.state_dict(), report.spec, report.perms[1])
    keys = [k for k, _ in a.named_parameters()]
    d2 = sum(float((sa[k].double() - sb[k].double()).square().sum()) for k in keys)
    d0 = sum(float((sa[k].double() - b.state_dict()[k].double()).square().sum()) for k in keys)
    widest = max(g.size for g in report.spec.groups)
    note = next((n for n in report.notes if n.startswith("graph")), "")
    # one step: a weight-matching sweep, a graph-matching update of one model (N per iteration)
    steps = (rec["sweeps"] if method == "weight" else
             2 * int(note.split(" iterations")[0].replace("graph matching: ", "")))
    print(json.dumps({"align_s": align_s, "total_s": total, "cpu_s": cpu, "d2": d2, "d0": d0,
                      "align_cpu_s": rec["align_cpu"], "steps": steps,
                      "extra_mb": (peak - rss0) / 1024, "rss0_mb": rss0 / 1024,
                      "groups": len(report.spec.groups), "widest": widest,
                      "note": note}))


def part_scale(args: argparse.Namespace, revision: str) -> list[str]:
    rows = []
    models = SCALE_MODELS[:2] if args.quick else SCALE_MODELS
    for name in models:
        base: dict[str, Any] | None = None
        for method in SCALE_METHODS:
            if args.quick and method == "graph":
                continue
            timeout = args.timeout * (4 if name == "resnet50" else 1)
            res = run_child([__file__, "scale-child", name, method], timeout)
            print(f"  {name} {method}: {res.data or res.status}", file=sys.stderr, flush=True)
            if res.data is None:
                rows.append(f"| {name} | {method} | {res.status} | - | - | - | - | - | - | - |")
                continue
            d = res.data
            if method == "weight":
                base = d
            ratio = f"{d['cpu_s'] / base['cpu_s']:.1f}x" if base else "-"
            it = d["note"].split(" iterations")[0].replace("graph matching: ", "") or "-"
            step = d["align_cpu_s"] / max(1, d["steps"])
            per = (f"{1e3 * step:.0f} ms" + (f" ({step / base['step']:.1f}x)" if base and
                                              method != "weight" else ""))
            d["step"] = step
            rows.append(f"| {name} ({d['groups']} groups, widest {d['widest']}) | {method} | "
                        f"{d['align_s']:.2f} s | {d['align_cpu_s']:.1f} s | {d['cpu_s']:.1f} s | "
                        f"{ratio} | {it} | {per} | {d['extra_mb']:.0f} MB | "
                        f"{d['d2'] / d['d0']:.4f} |")
    return [*header("scale", "alignment time and memory at real widths",
                    "python benchmarks/graph_matching.py scale --write", revision),
            "- Two random inits (seeds 0 / 1) per model, each method in a fresh child process "
            "(cold), one thread; `align` = the align pass's wall time in `FusionReport.timings`, "
            "align CPU = the align pass's own process CPU time, fuse CPU = the whole fuse call's "
            "(tracing included; the figures to compare: wall time waits for cores other jobs "
            "hold); CPU per step = align CPU per weight-matching sweep (every sweep of every "
            "descent: both starts, pooled and exact) or per graph-matching update of one model "
            "(two per iteration), in brackets graph matching's per weight matching's (the "
            "issue's goal: about one sweep per update); memory = peak RSS of the fuse call above the "
            "RSS before it (`ru_maxrss`); distance = `sum_t ||A_t - P(B_t)||^2` over the "
            "parameters after alignment / before (lower: closer; weight matching minimises it, "
            "graph matching does not). Methods: `WeightMatching()`, `GraphMatching.short()`, "
            f"`GraphMatching()` (the paper's schedule). Child limit {args.timeout:g} s "
            f"({4 * args.timeout:g} s for ResNet-50).",
            load_line(args.load_start, time.perf_counter() - args.started), "",
            "| model | method | align (wall) | align CPU | fuse CPU | fuse CPU vs weight "
            "matching | iterations | CPU per step | memory | distance after / before |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows, "", MARK["scale"][1]]


# -- 4. the exhaustive optimum on tiny nets ----------------------------------------------------
def part_optimum(args: argparse.Namespace, revision: str) -> list[str]:
    """How often graph matching (short and paper schedule) and weight matching reach the maximum
    of graph matching's own objective over all 4! x 4! permutations of a 6-4-4-3 MLP pair (the
    second a permuted copy of the first with Gaussian noise of ``noise`` standard deviations per
    tensor), 12 seeds per noise level."""
    from fxfuse.align.graph import GraphObjective

    seeds = range(4 if args.quick else 12)
    configs = {"graph matching, short": fxfuse.GraphMatching.short(),
               "graph matching, paper schedule": fxfuse.GraphMatching(),
               "weight matching": fxfuse.WeightMatching()}
    rows = []
    for noise in (0.5, 0.75, 1.0):
        hits = dict.fromkeys(configs, 0)
        ranks: dict[str, list[int]] = {name: [] for name in configs}
        for seed in seeds:
            torch.manual_seed(seed)
            a = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                              nn.Linear(4, 3))
            x = torch.randn(2, 6)
            spec = fxfuse.find_groups(a, (x,))
            b = fxfuse.permute(a, spec, spec.random_perms(seed=seed))
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in b.parameters():
                    p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
            objective = GraphObjective(spec, [a.state_dict(), b.state_dict()])
            g1, g2 = (g.name for g in spec.groups)
            ident = {g1: torch.arange(4), g2: torch.arange(4)}
            values = [objective([ident, {g1: torch.tensor(p1), g2: torch.tensor(p2)}])
                      for p1 in itertools.permutations(range(4))
                      for p2 in itertools.permutations(range(4))]
            for name, cfg in configs.items():
                report = fxfuse.FusionReport()
                fxfuse.fuse([a, b], (x,), align=cfg, progress=False, report=report)
                assert report.perms is not None
                got = objective(report.perms)
                rank = sum(v > got + 1e-9 for v in values)
                hits[name] += rank == 0
                ranks[name].append(rank + 1)
        for name in configs:
            rows.append(f"| {noise:g} | {name} | {hits[name]} of {len(seeds)} | "
                        f"{max(ranks[name])} |")
    return [*header("optimum", "the exhaustive optimum of its objective on tiny nets",
                    "python benchmarks/graph_matching.py optimum --write", revision),
            "- Pairs: a 6-4-4-3 MLP (init seed s) and a permuted copy of it with Gaussian noise "
            "of `noise` standard deviations added to every tensor (seed s), s = 0..11; "
            "objective: `fxfuse.align.graph.GraphObjective` (graph matching's "
            "`sum_(i != j) sum_g <A_ij[g], X_ij[g]>`), maximised by brute force over all "
            "24 x 24 permutations; each method's permutations scored on it.",
            load_line(args.load_start, time.perf_counter() - args.started), "",
            "| noise (std) | method | reaches the optimum | worst rank (of 576) |",
            "|---:|---|---:|---:|", *rows, "", MARK["optimum"][1]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["demo", "federated", "scale", "optimum", "scale-child"])
    p.add_argument("child", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="smoke run (small data, short schedule)")
    p.add_argument("--timeout", type=float, default=900.0, help="child limit in seconds (scale)")
    args = p.parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    if args.part == "scale-child":
        scale_child(*args.child)
        return 0
    args.started, args.load_start = time.perf_counter(), load_average()
    revision = fxfuse_revision()
    part = {"demo": part_demo, "federated": part_federated, "scale": part_scale,
            "optimum": part_optimum}[args.part]
    section = "\n".join(part(args, revision))
    print(section)
    if args.write and not args.quick:
        write_section(section, *MARK[args.part])
        print(f"wrote {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
