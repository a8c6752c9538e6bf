"""What every benchmark script shares: where its section of RESULTS.md goes, and the run's facts
(commit, machine, versions, load) that the section records."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "RESULTS.md"
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


def fxfuse_revision() -> str:
    """The repository commit the run used, marked when fxfuse/ or models/ had local changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fxfuse", "models"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not rev:
        return "unknown"
    return f"{rev} (with uncommitted changes in fxfuse/ or models/)" if dirty else rev


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
