"""Benchmark: permutation-group discovery time over the reference zoo, fxfuse vs torch-pruning.

For every zoo model (``models.names()`` and the large ``models.names("large")``) this times

* ``fxfuse.find_groups(model, inputs)`` end to end (tracing + shape recording + discovery), and
* torch-pruning's ``tp.DependencyGraph().build_dependency(model, example_inputs=inputs)``
  (a benchmark-only extra: ``pip install --no-deps torch-pruning``),

each tool in its own fresh child process per model (so neither inherits the other's imports,
caches or allocator state): importing the tool plus its first call is timed as the *cold* call, then the
median of N more calls (N=5 for small models, 3 for large ones, the same for both tools), wall time
and the process's CPU time, plus the spec's group / permutable-axis / cut counts.  A tool whose
first call takes longer than ``--timeout`` seconds is skipped for that model.

Verdicts: ResNet-50 under 1 s, and "no slower than torch-pruning" judged per model on every model
both tools build (medians), with the count of models where fxfuse is slower.

Run from the repository root::

    python benchmarks/discovery.py            # print the table
    python benchmarks/discovery.py --write    # also update benchmarks/RESULTS.md
    python benchmarks/discovery.py --quick --models mlp,resnet20   # smoke run, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# With OpenMP's default spin-waiting, 2-thread torch ops on the 2-vCPU benchmark VM went through
# multi-second phases ~10-40x slower (a 256x256 matmul: 10 ms -> 400 ms), swamping the figures;
# sleep-waiting keeps them stable.  Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks._report import (  # noqa: E402
    RESULTS_PATH,
    Lap,
    command_line,
    fmt_seconds,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    revision_note,
    run_child,
    timed,
    version_of,
    write_section,
)

BEGIN = "<!-- discovery:begin -->"
END = "<!-- discovery:end -->"
COMMAND = "python benchmarks/discovery.py --write"

REPEATS_SMALL = 5
REPEATS_LARGE = 3
ROUNDS = 3  # child processes per tool and model, interleaved (see bench_model)
NUM_THREADS = 1  # discovery is Python-bound; one thread is steadier on the shared 2 cores
FIXED_COST_S = 0.002  # issue 21: fxfuse's fixed cost under 2 ms
TARGET_MODEL = "resnet50"
TARGET_SECONDS = 1.0
# "fxfuse, new": find_groups with its spec memo emptied before every call (not timed): each call
# discovers the model as a new architecture, as the first call of one in a process does
TOOLS = ("fxfuse", "torch-pruning", "torch.fx", "fxfuse, new")
# "torch.fx": torch's own symbolic tracer alone (`torch.fx.Tracer().trace(model)`, no fxfuse
# code): the floor under any discovery that traces with torch.fx on every call


class BenchTimeout(Exception):
    """Raised by :func:`time_limit` when a guarded call runs too long."""


@dataclass
class Timing:
    """One tool on one model: the cold (first) call and the repeated calls, or a status text."""

    cold: Lap | None = None  # importing the tool + its first call
    import_s: float | None = None  # the import's share of ``cold``
    modules: int | None = None  # Python modules the cold call (import + first call) loaded
    laps: tuple[Lap, ...] = ()
    status: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(lap.wall_s for lap in self.laps) if self.laps else None

    @property
    def median_cpu_s(self) -> float | None:
        return statistics.median(lap.cpu_s for lap in self.laps) if self.laps else None

    @property
    def min_s(self) -> float | None:
        return min(lap.wall_s for lap in self.laps) if self.laps else None

    def cell(self) -> str:
        if not self.laps:
            return self.status
        return (f"{fmt_seconds(self.median_s)} ({fmt_seconds(self.min_s)}) "
                f"[CPU {fmt_seconds(self.median_cpu_s)}]")

    def cold_cell(self) -> str:
        if self.cold is None:
            return "-"
        return (f"{fmt_seconds(self.cold.wall_s)} (import {fmt_seconds(self.import_s)}; "
                f"{self.modules} modules loaded)")


@dataclass
class Row:
    model: str
    large: bool
    repeats: int
    groups: int | None
    perm_axes: int | None
    cuts: int | None
    fxfuse: Timing
    tp: Timing
    fx_trace: Timing
    rounds: int = 1
    fx_new: Timing = field(default_factory=Timing)


# -- the child process: one tool, one model -------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`BenchTimeout` inside the block after ``seconds`` (no-op without SIGALRM).

    The alarm interrupts Python code only; a single long-running C call finishes first.
    """
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise BenchTimeout(f"timeout (> {seconds:g} s on first attempt)")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def short_error(exc: BaseException, limit: int = 80) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def worker(tool: str, name: str, repeats: int, timeout: float, threads: int) -> int:
    """Child process: time ``tool`` on zoo model ``name``; print one JSON line.  The tool is
    imported (and timed) before the zoo, which imports parts of fxfuse (``models/leaf.py``
    registers a rule)."""
    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    forget: Any = None  # run before each timed call, not timed
    if tool in ("fxfuse", "fxfuse, new"):
        def load() -> Any:  # `import fxfuse` is lazy: looking up find_groups loads what it uses
            import fxfuse

            fxfuse.find_groups  # noqa: B018
            return fxfuse

        def call(lib: Any) -> Any:
            return lib.find_groups(model, inputs)

        if tool == "fxfuse, new":
            def forget() -> None:
                from fxfuse.groups import clear_spec_cache

                clear_spec_cache()
    elif tool == "torch.fx":
        def load() -> Any:
            import torch.fx

            return torch.fx

        def call(lib: Any) -> Any:  # as fxfuse's tracer: buffers as nodes if the plain trace fails
            try:
                return lib.Tracer().trace(model)
            except Exception:
                tracer = lib.Tracer()
                tracer.proxy_buffer_attributes = True
                return tracer.trace(model)
    else:
        def load() -> Any:
            import torch_pruning

            return torch_pruning

        def call(lib: Any) -> Any:  # build_dependency runs the model (in train mode)
            return lib.DependencyGraph().build_dependency(model, example_inputs=inputs)
    before = len(sys.modules)
    try:
        lib, import_lap = timed(load)
    except ImportError as exc:
        print(json.dumps({"status": f"not installed ({short_error(exc, 60)})"}))
        return 0
    loaded_by_import = len(sys.modules) - before
    import models

    entry = models.ZOO[name]
    inputs = entry.example_inputs()
    model = entry.factory()
    before = len(sys.modules)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gc.collect()
            with time_limit(timeout):
                # cold: importing the tool (above) and its first call, in a process that has
                # neither
                result, first = timed(lambda: call(lib))
            cold = Lap(import_lap.wall_s + first.wall_s, import_lap.cpu_s + first.cpu_s)
            loaded = loaded_by_import + len(sys.modules) - before
            laps = []
            for _ in range(repeats):  # no forced collection between calls: each call pays for
                # the collections it triggers, the garbage left by the call before included
                if forget is not None:
                    forget()
                result, lap = timed(lambda: call(lib))
                laps.append(lap)
    except BenchTimeout as exc:
        print(json.dumps({"status": str(exc)}))
        return 0
    except Exception as exc:  # any failure is a table entry, not a crash
        traceback.print_exc(limit=-4, file=sys.stderr)
        print(json.dumps({"status": f"error: {short_error(exc)}"}))
        return 0
    out["cold"] = [cold.wall_s, cold.cpu_s]
    out["import_s"] = import_lap.wall_s
    out["modules"] = loaded
    out["laps"] = [[lap.wall_s, lap.cpu_s] for lap in laps]
    if tool in ("fxfuse", "fxfuse, new"):
        out["groups"] = len(result.groups)
        out["perm_axes"] = sum(1 for axis_spec in result.axes.values() if axis_spec.groups)
        out["cuts"] = len(result.cuts)
    print(json.dumps(out))
    return 0


