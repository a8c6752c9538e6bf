"""Benchmark: graph matching (GAMF) of MNIST MLPs of different widths, beside exact OT.

The OT benchmark's different-width pair (``benchmarks/ot_fusion.py``: MLPs 784-400-200-100-10 and
784-200-100-50-10 without biases, seeds 0 and 2, SGD 10 epochs on the 50k train split), fused at
0.5 / 0.5 into the wide target and into the narrow one by: averaging in unit order (the
unaligned baseline: unit ``j`` to fused unit ``j mod m``, or fused unit ``i`` copying unit
``i mod n``), exact OT with the weight cost, and graph matching into a universe at the target's
widths (short schedule and the paper's).  Test accuracy on the 10k test split, the align pass's
wall and CPU time.  Goal (issue 17: graph matching across widths no worse than OT): each graph
matching row at or above OT's in the same target.

Run from the repository root::

    python benchmarks/graph_widths.py --write     # full run + RESULTS.md section
    python benchmarks/graph_widths.py --quick     # smoke run (1 epoch, short schedule only)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks._report import (  # noqa: E402
    command_line,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    revision_note,
    version_of,
    write_section,
)
from benchmarks.ot_fusion import HALF, WIDE, acc, train  # noqa: E402
from fxfuse.core import merge_states  # noqa: E402
from fxfuse.data import load_mnist  # noqa: E402
from fxfuse.pairing import in_order_maps  # noqa: E402

BEGIN, END = "<!-- graph-matching-widths:begin -->", "<!-- graph-matching-widths:end -->"
COMMAND = "python benchmarks/graph_widths.py --write"
THREADS = 1


def in_order(models: list[nn.Module], x: torch.Tensor, target: int) -> nn.Module:
    """The unaligned average of models of different widths (module doc)."""
    specs = [fxfuse.find_groups(m, x) for m in models]
    maps = in_order_maps(specs, target)
    out = copy.deepcopy(models[target])
    out.load_state_dict(merge_states(specs, [m.state_dict() for m in models], maps, [0.5, 0.5]))
    return out


def timed_fuse(models: list[nn.Module], x: torch.Tensor, align: Any, target: int
               ) -> tuple[nn.Module, float, float]:
    """The fused model, wall and CPU seconds of the whole call (the align pass dominates)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fxfuse.fuse(models, x, align=align, target=target, progress=False)
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="1 epoch, short schedule only")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    start_rev, load_start, t0 = fxfuse_revision(), load_average(), time.perf_counter()
    epochs = 1 if args.quick else 10
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    a, c = train(WIDE, 0, x, y, epochs), train(HALF, 2, x, y, epochs)
    pair: list[nn.Module] = [a, c]
    ex = x[:8]
    timed_fuse([fxfuse_mlp(8), fxfuse_mlp(4)], ex, fxfuse.OptimalTransport(), 0)  # imports
    methods: list[tuple[str, Any]] = [("OT, weight cost (exact)", fxfuse.OptimalTransport()),
                                      ("graph matching, short schedule", fxfuse.GraphMatching.short())]
    if not args.quick:
        methods.append(("graph matching, paper schedule", fxfuse.GraphMatching()))
    lines = ["| fused into | method | test acc. (%) | wall (s) | CPU (s) |",
             "|---|---|---:|---:|---:|"]
    verdicts: list[str] = []
    for target, label in ((0, "wide (A's widths)"), (1, "narrow (C's widths)")):
        lines.append(f"| {label} | unit-order average | {acc(in_order(pair, ex, target), xt, yt):.2f}"
                     f" | | |")
        got: dict[str, float] = {}
        for name, align in methods:
            model, wall, cpu = timed_fuse(pair, ex, align, target)
            got[name] = acc(model, xt, yt)
            lines.append(f"| {label} | {name} | {got[name]:.2f} | {wall:.2f} | {cpu:.2f} |")
        ot = got["OT, weight cost (exact)"]
        for name, value in got.items():
            if name.startswith("graph"):
                verdicts.append(f"{label}, {name}: {value - ot:+.2f} points vs OT: "
                                f"**{'met' if value >= ot else 'MISS'}**")
    lines += [f"| | model A (wide) / model C (half) | {acc(a, xt, yt):.2f} / "
              f"{acc(c, xt, yt):.2f} | | |", ""]
    lines += [f"- Goal (graph matching at or above exact OT, same target): {v}" for v in verdicts]
    total = time.perf_counter() - t0
    head = ["## Graph matching across widths (MNIST MLPs, OT's different-width pair)", "",
            command_line(COMMAND), "",
            f"- Commit: {revision_note(start_rev)}",
            machine_line(THREADS, f"POT {version_of('POT')}"),
            load_line(load_start, total),
            f"- Training: as `benchmarks/ot_fusion.py` ({epochs} epochs); fused at 0.5 / 0.5, "
            f"no repair.", ""]
    section = "\n".join([BEGIN, *head, *lines, END])
    print(section)
    if args.write and not args.quick:
        write_section(section, BEGIN, END)


def fxfuse_mlp(width: int) -> nn.Module:
    from models.mlp import MLP

    torch.manual_seed(width)
    return MLP(784, (2 * width, width), 10, bias=False)


if __name__ == "__main__":
    main()
