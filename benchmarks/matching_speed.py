"""Benchmark: weight-matching time of two ResNet-50s, fxfuse vs the ``rebasin`` package.

Two random-init ResNet-50s (``models.zoo.resnet50(seed=0)`` and ``seed=1``, 1000 classes,
example input ``1x3x224x224``) are weight-matched (Git Re-Basin's permutation coordinate descent)
by three configurations, each run cold in its own fresh child process (the timed call is the first
of its kind in that process), the same number of times (3), round-robin so that a change in the
machine's load hits all three alike:

* fxfuse at its default stopping rule: ``fxfuse.fuse([a, b], x, align=fxfuse.WeightMatching())``
  (stops at the first sweep that shortens the squared distance by < ``tol=1e-3`` of its value);
* fxfuse at Git Re-Basin's rule: ``WeightMatching(tol=0)`` (until a sweep changes no group);
* rebasin at its default (a benchmark-only extra: ``pip install --no-deps rebasin`` plus its light
  imports ``tqdm torchview graphviz``, also with ``--no-deps``): ``PermutationCoordinateDescent(a,
  b, input_data_b=x)`` (graph tracing / permutation set-up), ``pcd.calculate_permutations()``
  (until an iteration makes no progress, 100 iterations at most: the same rule as ``tol=0``) and
  ``pcd.apply_permutations()``.  A child past ``--rebasin-timeout`` seconds (default 300) is killed.

For each: wall and CPU time of set-up, matching and the whole call, the number of sweeps
(iterations), and the L2 distance ``||theta_a - P(theta_b)||`` over the parameters reached (what
weight matching minimises), so a faster time that stops at a worse distance shows as such.
One more instrumented fxfuse run in this process breaks its time down by assignment size.

Run from the repository root::

    python benchmarks/matching_speed.py            # print the section
    python benchmarks/matching_speed.py --write    # also update benchmarks/RESULTS.md
    python benchmarks/matching_speed.py --quick    # smoke run (1 run each, 60 s rebasin limit)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Same reason as benchmarks/discovery.py: spin-waiting OpenMP threads made 2-thread timings swing by
# 10x on the 2-vCPU benchmark VM.  Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
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
from fxfuse.passes import FusionReport  # noqa: E402
from fxfuse.solvers.assignment import WarmAssignment  # noqa: E402
from models.zoo import resnet50  # noqa: E402

BEGIN = "<!-- matching-speed:begin -->"
END = "<!-- matching-speed:end -->"
COMMAND = "python benchmarks/matching_speed.py --write"

NUM_THREADS = 2
SEEDS = (0, 1)
INPUT_SHAPE = (1, 3, 224, 224)
TARGET_SECONDS = 10.0
REPEATS = 3
FXFUSE_TIMEOUT = 300.0
REBASIN_TIMEOUT = 300.0
REBASIN_MAX_ITER = 100  # PermutationCoordinateDescent.calculate_permutations' default
REBASIN_EXTRAS = "pip install --no-deps rebasin tqdm torchview graphviz"


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    rule: str


CONFIGS = (
    Config("fxfuse-default", "fxfuse `fuse(..., align=WeightMatching())` (default)",
           f"first sweep shortening the squared distance by < {fxfuse.WeightMatching().tol:g} "
           "of it"),
    Config("fxfuse-exact", "fxfuse `WeightMatching(tol=0)`", "until a sweep changes no group"),
    Config("rebasin", "rebasin `PermutationCoordinateDescent` (default)",
           f"until an iteration makes no progress, at most {REBASIN_MAX_ITER} iterations"),
)


# -- shared helpers -----------------------------------------------------------------------------
def make_models() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(INPUT_SHAPE, generator=gen)
    return resnet50(seed=SEEDS[0]), resnet50(seed=SEEDS[1]), x


def state_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                   keys: set[str]) -> float:
    """L2 distance between two state_dicts over the entries ``keys`` (the parameters: what
    weight matching minimises; both tools permute the BatchNorm statistics along, neither
    matches on them)."""
    total = 0.0
    for key in keys:
        total += float((a[key].double() - b[key].double()).square().sum())
    return total**0.5


def param_keys(model: nn.Module) -> set[str]:
    return {k for k, _ in model.named_parameters()}


# -- child processes: one cold run of one configuration -------------------------------------------
def fxfuse_worker(tol: float | None) -> dict[str, Any]:
    """One ``fuse`` call with weight matching, the first in this process."""
    import fxfuse.align.weights as align_mod

    a, b, x = make_models()
    sweeps = [0]
    original_progress = align_mod.progress

    def counting(items: Iterable[Any], label: str, enabled: bool,
                 total: int | None = None) -> Iterator[Any]:
        for item in original_progress(items, label, enabled, total):
            if label == "weight matching sweeps":
                sweeps[0] += 1
            yield item

    align_laps: list[Lap] = []
    original_call = align_mod.AlignWeights.call

    def timed_call(self: Any, state: Any) -> None:
        _, lap = timed(lambda: original_call(self, state))
        align_laps.append(lap)

    align_mod.progress = counting  # type: ignore[assignment]
    align_mod.AlignWeights.call = timed_call  # type: ignore[method-assign]
    config = fxfuse.WeightMatching() if tol is None else fxfuse.WeightMatching(tol=tol)
    report = FusionReport()
    gc.collect()
    _, whole = timed(lambda: fxfuse.fuse([a, b], x, align=config, progress=False, report=report))
    assert report.spec is not None and report.perms is not None
    aligned_b = fxfuse.permute(b, report.spec, report.perms[1])
    discover = next(s for n, s in report.timings if n == "discover")
    return {"setup": [discover, None], "match": [align_laps[0].wall_s, align_laps[0].cpu_s],
            "whole": [whole.wall_s, whole.cpu_s], "sweeps": sweeps[0],
            "distance_after": state_distance(a.state_dict(), aligned_b.state_dict(),
                                             param_keys(a))}


def rebasin_worker() -> dict[str, Any]:
    """Set-up, permutation search and application of rebasin, the first in this process."""
    from rebasin import PermutationCoordinateDescent

    a, b, x = make_models()
    ref = {k: v.clone() for k, v in a.state_dict().items()}
    iterations = [0]
    original_step = PermutationCoordinateDescent._calculate_permutations_step

    def counting_step(self: Any, loop: Any) -> bool:
        iterations[0] += 1
        return bool(original_step(self, loop))

    PermutationCoordinateDescent._calculate_permutations_step = counting_step  # type: ignore
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()
        pcd, setup = timed(lambda: PermutationCoordinateDescent(a, b, input_data_b=x))
        _, match = timed(lambda: pcd.calculate_permutations(REBASIN_MAX_ITER))
        _, apply = timed(pcd.apply_permutations)
    return {"setup": [setup.wall_s, setup.cpu_s], "match": [match.wall_s, match.cpu_s],
            "whole": [setup.wall_s + match.wall_s + apply.wall_s,
                      setup.cpu_s + match.cpu_s + apply.cpu_s],
            "sweeps": iterations[0],
            "distance_after": state_distance(ref, b.state_dict(), param_keys(a))}


def worker(key: str) -> int:
    torch.set_num_threads(NUM_THREADS)
    if key == "rebasin":
        out = rebasin_worker()
    else:
        out = fxfuse_worker(0.0 if key == "fxfuse-exact" else None)
    print(json.dumps(out))
    return 0


@dataclass
class Run:
    """One child's figures (seconds; CPU seconds where measured)."""

    setup_s: float
    match: Lap
    whole: Lap
    sweeps: int
    distance_after: float