def measure(tool: str, name: str, repeats: int, timeout: float,
            threads: int) -> tuple[Timing, dict[str, Any]]:
    child = run_child([str(Path(__file__).resolve()), "--worker", tool, name,
                       "--repeats", str(repeats), "--timeout", f"{timeout:g}",
                       "--threads", str(threads)],
                      timeout=timeout * (repeats + 1) + 120)
    data = child.data or {}
    if child.data is None:
        return Timing(status=child.status), data
    if "status" in data:
        return Timing(status=data["status"]), data
    return Timing(cold=Lap(*data["cold"]), import_s=data["import_s"], modules=data["modules"],
                  laps=tuple(Lap(*x) for x in data["laps"])), data


def bench_model(name: str, index: int, repeats: int, timeout: float, threads: int,
                rounds: int = 1) -> Row:
    """``rounds`` child processes per tool, interleaved (``A B C``, then ``C B A``, ...: the
    tool that goes first alternates by model and by round), so that a slow spell of the shared
    machine falls on every tool alike; each tool's calls of all its rounds are pooled."""
    import models

    entry = models.ZOO[name]
    large = "large" in entry.tags
    n = repeats if repeats > 0 else (REPEATS_LARGE if large else REPEATS_SMALL)
    runs: dict[str, list[tuple[Timing, dict[str, Any]]]] = {tool: [] for tool in TOOLS}
    for r in range(rounds):
        order = TOOLS if (index + r) % 2 == 0 else TOOLS[::-1]
        for tool in order:
            runs[tool].append(measure(tool, name, n, timeout, threads))
    fx_data = runs["fxfuse"][0][1]
    merged = {tool: pooled([t for t, _ in got]) for tool, got in runs.items()}
    return Row(name, large, n, fx_data.get("groups"), fx_data.get("perm_axes"),
               fx_data.get("cuts"), merged["fxfuse"], merged["torch-pruning"],
               merged["torch.fx"], rounds, merged["fxfuse, new"])


