"""Benchmark: where ``fxfuse.find_groups`` spends its time, stage by stage, cold and warm.

For each profiled model (every zoo model, the large ones included, and the zoo's DenseNet built
with the block layouts of DenseNet-121 and -201: the concat-heavy deep case) a fresh child process
imports torch, imports fxfuse and ``fxfuse.groups`` (timed), then the zoo, builds the model, then
times ``fxfuse.find_groups(model, inputs)`` end to end, once *cold* (the first call in the process)
and then ``--repeats`` times *warm* (median), split into the stages that ``find_groups`` runs:

* **trace**: ``torch.fx`` symbolic tracing (``fxfuse.trace.trace_graph``; on models with cuts,
  also the second trace that names the cuts' source lines),
* **record**: shape recording on the example inputs (``fxfuse.trace.record_values``),
* **rules**: the driver walking the graph once and applying each node's axis rule to the atom
  table, union-find included (``_Driver.__init__`` and ``_Driver.run``),
* **spec**: building, resolving and freezing the spec (``build_spec``) and its lint,
* **other**: the rest of the end-to-end time (input checks, the calls between stages).

The stages are timed by wrapping those functions in the child process, so the figure is the real
``find_groups`` call, not a re-implementation of it. The same process then times torch-pruning's
``DependencyGraph().build_dependency`` on the model (one untimed call, then ``--repeats`` timed:
median) where it is installed, so each stage can be set against torch-pruning's whole build: the
summary counts the models where fxfuse's warm call is slower, where it would still be slower
without its trace, and where it would be without its trace and its recording (no tracer or
recorder, however fast, brings those under torch-pruning). Each cold stage also says how many
Python modules it imported. With ``--baseline REV`` the same children also run on the library and
zoo of commit ``REV`` (extracted with ``git archive`` into a temporary folder), side by side in the
same run, so a change can be judged before / after on the same machine load.

Run from the repository root::

    python benchmarks/discovery_profile.py                    # print the table
    python benchmarks/discovery_profile.py --baseline a5fc753 --write   # also update RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/discovery.py

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._report import (  # noqa: E402
    command_line,
    fmt_seconds,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    revision_note,
    run_child,
    write_section,
)

BEGIN = "<!-- discovery-profile:begin -->"
END = "<!-- discovery-profile:end -->"
# the baseline: main before this session's issue-21 changes (GraphTrace, atom-table cache, ...)
COMMAND = "python benchmarks/discovery_profile.py --baseline 0837e25 --write"
NUM_THREADS = 1  # discovery is Python-bound; one thread is steadier on the shared 2 cores
ROUNDS = 3  # child processes per model and code version (see main)
REPEATS = 5
STAGES = ("trace", "record", "rules", "spec", "other")
# labels that are not zoo names: label -> (zoo name, factory keyword arguments); every other
# label is a zoo name, built with its defaults
LAYOUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "densenet-121 layout": ("densenet", {"block_layers": (6, 12, 24, 16)}),
    "densenet-201 layout": ("densenet", {"block_layers": (6, 12, 48, 32)}),
}


def profiled() -> list[str]:
    """The labels of a full run: every zoo model (``models.names()``), the large ones, then the
    DenseNet layouts."""
    import models

    return [*models.names(), *models.names("large"), *LAYOUTS]


# -- the child process ----------------------------------------------------------------------------
class StageClock:
    """Accumulates wall time and imported-module counts per stage while installed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.modules: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._active: str | None = None

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.modules = dict.fromkeys(STAGES, 0)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_stage(*args: Any, **kwargs: Any) -> Any:
            if self._active is not None:  # nested: counted in the outer stage
                return fn(*args, **kwargs)
            self._active = stage
            n0, t0 = len(sys.modules), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t0
                self.modules[stage] += len(sys.modules) - n0
                self._active = None

        return timed_stage


