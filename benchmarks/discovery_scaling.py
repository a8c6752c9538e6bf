"""Benchmark: discovery time against graph size, and the fitted exponent.

Four families of synthetic models, each a chain of ``N`` blocks, ``N = 8, 16, ..., 512``:

* ``plain``: Linear -> ReLU, repeated (one group per layer);
* ``residual``: ``x + Linear(ReLU(Linear(x)))`` (one stream group shared by every block, one group
  per block);
* ``dense``: DenseNet-style concatenation, ``x = cat(x, conv(x))`` with a transition conv
  (1x1, back to the stem width) every 4 blocks so widths stay bounded (concat layouts grow within
  a stage);
* ``transformer``: pre-LayerNorm blocks of ``nn.MultiheadAttention``-free attention (q/k/v
  Linear, SDPA, heads x head_dim) + MLP on a residual stream.

For each model: ``fxfuse.find_groups`` timed warm (after one untimed call on the same model),
median of ``REPEATS``, in this process, single-threaded.  The exponent ``b`` is the least-squares
slope of ``log t`` against ``log N`` over the sizes measured (goal: ``b <= 1.1``, linear).  Graph
size is reported as the traced graph's node count.

Run from the repository root::

    python benchmarks/discovery_scaling.py --write        # N up to 512, RESULTS.md section
    python benchmarks/discovery_scaling.py --max-n 64     # quick look, print only
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks._report import (  # noqa: E402
    command_line,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    revision_note,
    write_section,
)
from fxfuse.groups import clear_spec_cache  # noqa: E402

BEGIN, END = "<!-- discovery-scaling:begin -->", "<!-- discovery-scaling:end -->"
COMMAND = "python benchmarks/discovery_scaling.py --write"
REPEATS = 3
GOAL = 1.1


class Plain(nn.Module):
    def __init__(self, n: int, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class Residual(nn.Module):
    def __init__(self, n: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.a = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(n))
        self.b = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(n))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for a, b in zip(self.a, self.b):
            x = x + b(torch.relu(a(x)))
        return self.head(x)


class Dense(nn.Module):
    def __init__(self, n: int, stem: int = 8, growth: int = 4, per_stage: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.per_stage = per_stage
        convs, trans = [], []
        width = stem
        for i in range(n):
            convs.append(nn.Conv2d(width, growth, 3, padding=1))
            width += growth
            if (i + 1) % per_stage == 0:
                trans.append(nn.Conv2d(width, stem, 1))
                width = stem
        self.convs, self.trans = nn.ModuleList(convs), nn.ModuleList(trans)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, conv in enumerate(self.convs):
            x = torch.cat([x, torch.relu(conv(x))], 1)
            if (i + 1) % self.per_stage == 0:
                x = self.trans[i // self.per_stage](x)
        return self.head(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).reshape(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, n: int, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(n))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


FAMILIES: dict[str, tuple[Callable[[int], nn.Module], Callable[[], torch.Tensor]]] = {
    "plain": (Plain, lambda: torch.randn(2, 16)),
    "residual": (Residual, lambda: torch.randn(2, 16)),
    "dense": (Dense, lambda: torch.randn(2, 3, 8, 8)),
    "transformer": (Transformer, lambda: torch.randn(2, 5, 8)),
}


def measure(model: nn.Module, x: torch.Tensor) -> tuple[float, float, int]:
    """Median wall and CPU seconds of warm ``find_groups`` calls, and the graph's node count."""
    spec = fxfuse.find_groups(model, x)  # warm-up (and the node count)
    del spec
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    walls, cpus = [], []
    for _ in range(REPEATS):  # consecutive: each call pays for the collections it triggers
        clear_spec_cache()  # not timed: every call relates every axis (no spec memo hit)
        t0, c0 = time.perf_counter(), time.process_time()
        fxfuse.find_groups(model, x)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), nodes


def slope(ns: list[int], ts: list[float]) -> float:
    lx, ly = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--max-n", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_rev, load_start, t0 = fxfuse_revision(), load_average(), time.perf_counter()
    sizes = [n for n in (8, 16, 32, 64, 128, 256, 512) if n <= args.max_n]
    lines = ["| family | " + " | ".join(f"N={n}" for n in sizes)
             + " | exponent (CPU) | exponent (wall) | goal |",
             "|---|" + "---:|" * len(sizes) + "---:|---:|---|"]
    for name, (build, inputs) in FAMILIES.items():
        torch.manual_seed(0)
        cells, walls, cpus = [], [], []
        for n in sizes:
            wall, cpu, nodes = measure(build(n).eval(), inputs())
            walls.append(wall)
            cpus.append(cpu)
            cells.append(f"{1000 * wall:.0f} ms [CPU {1000 * cpu:.0f} ms] ({nodes} nodes)")
            print(f"{name} N={n}: {1000 * wall:.1f} ms, CPU {1000 * cpu:.1f} ms, {nodes} nodes",
                  file=sys.stderr)
        b, b_wall = slope(sizes, cpus), slope(sizes, walls)
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {b:.2f} | {b_wall:.2f} | **{'met' if b <= GOAL else 'MISS'}** |")
    total = time.perf_counter() - t0
    head = ["## Discovery time against graph size", "", command_line(COMMAND), "",
            f"- Commit: {revision_note(start_rev)}", machine_line(1), load_line(load_start, total),
            f"- `find_groups` warm, median of {REPEATS} consecutive calls (no collection forced "
            f"between them; the spec memo emptied before each, untimed, so every call relates "
            f"every axis as a new architecture's first call does), single-threaded; cells: wall [CPU time of the process]; exponent: "
            f"least-squares slope of log time on log N, judged on CPU time (less sensitive to "
            f"the shared machine's load; goal: at most {GOAL}).", ""]
    section = "\n".join([BEGIN, *head, *lines, END])
    print(section)
    if args.write:
        write_section(section, BEGIN, END)


if __name__ == "__main__":
    main()
