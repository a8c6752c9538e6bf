"""Benchmark: permutation-group discovery time over the reference zoo.

For every zoo model (the small ones and the large ``resnet50`` / ``vit_b``) this times

* ``fxfuse.find_groups(model, inputs)`` end to end (tracing + shape recording + discovery), and
* torch-pruning's ``tp.DependencyGraph().build_dependency(model, example_inputs=inputs)``
  (a benchmark-only extra: ``pip install --no-deps torch-pruning``),

reporting the median of N repeats after one warm-up run (N=5 for small models, 3 for large ones),
plus the spec's group / permutable-axis / cut counts.  The warm-up run is the "first attempt": a
tool that takes longer than ``--timeout`` seconds on it is skipped for that model.

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
import importlib.metadata
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

# With OpenMP's default spin-waiting, 2-thread torch ops on the 2-vCPU benchmark VM went through
# multi-second phases ~10-40x slower (a 256x256 matmul: 10 ms -> 400 ms), swamping the figures;
# sleep-waiting keeps them stable.  Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import fxfuse  # noqa: E402
import models  # noqa: E402
from benchmarks._report import RESULTS_PATH, cpu_name, write_section  # noqa: E402

BEGIN = "<!-- discovery:begin -->"
END = "<!-- discovery:end -->"
COMMAND = "python benchmarks/discovery.py --write"

REPEATS_SMALL = 5
REPEATS_LARGE = 3
NUM_THREADS = 2
TARGET_MODEL = "resnet50"
TARGET_SECONDS = 1.0


class BenchTimeout(Exception):
    """Raised by :func:`time_limit` when a guarded call runs too long."""


@dataclass
class Timing:
    """Outcome of timing one tool on one model: a median in seconds, or a short status text."""

    median_s: float | None = None
    min_s: float | None = None
    status: str = ""

    def cell(self) -> str:
        if self.median_s is None or self.min_s is None:
            return self.status
        return f"{fmt_seconds(self.median_s)} ({fmt_seconds(self.min_s)})"


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


# -- timing helpers -----------------------------------------------------------------------------
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


def time_once(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def short_error(exc: BaseException, limit: int = 80) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def measure(fn: Callable[[], Any], repeats: int, timeout: float, label: str) -> Timing:
    """One guarded warm-up run, then the median of ``repeats`` timed runs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with time_limit(timeout):
                time_once(fn)
            times = [time_once(fn) for _ in range(repeats)]
    except BenchTimeout as exc:
        return Timing(status=str(exc))
    except Exception as exc:  # any failure is a table entry, not a crash
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        print(f"[{label}] raised {summary}", file=sys.stderr)
        traceback.print_exc(limit=-4, file=sys.stderr)
        return Timing(status=f"error: {short_error(exc)}")
    return Timing(median_s=statistics.median(times), min_s=min(times))


# -- the two tools ------------------------------------------------------------------------------
def import_torch_pruning() -> ModuleType | None:
    try:
        import torch_pruning
    except Exception:  # a broken install counts as not installed
        return None
    return torch_pruning


def bench_model(name: str, repeats: int, timeout: float, tp: ModuleType | None) -> Row:
    entry = models.ZOO[name]
    large = "large" in entry.tags
    n = repeats if repeats > 0 else (REPEATS_LARGE if large else REPEATS_SMALL)
    inputs = entry.example_inputs()

    model = entry.factory()
    spec_box: list[fxfuse.PermutationSpec] = []

    def run_fxfuse() -> None:
        spec_box[:] = [fxfuse.find_groups(model, inputs)]

    fx_timing = measure(run_fxfuse, n, timeout, f"fxfuse {name}")
    groups = perm_axes = cuts = None
    if spec_box:
        spec = spec_box[-1]
        groups = len(spec.groups)
        perm_axes = sum(1 for axis_spec in spec.axes.values() if axis_spec.groups)
        cuts = len(spec.cuts)

    if tp is None:
        tp_timing = Timing(status="not installed")
    else:
        tp_model = entry.factory()  # fresh copy: build_dependency runs the model in train mode

        def run_tp() -> None:
            tp.DependencyGraph().build_dependency(tp_model, example_inputs=inputs)

        tp_timing = measure(run_tp, n, timeout, f"torch-pruning {name}")

    return Row(name, large, n, groups, perm_axes, cuts, fx_timing, tp_timing)


# -- reporting ----------------------------------------------------------------------------------
def fmt_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def fmt_count(value: int | None) -> str:
    return "-" if value is None else str(value)


def ratio_cell(row: Row) -> str:
    fx, tp = row.fxfuse.median_s, row.tp.median_s
    if fx is None or tp is None or tp == 0:
        return "-"
    return f"{fx / tp:.2f}x"


