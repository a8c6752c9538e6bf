"""What every benchmark script shares: where its section of RESULTS.md goes, the run's facts
(commit, machine, versions, load) that the section records, and timing in child processes.

Wall time on the shared 2-core machine depends on what else runs; every section therefore records
the 1-minute load average at the start and end of its run and, where it times something, the CPU
time of the timed process beside the wall time (``cpu / wall`` near the thread count means the
process had the cores; well below it, it waited for them)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where ``--write`` puts a section.  Other people may edit the checkout while a long benchmark runs;
# to measure one commit, run the script from a clean worktree of it and point this variable at the
# checkout's RESULTS.md (``command_line`` then says so in the section).
RESULTS_ENV = "FXFUSE_BENCH_RESULTS"
RESULTS_PATH = Path(os.environ.get(RESULTS_ENV) or REPO_ROOT / "benchmarks" / "RESULTS.md")
RESULTS_HEADER = (
    "# fxfuse benchmark results\n\n"
    "Every figure in this file is produced by the command named in its section; "
    "re-run that command to refresh the section (do not edit the numbers by hand).\n"
)


def write_section(section: str, begin: str, end: str, path: Path = RESULTS_PATH) -> None:
    """Replace the ``begin``...``end`` section of ``path`` (or append it), keeping the rest."""
    text = path.read_text() if path.exists() else RESULTS_HEADER
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop > start:
        rest = text[stop + len(end):].lstrip("\n")
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)


# What a benchmark's figures depend on: the library, the zoo, and the benchmark scripts.
CODE_PATHS = ("fxfuse", "models", "benchmarks/*.py")


def fxfuse_revision() -> str:
    """The repository commit the run used, marked when the library, the zoo or the benchmark
    scripts had local changes (then the commit alone does not reproduce the figures)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not rev:
        return "unknown"
    changed = sorted({line[3:].split("/")[0] + "/" for line in dirty.splitlines() if line.strip()})
    if changed:
        return f"{rev} (with uncommitted changes in {', '.join(changed)})"
    return rev


def command_line(command: str) -> str:
    """The section's command line; notes a run from a separate (clean) worktree."""
    line = f"Command: `{command}`"
    if os.environ.get(RESULTS_ENV):
        line += (f" (run in a clean `git worktree` of the commit below, with `{RESULTS_ENV}` "
                 "pointing at this file so the section lands here)")
    return line


def revision_note(start: str) -> str:
    """``start`` (the revision when the run began, whose code was imported), noting a change of
    HEAD or of local changes while the run went on (others may commit in the same checkout)."""
    end = fxfuse_revision()
    return start if end == start else f"{start} (HEAD moved to {end} during the run)"


def load_average() -> str:
    """The 1-minute load average (other processes share the 2 cores), or "n/a"."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line(threads: int, *extras: str) -> str:
    """The section's machine line: cores, CPU, thread settings, torch and Python versions."""
    import torch

    parts = [f"{os.cpu_count()}-core CPU ({cpu_name()})", f"`torch.set_num_threads({threads})`",
             f"`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}`",
             f"torch {torch.__version__}", f"Python {platform.python_version()}", *extras]
    return "- Machine: " + ", ".join(parts)


def load_line(load_start: str, total_s: float) -> str:
    """Run time and load average at start / end, and the warning that goes with them."""
    return (f"- Run time of the command: {total_s:.0f} s; 1-minute load average at start / end: "
            f"{load_start} / {load_average()}. The 2 cores are shared with other engineers' jobs "
            "(test runs): wall times are only comparable within one run, and CPU time is shown "
            "beside them.")


# -- timing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lap:
    """One timed call: wall seconds and the process's CPU seconds (all its threads)."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], T]) -> tuple[T, Lap]:
    """``fn()`` and its wall / CPU time."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, Lap(time.perf_counter() - wall0, time.process_time() - cpu0)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


@dataclass
class ChildResult:
    """What a child process printed as its last JSON line, or why there is none."""

    data: dict[str, Any] | None
    status: str
    wall_s: float


def run_child(args: Sequence[str], timeout: float) -> ChildResult:
    """Run ``python args...`` from the repository root in a fresh process (so the call it times is
    the first in that process: cold) and read the last line of its stdout that is a JSON object.
    A child past ``timeout`` seconds is killed and reported as such."""
    cmd = [sys.executable, *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO_ROOT, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return ChildResult(None, f"timeout (> {timeout:g} s, killed)",
                           time.perf_counter() - start)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(proc.stderr[-3000:], file=sys.stderr)
        return ChildResult(None, f"error: {tail[:100]}", wall)
    return ChildResult(json.loads(lines[-1]), "", wall)
