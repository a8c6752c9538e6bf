"""Benchmark: weight-matching time of two ResNet-50s, fxfuse vs the ``rebasin`` package.

Two random-init ResNet-50s (``models.zoo.resnet50(seed=0)`` and ``seed=1``, 1000 classes,
example input ``1x3x224x224``) are aligned by

* fxfuse: ``fxfuse.fuse([a, b], x, align=fxfuse.WeightMatching(), progress=False,
  report=report)``; the align step's time is the ``align-weights`` entry of
  ``report.timings``, and the whole ``fuse`` call is timed too (discovery, merge, verify);
* rebasin (a benchmark-only extra: ``pip install --no-deps rebasin`` plus its light imports
  ``tqdm torchview graphviz``, also with ``--no-deps``): ``PermutationCoordinateDescent(a, b,
  input_data_b=x)`` (graph tracing / permutation set-up) and ``pcd.rebasin()`` (coordinate
  descent, 100 iterations at most, then permuting ``b`` in place).  It runs in a child process
  killed after ``--rebasin-timeout`` seconds (default 300), reported as a timeout.

Both tools solve the same problem (Git Re-Basin weight matching), so next to the times the
script reports how far each one brought ``b`` to ``a``: the L2 distance ``||theta_a - P(theta_b)||``
over the floating-point state (parameters and BatchNorm statistics), before and after.

Run from the repository root::

    python benchmarks/matching_speed.py            # print the section
    python benchmarks/matching_speed.py --write    # also update benchmarks/RESULTS.md
    python benchmarks/matching_speed.py --quick    # smoke run (1 fxfuse run, 60 s rebasin limit)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping
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
    cpu_name,
    fxfuse_revision,
    load_average,
    revision_note,
    version_of,
    write_section,
)
from fxfuse.assignment import WarmAssignment  # noqa: E402
from fxfuse.passes import FusionReport  # noqa: E402
from models.zoo import resnet50  # noqa: E402

BEGIN = "<!-- matching-speed:begin -->"
END = "<!-- matching-speed:end -->"
COMMAND = "python benchmarks/matching_speed.py --write"

NUM_THREADS = 2
SEEDS = (0, 1)
INPUT_SHAPE = (1, 3, 224, 224)
TARGET_SECONDS = 10.0
REPEATS = 3
SKIP_REPEATS_OVER = 3.0  # no more repeats once a run's align pass exceeds 3x the target
REBASIN_TIMEOUT = 300.0
REBASIN_EXTRAS = "pip install --no-deps rebasin tqdm torchview graphviz"


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


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds >= 1.0 else f"{seconds * 1e3:.0f} ms"


# -- fxfuse -------------------------------------------------------------------------------------
@dataclass
class FxRun:
    fuse_s: float
    timings: list[tuple[str, float]]
    distance_after: float
    laps: dict[int, tuple[int, float, float]]  # size -> (number solved, seconds, first solve's)

    def pass_s(self, name: str) -> float | None:
        return next((s for n, s in self.timings if n == name), None)


@contextlib.contextmanager
def count_laps() -> Iterator[dict[int, tuple[int, float, float]]]:
    """Count and time the linear assignments of fxfuse's weight matching, by size.

    Instrumentation only: wraps ``fxfuse.assignment.WarmAssignment.solve`` (the warm start, the
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


def run_fxfuse(a: nn.Module, b: nn.Module, x: torch.Tensor,
               config: fxfuse.WeightMatching | None = None) -> FxRun:
    report = FusionReport()
    gc.collect()
    with count_laps() as laps:
        start = time.perf_counter()
        fxfuse.fuse([a, b], x, align=config or fxfuse.WeightMatching(), progress=False,
                    report=report)
        elapsed = time.perf_counter() - start
    assert report.spec is not None and report.perms is not None
    aligned_b = fxfuse.permute(b, report.spec, report.perms[1])
    return FxRun(elapsed, list(report.timings),
                 state_distance(a.state_dict(), aligned_b.state_dict(), param_keys(a)),
                 dict(laps))


# -- rebasin (child process) --------------------------------------------------------------------
def rebasin_worker() -> int:
    """Child process: run rebasin on the same models, print one JSON line with the timings."""
    torch.set_num_threads(NUM_THREADS)
    from rebasin import PermutationCoordinateDescent

    a, b, x = make_models()
    ref = {k: v.clone() for k, v in a.state_dict().items()}
    before = state_distance(ref, b.state_dict(), param_keys(a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        pcd = PermutationCoordinateDescent(a, b, input_data_b=x)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        pcd.rebasin()
        rebasin_s = time.perf_counter() - start
    after = state_distance(ref, b.state_dict(), param_keys(a))
    print(json.dumps({"init_s": init_s, "rebasin_s": rebasin_s, "distance_before": before,
                      "distance_after": after}))
    return 0


@dataclass
class RebasinRun:
    status: str = ""
    init_s: float | None = None
    rebasin_s: float | None = None
    distance_after: float | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_rebasin(timeout: float) -> RebasinRun:
    if version_of("rebasin") == "not installed":
        return RebasinRun(status=f"not installed (`{REBASIN_EXTRAS}`)")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rebasin-worker"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO_ROOT, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return RebasinRun(status=f"timeout (> {timeout:g} s, killed)",
                          wall_s=time.perf_counter() - start)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(proc.stderr[-4000:], file=sys.stderr)
        return RebasinRun(status=f"error: {tail[:120]}", wall_s=wall)
    data = json.loads(lines[-1])
    return RebasinRun(init_s=data["init_s"], rebasin_s=data["rebasin_s"],
                      distance_after=data["distance_after"], wall_s=wall, extra=data)


# -- reporting ----------------------------------------------------------------------------------
def render_section(fx_runs: list[FxRun], exact: FxRun | None, rb: RebasinRun,
                   distance_before: float,
                   n_groups: int, spec_info: str, diag: LapDiagnosis | None,
                   args: argparse.Namespace, total_s: float) -> str:
    aligns = [r.pass_s("align-weights") or 0.0 for r in fx_runs]
    fuses = [r.fuse_s for r in fx_runs]
    align_med, fuse_med = statistics.median(aligns), statistics.median(fuses)
    discover = statistics.median([r.pass_s("discover") or 0.0 for r in fx_runs])
    fx_dist = fx_runs[-1].distance_after
    if args.quick:
        runs = "quick smoke run: 1 fxfuse run"
    elif len(fx_runs) < REPEATS:
        runs = (f"{len(fx_runs)} fxfuse run (up to {REPEATS}; no repeats once the align pass "
                f"takes over {SKIP_REPEATS_OVER:g}x the target)")
    else:
        runs = f"{len(fx_runs)} fxfuse runs (median, min-max shown)"
    laps = fx_runs[-1].laps
    lap_total = sum(t for _, t, _ in laps.values())
    lap_cells = ", ".join(f"{n}x{n}: {c} solves, {t:.2f} s (the first: {first:.2f} s)"
                          for n, (c, t, first) in sorted(laps.items()))
    n_solves = sum(c for c, _, _ in laps.values())
    lap_line = (
        f"- fxfuse breakdown (last default run, instrumented): {n_solves} linear assignments "
        f"(`scipy.optimize.linear_sum_assignment`, {n_groups} groups; a group is re-solved only "
        f"when a neighbour changed; from 256 on, each re-solve is warm-started from the duals of "
        f"the group's last solve, so a group's first solve is its slow one) took "
        f"{lap_total:.1f} s of solver time (in up to 2 worker "
        f"threads, overlapping the cost computations) in the "
        f"{fmt_seconds(fx_runs[-1].pass_s('align-weights'))} align pass; by size: {lap_cells}.")
    if diag is not None:
        rank1 = diag.top_singular[0] > 10 * diag.top_singular[1]
        lap_line += (
            f" The largest cost matrix ({diag.size}x{diag.size}) "
            f"{'is dominated by one rank-1 term' if rank1 else 'has'} (singular values "
            f"{diag.top_singular[0]:.0f}, then {diag.top_singular[1]:.0f}): scipy solves it in "
            f"{diag.raw_s:.2f} s as given, "
            f"{diag.centred_s:.2f} s double-centred, {diag.fxfuse_cold_s:.2f} s as fxfuse's cold "
            f"start (centred, reduced by 50 auction rounds' prices; same optimum: "
            f"{'yes' if diag.same_objective else 'NO'}), re-timed after the runs.")
    rb_total = (None if rb.init_s is None or rb.rebasin_s is None else rb.init_s + rb.rebasin_s)

    def spread(values: list[float]) -> str:
        if len(values) == 1:
            return fmt_seconds(values[0])
        return (f"{fmt_seconds(statistics.median(values))} "
                f"({fmt_seconds(min(values))}-{fmt_seconds(max(values))})")

    rb_status = f" ({rb.status})" if rb.status else ""
    lines = [
        "| tool | set-up (tracing / discovery) | weight matching | whole call | "
        f"parameter distance to A after (before: {distance_before:.2f}) |",
        "|---|---:|---:|---:|---:|",
        f"| fxfuse {version_of('fxfuse')} `fuse(..., align=WeightMatching())` | "
        f"{fmt_seconds(discover)} | **{spread(aligns)}** | {spread(fuses)} | {fx_dist:.2f} |",
        *([] if exact is None else [
            f"| fxfuse {version_of('fxfuse')} `WeightMatching(tol=0)` (exact fixed point, 1 run) "
            f"| {fmt_seconds(exact.pass_s('discover'))} | {fmt_seconds(exact.pass_s('align-weights'))}"
            f" | {fmt_seconds(exact.fuse_s)} | {exact.distance_after:.2f} |"]),
        f"| rebasin {version_of('rebasin')} `PermutationCoordinateDescent` + `.rebasin()` | "
        f"{fmt_seconds(rb.init_s) if rb.init_s is not None else rb.status} | "
        f"{fmt_seconds(rb.rebasin_s) if rb.rebasin_s is not None else '-'} | "
        f"{fmt_seconds(rb_total) if rb_total is not None else '-'} | "
        f"{'-' if rb.distance_after is None else f'{rb.distance_after:.2f}'} |",
    ]
    ok = align_med < TARGET_SECONDS
    verdicts = [
        f"- fxfuse ResNet-50 weight matching under {TARGET_SECONDS:g} s: "
        f"{'PASS' if ok else 'FAIL'} (align-weights pass {fmt_seconds(align_med)} median; whole "
        f"`fuse` call {fmt_seconds(fuse_med)})",
    ]
    if rb.rebasin_s is not None and rb_total is not None:
        verdicts.append(
            f"- vs rebasin on the same models in the same run: fxfuse's align pass "
            f"{fmt_seconds(align_med)} vs rebasin's `rebasin()` {fmt_seconds(rb.rebasin_s)} "
            f"(fxfuse / rebasin = {align_med / rb.rebasin_s:.2f}x; whole calls "
            f"{fmt_seconds(fuse_med)} vs {fmt_seconds(rb_total)}, {fuse_med / rb_total:.2f}x); "
            f"distance to A after matching: fxfuse {fx_dist:.2f}, rebasin {rb.distance_after:.2f} "
            f"(before {distance_before:.2f}; lower is a better match)")
    else:
        verdicts.append(f"- vs rebasin: no timing{rb_status}")
    parts = [
        BEGIN,
        "## Weight-matching speed: ResNet-50",
        "",
        f"Command: `{COMMAND}`",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {os.cpu_count()}-core CPU ({cpu_name()}), "
        f"`torch.set_num_threads({NUM_THREADS})`, "
        f"`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}`, torch {torch.__version__}, "
        f"Python {platform.python_version()}, fxfuse {version_of('fxfuse')} at commit "
        f"{revision_note(args.revision)}, rebasin {version_of('rebasin')} "
        f"(torchview {version_of('torchview')})",
        "- Method: two random-init ResNet-50s (`models.zoo.resnet50(seed=0)` and `seed=1`, "
        "1000 classes, BatchNorm statistics randomised by the zoo), example input "
        "`randn(1, 3, 224, 224)`. fxfuse: `fxfuse.fuse([a, b], x, align=WeightMatching(), "
        "progress=False, report=report)`, the permutations read from `report.perms`; *weight matching* is the `align-weights` entry of `report.timings`, "
        "*set-up* the `discover` entry (tracing + group discovery), *whole call* includes merge "
        f"and verify; {runs}. rebasin: in a child process with the same thread settings, "
        "*set-up* = `PermutationCoordinateDescent(a, b, input_data_b=x)`, *weight matching* = "
        "`pcd.rebasin()` (<= 100 coordinate-descent iterations, then permuting `b` in place), "
        f"one run, killed after {args.rebasin_timeout:g} s. *distance to A* = L2 norm of "
        "`theta_a - P(theta_b)` over the parameters (what weight matching minimises; both tools "
        "permute the BatchNorm statistics along, neither matches on them). fxfuse's default "
        f"`WeightMatching()` stops at the first sweep that shortens the squared distance by "
        f"< {fxfuse.WeightMatching().tol:g} of its value; the `tol=0` row runs to the exact fixed "
        f"point (no group changes). {spec_info}",
        f"- Target: fxfuse's align-weights pass under {TARGET_SECONDS:g} s on ResNet-50; "
        "rebasin side by side (expected 42-170 s on this CPU).",
        f"- Total run time of the command: {total_s:.0f} s; 1-minute load average at start / "
        f"end: {args.load_start} / {load_average()} (the 2 cores may be shared with other jobs).",
        "",
        *lines,
        "",
        lap_line,
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
                        help="smoke run: 1 fxfuse run, rebasin limited to 60 s")
    parser.add_argument("--rebasin-timeout", type=float, default=None,
                        help=f"kill rebasin after this many seconds (default {REBASIN_TIMEOUT:g})")
    parser.add_argument("--skip-rebasin", action="store_true", help="time fxfuse only")
    parser.add_argument("--rebasin-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rebasin_timeout is None:
        args.rebasin_timeout = 60.0 if args.quick else REBASIN_TIMEOUT
    if args.write and (args.quick or args.skip_rebasin or args.rebasin_timeout != REBASIN_TIMEOUT):
        parser.error(f"--write records the full run only ({COMMAND})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rebasin_worker:
        return rebasin_worker()
    torch.set_num_threads(NUM_THREADS)
    start = time.perf_counter()
    args.load_start = load_average()
    args.revision = fxfuse_revision()
    a, b, x = make_models()
    distance_before = state_distance(a.state_dict(), b.state_dict(), param_keys(a))
    spec = fxfuse.find_groups(a, x)
    spec_info = (f"ResNet-50 spec: {len(spec.groups)} permutation groups, "
                 f"{sum(g.size for g in spec.groups)} permuted channels.")
    fx_runs = []
    for i in range(1 if args.quick else REPEATS):
        print(f"fxfuse weight matching, run {i + 1} ...", file=sys.stderr, flush=True)
        fx_runs.append(run_fxfuse(a, b, x))
        print(f"  {fx_runs[-1].timings}", file=sys.stderr, flush=True)
        if (fx_runs[-1].pass_s("align-weights") or 0.0) > SKIP_REPEATS_OVER * TARGET_SECONDS:
            break  # far over the target: repeats would only add minutes, not information
    exact = None
    if not args.quick:
        print("fxfuse weight matching, tol=0 (exact fixed point) ...", file=sys.stderr, flush=True)
        exact = run_fxfuse(a, b, x, fxfuse.WeightMatching(tol=0.0))
        print(f"  {exact.timings}", file=sys.stderr, flush=True)
    if args.skip_rebasin:
        rb = RebasinRun(status="skipped (--skip-rebasin)")
    else:
        print(f"rebasin (timeout {args.rebasin_timeout:g} s) ...", file=sys.stderr, flush=True)
        rb = run_rebasin(args.rebasin_timeout)
        print(f"  {rb}", file=sys.stderr, flush=True)
    diag = lap_diagnosis()
    section = render_section(fx_runs, exact, rb, distance_before, len(spec.groups), spec_info,
                             diag, args, time.perf_counter() - start)
    print(section)
    if args.write:
        write_section(section, BEGIN, END)
        print(f"wrote {RESULTS_PATH.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