def render_table(rows: list[Row]) -> str:
    lines = [
        "| model | repeats | groups | permutable axes | cuts | fxfuse find_groups, median (min) | "
        "torch-pruning build_dependency, median (min) | fxfuse / tp (medians) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{r.model} (large)" if r.large else r.model
        lines.append(
            f"| {name} | {r.repeats} | {fmt_count(r.groups)} | {fmt_count(r.perm_axes)} | "
            f"{fmt_count(r.cuts)} | {r.fxfuse.cell()} | {r.tp.cell()} | {ratio_cell(r)} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    row = next((r for r in rows if r.model == TARGET_MODEL), None)
    if row is None:
        return [f"- Targets not evaluated: {TARGET_MODEL} was not in this run."]
    fx, tp = row.fxfuse.median_s, row.tp.median_s
    out = []
    if fx is None:
        out.append(f"- ResNet-50 discovery under {TARGET_SECONDS:g} s: FAIL ({row.fxfuse.status})")
    else:
        ok = fx < TARGET_SECONDS
        out.append(
            f"- ResNet-50 discovery under {TARGET_SECONDS:g} s: {'PASS' if ok else 'FAIL'} "
            f"(median {fmt_seconds(fx)})"
        )
    if fx is None or tp is None:
        why = row.fxfuse.status if fx is None else f"torch-pruning: {row.tp.status}"
        out.append(f"- ResNet-50 no slower than torch-pruning build_dependency: N/A ({why})")
    else:
        ok = fx <= tp
        out.append(
            f"- ResNet-50 no slower than torch-pruning build_dependency: "
            f"{'PASS' if ok else 'FAIL'} (fxfuse {fmt_seconds(fx)} vs torch-pruning "
            f"{fmt_seconds(tp)}, {fx / tp:.2f}x)"
        )
    return out


def render_section(rows: list[Row], args: argparse.Namespace, tp: ModuleType | None) -> str:
    tp_version = "not installed"
    if tp is not None:
        try:
            tp_version = importlib.metadata.version("torch-pruning")
        except importlib.metadata.PackageNotFoundError:
            tp_version = str(getattr(tp, "__version__", "unknown"))
    run_kind = (
        "quick smoke run (1 repeat)"
        if args.quick
        else (
            f"median of {REPEATS_SMALL} repeats for small models and {REPEATS_LARGE} for large "
            "ones, after one warm-up run"
        )
    )
    if args.models:
        run_kind += f"; models restricted to `{args.models}`"
    parts = [
        BEGIN,
        "## Discovery time",
        "",
        f"Command: `{COMMAND}`",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {os.cpu_count()}-core CPU ({cpu_name()}), "
        f"`torch.set_num_threads({args.threads})`, "
        f"`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}`, torch {torch.__version__}, "
        f"Python {platform.python_version()}, torch-pruning {tp_version}",
        f"- Method: wall time of `fxfuse.find_groups(model, inputs)` end to end (tracing, shape "
        "recording, discovery, spec build) and of torch-pruning's "
        "`tp.DependencyGraph().build_dependency(model, example_inputs=inputs)` on the same "
        f"zoo model and inputs; {run_kind}. A tool slower than {args.timeout:g} s on its first "
        "attempt is skipped. `OMP_WAIT_POLICY=PASSIVE` is set by the script (unless already "
        "set) because spin-waiting OpenMP threads made 2-thread timings swing by 10x on this VM. "
        "*groups* = `len(spec.groups)`, *permutable axes* = number of "
        "`(key, axis)` in `spec.axes` with a non-empty `.groups`, *cuts* = `len(spec.cuts)`.",
        "- Targets: ResNet-50 discovery under 1 s, and no slower than torch-pruning's "
        "`build_dependency` on the same model.",
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
        "--threads", type=int, default=NUM_THREADS, help="torch.set_num_threads (default: 2)"
    )
    args = parser.parse_args(argv)
    if args.write and (args.models or args.quick or args.threads != NUM_THREADS):
        parser.error(
            f"--write records the full run only ({COMMAND}); drop --models/--quick/--threads"
        )
    return args


def selected_models(spec: str) -> list[str]:
    if not spec:
        return models.names() + models.names("large")
    chosen = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in models.ZOO]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {sorted(models.ZOO)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = selected_models(args.models)
    tp = import_torch_pruning()
    rows = []
    for name in names:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name, 1 if args.quick else 0, args.timeout, tp))
    section = render_section(rows, args, tp)
    print(section)
    if args.write:
        write_section(section, BEGIN, END)
        print(f"wrote {RESULTS_PATH.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
