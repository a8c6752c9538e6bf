from __future__ import annotations

import pytest

#: Skip reason of every test that needs CUDA; the terminal summary counts them by it.
NEEDS_GPU = "needs a GPU (CUDA): none on this machine"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden/*.txt from the current discovery")


def pytest_configure(config: pytest.Config) -> None:
    # The tests use small tensors: one thread is as fast, and immune to a busy machine
    # (2-thread ops on a loaded 2-core VM were seen to slow down 5-30x).
    import torch

    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    """Say which tests did not run for lack of a GPU, so they do not read as coverage."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and NEEDS_GPU in str(r.longrepr[2])]
    if skipped:
        n = len(skipped)
        terminalreporter.write_sep("-", f"{n} test{'s' if n > 1 else ''} NOT run: no GPU (CUDA) "
                                        "on this machine")
        for r in skipped:
            terminalreporter.write_line(f"  {r.nodeid}")