def install(clock: StageClock) -> None:
    """Wrap the stage functions that ``find_groups`` calls (by the names it looks them up by)."""
    import importlib

    groups = importlib.import_module("fxfuse.groups")
    disc = importlib.import_module("fxfuse.groups.discover")  # `groups.discover` is the function

    # the trace is ``trace_graph`` since it stopped compiling a GraphModule (older code and
    # baselines: ``symbolic_trace``); find_groups traces and records itself since the spec memo
    # (its own names for both), discovery where it is called without a graph
    trace = "trace_graph" if hasattr(disc, "trace_graph") else "symbolic_trace"
    patches = [(disc, trace, "trace"), (disc, "record_values", "record"),
               (groups, "trace_graph", "trace"), (groups, "record_values", "record"),
               (disc._Driver, "__init__", "rules"), (disc._Driver, "run", "rules"),
               (groups, "build_spec", "spec"), (groups.PermutationSpec, "lint", "spec")]
    for owner, attr, stage in patches:
        if hasattr(owner, attr):
            setattr(owner, attr, clock.wrap(stage, getattr(owner, attr)))


def one_call(clock: StageClock, fn: Callable[[], Any]) -> tuple[dict[str, float], dict[str, int]]:
    clock.reset()
    n0, t0, c0 = len(sys.modules), time.perf_counter(), time.process_time()
    fn()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    seconds = dict(clock.seconds)
    seconds["other"] = max(0.0, total - sum(seconds.values()))
    seconds["total"] = total
    seconds["cpu"] = cpu
    modules = dict(clock.modules)
    modules["other"] = len(sys.modules) - n0 - sum(modules.values())
    return seconds, modules


def worker(label: str, root: str, repeats: int, threads: int) -> int:
    sys.path.insert(0, root)  # the library and zoo under test (this checkout or a baseline)
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    import fxfuse  # before the zoo, which imports parts of fxfuse (models/leaf.py)
    import fxfuse.groups

    import_s = time.perf_counter() - t0
    import models

    name, kwargs = LAYOUTS.get(label, (label, {}))
    entry = models.get(name)
    model, inputs = entry.factory(**kwargs), entry.example_inputs()
    assert str(Path(fxfuse.__file__).resolve()).startswith(str(Path(root).resolve()))
    clock = StageClock()
    install(clock)
    holder: dict[str, Any] = {}

    def call() -> None:
        holder["spec"] = fxfuse.find_groups(model, inputs)

    gc.collect()
    cold, cold_modules = one_call(clock, call)

    # the spec memo (code that has one) emptied before each warm call, not timed: each relates
    # every axis again, as the first call of an architecture in a process does
    forget = getattr(fxfuse.groups, "clear_spec_cache", lambda: None)
    warm_runs = []
    for _ in range(repeats):  # no forced collection: each call pays for what it triggers
        forget()
        warm_runs.append(one_call(clock, call)[0])
    warm = {k: statistics.median(r[k] for r in warm_runs) for k in (*STAGES, "total", "cpu")}
    spec = holder["spec"]
    tp_s, tp_status = torch_pruning_build(model, inputs, repeats)
    print(json.dumps({"import_s": import_s, "cold": cold, "cold_modules": cold_modules,
                      "warm": warm, "nodes": sum(1 for _ in spec_nodes(model)),
                      "groups": len(spec.groups), "cuts": len(spec.cuts),
                      "tp_s": tp_s, "tp_status": tp_status}))
    return 0


