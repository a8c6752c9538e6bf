"""``fxfuse.passes.base.progress``: tqdm bars on terminals, quiet logs, silent when disabled."""

from __future__ import annotations

import io
import sys
import time

import pytest

from fxfuse.passes.base import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_that_is_closed_on_break(monkeypatch: pytest.MonkeyPatch) -> None:
    out = Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    for i in progress(range(10), "sweeps", True):
        if i == 3:
            break
    text = out.getvalue()
    assert "sweeps" in text and "it/s" in text and text.endswith("\n")  # closed: a newline


def test_disabled_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    out = Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    assert list(progress(range(5), "sweeps", False)) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""


def test_a_log_gets_no_bar_for_a_short_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", out)
    for _ in progress(range(50), "sweeps", True):
        time.sleep(0.001)
    assert out.getvalue() == ""
