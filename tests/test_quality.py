"""ruff and mypy stay clean on the library (skipped where the tools are not installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd", [["ruff", "check", "fxfuse", "models", "tests"],
                                 [sys.executable, "-m", "mypy", "fxfuse"]])
def test_linters_are_clean(cmd: list[str]) -> None:
    tool = "mypy" if "mypy" in cmd else cmd[0]
    if shutil.which(tool) is None and tool != "mypy":
        pytest.skip(f"{tool} not installed")
    if tool == "mypy":
        pytest.importorskip("mypy")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