@dataclass
class Result:
    config: Config
    runs: list[Run] = field(default_factory=list)
    status: str = ""

    def med(self, attr: str) -> float | None:
        if not self.runs:
            return None
        values = [getattr(r, attr) for r in self.runs]
        return statistics.median(v if isinstance(v, float) else v.wall_s for v in values)

    def med_cpu(self, attr: str) -> float | None:
        return statistics.median(getattr(r, attr).cpu_s for r in self.runs) if self.runs else None

    def spread(self, attr: str) -> str:
        if not self.runs:
            return "-"
        walls = [getattr(r, attr).wall_s for r in self.runs]
        text = fmt_seconds(statistics.median(walls))
        if len(walls) > 1:
            text += f" ({fmt_seconds(min(walls))}-{fmt_seconds(max(walls))})"
        return f"{text} [CPU {fmt_seconds(self.med_cpu(attr))}]"

    def distances(self) -> str:
        if not self.runs:
            return "-"
        values = sorted({round(r.distance_after, 2) for r in self.runs})
        return " / ".join(f"{v:.2f}" for v in values)

    def sweep_cell(self) -> str:
        if not self.runs:
            return "-"
        values = sorted({r.sweeps for r in self.runs})
        return " / ".join(str(v) for v in values)


def run_config(config: Config, timeout: float) -> Run | str:
    if config.key == "rebasin" and version_of("rebasin") == "not installed":
        return f"not installed (`{REBASIN_EXTRAS}`)"
    child = run_child([str(Path(__file__).resolve()), "--worker", config.key], timeout)
    if child.data is None:
        return child.status
    d = child.data
    return Run(d["setup"][0], Lap(*d["match"]), Lap(*d["whole"]), d["sweeps"],
               d["distance_after"])


