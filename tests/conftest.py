from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden/*.txt from the current discovery")


def pytest_configure(config: pytest.Config) -> None:
    # The tests use small tensors: one thread is as fast, and immune to a busy machine
    # (2-thread ops on a loaded 2-core VM were seen to slow down 5-30x).
    import torch

    torch.set_num_threads(1)