def pooled(timings: list[Timing]) -> Timing:
    """One tool's rounds as one timing: every round's calls; the cold call (with its import and
    module count) of the round whose cold wall time is the median; a round without timings
    (an error, a timeout) makes the whole a status."""
    failed = next((t for t in timings if not t.laps or t.cold is None), None)
    if failed is not None:
        return failed
    by_cold = sorted(timings, key=lambda t: t.cold.wall_s if t.cold else 0.0)
    mid = by_cold[(len(by_cold) - 1) // 2]
    return Timing(cold=mid.cold, import_s=mid.import_s, modules=mid.modules,
                  laps=tuple(lap for t in timings for lap in t.laps))


# -- reporting ----------------------------------------------------------------------------------
def fmt_count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _per_tp(timing: Timing, row: Row) -> float | None:
    """``timing``'s median over torch-pruning's on the same model (None without both)."""
    fx, tp = timing.median_s, row.tp.median_s
    return None if fx is None or tp is None or tp == 0 else fx / tp


def ratio(row: Row) -> float | None:
    return _per_tp(row.fxfuse, row)


def new_ratio(row: Row) -> float | None:
    return _per_tp(row.fx_new, row)


def trace_ratio(row: Row) -> float | None:
    return _per_tp(row.fx_trace, row)


def render_table(rows: list[Row]) -> str:
    lines = [
        "| model | rounds x calls | groups | permutable axes | cuts | fxfuse cold | fxfuse median (min) "
        "[CPU] | torch-pruning cold | torch-pruning median (min) [CPU] | fxfuse / tp (medians) "
        "| fxfuse, new architecture each call: median (min) [CPU] | new / tp "
        "| torch.fx trace alone median (min) [CPU] | trace alone / tp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{r.model} (large)" if r.large else r.model
        q = ratio(r)
        lines.append(
            f"| {name} | {r.rounds} x {r.repeats} | {fmt_count(r.groups)} | {fmt_count(r.perm_axes)} | "
            f"{fmt_count(r.cuts)} | {r.fxfuse.cold_cell()} | {r.fxfuse.cell()} | "
            f"{r.tp.cold_cell()} | {r.tp.cell()} | {'-' if q is None else f'{q:.2f}x'} | "
            f"{r.fx_new.cell()} | {'-' if (n := new_ratio(r)) is None else f'{n:.2f}x'} | "
            f"{r.fx_trace.cell()} | {'-' if (t := trace_ratio(r)) is None else f'{t:.2f}x'} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    out = []
    row = next((r for r in rows if r.model == TARGET_MODEL), None)
    if row is None:
        out.append(f"- ResNet-50 discovery under {TARGET_SECONDS:g} s: not evaluated "
                   f"({TARGET_MODEL} was not in this run)")
    elif row.fxfuse.median_s is None:
        out.append(f"- ResNet-50 discovery under {TARGET_SECONDS:g} s: FAIL ({row.fxfuse.status})")
    else:
        fx = row.fxfuse.median_s
        out.append(f"- ResNet-50 discovery under {TARGET_SECONDS:g} s: "
                   f"{'PASS' if fx < TARGET_SECONDS else 'FAIL'} (median {fmt_seconds(fx)}; cold, "
                   f"import + first call: {row.fxfuse.cold_cell()})")
    both = [r for r in rows if ratio(r) is not None]
    fx_only = [r.model for r in rows if r.fxfuse.median_s is not None and r.tp.median_s is None]
    fx_failed = [r.model for r in rows if r.fxfuse.median_s is None]
    slower = [r for r in both if (ratio(r) or 0.0) > 1.0]
    faster = [r for r in both if (ratio(r) or 0.0) <= 1.0]
    cold_slower = [r for r in both if r.fxfuse.cold is not None and r.tp.cold is not None
                   and r.fxfuse.cold.wall_s > r.tp.cold.wall_s]
    if not both:
        out.append("- No slower than torch-pruning's build_dependency, per model: not evaluated "
                   "(no model timed by both tools)")
    else:
        ratios = [ratio(r) or 0.0 for r in both]
        verdict = "PASS" if not slower else "FAIL"
        line = (f"- No slower than torch-pruning's `build_dependency` on every model both tools "
                f"build (per model, medians; fxfuse's calls after its first: the same model "
                f"discovered again, its spec from the memo after the trace (and the recording, where the "
                f"shapes do not say it all)): "
                f"**{verdict}**: fxfuse is slower on {len(slower)} of "
                f"{len(both)} models (fxfuse / tp from {min(ratios):.2f}x to {max(ratios):.2f}x, "
                f"median {statistics.median(ratios):.2f}x)")
        if faster:
            line += ("; at or below torch-pruning on: "
                     + ", ".join(f"{r.model} ({ratio(r):.2f}x)" for r in faster))
        cpu_slower = [r for r in both if (r.fxfuse.median_cpu_s or 0.0) > (r.tp.median_cpu_s
                                                                          or 0.0)]
        line += (f". By median CPU time (less sensitive to the shared machine's load) fxfuse is "
                 f"slower on {len(cpu_slower)} of {len(both)}; cold (import + first call), on "
                 f"{len(cold_slower)} of {len(both)}.")
        out.append(line)
        news = [r for r in both if new_ratio(r) is not None]
        if news:
            new_ratios = [new_ratio(r) or 0.0 for r in news]
            new_slower = [r for r in news if (new_ratio(r) or 0.0) > 1.0]
            new_faster = [r for r in news if (new_ratio(r) or 0.0) <= 1.0]
            line = (f"- The same, each call discovering a new architecture (fxfuse's spec memo "
                    f"emptied before every call: every axis related again, as on the first call "
                    f"of an architecture in a process): **{'PASS' if not new_slower else 'FAIL'}**"
                    f": fxfuse is slower on {len(new_slower)} of {len(news)} models (new / tp "
                    f"from {min(new_ratios):.2f}x to {max(new_ratios):.2f}x, median "
                    f"{statistics.median(new_ratios):.2f}x)")
            if new_faster:
                line += ("; at or below torch-pruning on: "
                         + ", ".join(f"{r.model} ({new_ratio(r):.2f}x)" for r in new_faster))
            out.append(line + ".")
    timed_fx = [r for r in rows if r.fxfuse.median_s is not None]
    if timed_fx:
        low = min(timed_fx, key=lambda r: r.fxfuse.median_s or 0.0)
        low_s = low.fxfuse.median_s or 0.0
        out.append(f"- fxfuse's fixed cost under {fmt_seconds(FIXED_COST_S)} (at most its smallest "
                   f"warm median, {low.model}: {fmt_seconds(low_s)}): "
                   f"{'PASS' if low_s < FIXED_COST_S else '**FAIL**'}")
    floor = [r for r in rows if trace_ratio(r) is not None]
    above = [r for r in floor if (trace_ratio(r) or 0.0) > 1.0]
    if floor:
        out.append(f"- The floor of tracing with torch.fx: torch's own `Tracer().trace` alone (no "
                   f"fxfuse code) is slower than torch-pruning's whole `build_dependency` on "
                   f"{len(above)} of {len(floor)} models"
                   + (": " + ", ".join(f"{r.model} ({trace_ratio(r):.2f}x)" for r in above)
                      if above else "")
                   + ". On those, a discovery that runs fx's symbolic trace on every call can "
                   "not be at or below torch-pruning, however fast the rest of it is.")
    if fx_only:
        out.append("- Not compared (torch-pruning has no timing: its status is in the table): "
                   + ", ".join(fx_only))
    if fx_failed:
        out.append("- fxfuse gave no timing on: " + ", ".join(fx_failed))
    return out


def render_section(rows: list[Row], args: argparse.Namespace, total_s: float) -> str:
    run_kind = (
        "quick smoke run (1 repeat)"
        if args.quick
        else (
            f"after the cold call, {REPEATS_SMALL} calls for small models and "
            f"{REPEATS_LARGE} for large ones (the same number for every tool); this in "
            f"{args.rounds} rounds: {args.rounds} child processes per tool and model, "
            "interleaved (A B C, C B A, ...), whose calls are pooled (the median of "
            f"{args.rounds * REPEATS_SMALL} or {args.rounds * REPEATS_LARGE} calls) and whose "
            "median cold call is shown"
        )
    )
    if args.models:
        run_kind += f"; models restricted to `{args.models}`"
    parts = [
        BEGIN,
        "## Discovery time",
        "",
        command_line(COMMAND),
        "",
        f"- Date: {datetime.date.today().isoformat()}; commit {revision_note(args.revision)}",
        machine_line(args.threads, f"fxfuse {version_of('fxfuse')}",
                     f"torch-pruning {version_of('torch-pruning')}"),
        f"- Method: for every zoo model (`models.names()` and `models.names(\"large\")`, "
        f"{len(rows)} models), each tool runs in its own fresh child process (alternating which "
        "tool goes first): the process imports torch and the zoo, builds the model and its example "
        "inputs, then times *cold* = importing the tool plus its first call (with the number "
        "of Python modules loaded meanwhile; where fxfuse's cold call spends its time is in "
        "the discovery-profile section), then " + run_kind + ". fxfuse: `fxfuse.find_groups(model, inputs)` "
        "end to end (tracing, shape recording, discovery, spec build); torch-pruning: "
        "`tp.DependencyGraph().build_dependency(model, example_inputs=inputs)`; fxfuse, new "
        "architecture each call (its own child processes too): the same calls with "
        "`fxfuse.groups.clear_spec_cache()` before each (not timed), so no call finds the "
        "model's spec in the memo (`fxfuse.groups.memo`: a spec kept per exact form of the "
        "traced model, its recorded values, rules, called modules and state_dict; the plain "
        "fxfuse column's calls after the first find it there, after tracing, and without "
        "recording where every op's output shape follows from its inputs' shapes, the inputs' "
        "shapes and dtypes then standing in for the recorded values: so on every zoo model but "
        "leaf_mlp, whose user leaf module is recorded); "
        "torch.fx (a "
        "reference, in its own child process too): `torch.fx.Tracer().trace(model)` alone "
        "(retried with `proxy_buffer_attributes=True` where the plain trace fails, as fxfuse "
        "does), the symbolic trace fxfuse's discovery starts from, without fxfuse's code. Cells: wall-time "
        "median (min) [median CPU time of the process, all threads]; no garbage collection is "
        "forced between the timed calls (each pays for the collections it triggers, the garbage "
        "of the call before it included). fxfuse's warm calls reuse what it keeps per process "
        "across calls, each a bounded table of answers that depend only on their key: role plans "
        "and rule relations per op form (target class, shapes, dtypes, arguments), fx's node-name "
        "candidate per target, torch's Tensor-method answer per function; its first call fills "
        "them (in the *cold* column), a model with new op forms fills more. A tool slower than "
        f"{args.timeout:g} s on its first call is skipped. `OMP_WAIT_POLICY=PASSIVE` is set by the "
        "script (unless already set) because spin-waiting OpenMP threads made 2-thread timings "
        "swing by 10x on this VM. Python bytecode caching: " + (
            "off (`PYTHONDONTWRITEBYTECODE`): every cold import compiles fxfuse from source"
            if sys.dont_write_bytecode else "on (cold imports read cached `.pyc` files)")
        + ". *groups* = `len(spec.groups)`, *permutable axes* = number of "
        "`(key, axis)` in `spec.axes` with a non-empty `.groups`, *cuts* = `len(spec.cuts)`.",
        "- Targets (issue 2): ResNet-50 discovery under 1 s, and no slower than torch-pruning's "
        "`build_dependency` on the same model; the second is judged here on every model both "
        "tools build. Issue 21: fxfuse at or below torch-pruning on every model, and its fixed "
        "cost (bounded above by its smallest warm median) under 2 ms.",
        load_line(args.load_start, total_s),
        "",
        render_table(rows),
        "",
        "Verdicts:",
        "",
        *verdicts(rows),
        END,
    ]
    return "\n".join(parts) + "\n"


# -- entry point --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS_PATH.name}")
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat per model")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="skip a tool slower than this on its first try"
    )
    parser.add_argument(
        "--threads", type=int, default=NUM_THREADS, help=f"torch.set_num_threads (default: {NUM_THREADS})"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"child processes per tool and model (default: {ROUNDS})")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write and (args.models or args.quick or args.threads != NUM_THREADS
                       or args.rounds != ROUNDS):
        parser.error(
            f"--write records the full run only ({COMMAND}); drop --models/--quick/--threads/"
            "--rounds"
        )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def selected_models(spec: str) -> list[str]:
    import models

    if not spec:
        return models.names() + models.names("large")
    chosen = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in models.ZOO]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {sorted(models.ZOO)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.repeats, args.timeout, args.threads)
    start = time.perf_counter()
    args.load_start = load_average()
    args.revision = fxfuse_revision()
    names = selected_models(args.models)
    rows = []
    for i, name in enumerate(names):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name, i, 1 if args.quick else 0, args.timeout, args.threads,
                                1 if args.quick else args.rounds))
        r = rows[-1]
        print(f"  fxfuse {r.fxfuse.cell()}, torch-pruning {r.tp.cell()}", file=sys.stderr,
              flush=True)
    section = render_section(rows, args, time.perf_counter() - start)
    print(section)
    if args.write:
        write_section(section, BEGIN, END)
        print(f"wrote {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