# -- instrumented run in this process -------------------------------------------------------------
@contextlib.contextmanager
def count_laps() -> Iterator[dict[int, tuple[int, float, float]]]:
    """Count and time the linear assignments of fxfuse's weight matching, by size.

    Instrumentation only: wraps ``fxfuse.solvers.assignment.WarmAssignment.solve`` (the warm start, the
    call to scipy's ``linear_sum_assignment`` and the duals for the next solve) for the duration,
    adding two ``perf_counter`` calls per solve.
    """
    original = WarmAssignment.solve
    laps: dict[int, tuple[int, float, float]] = {}

    def timed(self: WarmAssignment, key: Hashable, cost: torch.Tensor) -> torch.Tensor:
        if cost.shape[0] > LARGEST_COST[0].shape[0]:  # kept for lap_diagnosis()
            LARGEST_COST[0] = cost.detach().double().cpu().clone()
        start = time.perf_counter()
        out = original(self, key, cost)
        took = time.perf_counter() - start
        count, seconds, first = laps.get(cost.shape[0], (0, 0.0, took))
        laps[cost.shape[0]] = (count + 1, seconds + took, first)
        return out

    WarmAssignment.solve = timed  # type: ignore[method-assign]
    try:
        yield laps
    finally:
        WarmAssignment.solve = original  # type: ignore[method-assign]


LARGEST_COST: list[torch.Tensor] = [torch.zeros(0, 0)]


@dataclass
class LapDiagnosis:
    size: int
    raw_s: float
    centred_s: float
    fxfuse_cold_s: float
    same_objective: bool
    top_singular: tuple[float, float]