def torch_pruning_build(model: Any, inputs: Any, repeats: int) -> tuple[float | None, str]:
    """The median of ``repeats`` calls of torch-pruning's ``build_dependency`` on the model
    after an untimed first one (its imports and caches), or None and why."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        return None, f"torch-pruning not installed ({exc.name})"

    def build() -> None:
        tp.DependencyGraph().build_dependency(model, example_inputs=inputs)

    laps = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build()
            for _ in range(repeats):  # as fxfuse's warm calls: no forced collection
                t0 = time.perf_counter()
                build()
                laps.append(time.perf_counter() - t0)
    except Exception as exc:  # torch-pruning's own failure (e.g. on channel shuffles)
        return None, f"torch-pruning error: {type(exc).__name__}"
    return statistics.median(laps), ""


def spec_nodes(model: Any) -> Iterator[Any]:
    from fxfuse.trace import symbolic_trace

    yield from symbolic_trace(model, stack_traces=False).graph.nodes


# -- the parent -----------------------------------------------------------------------------------
@dataclass
class Result:
    label: str
    code: str  # "this checkout" or the baseline revision
    data: dict[str, Any] = field(default_factory=dict)
    status: str = ""


@contextlib.contextmanager
def baseline_tree(rev: str | None) -> Iterator[Path | None]:
    """The ``fxfuse`` and ``models`` packages of commit ``rev`` in a temporary folder."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="fxfuse-baseline-") as tmp:
        archive = subprocess.run(["git", "archive", rev, "fxfuse", "models"], cwd=REPO_ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def profile(label: str, code: str, root: Path, repeats: int, threads: int) -> Result:
    child = run_child([str(Path(__file__).resolve()), "--worker", label, "--root", str(root),
                       "--repeats", str(repeats), "--threads", str(threads)], timeout=600)
    if child.data is None:
        return Result(label, code, status=child.status)
    return Result(label, code, child.data)


def pooled(results: list[Result]) -> Result:
    """One model and code version over its rounds: per stage, the median of the rounds' cold
    times and of their warm medians (and of the import times); a round that failed makes the
    whole its status."""
    failed = next((r for r in results if not r.data), None)
    if failed is not None:
        return failed
    first = results[0]
    data = dict(first.data)
    for part in ("cold", "warm"):
        data[part] = {k: statistics.median(r.data[part][k] for r in results)
                      for k in first.data[part]}
    data["import_s"] = statistics.median(r.data["import_s"] for r in results)
    tp = [r.data.get("tp_s") for r in results]
    data["tp_s"] = statistics.median(tp) if None not in tp else None  # type: ignore[type-var]
    data["tp_status"] = next((r.data.get("tp_status") for r in results
                              if r.data.get("tp_status")), "") or ""
    return Result(first.label, first.code, data)


def cell(stages: dict[str, float], key: str) -> str:
    return fmt_seconds(stages[key])


def render_table(results: list[Result]) -> str:
    head = ("| model | graph nodes | groups | code | import fxfuse | cold total | "
            + " | ".join(f"cold {s}" for s in STAGES) + " | modules imported by the cold call "
            "(record) | warm total | warm CPU | " + " | ".join(f"warm {s}" for s in STAGES)
            + " | torch-pruning warm | warm / tp | rules + spec / tp |")
    lines = [head, "|---|---:|---:|---|" + "---:|" * (8 + 2 * len(STAGES))]
    for r in results:
        if not r.data:
            lines.append(f"| {r.label} | - | - | {r.code} | {r.status} |"
                         + " - |" * (7 + 2 * len(STAGES)))  # 22 columns in all
            continue
        d = r.data
        mods = d["cold_modules"]
        lines.append(
            f"| {r.label} | {d['nodes']} | {d['groups']} | {r.code} | "
            f"{fmt_seconds(d['import_s'])} | **{cell(d['cold'], 'total')}** | "
            + " | ".join(cell(d["cold"], s) for s in STAGES)
            + f" | {sum(mods.values())} ({mods['record']}) | **{cell(d['warm'], 'total')}** | "
            + (cell(d["warm"], "cpu") if "cpu" in d["warm"] else "-") + " | "
            + " | ".join(cell(d["warm"], s) for s in STAGES) + " | " + tp_cells(d) + " |")
    return "\n".join(lines)


def tp_cells(d: dict[str, Any]) -> str:
    tp = d.get("tp_s")
    if tp is None:
        return f"{d.get('tp_status') or '-'} | - | -"
    warm = d["warm"]
    return (f"{fmt_seconds(tp)} | {warm['total'] / tp:.2f}x | "
            f"{(warm['rules'] + warm['spec']) / tp:.2f}x")


def floor_lines(results: list[Result]) -> list[str]:
    """Against torch-pruning, timed in the same processes (this checkout's rows): where the
    warm call (a new architecture) is slower, where it would still be slower without its trace,
    and without its trace and recording."""
    rows = [r for r in results if r.code == "this checkout" and r.data
            and r.data.get("tp_s")]
    if not rows:
        return []
    n = len(rows)

    def over(part: Callable[[dict[str, float]], float]) -> list[tuple[str, float]]:
        return [(r.label, part(r.data["warm"]) / r.data["tp_s"]) for r in rows
                if part(r.data["warm"]) > r.data["tp_s"]]

    def names(found: list[tuple[str, float]]) -> str:
        return ", ".join(f"{label} ({x:.2f}x)" for label, x in found) or "none"

    total = over(lambda w: w["total"])
    untraced = over(lambda w: w["total"] - w["trace"])
    walk = over(lambda w: w["total"] - w["trace"] - w["record"])
    ratios = sorted(r.data["warm"]["total"] / r.data["tp_s"] for r in rows)
    skipped = [r.label for r in results if r.code == "this checkout" and r.data
               and not r.data.get("tp_s")]
    out = [
        f"- Against torch-pruning's `build_dependency`, timed in the same processes ({n} models "
        f"it builds; warm medians, a new architecture each fxfuse call): fxfuse is slower on "
        f"{len(total)} of {n} (warm / tp from {ratios[0]:.2f}x to {ratios[-1]:.2f}x, median "
        f"{statistics.median(ratios):.2f}x): {names(total)}",
        f"- Without its trace (warm total minus the trace stage: as if tracing cost nothing) "
        f"fxfuse would still be slower on {len(untraced)} of {n}: {names(untraced)}",
        f"- Without its trace and its recording (its rules, spec and the rest: as if a tracer "
        f"recorded the shapes as it traced, at no cost) still slower on {len(walk)} of {n}: "
        f"{names(walk)}. On these no tracer or recorder, however fast, makes a new "
        "architecture's discovery as fast as torch-pruning's; the axis walk and the spec "
        "build must be faster too",
    ]
    if skipped:
        out.append(f"- Not compared (torch-pruning has no timing, see the table): "
                   f"{', '.join(skipped)}")
    return out


def summary(results: list[Result], baseline: str | None) -> list[str]:
    out = []
    here = {r.label: r for r in results if r.code == "this checkout" and r.data}
    if baseline is not None:
        base = {r.label: r for r in results if r.code != "this checkout" and r.data}
        for label, r in here.items():
            b = base.get(label)
            if b is None:
                continue
            out.append(
                f"- {label}: cold {fmt_seconds(b.data['cold']['total'])} -> "
                f"{fmt_seconds(r.data['cold']['total'])} (record "
                f"{fmt_seconds(b.data['cold']['record'])} -> "
                f"{fmt_seconds(r.data['cold']['record'])}); warm "
                f"{fmt_seconds(b.data['warm']['total'])} -> "
                f"{fmt_seconds(r.data['warm']['total'])}")
    for label, r in here.items():
        warm = r.data["warm"]
        top = max(STAGES, key=lambda s: warm[s])
        out.append(f"- {label} (this checkout): the largest warm stage is {top} "
                   f"({fmt_seconds(warm[top])} of {fmt_seconds(warm['total'])})")
    return out


def render_section(results: list[Result], args: argparse.Namespace, total_s: float) -> str:
    codes = "this checkout" + (f" and commit `{args.baseline}` (baseline, from `git archive`)"
                               if args.baseline else "")
    parts = [
        BEGIN,
        "## Discovery profile by stage (issue 21)",
        "",
        command_line(COMMAND if args.baseline == "0837e25" else
                     f"python benchmarks/discovery_profile.py --baseline {args.baseline} --write"),
        "",
        f"- Date: {datetime.date.today().isoformat()}; commit {revision_note(args.revision)}; "
        f"code profiled: {codes}",
        machine_line(args.threads),
        f"- Method: {args.rounds} fresh child processes per model and code version, "
        "interleaved (the code version that goes first alternates by model and by round); each "
        "row is the median over them of each cell. Each process imports torch, then fxfuse and "
        "`fxfuse.groups` (*import fxfuse*; before the zoo, which imports parts of it), then the "
        "zoo, builds the model, then times "
        "`fxfuse.find_groups(model, inputs)` once *cold* (first call in the process) and "
        f"{args.repeats} times *warm* (median per stage; *warm CPU*: the process's CPU time of "
        "the whole call; no collection forced between calls; where the code has a spec memo, "
        "`fxfuse.groups.clear_spec_cache()` before each, not timed, so every warm call relates "
        "every axis as a new architecture does), each call split into stages by "
        "wrapping the functions find_groups calls: *trace* (`trace_graph`, `symbolic_trace` in "
        "code before it, incl. the re-trace that names cuts' source lines), *record* (`record_values`: shapes on the example inputs), *rules* "
        "(`_Driver`: one walk applying every node's axis rule, union-find included), *spec* "
        "(`build_spec` + `lint`), *other* (the rest of the end-to-end time). The DenseNet rows "
        "are the zoo's `densenet` with the block layouts of DenseNet-121 (6, 12, 24, 16) and -201 "
        "(6, 12, 48, 32) on its 32x32 inputs. *graph nodes*: nodes of the symbolic trace. "
        "Warm calls reuse fxfuse's per-process tables (role plans and rule relations per op "
        "form, node-name candidates, Tensor-method answers: see the discovery-time section); "
        "the cold call fills them. *torch-pruning warm*: in the same process after fxfuse's "
        "calls, `tp.DependencyGraph().build_dependency(model, example_inputs=inputs)` once "
        f"untimed, then {args.repeats} times (median; over the rounds, the median); *warm / tp*: "
        "fxfuse's warm total over it; *rules + spec / tp*: the axis walk and the spec build "
        "alone over it.",
        load_line(args.load_start, total_s),
        "",
        render_table(results),
        "",
        "Summary (before -> after where a baseline ran):",
        "",
        *summary(results, args.baseline),
        "",
        "The floor, against torch-pruning:",
        "",
        *floor_lines(results),
        END,
    ]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--baseline", default=None,
                        help="also profile the fxfuse and zoo of this commit, side by side")
    parser.add_argument("--models", default="", help="comma-separated labels (default: all)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="warm calls per model")
    parser.add_argument("--threads", type=int, default=NUM_THREADS)
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"child processes per model and code version (default: {ROUNDS})")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(REPO_ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write and (args.models or args.repeats != REPEATS or args.threads != NUM_THREADS
                       or args.rounds != ROUNDS):
        parser.error(f"--write records the full run only ({COMMAND})")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.root, args.repeats, args.threads)
    known = profiled()
    labels = [s.strip() for s in args.models.split(",") if s.strip()] or known
    unknown = [s for s in labels if s not in known]
    if unknown:
        raise SystemExit(f"unknown model label(s) {unknown}; known: {known}")
    start = time.perf_counter()
    args.load_start = load_average()
    args.revision = fxfuse_revision()
    results: list[Result] = []
    with baseline_tree(args.baseline) as base:
        for i, label in enumerate(labels):
            runs = [("this checkout", REPO_ROOT)]
            if base is not None:
                runs.append((args.baseline, base))
            rounds: dict[str, list[Result]] = {code: [] for code, _ in runs}
            for r in range(args.rounds):
                # alternate which code runs first, by model and by round
                for code, root in (runs if (i + r) % 2 == 0 else runs[::-1]):
                    print(f"profiling {label} ({code}, round {r + 1}) ...", file=sys.stderr,
                          flush=True)
                    rounds[code].append(profile(label, code, root, args.repeats, args.threads))
            results += [pooled(got) for got in rounds.values()]
    results.sort(key=lambda r: (labels.index(r.label), r.code != "this checkout"))
    section = render_section(results, args, time.perf_counter() - start)
    print(section)
    if args.write:
        write_section(section, BEGIN, END)
        print("wrote benchmarks/RESULTS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
