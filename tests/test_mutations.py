"""The mutation check (tests/mutations): every planted bug still applies to the code, and the
short list is caught by the tests named for it.  The full list: ``python -m tests.mutations``."""

from __future__ import annotations

from pathlib import Path

import pytest

from .mutations import MUTATIONS, SHORT, Mutation, StaleMutationError, by_name, check_fresh, run


def test_every_mutation_still_applies() -> None:
    """A snippet that no longer matches the code must fail here, not pass silently later."""
    check_fresh(MUTATIONS)
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert set(SHORT) <= {m.name for m in MUTATIONS}


def test_a_stale_mutation_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "f.py").write_text("x = 1\nx = 1\n")
    for old in ("y = 2", "x = 1"):  # not found; found twice
        with pytest.raises(StaleMutationError, match="stale"):
            check_fresh([Mutation("m", "f.py", old, "x = 3", ("tests",))], tmp_path)
    with pytest.raises(StaleMutationError, match="does not exist"):
        check_fresh([Mutation("m", "nope.py", "x", "y", ("tests",))], tmp_path)


def test_short_list_is_caught() -> None:
    """Each mutation in a fresh copy of the repository, its tests in a pytest subprocess (the
    unmutated run is the suite itself), two at a time (CI has 2 cores)."""
    outcomes = run(by_name(SHORT), baseline=False, timeout=300, workers=2)
    report = "\n".join(f"{o.verdict}: {o.name} {o.failed[:2]}\n{o.tail if o.verdict != 'caught' else ''}"
                       for o in outcomes)
    assert [o.verdict for o in outcomes] == ["caught"] * len(SHORT), report