def lap_diagnosis() -> LapDiagnosis | None:
    """Time scipy's solver on the largest cost matrix of the fxfuse run, as given and
    double-centred (row and column means removed: every assignment's total changes by the same
    constant, so the optimum is the same), and fxfuse's cold start on it (``WarmAssignment``'s
    first solve of a key: centred, reduced by an auction's prices, then scipy)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    cost = LARGEST_COST[0].numpy()
    if cost.size == 0:
        return None
    centred = cost - cost.mean(1, keepdims=True) - cost.mean(0, keepdims=True) + cost.mean()
    start = time.perf_counter()
    rows, cols_raw = linear_sum_assignment(cost, maximize=True)
    raw_s = time.perf_counter() - start
    start = time.perf_counter()
    _, cols_c = linear_sum_assignment(centred, maximize=True)
    centred_s = time.perf_counter() - start
    start = time.perf_counter()
    cols_f = WarmAssignment().solve("largest", LARGEST_COST[0]).numpy()
    fxfuse_cold_s = time.perf_counter() - start
    best_raw = cost[rows, cols_raw].sum()
    same = all(abs(best_raw - cost[rows, cols].sum()) <= 1e-9 * max(1.0, abs(best_raw))
               for cols in (cols_c, cols_f))
    sv = np.linalg.svd(cost, compute_uv=False)
    return LapDiagnosis(cost.shape[0], raw_s, centred_s, fxfuse_cold_s, same,
                        (float(sv[0]), float(sv[1])))


def instrumented_run(a: nn.Module, b: nn.Module, x: torch.Tensor
                     ) -> tuple[float | None, dict[int, tuple[int, float, float]]]:
    """One more default fxfuse run (not one of the timed runs) with every assignment timed."""
    report = FusionReport()
    gc.collect()
    with count_laps() as laps:
        fxfuse.fuse([a, b], x, align=fxfuse.WeightMatching(), progress=False, report=report)
    align_s = next((s for n, s in report.timings if n == "align-weights"), None)
    return align_s, dict(laps)


# -- reporting ----------------------------------------------------------------------------------
def lap_line(align_s: float | None, laps: dict[int, tuple[int, float, float]], n_groups: int,
             diag: LapDiagnosis | None) -> str:
    lap_total = sum(t for _, t, _ in laps.values())
    lap_cells = ", ".join(f"{n}x{n}: {c} solves, {t:.2f} s (the first: {first:.2f} s)"
                          for n, (c, t, first) in sorted(laps.items()))
    n_solves = sum(c for c, _, _ in laps.values())
    line = (
        f"- fxfuse breakdown (one more default run in the parent process, instrumented, not one of "
        f"the timed runs): {n_solves} linear assignments "
        f"(`scipy.optimize.linear_sum_assignment`, {n_groups} groups; a group is re-solved only "
        f"when a neighbour changed; from 256 on, each re-solve is warm-started from the duals of "
        f"the group's last solve, so a group's first solve is its slow one) took "
        f"{lap_total:.1f} s of solver time (in up to 2 worker threads, overlapping the cost "
        f"computations) in the {fmt_seconds(align_s)} align pass; by size: {lap_cells}.")
    if diag is not None:
        rank1 = diag.top_singular[0] > 10 * diag.top_singular[1]
        line += (
            f" The largest cost matrix ({diag.size}x{diag.size}) "
            f"{'is dominated by one rank-1 term' if rank1 else 'has'} (singular values "
            f"{diag.top_singular[0]:.0f}, then {diag.top_singular[1]:.0f}): scipy solves it in "
            f"{diag.raw_s:.2f} s as given, "
            f"{diag.centred_s:.2f} s double-centred, {diag.fxfuse_cold_s:.2f} s as fxfuse's cold "
            f"start (centred, reduced by 50 auction rounds' prices; same optimum: "
            f"{'yes' if diag.same_objective else 'NO'}), re-timed after the runs.")
    return line


def compare(fx: Result, rb: Result, what: str, distance_before: float) -> str:
    fx_t, rb_t = fx.med("match"), rb.med("match")
    fx_w, rb_w = fx.med("whole"), rb.med("whole")
    if fx_t is None or rb_t is None or fx_w is None or rb_w is None:
        why = fx.status if fx_t is None else rb.status
        return f"- {what}: not compared ({why})"
    capped = [r.sweeps for r in rb.runs if r.sweeps >= REBASIN_MAX_ITER]
    cap_note = (f" rebasin stopped at its {REBASIN_MAX_ITER}-iteration cap in {len(capped)} of "
                f"{len(rb.runs)} runs, so it did not reach its own stopping rule there."
                if capped else "")
    fx_c, rb_c = fx.med_cpu("match") or 0.0, rb.med_cpu("match") or 1.0
    return (f"- {what}: fxfuse matching {fmt_seconds(fx_t)} vs rebasin {fmt_seconds(rb_t)} "
            f"(fxfuse / rebasin = {fx_t / rb_t:.2f}x; CPU time {fmt_seconds(fx_c)} vs "
            f"{fmt_seconds(rb_c)}, {fx_c / rb_c:.2f}x; whole calls {fmt_seconds(fx_w)} vs "
            f"{fmt_seconds(rb_w)}, {fx_w / rb_w:.2f}x), medians of {len(fx.runs)} and "
            f"{len(rb.runs)} cold runs; distance to A after: fxfuse {fx.distances()} in "
            f"{fx.sweep_cell()} sweeps, rebasin {rb.distances()} in {rb.sweep_cell()} iterations "
            f"(before {distance_before:.2f}; lower is a closer match).{cap_note}")


def render_section(results: dict[str, Result], distance_before: float, spec_info: str,
                   n_groups: int, instrumented: tuple[float | None, dict[int, tuple[int, float,
                                                                                   float]]],
                   diag: LapDiagnosis | None, args: argparse.Namespace, total_s: float) -> str:
    rows = [
        "| tool (stopping rule) | cold runs | set-up (tracing / discovery) | weight matching, "
        "median (min-max) [CPU] | whole call, median (min-max) [CPU] | sweeps / iterations | "
        f"parameter distance to A after (before: {distance_before:.2f}) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results.values():
        runs = str(len(res.runs)) + (f" ({res.status})" if res.status else "")
        rows.append(
            f"| {res.config.label} ({res.config.rule}) | {runs} | "
            f"{fmt_seconds(res.med('setup_s'))} | **{res.spread('match')}** | "
            f"{res.spread('whole')} | {res.sweep_cell()} | {res.distances()} |")
    default, exact, rb = (results[c.key] for c in CONFIGS)
    verdicts = []
    align_med = default.med("match")
    if align_med is None:
        verdicts.append(f"- fxfuse ResNet-50 weight matching under {TARGET_SECONDS:g} s: FAIL "
                        f"(no timing: {default.status})")
    else:
        verdicts.append(
            f"- fxfuse ResNet-50 weight matching under {TARGET_SECONDS:g} s (default rule, cold): "
            f"{'PASS' if align_med < TARGET_SECONDS else 'FAIL'} (align-weights pass "
            f"{fmt_seconds(align_med)} median of {len(default.runs)}, CPU time "
            f"{fmt_seconds(default.med_cpu('match'))} on 2 threads; whole `fuse` call "
            f"{fmt_seconds(default.med('whole'))}; wall time, on the shared machine whose load "
            "is recorded above)")
    verdicts.append(compare(exact, rb, "Same stopping rule (until nothing changes: fxfuse "
                            "`tol=0` vs rebasin's default)", distance_before))
    verdicts.append(compare(default, rb, "Both at their defaults (fxfuse `tol=1e-3` vs rebasin)",
                            distance_before))
    repeats = 1 if args.quick else REPEATS
    parts = [
        BEGIN,
        "## Weight-matching speed: ResNet-50",
        "",
        command_line(COMMAND),
        "",
        f"- Date: {datetime.date.today().isoformat()}; commit {revision_note(args.revision)}",
        machine_line(NUM_THREADS, f"fxfuse {version_of('fxfuse')}",
                     f"rebasin {version_of('rebasin')} (torchview {version_of('torchview')})"),
        "- Method: two random-init ResNet-50s (`models.zoo.resnet50(seed=0)` and `seed=1`, "
        "1000 classes, BatchNorm statistics randomised by the zoo), example input "
        f"`randn(1, 3, 224, 224)`. Each configuration runs {repeats} time(s), each time cold in a "
        "fresh child process (imports and model construction are not timed; the timed call is "
        "the first of its kind in the process), round-robin over the configurations. fxfuse: "
        "`fxfuse.fuse([a, b], x, align=..., progress=False, report=report)`; *weight matching* = "
        "the `align-weights` pass (wall from `report.timings`, CPU by wrapping "
        "`AlignWeights.call`), *set-up* = the `discover` pass (tracing + group discovery), "
        "*whole call* includes merge and verify; sweeps counted on the matcher's progress loop. "
        "rebasin: *set-up* = `PermutationCoordinateDescent(a, b, input_data_b=x)`, *weight "
        f"matching* = `pcd.calculate_permutations({REBASIN_MAX_ITER})` (its default), *whole call* "
        "adds `pcd.apply_permutations()`; iterations counted on its step method. Killed after "
        f"{args.rebasin_timeout:g} s (rebasin) / {FXFUSE_TIMEOUT:g} s (fxfuse). *distance to A* "
        "= L2 norm of `theta_a - P(theta_b)` over the parameters (what weight matching minimises; "
        "both tools permute the BatchNorm statistics along, neither matches on them). CPU = the "
        f"child's process time, all threads. {spec_info}",
        f"- Target: fxfuse's align-weights pass under {TARGET_SECONDS:g} s on ResNet-50; rebasin "
        "side by side, compared at the same stopping rule and at both defaults.",
        load_line(args.load_start, total_s),
        "",
        *rows,
        "",
        lap_line(*instrumented, n_groups, diag),
        "",
        "Verdicts:",
        "",
        *verdicts,
        END,
    ]
    return "\n".join(parts) + "\n"


# -- entry point --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS_PATH.name}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 run each, rebasin limited to 60 s")
    parser.add_argument("--rebasin-timeout", type=float, default=None,
                        help=f"kill rebasin after this many seconds (default {REBASIN_TIMEOUT:g})")
    parser.add_argument("--skip-rebasin", action="store_true", help="time fxfuse only")
    parser.add_argument("--worker", choices=[c.key for c in CONFIGS], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rebasin_timeout is None:
        args.rebasin_timeout = 60.0 if args.quick else REBASIN_TIMEOUT
    if args.write and (args.quick or args.skip_rebasin or args.rebasin_timeout != REBASIN_TIMEOUT):
        parser.error(f"--write records the full run only ({COMMAND})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    torch.set_num_threads(NUM_THREADS)
    start = time.perf_counter()
    args.load_start = load_average()
    args.revision = fxfuse_revision()
    a, b, x = make_models()
    distance_before = state_distance(a.state_dict(), b.state_dict(), param_keys(a))
    spec = fxfuse.find_groups(a, x)
    spec_info = (f"ResNet-50 spec: {len(spec.groups)} permutation groups, "
                 f"{sum(g.size for g in spec.groups)} permuted channels.")
    results = {c.key: Result(c) for c in CONFIGS}
    if args.skip_rebasin:
        results["rebasin"].status = "skipped (--skip-rebasin)"
    for i in range(1 if args.quick else REPEATS):
        for config in CONFIGS:
            res = results[config.key]
            if res.status:  # skipped, not installed, or failed / timed out once: no repeats
                continue
            print(f"{config.key}, run {i + 1} ...", file=sys.stderr, flush=True)
            timeout = args.rebasin_timeout if config.key == "rebasin" else FXFUSE_TIMEOUT
            out = run_config(config, timeout)
            if isinstance(out, str):
                res.status = out
            else:
                res.runs.append(out)
            print(f"  {out}", file=sys.stderr, flush=True)
    print("instrumented fxfuse run ...", file=sys.stderr, flush=True)
    instrumented = instrumented_run(a, b, x)
    diag = lap_diagnosis()
    section = render_section(results, distance_before, spec_info, len(spec.groups), instrumented,
                             diag, args, time.perf_counter() - start)
    print(section)
    if args.write:
        write_section(section, BEGIN, END)
        print(f"wrote {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
