"""Benchmark: discovery time on transformer-sized models, symbolic path vs torch.export path.

* ViT-B/16-sized (``models.get("vit_b")``: 12 blocks, width 768, nn.MultiheadAttention), which
  ``torch.fx.symbolic_trace`` handles: timed with ``tracer="symbolic"`` and ``tracer="export"``.
* A 12-layer LLaMA-style LM, hidden 768 (12 query heads, 4 kv heads, RoPE, SwiGLU 2048,
  vocabulary 1000), which symbolic tracing can not handle: timed with ``tracer="export"`` (what
  ``tracer="auto"`` falls back to; the failed symbolic attempt is timed separately).

Median of 3 runs after a warm-up (wall and CPU time), 2 threads, in this one process.  ``--write`` replaces the section between
``<!-- transformer-discovery:begin -->`` and ``<!-- transformer-discovery:end -->`` in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fxfuse  # noqa: E402
import models  # noqa: E402
from benchmarks._report import (  # noqa: E402
    RESULTS_PATH,
    Lap,
    command_line,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    revision_note,
    timed,
    write_section,
)
from fxfuse.ir.layout import Prod  # noqa: E402
from models.transformer import LlamaLM  # noqa: E402

BEGIN, END = "<!-- transformer-discovery:begin -->", "<!-- transformer-discovery:end -->"
COMMAND = "python benchmarks/transformer_discovery.py --write"


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[Lap, Any]:
    """Median wall and CPU time of ``repeats`` calls after one warm-up call."""
    out = fn()
    laps = []
    for _ in range(repeats):
        out, lap = timed(fn)
        laps.append(lap)
    return Lap(statistics.median(lap.wall_s for lap in laps),
               statistics.median(lap.cpu_s for lap in laps)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started, load_start, revision = time.perf_counter(), load_average(), fxfuse_revision()
    vit = models.get("vit_b")
    vit_model, vit_x = vit.factory(), vit.example_inputs()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        llama = LlamaLM(vocab=1000, dim=768, heads=12, kv_heads=4, depth=12, hidden=2048,
                        max_len=64).eval()
    ids = (torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0)),)
    rows = []
    for name, model, x, tracer in [("ViT-B/16 (vit_b)", vit_model, vit_x, "symbolic"),
                                   ("ViT-B/16 (vit_b)", vit_model, vit_x, "export"),
                                   ("LLaMA-style 12 x 768", llama, ids, "symbolic"),
                                   ("LLaMA-style 12 x 768", llama, ids, "export")]:
        sec, spec = median_time(lambda m=model, x=x, t=tracer: fxfuse.find_groups(m, x, tracer=t),
                                args.repeats)
        heads = sum(1 for g in spec.groups if any(
            ("attn" in m.key or "q_proj" in m.key) and isinstance(m.layout, Prod) for m in g.members))
        rows.append(f"| {name} | {tracer} | {1000 * sec.wall_s:.0f} ms | "
                    f"{1000 * sec.cpu_s:.0f} ms | {len(spec.groups)} | {heads} | {len(spec.cuts)} |")
        print(rows[-1], flush=True)
    start = time.perf_counter()
    try:
        fxfuse.find_groups(llama, ids, tracer="symbolic")
        failed = "succeeded"
    except fxfuse.TraceError:
        failed = "raised TraceError"
    symbolic_fail = time.perf_counter() - start
    then = ("keeps the symbolic trace (it falls back to export only where the symbolic one fails "
            "or cuts at calls it can not see into)" if failed == "succeeded"
            else "then takes the export path")
    note = (f"On the LLaMA-style model the symbolic attempt {failed} after "
            f"{1000 * symbolic_fail:.0f} ms (a first call); `tracer=\"auto\"` {then}.")
    print(note)
    section = "\n".join([
        BEGIN, "## Discovery time on transformers (symbolic vs torch.export path)", "",
        command_line(COMMAND), "",
        f"- Date: {datetime.date.today()}; commit {revision_note(revision)}",
        machine_line(2),
        f"- Method: `fxfuse.find_groups(model, inputs, tracer=...)`, median of {args.repeats} "
        "runs after a warm-up, in one process (wall and the process's CPU time); batch 1 (ViT "
        "224x224 image, LLaMA 32 tokens).",
        load_line(load_start, time.perf_counter() - started),
        "- head groups: groups acting as a factor of an attention projection's axis (heads, "
        "head_dim, query heads per kv head). On the export path nn.MultiheadAttention is lowered "
        "to linear + unflatten(3, E) + select, so q/k/v share one head_dim group there (a "
        "subgroup of what the module-level rule finds).",
        "", "| model | tracer | find_groups (median) | CPU | groups | head groups | cuts |",
        "|---|---|---:|---:|---:|---:|---:|", *rows, "", note, END])
    if args.write:
        write_section(section, BEGIN, END)
        print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
